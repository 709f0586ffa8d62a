"""Prometheus metrics, computed from the job database, the broker and the data folder at scrape time.

Nothing is counted in memory: the listener, the workers and the dashboard are separate processes, and a
collector that reads the shared records gives the same numbers whichever process is scraped.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select

from cad_node.job_database import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Job,
    JobDatabase,
    JobStatus,
    Step,
    Study,
    StudyStatus,
)
from cad_node.node_health import QUEUES, instance_store_disk, last_delivery, queue_lengths
from cad_node.settings import Settings
from cad_node.worker_heartbeat import read_beats

# Steps take from tens of milliseconds (writing results) to minutes (a large study on a CPU).
STEP_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class NodeCollector(Collector):
    def __init__(self, settings: Settings, database: JobDatabase) -> None:
        self.settings = settings
        self.database = database

    def collect(self) -> Iterator[Metric]:
        yield from self._database_metrics()
        lengths = GaugeMetricFamily(
            "cad_node_queue_length", "Messages waiting in the broker, per queue.", labels=["queue"]
        )
        for queue, length in queue_lengths(self.settings).items():
            if length is not None:
                lengths.add_metric([queue], length)
        yield lengths
        alive = GaugeMetricFamily(
            "cad_node_workers_alive", "Worker processes that beat recently, per queue.", labels=["queue"]
        )
        beats = read_beats(self.database)
        for queue in QUEUES:
            alive.add_metric([queue], sum(b.alive and b.queue == queue for b in beats))
        yield alive
        disk = instance_store_disk(self.settings)
        yield GaugeMetricFamily(
            "cad_node_instance_store_free_bytes",
            "Free disk space in the instance store.",
            value=disk.free_bytes,
        )

    def _database_metrics(self) -> Iterator[Metric]:
        with self.database.session() as session:
            received = session.scalar(select(func.coalesce(func.sum(Study.instance_count), 0)))
            studies = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            bucket_columns = [func.sum(case((Step.seconds <= le, 1), else_=0)) for le in STEP_BUCKETS_S]
            steps = session.execute(
                select(Step.name, func.count(), func.sum(Step.seconds), *bucket_columns).group_by(Step.name)
            ).all()
            failures = session.scalar(select(func.count()).where(DeliveryAttempt.error != ""))
            deliveries = dict(
                session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
            )
        yield CounterMetricFamily(
            "cad_node_instances_received", "DICOM instances received and stored.", value=received or 0
        )
        yield _by_state("cad_node_studies", "Studies, by state.", studies, list(StudyStatus))
        yield _by_state("cad_node_jobs", "Jobs, by state.", jobs, list(JobStatus))
        histogram = HistogramMetricFamily(
            "cad_node_step_duration_seconds", "Time each step of a job took.", labels=["step"]
        )
        for name, count, total, *cumulative in steps:
            buckets = [
                (floatToGoString(le), n or 0) for le, n in zip(STEP_BUCKETS_S, cumulative, strict=True)
            ]
            histogram.add_metric([name], [*buckets, ("+Inf", count)], sum_value=total or 0.0)
        yield histogram
        yield CounterMetricFamily(
            "cad_node_export_failures",
            "C-STORE attempts of results to a destination that failed (each is retried with back-off).",
            value=failures or 0,
        )
        yield _by_state(
            "cad_node_deliveries",
            "Deliveries of results to a destination, by state.",
            deliveries,
            list(DeliveryStatus),
        )
        last = last_delivery(self.database)
        if last is not None:
            yield GaugeMetricFamily(
                "cad_node_last_delivery_timestamp_seconds",
                "When results were last delivered to a destination (Unix time).",
                value=calendar.timegm(last.delivered_at.timetuple()),
            )


def _by_state(name: str, documentation: str, counts: dict[str, int], states: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in [*states, *sorted(set(counts) - set(states))]:
        family.add_metric([state], counts.get(state, 0))
    return family


def node_registry(settings: Settings, database: JobDatabase) -> CollectorRegistry:
    """A registry of the node's metrics alone (no process metrics: those differ between processes)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(settings, database))
    return registry
