"""Delivery of one job's results to one destination, with its status in the job database."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select

from cad_node.export import ExportError, send_files
from cad_node.job_database import Delivery, DeliveryAttempt, DeliveryStatus, JobDatabase, ResultObject, utcnow
from cad_node.settings import Peer, Settings

log = logging.getLogger(__name__)


def run_delivery(job_id: int, destination: str, settings: Settings, database: JobDatabase) -> float | None:
    """One attempt, sending what no earlier attempt had stored. None when there is nothing more to do;
    else the seconds to wait before the next."""
    with database.session() as session:
        delivery = session.scalar(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
        )
        if delivery is None or delivery.status == DeliveryStatus.DELIVERED:
            return None
        delivery.attempts += 1
        attempt = delivery.attempts
        earlier = {uid for past in delivery.attempt_log for uid in past.stored}
        objects = session.execute(
            select(ResultObject.sop_instance_uid, ResultObject.path)
            .where(ResultObject.job_id == job_id)
            .order_by(ResultObject.id)
        ).all()
    pending = {Path(path): uid for uid, path in objects if uid not in earlier}
    error = ""
    stored: list[str] = []
    started_at, clock = utcnow(), time.perf_counter()
    if pending:
        try:
            report = send_files(list(pending), Peer.parse(destination), settings.ae_title)
            stored = [pending[path] for path in report.stored]
            if not report.ok:
                error = "; ".join(f"{Path(p).name}: {why}" for p, why in report.failed.items())
        except ExportError as failure:
            error = str(failure)
    with database.session() as session:
        delivery = session.get_one(Delivery, delivery.id)
        delivery.updated_at = utcnow()
        session.add(
            DeliveryAttempt(
                delivery=delivery,
                started_at=started_at,
                seconds=round(time.perf_counter() - clock, 3),
                error=error,
                stored=stored,
            )
        )
        if not error:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = utcnow()
            delivery.last_error = ""
            log.info(
                "job %d: %d results delivered to %s (%d of them by earlier attempts)",
                job_id,
                len(objects),
                destination,
                len(objects) - len(pending),
            )
            return None
        delivery.last_error = error
        if attempt >= settings.export_attempts:
            delivery.status = DeliveryStatus.FAILED
            log.error(
                "job %d: delivery to %s failed after %d attempts: %s", job_id, destination, attempt, error
            )
            return None
        delivery.status = DeliveryStatus.RETRYING
        wait = settings.export_backoff_s * 2 ** (attempt - 1)
        log.warning(
            "job %d: delivery to %s failed (%s; %d of %d results stored so far); again in %.0f s",
            job_id,
            destination,
            error,
            len(objects) - len(pending) + len(stored),
            len(objects),
            wait,
        )
        return wait
