"""Study assembly: when a study has been quiet long enough, choose its series and queue (or skip) a job.

Instances that arrive after a study was assembled make it due again; it is analysed again only if
the chosen series changed (another series, or other instances in it), and the earlier job is then
marked superseded, so results are never duplicated silently. The same loop sends again the messages
of jobs that sat queued too long, takes back jobs whose worker died, and sends again the export
messages of deliveries that stopped moving.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import threading
from collections import defaultdict
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cad_node.job_database import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    Study,
    StudyStatus,
    utcnow,
)
from cad_node.job_queue import JobQueue
from cad_node.series_selection import Selection, SelectionRules, select_series, summarise_study

log = logging.getLogger(__name__)

REQUEUE_AFTER = dt.timedelta(minutes=10)
STALE_HEARTBEAT = dt.timedelta(minutes=15)


def series_fingerprint(sop_instance_uids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


class StudyAssembler:
    def __init__(
        self, database: JobDatabase, queue: JobQueue, rules: SelectionRules, quiet_period_s: float
    ) -> None:
        self.database = database
        self.queue = queue
        self.rules = rules
        self.quiet = dt.timedelta(seconds=quiet_period_s)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("study assembly failed; trying again")
            stop.wait(interval_s)

    def tick(self, now: dt.datetime | None = None) -> list[int]:
        """Assemble every study that is due; the jobs queued."""
        now = now or utcnow()
        queued: list[int] = []
        with self.database.session() as session:
            due = session.scalars(
                select(Study.id).where(
                    Study.last_received_at <= now - self.quiet,
                    or_(Study.selected_at.is_(None), Study.last_received_at > Study.selected_at),
                )
            ).all()
        for study_id in due:
            job_id = self.assemble(study_id, now)
            if job_id is not None:
                queued.append(job_id)
        for job_id in dict.fromkeys([*queued, *self.overdue_jobs(now)]):  # once each, in order
            self._enqueue(job_id)
        for job_id, destination in self.overdue_deliveries(now):
            log.warning("job %d: delivery to %s has not moved for a while; queued again", job_id, destination)
            self._enqueue_export(job_id, destination, now)
        return queued

    def assemble(self, study_id: int, now: dt.datetime) -> int | None:
        with self.database.session() as session:
            study = session.get_one(Study, study_id)
            study.selected_at = now
            files = _files_by_series(session, study_id)
            selection = select_series(summarise_study(files), self.rules)
            previous = _latest_job(session, study_id)
            if selection.chosen is None:
                return self._skip(session, study, selection, previous, now)
            chosen = selection.chosen.series_uid
            fingerprint = series_fingerprint([Path(p).stem for p in files[chosen]])
            if previous is not None and previous.series_fingerprint == fingerprint:
                study.note = (
                    f"instances received after job {previous.id} started did not change the chosen series"
                )
                log.info("study %d: %s", study.id, study.note)
                return None
            if previous is not None:
                self._supersede(study, previous, selection)
            job = Job(
                study=study,
                status=JobStatus.QUEUED,
                series_uid=chosen,
                series_fingerprint=fingerprint,
                selection=selection.to_dict(),
            )
            session.add(job)
            study.status = StudyStatus.QUEUED
            session.flush()
            log.info("study %d: job %d queued; %s", study.id, job.id, selection.why)
            return job.id

    def _skip(
        self, session: Session, study: Study, selection: Selection, previous: Job | None, now: dt.datetime
    ) -> int | None:
        if previous is not None and previous.status == JobStatus.SKIPPED:
            previous.reason = selection.why
            previous.selection = selection.to_dict()
            return None
        if previous is not None:
            study.note = f"later instances left no eligible series; job {previous.id} stands"
            return None
        session.add(
            Job(
                study=study,
                status=JobStatus.SKIPPED,
                selection=selection.to_dict(),
                reason=selection.why,
                finished_at=now,
            )
        )
        study.status = StudyStatus.SKIPPED
        log.info("study %d skipped: %s", study.id, selection.why)
        return None

    def _supersede(self, study: Study, previous: Job, selection: Selection) -> None:
        why = "chosen series changed: " + selection.why
        if previous.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SKIPPED):
            previous.status = JobStatus.SUPERSEDED
            previous.reason = why
        study.note = f"job {previous.id} superseded ({why})"
        log.info("study %d: %s", study.id, study.note)

    def overdue_jobs(self, now: dt.datetime) -> list[int]:
        """Queued jobs whose message was sent long ago or could not be sent, and running jobs whose
        worker is gone: their messages are sent again (a job is claimed once, so a duplicate message
        does nothing)."""
        with self.database.session() as session:
            waiting = session.scalars(
                select(Job).where(
                    Job.status == JobStatus.QUEUED,
                    or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - REQUEUE_AFTER),
                )
            ).all()
            running = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
            lost = [job for job in running if worker_is_gone(job, now)]
            for job in lost:
                log.warning("job %d: its worker %s is gone; queued again", job.id, job.worker)
                job.status = JobStatus.QUEUED
            return [job.id for job in [*waiting, *lost]]

    def overdue_deliveries(self, now: dt.datetime) -> list[tuple[int, str]]:
        """Deliveries waiting far longer than any back-off: their export message was lost."""
        with self.database.session() as session:
            rows = session.execute(
                select(Delivery.job_id, Delivery.destination).where(
                    Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.RETRYING]),
                    Delivery.updated_at < now - REQUEUE_AFTER,
                )
            ).all()
            return [(int(job_id), str(destination)) for job_id, destination in rows]

    def _enqueue_export(self, job_id: int, destination: str, now: dt.datetime) -> None:
        try:
            self.queue.export(job_id, destination)
        except Exception as error:
            log.error("job %d: could not reach the queue (%s); will try again", job_id, error)
            return
        with self.database.session() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.job_id == job_id, Delivery.destination == destination)
                .values(updated_at=now)
            )

    def _enqueue(self, job_id: int) -> None:
        try:
            self.queue.analyse(job_id)
        except Exception as error:
            log.error("job %d: could not reach the queue (%s); will try again", job_id, error)
            return
        with self.database.session() as session:
            session.get_one(Job, job_id).enqueued_at = utcnow()


def worker_is_gone(job: Job, now: dt.datetime) -> bool:
    """The worker that claimed the job has stopped beating, or was a process on this host that died."""
    if job.heartbeat_at is not None and job.heartbeat_at < now - STALE_HEARTBEAT:
        return True
    host, _, pid = job.worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _files_by_series(session: Session, study_id: int) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in session.execute(
        select(Instance.series_uid, Instance.path).where(Instance.study_id == study_id)
    ):
        files[series_uid].append(Path(path))
    return dict(files)


def _latest_job(session: Session, study_id: int) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.study_id == study_id, Job.status != JobStatus.SUPERSEDED)
        .order_by(Job.id.desc())
        .limit(1)
    )
