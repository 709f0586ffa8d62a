"""Benchmark: studies per hour with one analysis worker and with two, on the same studies.

The node as a hospital runs it (`cad-node listen`, separate `cad-node worker` processes, Celery on
Redis, the job database on PostgreSQL; the embedded filesystem queue and SQLite when those cannot be
reached). Eight copies of LIDC-IDRI-0001 (133 slices), each a study of its own, are pushed at once by
four senders; a dcmtk storescp is the PACS. Studies per hour run from the first push to the last study's
results at the PACS; the queue wait of each job is from its message being sent to a worker taking it.

    .venv/bin/python benchmarks/bench_throughput.py [--studies 8]

A benchmark, not a test: nothing is asserted about speed. Figures also go to
var/benchmarks/bench_throughput.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.peers and tests.node_process

import redis
from sqlalchemy import create_engine, make_url, select, text

from cad_node.job_database import Job, JobDatabase
from models.datasets import lidc_series_dir
from tests.node_process import SplitNode
from tests.peers import Storescp
from tests.test_node_e2e import RESULT_MODALITIES
from tests.test_production_e2e import copy_as_new_study, push_all

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "var" / "benchmarks" / "bench_throughput.json"
POSTGRES = os.environ.get("CAD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CAD_TEST_REDIS_URL", "redis://127.0.0.1:6379")
SENDERS = 4


def services() -> tuple[str, str, str]:
    """Broker and database URLs (Redis and a fresh PostgreSQL database where reachable), and a label."""
    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=3).ping()
        server = create_engine(POSTGRES, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"cadnode_bench_{uuid.uuid4().hex[:10]}"
        with server.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        server.dispose()
        return (
            f"{REDIS}/14",
            make_url(POSTGRES).set(database=name).render_as_string(False),
            "Redis + PostgreSQL",
        )
    except Exception as error:
        print(f"Redis or PostgreSQL unreachable ({error}); using the embedded queue and SQLite")
        return "", "", "embedded filesystem queue + SQLite"


def drop(broker: str, database: str) -> None:
    if broker:
        redis.Redis.from_url(broker).flushdb()
    if database:
        server = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(database).database}" WITH (FORCE)'))
        server.dispose()


def run(studies: list[list[Path]], workers: int) -> dict[str, Any]:
    broker, database, label = services()
    per_sender = max(1, len(studies) // SENDERS)
    starts = range(0, len(studies), per_sender)
    groups = [list(itertools.chain.from_iterable(studies[i : i + per_sender])) for i in starts]
    callers = [f"SENDER{n}" for n in range(1, len(groups) + 1)]
    try:
        with Storescp(ae_title="PACS") as pacs:
            node = SplitNode(
                broker_url=broker,
                database_url=database,
                analysis_workers=workers,
                destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                allowed_callers=callers,
            )
            with node:
                started = time.perf_counter()
                errors = push_all(groups, node.port, node.ae_title)
                if errors:
                    raise RuntimeError(f"a sender failed: {errors[0]}")
                pacs.wait_for(len(RESULT_MODALITIES) * len(studies), timeout=3600)
                elapsed = time.perf_counter() - started
                url = database or f"sqlite:///{(node.data_dir / 'jobs.sqlite').resolve()}"
                waits, runs = job_times(url)
    finally:
        drop(broker, database)
    return {
        "workers": workers,
        "services": label,
        "studies": len(studies),
        "seconds": round(elapsed, 1),
        "studies_per_hour": round(len(studies) / elapsed * 3600, 1),
        "queue_wait_p50_s": round(percentile(waits, 50), 1),
        "queue_wait_p95_s": round(percentile(waits, 95), 1),
        "analysis_median_s": round(statistics.median(runs), 1),
    }


def job_times(url: str) -> tuple[list[float], list[float]]:
    """Each job's wait in the queue (message sent to a worker taking it) and its run time."""
    database = JobDatabase(url)
    with database.session() as session:
        jobs = session.scalars(select(Job)).all()
        waits = [
            (j.started_at - (j.enqueued_at or j.created_at)).total_seconds() for j in jobs if j.started_at
        ]
        runs = [
            (j.finished_at - j.started_at).total_seconds() for j in jobs if j.started_at and j.finished_at
        ]
    database.close()
    return waits, runs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    arguments = parser.parse_args()
    source = sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
        studies = [copy_as_new_study(source, Path(folder) / f"s{n}", n) for n in range(arguments.studies)]
        print(
            f"{arguments.studies} studies of {len(source)} slices (LIDC-IDRI-0001, new UIDs each), "
            f"{SENDERS} senders at once; {os.cpu_count()} CPU cores, no GPU"
        )
        results = []
        for workers in (1, 2):
            print(f"running with {workers} analysis worker(s)...", flush=True)
            results.append(run(studies, workers))
    print(
        f"\n{'workers':>7}  {'services':<20} {'studies/h':>9}  {'total':>7}  {'queue wait p50':>14}  "
        f"{'p95':>7}  {'analysis median':>15}"
    )
    for r in results:
        print(
            f"{r['workers']:>7}  {r['services']:<20} {r['studies_per_hour']:>9.0f}  {r['seconds']:>6.0f}s  "
            f"{r['queue_wait_p50_s']:>13.1f}s  {r['queue_wait_p95_s']:>6.1f}s  "
            f"{r['analysis_median_s']:>14.1f}s"
        )
    ratio = results[1]["studies_per_hour"] / results[0]["studies_per_hour"]
    print(f"two workers / one worker: {ratio:.2f}x (both share the same {os.cpu_count()} cores)")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({"runs": results, "two_over_one": round(ratio, 2)}, indent=2) + "\n")
    print(f"figures written to {OUTPUT}")


if __name__ == "__main__":
    main()
