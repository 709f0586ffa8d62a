"""The node's health at a glance, for the dashboard and the metrics: queues, workers, disk, deliveries.

Everything is read at the time of asking, from the broker, the data folder and the job database, so
every process that asks (the dashboard, a Prometheus scrape of any node process) gets the same answer.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, text

from cad_node.job_database import Delivery, DeliveryStatus, JobDatabase
from cad_node.job_queue import ANALYSIS_QUEUE, EXPORT_QUEUE
from cad_node.settings import Settings

log = logging.getLogger(__name__)

QUEUES = (ANALYSIS_QUEUE, EXPORT_QUEUE)
# kombu's Redis transport keeps a list per priority step: the queue's name, then name + "\x06\x16" + step.
_REDIS_PRIORITY_SEPARATOR = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)


def queue_lengths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in the broker per queue; None where the broker cannot be asked."""
    url = settings.effective_broker_url
    if url.startswith("filesystem://"):
        folder = settings.queue_dir / "messages"
        return {queue: _count(folder, f"*.{queue}.msg") for queue in QUEUES}
    if url.startswith(("redis://", "rediss://", "unix://")):
        return _redis_lengths(url)
    return dict.fromkeys(QUEUES)


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _redis_lengths(url: str) -> dict[str, int | None]:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    pipe.llen(queue)
                    for step in _REDIS_PRIORITY_STEPS:
                        pipe.llen(f"{queue}{_REDIS_PRIORITY_SEPARATOR}{step}")
                counts = pipe.execute()
        finally:
            client.close()
    except redis.RedisError as error:
        log.warning("queue lengths: the broker could not be asked: %s", type(error).__name__)
        return dict.fromkeys(QUEUES)
    per_queue = 1 + len(_REDIS_PRIORITY_STEPS)
    return {queue: sum(counts[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(QUEUES)}


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    free_bytes: int
    total_bytes: int
    minimum_bytes: int  # below this the listener refuses instances

    @property
    def low(self) -> bool:
        return self.free_bytes < self.minimum_bytes


def instance_store_disk(settings: Settings) -> DiskSpace:
    """Free space where instances are stored (the data folder, before the first instance arrives)."""
    path = settings.instances_dir if settings.instances_dir.is_dir() else settings.data_dir
    usage = shutil.disk_usage(path)
    return DiskSpace(path, usage.free, usage.total, settings.min_free_disk_mb * 1024 * 1024)


@dataclass(frozen=True)
class LastDelivery:
    job_id: int
    destination: str
    delivered_at: dt.datetime


def last_delivery(database: JobDatabase) -> LastDelivery | None:
    with database.session() as session:
        row = session.execute(
            select(Delivery.job_id, Delivery.destination, Delivery.delivered_at)
            .where(Delivery.status == DeliveryStatus.DELIVERED, Delivery.delivered_at.is_not(None))
            .order_by(Delivery.delivered_at.desc())
            .limit(1)
        ).first()
    return None if row is None else LastDelivery(row.job_id, row.destination, row.delivered_at)


def database_reachable(database: JobDatabase) -> bool:
    try:
        with database.session() as session:
            session.execute(text("SELECT 1"))
    except Exception as error:  # any driver's error: the probe says "not ok", the log says why
        log.warning("health: the job database cannot be reached: %s", type(error).__name__)
        return False
    return True
