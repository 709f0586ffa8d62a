"""`cad-node demo`: the whole flow on one machine with nothing set up.

A synthetic chest CT with known nodules is sent to the node (`cad-node up` on its embedded defaults,
in a process of its own); a throwaway PACS (a pynetdicom storage SCP in this process) receives what
the node sends back; the SR is read back and its nodules compared with the truth.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
    Verification,
)
from sqlalchemy import select

from cad_node.export import send_files
from cad_node.job_database import Job, JobDatabase
from cad_node.result_reading import ReportedNodule, reported_nodules
from cad_node.settings import Peer

MARKER = ".cad-node-demo"
NODE_AET = "CADNODE"
PACS_AET = "DEMO-PACS"
RESULTS_TIMEOUT_S = 900.0


class DemoError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayPacs:
    """A storage SCP that keeps what it receives in a folder: the PACS of the demo."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self._ae = AE(ae_title=PACS_AET)
        result_classes = (
            Comprehensive3DSRStorage,
            SegmentationStorage,
            GrayscaleSoftcopyPresentationStateStorage,
            KeyObjectSelectionDocumentStorage,
            EncapsulatedPDFStorage,
        )
        for sop_class in result_classes:
            self._ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        self._server: Any = None

    def __enter__(self) -> ThrowawayPacs:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def _store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(
            self.folder / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm", enforce_file_format=True
        )
        return 0x0000

    def received(self, modality: str) -> list[Path]:
        return sorted(self.folder.glob(f"{modality}-*.dcm"))

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()


@dataclass
class NodeProcess:
    data_dir: Path
    port: int
    pacs: Peer
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "cad_node", "up", "--data-dir", str(self.data_dir)]
        command += ["--port", str(self.port), "--ae-title", NODE_AET, "--destination", str(self.pacs)]
        command += ["--quiet-period", "2"]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CAD_NODE_")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + 120
        while not self._answers_echo():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the node did not start; its log:\n{self.log_tail()}")
            time.sleep(0.5)

    def _answers_echo(self) -> bool:
        ae = AE(ae_title=PACS_AET)
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        if not association.is_established:
            return False
        association.release()
        return True

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def prepare_folder(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise DemoError(f"{out_dir} is not empty and not an earlier demo: give a new or empty folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by cad-node demo; removed by the next demo\n")


def run_demo(out_dir: Path, seed: int, n_nodules: int, echo: Callable[[str], None]) -> list[str]:
    """The demo; gives the lines of its closing report."""
    from models.ground_truth import read_ground_truth
    from models.synthetic.case_writing import synthesize

    started = time.perf_counter()

    def say(message: str) -> None:
        echo(f"[{time.perf_counter() - started:6.1f} s] {message}")

    prepare_folder(out_dir)
    say(f"making a synthetic chest CT with {n_nodules} nodules (seed {seed})")
    case = synthesize(out_dir / "case", seed=seed, n_nodules=n_nodules, n_slices=200)
    truth = read_ground_truth(out_dir / "case")["nodules"]
    with ThrowawayPacs(out_dir / "pacs") as pacs:
        node = NodeProcess(
            out_dir / "node", free_port(), Peer(PACS_AET, "127.0.0.1", pacs.port), out_dir / "node.log"
        )
        say(f"starting the node (cad-node up, embedded broker and SQLite) on port {node.port}")
        try:
            node.start()
            say(f"sending {len(case.series_files)} CT images to {NODE_AET}@127.0.0.1:{node.port}")
            report = send_files(case.series_files, Peer(NODE_AET, "127.0.0.1", node.port), PACS_AET)
            if not report.ok:
                raise DemoError(f"the node refused {len(report.failed)} images: {report.failed}")
            sent_at = time.perf_counter()
            _wait_for_results(pacs, node, say)
            say(f"SR and SEG received by the PACS {time.perf_counter() - sent_at:.1f} s after the last image")
            job = _job_details(node.data_dir)
        finally:
            node.stop()
        source = {
            str(h.SOPInstanceUID): h
            for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in case.series_files)
        }
        found = reported_nodules(pydicom.dcmread(pacs.received("SR")[0]), source)
        lines = _comparison(found, truth)
        lines += ["", "steps (job database):"] + [f"  {name:<30} {seconds:6.1f} s" for name, seconds in job]
        lines += ["", "files:", f"  case      {out_dir / 'case'}", f"  PACS      {pacs.folder}"]
        lines += [f"  node data {node.data_dir}", f"  node log  {node.log_path}"]
    return lines


def _wait_for_results(pacs: ThrowawayPacs, node: NodeProcess, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + RESULTS_TIMEOUT_S
    last = ""
    while not (pacs.received("SR") and pacs.received("SEG")):
        if node.process is not None and node.process.poll() is not None:
            raise DemoError(f"the node stopped; its log:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"no results after {RESULTS_TIMEOUT_S:.0f} s; the node's log:\n{node.log_tail()}")
        state = _job_state(node.data_dir)
        if state != last:
            say(state)
            last = state
        if state.startswith(("job failed", "job skipped")):
            raise DemoError(f"{state}; the node's log:\n{node.log_tail()}")
        time.sleep(0.5)


def _database(data_dir: Path) -> JobDatabase:
    return JobDatabase(f"sqlite:///{(data_dir / 'jobs.sqlite').resolve()}")


def _job_state(data_dir: Path) -> str:
    if not (data_dir / "jobs.sqlite").exists():
        return "waiting for the node"
    database = _database(data_dir)
    try:
        with database.session() as session:
            job = session.scalar(select(Job).order_by(Job.id.desc()).limit(1))
            if job is None:
                return "images received; waiting for the study to be quiet"
            step = job.steps[-1].name if job.steps else ""
            return (
                f"job {job.status}"
                + (f" ({step} done)" if step and job.status == "running" else "")
                + (f": {job.reason}" if job.reason else "")
            )
    finally:
        database.close()


def _job_details(data_dir: Path) -> list[tuple[str, float]]:
    database = _database(data_dir)
    try:
        with database.session() as session:
            job = session.scalars(select(Job).order_by(Job.id.desc()).limit(1)).one()
            return [(step.name, step.seconds) for step in job.steps]
    finally:
        database.close()


def _comparison(found: list[ReportedNodule], truth: list[dict[str, Any]]) -> list[str]:
    """Each true nodule with the reported nodule nearest it: found when within its radius (at least 5 mm)."""
    lines = ["true nodules (ground truth) and what the SR reported:"]
    matched: set[str] = set()
    for number, nodule in enumerate(truth, start=1):
        reach = max(nodule["mean_diameter_mm"] / 2, 5.0)
        nearest = min(found, key=lambda f: _distance(f, nodule), default=None)
        hit = nearest is not None and _distance(nearest, nodule) <= reach
        described = f"{nodule['type']:<12} {nodule['mean_diameter_mm']:5.1f} mm"
        if hit and nearest is not None:
            matched.add(nearest.tracking_id)
            lines.append(
                f"  {number:>2}. {described}  found as {nearest.name} "
                f"({_distance(nearest, nodule):.1f} mm away, {nearest.long_axis_mm:.1f} x "
                f"{nearest.short_axis_mm:.1f} mm, {nearest.nodule_type}, {nearest.lung_rads})"
            )
        else:
            lines.append(f"  {number:>2}. {described}  missed")
    extra = [f for f in found if f.tracking_id not in matched]
    lines.append(f"found {len(matched)} of {len(truth)} nodules; {len(extra)} other reported findings")
    lines += [
        f"  {f.name}: {f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} mm {f.nodule_type}, no true nodule"
        for f in extra
    ]
    return lines


def _distance(found: ReportedNodule, nodule: dict[str, Any]) -> float:
    return float(np.linalg.norm(np.subtract(found.centre_mm, nodule["centre_mm"])))
