"""`cad-node worker`: a Celery worker on the analysis queue (prefork) or the export queue (threads)."""

from __future__ import annotations

from cad_node.job_queue import ANALYSIS_QUEUE, EXPORT_QUEUE
from cad_node.worker_heartbeat import Heartbeat


def run_worker(queue: str, concurrency: int) -> None:
    from workers.tasks import app, settings

    if queue not in (ANALYSIS_QUEUE, EXPORT_QUEUE):
        raise ValueError(f"unknown queue {queue!r}: {ANALYSIS_QUEUE} or {EXPORT_QUEUE}")
    # Exports wait on the network, not the CPU: threads. Analyses get processes of their own, so a
    # crash or a leak in one does not take the worker with it.
    pool = "threads" if queue == EXPORT_QUEUE else "prefork"
    heartbeat = Heartbeat(settings.effective_database_url, queue)  # how the dashboard knows it lives
    heartbeat.start()
    try:
        app.worker_main(
            [
                "worker",
                "--loglevel=INFO",
                f"--queues={queue}",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                f"--hostname={queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        heartbeat.stop()
