"""Benchmark: the node as the hospital sees it, on LIDC-IDRI-0002 (261 slices, 512 x 512).

1. Ingest. The same push (dcmtk storescu, one association, TCP_NODELAY=1) into dcmtk storescp and into
   the node's listener (`cad-node up`: each instance written atomically with fsync and recorded in the
   SQLite job database before success), alternating, a fresh receiver each time (the node keeps a SOP
   instance once, so every push to it goes to a fresh node with an empty data folder and a quiet period
   long enough that nothing is analysed meanwhile). Prints each time, the medians and node / storescp.
2. End to end. A dcmtk storescp acts as the PACS ("PACS", the caller the node allows and its
   destination): from the last instance received by the node to the PACS holding the SR and the SEG,
   broken down with the job database (quiet period, queue wait, each pipeline step, encoding, export),
   with the node's peak memory per process.

    .venv/bin/python benchmarks/bench_node.py [--repeats 5] [--quiet-period 2] [--timeout 300]

Prints a table and writes the figures to var/benchmarks/bench_node.json; exits 1, with the node's log,
if anything failed. A benchmark, not a test: nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.peers and tests.node_process

from pydicom import dcmread
from sqlalchemy import select

from cad_node.job_database import DeliveryStatus, Job, JobDatabase, JobStatus, Study
from cad_node.settings import Settings
from models.datasets import lidc_series_dir
from tests.node_process import RunningNode
from tests.peers import Storescp, storescu, wait_until

ROOT = Path(__file__).resolve().parents[1]
CASE = "LIDC-IDRI-0002"
PACS_AET = "PACS"
SETTLE_S = 1.0
INGEST_QUIET_S = 3600.0  # the ingest nodes never analyse during the pushes
OUTPUT = ROOT / "var" / "benchmarks" / "bench_node.json"
# What a step recorded by the worker holds besides its name, on a fresh node's first job.
STEP_NOTES = {"load series": " (first task: + loading the networks)"}
RESULT_MODALITIES = ("SR", "SEG")  # the end of the end-to-end time: both at the PACS
TOOLS = ("storescp", "storescu", "echoscu")
# docs/handbook.md section 6, measured on this kind of machine; context only, not measured here.
HANDBOOK = {
    "slices": 300,
    "megabytes": 150,
    "dcmtk_storescp_s": 0.42,
    "pynetdicom_minimal_listener_s": 1.45,
}


@dataclass(frozen=True)
class Push:
    files: list[Path]
    megabytes: float

    @property
    def slices(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Timeline:
    """Moments of one job, seconds since the epoch, from the job database (which keeps microseconds;
    `cad-node jobs show` prints them to the second)."""

    last_instance: float
    job_created: float
    job_enqueued: float
    task_received: float | None  # the analysis worker's log; None if the line is not there
    job_started: float
    job_finished: float
    delivery_recorded: float


# --- the data and the machine ---------------------------------------------------------------------


def load_push() -> Push:
    """The case's slices (the reader XML left out), read once so every push finds them in the page cache."""
    files = sorted(lidc_series_dir(CASE).glob("*.dcm"))
    size = sum(len(path.read_bytes()) for path in files)
    return Push(files, size / 1e6)


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else ""
    return {"cpu_cores": len(os.sched_getaffinity(0)), "cpu_model": model, "load_average": load_average()}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --- ingest -----------------------------------------------------------------------------------------


def settle() -> None:
    """Before a timed push: the previous receiver's files flushed to disk (so the node's fsyncs do not pay
    for storescp's unflushed writes), and the receiver just started left a moment to go idle."""
    os.sync()
    time.sleep(SETTLE_S)


def push_to_storescp(push: Push) -> float:
    with Storescp(ae_title=PACS_AET) as receiver:
        settle()
        seconds = storescu(push.files, receiver.port, receiver.ae_title, calling_aet=PACS_AET)
        kept = len(receiver.wait_for(push.slices))
    if kept != push.slices:
        raise RuntimeError(f"storescp kept {kept} of {push.slices} instances")
    return seconds


def push_to_node(push: Push) -> float:
    with RunningNode(allowed_callers=[PACS_AET], quiet_period_s=INGEST_QUIET_S) as node:
        settle()
        seconds = storescu(push.files, node.port, node.ae_title, calling_aet=PACS_AET)
        with job_database(node) as database, database.session() as session:
            recorded = session.scalar(select(Study.instance_count)) or 0
        on_disk = sum(1 for _ in (node.data_dir / "instances").rglob("*.dcm"))
    if recorded != push.slices or on_disk != push.slices:
        raise RuntimeError(f"the node recorded {recorded} and wrote {on_disk} of {push.slices} instances")
    return seconds


def measure_ingest(push: Push, repeats: int) -> dict[str, Any]:
    storescp_s: list[float] = []
    node_s: list[float] = []
    for repeat in range(1, repeats + 1):
        storescp_s.append(push_to_storescp(push))
        node_s.append(push_to_node(push))
        print(f"  push {repeat}: storescp {storescp_s[-1]:.2f} s, cad-node {node_s[-1]:.2f} s", flush=True)
    storescp_median = statistics.median(storescp_s)
    node_median = statistics.median(node_s)
    return {
        "storescp_s": rounded(storescp_s),
        "node_s": rounded(node_s),
        "ratios": [round(node / scp, 2) for scp, node in zip(storescp_s, node_s, strict=True)],
        "storescp_median_s": round(storescp_median, 3),
        "node_median_s": round(node_median, 3),
        "ratio_node_over_storescp": round(node_median / storescp_median, 2),
    }


def rounded(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


# --- end to end -------------------------------------------------------------------------------------


@contextmanager
def job_database(node: RunningNode) -> Iterator[JobDatabase]:
    """The node's job database, read from this process."""
    database = JobDatabase(Settings(data_dir=node.data_dir, database_url="").effective_database_url)
    try:
        yield database
    finally:
        database.close()


def delivered_job(node: RunningNode, database: JobDatabase) -> Callable[[], int | None]:
    """A poll: the job's id once its results are delivered everywhere; raises as soon as anything failed."""

    def poll() -> int | None:
        node.check_alive()
        with database.session() as session:
            job = session.scalar(select(Job).order_by(Job.id.desc()).limit(1))
            if job is None or job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                return None
            if job.status != JobStatus.DONE:
                raise RuntimeError(f"job {job.id} ended {job.status}: {job.reason}")
            states = [(d.destination, d.status, d.last_error) for d in job.deliveries]
        for destination, status, error in states:
            if status in (DeliveryStatus.FAILED, DeliveryStatus.RETRYING):
                raise RuntimeError(f"job {job.id}: delivery to {destination} {status}: {error}")
        return job.id if states and all(s == DeliveryStatus.DELIVERED for _, s, _ in states) else None

    return poll


def epoch(moment: dt.datetime | None) -> float:
    if moment is None:
        raise RuntimeError("the job database lacks a moment of the job")
    return moment.replace(tzinfo=dt.UTC).timestamp()


def task_received(log: str) -> float | None:
    """When the analysis worker (Celery's main process) took the analysis task off the queue: its log
    line, in local time to the millisecond."""
    found = re.search(
        r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/MainProcess\] Task \S*analyse_job\[\S+\] received",
        log,
    )
    if found is None:
        return None
    return time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000


def timeline(database: JobDatabase, job_id: int, log: str) -> Timeline:
    with database.session() as session:
        job = session.get_one(Job, job_id)
        delivered = [d.delivered_at for d in job.deliveries]
        return Timeline(
            last_instance=epoch(job.study.last_received_at),
            job_created=epoch(job.created_at),
            job_enqueued=epoch(job.enqueued_at),
            task_received=task_received(log),
            job_started=epoch(job.started_at),
            job_finished=epoch(job.finished_at),
            delivery_recorded=max(epoch(moment) for moment in delivered),
        )


def queue_wait(moments: Timeline) -> list[tuple[str, float, bool]]:
    """From the message sent to the job claimed, in two parts where the worker's log tells when it took
    the task: the broker's pickup, then the task's start in the prefork child (imports on a first task)."""
    received = moments.task_received
    if received is None:
        return [("queue wait (broker, start of the task)", moments.job_started - moments.job_enqueued, False)]
    pickup = ("queue wait: the analysis worker takes the task", received - moments.job_enqueued, False)
    start = ("queue wait: task start (first task: imports torch)", moments.job_started - received, False)
    return [pickup, start]


def breakdown(moments: Timeline, steps: list[dict[str, Any]], pacs_ack: float) -> list[dict[str, Any]]:
    """The stretch from the last instance to the PACS's acknowledgement, in parts that add up to it;
    `step` marks the analysis steps the worker recorded in the job database."""
    step_total = sum(float(step["seconds"]) for step in steps)
    parts = [
        ("quiet period and series selection", moments.job_created - moments.last_instance, False),
        ("job queued (message to the broker)", moments.job_enqueued - moments.job_created, False),
        *queue_wait(moments),
        *((str(step["name"]), float(step["seconds"]), True) for step in steps),
        (
            "job bookkeeping (claim, findings, results)",
            moments.job_finished - moments.job_started - step_total,
            False,
        ),
        ("export (export queue, C-STORE to the PACS)", pacs_ack - moments.job_finished, False),
    ]
    return [{"name": name, "seconds": round(seconds, 3), "step": step} for name, seconds, step in parts]


# --- the node's processes ---------------------------------------------------------------------------


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command.strip())
    return found


def node_processes(node: RunningNode) -> dict[str, int]:
    """The `cad-node up` process of this node and its descendants, by role."""
    table = processes()
    marker = f"--data-dir {node.data_dir} "
    roots = [pid for pid, (_, command) in table.items() if " up " in command and marker in command + " "]
    if len(roots) != 1:
        raise RuntimeError(f"cannot tell the node's process among {roots}")
    roles = {"listener and study assembly (cad-node up)": roots[0]}
    for pid, (parent, command) in table.items():
        if parent != roots[0]:
            continue
        queue = "analysis" if "--queue analysis" in command else "export"
        roles[f"{queue} worker (Celery main process)"] = pid
        for child, (grandparent, _) in table.items():
            if grandparent == pid:
                roles[f"{queue} worker child (prefork: runs the pipeline)"] = child
    return roles


def peak_memory_mb(node: RunningNode) -> dict[str, float]:
    """VmHWM (peak resident set) of each of the node's processes, in MB."""
    peaks: dict[str, float] = {}
    for role, pid in node_processes(node).items():
        status = Path(f"/proc/{pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if found:
            peaks[role] = round(int(found.group(1)) / 1024, 1)
    return peaks


def device_used(node: RunningNode) -> str:
    found = re.search(r"model \S+ loaded on (\S+) in process", node.full_log())
    return found.group(1) if found else "unknown"


def at_the_pacs(received: list[Path]) -> dict[str, tuple[int, float]]:
    """Modality -> (size, when the PACS wrote it) of each result file; storescp writes a file just
    before it acknowledges it."""
    arrived = {}
    for path in received:
        modality = str(dcmread(path, stop_before_pixels=True).Modality)
        arrived[modality] = (path.stat().st_size, path.stat().st_mtime)
    return arrived


def acknowledged(arrived: dict[str, tuple[int, float]]) -> float:
    """When the PACS had the SR and the SEG (the SR alone for a job without findings); other results
    the node may be set to send are left out."""
    if "SR" not in arrived:
        raise RuntimeError(f"the PACS received no SR (it has {sorted(arrived)})")
    return max(written for modality, (_, written) in arrived.items() if modality in RESULT_MODALITIES)


def end_to_end(push: Push, quiet_period_s: float, timeout_s: float) -> dict[str, Any]:
    with Storescp(ae_title=PACS_AET) as pacs:
        destination = f"{PACS_AET}@127.0.0.1:{pacs.port}"
        with (
            RunningNode(
                destinations=[destination], allowed_callers=[PACS_AET], quiet_period_s=quiet_period_s
            ) as node,
            job_database(node) as database,
        ):
            settle()
            push_s = storescu(push.files, node.port, node.ae_title, calling_aet=PACS_AET)
            push_returned = time.time()
            job_id = wait_until(
                delivered_job(node, database), timeout_s, interval=0.2, what="results at the PACS"
            )
            job = node.job(job_id)
            if job["study_instances"] != push.slices:
                raise RuntimeError(f"the node recorded {job['study_instances']} of {push.slices} instances")
            arrived = at_the_pacs(pacs.wait_for(len(job["results"])))
            memory = peak_memory_mb(node)
            moments = timeline(database, job_id, node.full_log())
            device = device_used(node)
    pacs_ack = acknowledged(arrived)
    return {
        "push_s": round(push_s, 3),
        "storescu_returned_after_last_instance_s": round(push_returned - moments.last_instance, 3),
        "total_s": round(pacs_ack - moments.last_instance, 2),
        "parts": breakdown(moments, job["steps"], pacs_ack),
        "delivery_recorded_after_ack_s": round(moments.delivery_recorded - pacs_ack, 3),
        "job": {
            k: job[k] for k in ("id", "status", "reason", "study_instances", "model_version", "attempts")
        },
        "results_at_the_pacs_bytes": {modality: size for modality, (size, _) in arrived.items()},
        "timeline": asdict(moments),
        "peak_memory_mb": memory,
        "device": device,
    }


# --- report -----------------------------------------------------------------------------------------


def print_ingest(push: Push, ingest: dict[str, Any]) -> None:
    print(f"\nIngest: the same push, {push.slices} slices, {push.megabytes:.1f} MB, alternating")
    print(f"  {'push':<10}{'dcmtk storescp':>16}{'cad-node up':>14}{'node / storescp':>18}")
    rows = zip(ingest["storescp_s"], ingest["node_s"], ingest["ratios"], strict=True)
    for number, (scp, node, ratio) in enumerate(rows, start=1):
        print(f"  {number:<10}{scp:>14.2f} s{node:>12.2f} s{ratio:>18.2f}")
    scp, node = ingest["storescp_median_s"], ingest["node_median_s"]
    print(f"  {'median':<10}{scp:>14.2f} s{node:>12.2f} s{ingest['ratio_node_over_storescp']:>18.2f}")
    print(f"  {'MB/s':<10}{push.megabytes / scp:>16.0f}{push.megabytes / node:>14.0f}")
    print(f"  {'ms/slice':<10}{1000 * scp / push.slices:>16.1f}{1000 * node / push.slices:>14.1f}")
    slices, mb = HANDBOOK["slices"], HANDBOOK["megabytes"]
    print(f"  from the handbook, NOT measured here ({slices} slices, {mb} MB, same kind of machine):")
    references = (
        ("dcmtk storescp", "dcmtk_storescp_s"),
        ("pynetdicom minimal", "pynetdicom_minimal_listener_s"),
    )
    for label, key in references:
        seconds = HANDBOOK[key]
        print(f"    {label:<22}{seconds:.2f} s ({1000 * seconds / slices:.1f} ms/slice)")


def print_end_to_end(e2e: dict[str, Any], quiet_period_s: float) -> None:
    print(f"\nEnd to end: {CASE} pushed by the PACS (storescu, {e2e['push_s']:.2f} s), results back to it")
    print(
        f"  from the last instance received (the node's job database; storescu returned "
        f"{e2e['storescu_returned_after_last_instance_s']:+.3f} s after it)\n"
        "  to the PACS (dcmtk storescp) having written the SR and the SEG (its acknowledgement)"
    )
    print(f"  quiet period set to {quiet_period_s:g} s for the benchmark (a hospital would use ~20 s)")
    for part in e2e["parts"]:
        name = f"  step: {part['name']}{STEP_NOTES.get(part['name'], '')}" if part["step"] else part["name"]
        print(f"  {name:<58}{part['seconds']:>8.2f} s")
    print(f"  {'total':<58}{e2e['total_s']:>8.2f} s")
    job = e2e["job"]
    sizes = ", ".join(
        f"{kind} {size / 1e3:.0f} kB" for kind, size in e2e["results_at_the_pacs_bytes"].items()
    )
    print(f"  job {job['id']}: {job['status']}, {job['reason']}; received by the PACS: {sizes}")
    print("  peak memory (VmHWM) of the node's processes:")
    for role, megabytes in e2e["peak_memory_mb"].items():
        print(f"    {role:<56}{megabytes:>8.0f} MB")


def print_header(push: Push, host: dict[str, Any]) -> None:
    print(
        f"cad-node benchmark: {CASE}, {push.slices} slices of 512 x 512, {push.megabytes:.1f} MB "
        f"({push.megabytes * 1e6 / 2**20:.0f} MiB) per push "
        "(dcmtk storescu, one association, TCP_NODELAY=1)"
    )
    print(
        f"machine: {host['cpu_cores']} CPU cores ({host['cpu_model']}), "
        f"load average {host['load_average']} at the start (other jobs share the machine)"
    )


def write_json(figures: dict[str, Any]) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures written to {OUTPUT.relative_to(ROOT)}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="Pushes to each receiver.")
    parser.add_argument("--quiet-period", type=float, default=2.0, help="The node's quiet period (s).")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for the results.")
    return parser.parse_args()


def measure(push: Push, args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """Every figure into `figures`; raises (RuntimeError, TimeoutError, OSError) if something failed,
    with the figures measured until then in `figures`."""
    host = figures["machine"]
    print("\nmeasuring ingest...", flush=True)
    figures["ingest"] = measure_ingest(push, args.repeats)
    print("measuring end to end...", flush=True)
    host["load_average_before_end_to_end"] = load_average()
    figures["end_to_end"] = end_to_end(push, args.quiet_period, args.timeout)
    host["load_average_at_end"] = load_average()
    host["gpu_used"] = figures["end_to_end"]["device"] != "cpu"


def report(push: Push, figures: dict[str, Any]) -> None:
    host, e2e = figures["machine"], figures["end_to_end"]
    print_ingest(push, figures["ingest"])
    print_end_to_end(e2e, figures["quiet_period_s"])
    print(
        f"\nCPU: {host['cpu_cores']} cores, load average {host['load_average']} at the start, "
        f"{host['load_average_before_end_to_end']} before the end-to-end run, {host['load_average_at_end']} "
        f"at the end (other jobs share the machine); the networks ran on {e2e['device']}: "
        + ("a GPU was used" if host["gpu_used"] else "no GPU used")
    )
    write_json(figures)


def main() -> int:
    args = arguments()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"bench_node: dcmtk programs missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        push = load_push()
    except FileNotFoundError as error:
        print(f"bench_node: {CASE} not found: {error}", file=sys.stderr)
        return 1
    host = machine()
    print_header(push, host)
    figures: dict[str, Any] = {"case": CASE, "slices": push.slices, "megabytes": round(push.megabytes, 1)}
    figures |= {"machine": host, "handbook_not_measured": HANDBOOK, "quiet_period_s": args.quiet_period}
    try:
        measure(push, args, figures)
    except (RuntimeError, TimeoutError, OSError) as error:
        print(f"\nbench_node FAILED: {error}", file=sys.stderr)
        write_json(figures | {"error": str(error)})
        return 1
    report(push, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
