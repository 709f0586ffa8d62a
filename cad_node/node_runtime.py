"""Running the node: the listener with its study assembler, and the workers as child processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from cad_node.job_database import JobDatabase
from cad_node.job_queue import ANALYSIS_QUEUE, EXPORT_QUEUE, JobQueue, make_celery
from cad_node.listener import Listener
from cad_node.schema_migration import upgrade
from cad_node.settings import Settings
from cad_node.storage_retention import RetentionSweep
from cad_node.study_assembly import StudyAssembler

log = logging.getLogger(__name__)


def prepare(settings: Settings) -> JobDatabase:
    """The data folder and the job database at the schema this code expects."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    revision = upgrade(settings.effective_database_url)
    log.info("job database at schema %s", revision)
    return JobDatabase(settings.effective_database_url)


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("stopping (signal %d)", signum)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def run_listener(settings: Settings, database: JobDatabase, stop: threading.Event) -> None:
    """Listen and assemble studies until `stop` is set."""
    listener = Listener(settings, database)
    listener.start()
    assembler = StudyAssembler(
        database, JobQueue(make_celery(settings)), settings.selection_rules, settings.quiet_period_s
    )
    thread = threading.Thread(target=assembler.run, args=(stop,), name="study-assembly", daemon=True)
    thread.start()
    sweep = RetentionSweep(settings, database)
    threading.Thread(target=sweep.run, args=(stop,), name="storage-retention", daemon=True).start()
    try:
        stop.wait()
    finally:
        listener.stop()
        thread.join(timeout=5)


def start_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    environment = {**os.environ, **settings.as_environment()}
    commands = [
        (ANALYSIS_QUEUE, settings.analysis_concurrency),
        (EXPORT_QUEUE, 4),
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "cad_node", "worker", "--queue", queue, "--concurrency", str(concurrency)],
            env=environment,
        )
        for queue, concurrency in commands
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()


def run_up(settings: Settings, announce: Callable[[str], None]) -> None:
    """Listener, assembler and workers together, until SIGINT or SIGTERM (or a worker dies)."""
    database = prepare(settings)
    dashboard = None
    if settings.dashboard_port:
        from cad_node.dashboard.serving import dashboard_server

        dashboard = dashboard_server(settings, database, settings.dashboard_host, settings.dashboard_port)
        dashboard.start()
    stop = stop_on_signals()
    workers = start_workers(settings)

    def watch() -> None:
        while not stop.wait(1.0):
            for worker in workers:
                if worker.poll() is not None:
                    log.error("a worker exited with status %s; stopping the node", worker.returncode)
                    stop.set()

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
    destinations = ", ".join(settings.destinations) or "none (results stay in the data folder)"
    announce(
        f"cad-node is up: send CT studies to {settings.ae_title}@<this host>:{settings.port}; "
        f"results go to {destinations}; data in {settings.data_dir}"
        + (f"; dashboard at {dashboard.address}" if dashboard else "")
    )
    try:
        run_listener(settings, database, stop)
    finally:
        stop_workers(workers)
        if dashboard:
            dashboard.stop()
        database.close()
