"""What the pages show, read from the job database: plain values, ready for the templates."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from cad_node.job_database import (
    Delivery,
    DeliveryStatus,
    FindingRecord,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    utcnow,
)
from cad_node.node_health import (
    DiskSpace,
    LastDelivery,
    database_reachable,
    instance_store_disk,
    last_delivery,
    queue_lengths,
)
from cad_node.settings import Settings
from cad_node.worker_heartbeat import WorkerBeat, read_beats

log = logging.getLogger(__name__)

PAGE_SIZE = 100


@dataclass(frozen=True)
class JobFilter:
    state: str = ""
    since: dt.date | None = None  # created on or after this day (UTC)
    until: dt.date | None = None  # created on or before this day (UTC)
    before: int | None = None  # older than this job: the next page

    def query_string(self, **changes: Any) -> str:
        from urllib.parse import urlencode

        values = {
            "state": self.state,
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
            "before": self.before or "",
            **changes,
        }
        return urlencode({k: v for k, v in values.items() if v})


@dataclass(frozen=True)
class StepTime:
    name: str
    seconds: float


@dataclass(frozen=True)
class JobRow:
    id: int
    created_at: dt.datetime
    study_uid: str
    calling_ae: str
    instances: int
    series: str  # how a person finds the chosen series: number and description, else its UID
    state: str
    reason: str
    findings: int
    steps: list[StepTime]
    deliveries: list[tuple[str, str]]  # destination, state

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


_LIST_LOAD = (
    selectinload(Job.study),
    selectinload(Job.steps),
    selectinload(Job.deliveries),
    selectinload(Job.findings),
)


def job_rows(database: JobDatabase, wanted: JobFilter) -> tuple[list[JobRow], int | None]:
    """The jobs that pass the filter, newest first, one page; and the `before` of the next page."""
    query = select(Job).options(*_LIST_LOAD).order_by(Job.id.desc()).limit(PAGE_SIZE + 1)
    if wanted.state:
        query = query.where(Job.status == wanted.state)
    if wanted.since:
        query = query.where(Job.created_at >= dt.datetime.combine(wanted.since, dt.time()))
    if wanted.until:
        query = query.where(
            Job.created_at < dt.datetime.combine(wanted.until + dt.timedelta(days=1), dt.time())
        )
    if wanted.before:
        query = query.where(Job.id < wanted.before)
    with database.session() as session:
        jobs = list(session.scalars(query))
        rows = [_row(job) for job in jobs[:PAGE_SIZE]]
    return rows, (rows[-1].id if len(jobs) > PAGE_SIZE else None)


def _row(job: Job) -> JobRow:
    return JobRow(
        id=job.id,
        created_at=job.created_at,
        study_uid=job.study.study_uid,
        calling_ae=job.study.calling_ae,
        instances=job.study.instance_count,
        series=series_label(job.selection, job.series_uid),
        state=job.status,
        reason=job.reason,
        findings=len(job.findings),
        steps=[StepTime(s.name, s.seconds) for s in job.steps],
        deliveries=[(d.destination, d.status) for d in job.deliveries],
    )


def series_label(selection: dict[str, Any], series_uid: str | None) -> str:
    if series_uid is None:
        return ""
    for summary in selection.get("series", []):
        if summary.get("series_uid") == series_uid:
            number, description = summary.get("series_number"), summary.get("description") or ""
            words = [
                f"series {number}" if number is not None else "",
                f'"{description[:40]}"' if description else "",
            ]
            return " ".join(w for w in words if w) or series_uid
    return series_uid


@dataclass(frozen=True)
class SeriesVerdict:
    label: str
    series_uid: str
    chosen: bool
    verdict: str
    slices: int | None
    thickness_mm: float | None
    coverage_mm: float | None
    kernel: str


@dataclass(frozen=True)
class AttemptView:
    started_at: dt.datetime
    seconds: float
    error: str
    stored: int


@dataclass(frozen=True)
class DeliveryView:
    destination: str
    state: str
    attempts: int
    last_error: str
    updated_at: dt.datetime
    delivered_at: dt.datetime | None
    attempt_log: list[AttemptView]


@dataclass(frozen=True)
class FindingView:
    number: int
    probability: float
    nodule_type: str
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float | None
    location: str
    lung_rads: str


@dataclass(frozen=True)
class Patient:
    name: str
    patient_id: str


@dataclass
class JobPage:
    row: JobRow
    calling_host: str
    study_state: str
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    purged: bool
    patient: Patient | None
    why: str
    series: list[SeriesVerdict]
    attempts: int
    worker: str
    model_version: str
    times: list[tuple[str, dt.datetime | None]]
    error_trace: str
    findings: list[FindingView]
    results: list[tuple[str, str]]
    deliveries: list[DeliveryView]
    retry: str = field(default="")  # what the retry button would do; empty: nothing to retry


def job_page(database: JobDatabase, job_id: int) -> JobPage | None:
    with database.session() as session:
        job = session.get(
            Job,
            job_id,
            options=[
                *_LIST_LOAD,
                selectinload(Job.results),
                selectinload(Job.deliveries).selectinload(Delivery.attempt_log),
            ],
        )
        if job is None:
            return None
        study = job.study
        selection = job.selection or {}
        verdicts = selection.get("verdicts", {})
        series = [
            SeriesVerdict(
                label=series_label(selection, s.get("series_uid")),
                series_uid=s.get("series_uid", ""),
                chosen=s.get("series_uid") == job.series_uid,
                verdict=verdicts.get(s.get("series_uid", ""), ""),
                slices=s.get("slices"),
                thickness_mm=s.get("slice_thickness_mm"),
                coverage_mm=s.get("coverage_mm"),
                kernel=s.get("kernel", ""),
            )
            for s in selection.get("series", [])
        ]
        failed_deliveries = [d.destination for d in job.deliveries if d.status == DeliveryStatus.FAILED]
        if job.status == JobStatus.FAILED:
            retry = "Run the analysis again"
        elif failed_deliveries:
            retry = "Send the results again to " + ", ".join(failed_deliveries)
        else:
            retry = ""
        return JobPage(
            row=_row(job),
            calling_host=study.calling_host,
            study_state=study.status,
            first_received_at=study.first_received_at,
            last_received_at=study.last_received_at,
            purged=study.purged_at is not None,
            patient=_patient(session, study.id, job.series_uid),
            why=selection.get("why", "") or job.reason,
            series=series,
            attempts=job.attempts,
            worker=job.worker,
            model_version=job.model_version,
            times=[
                ("created", job.created_at),
                ("queued", job.enqueued_at),
                ("started", job.started_at),
                ("last heartbeat", job.heartbeat_at),
                ("finished", job.finished_at),
            ],
            error_trace=job.error_trace,
            findings=[_finding(f) for f in job.findings],
            results=[(r.kind, r.sop_instance_uid) for r in job.results],
            deliveries=[
                DeliveryView(
                    destination=d.destination,
                    state=d.status,
                    attempts=d.attempts,
                    last_error=d.last_error,
                    updated_at=d.updated_at,
                    delivered_at=d.delivered_at,
                    attempt_log=[
                        AttemptView(a.started_at, a.seconds, a.error, len(a.stored)) for a in d.attempt_log
                    ],
                )
                for d in job.deliveries
            ],
            retry=retry,
        )


def _finding(record: FindingRecord) -> FindingView:
    details = record.details or {}
    return FindingView(
        number=record.number,
        probability=record.probability,
        nodule_type=record.nodule_type,
        long_axis_mm=record.long_axis_mm,
        short_axis_mm=record.short_axis_mm,
        volume_mm3=record.volume_mm3,
        mean_hu=details.get("mean_hu"),
        location=" ".join(str(details[k]) for k in ("side", "zone") if details.get(k)),
        lung_rads=record.lung_rads,
    )


def _patient(session: Session, study_id: int, series_uid: str | None) -> Patient | None:
    """The patient, from a stored instance of the study's chosen series (the database never holds it)."""
    query = select(Instance.path).where(Instance.study_id == study_id).limit(1)
    if series_uid is not None:
        query = query.where(Instance.series_uid == series_uid)
    path = session.scalar(query)
    if path is None or not Path(path).is_file():
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
    except (OSError, InvalidDicomError):
        log.warning("job page: the stored instance of study %d cannot be read", study_id)
        return None
    return Patient(str(header.get("PatientName", "")), str(header.get("PatientID", "")))


@dataclass(frozen=True)
class RunningJob:
    id: int
    worker: str
    heartbeat_at: dt.datetime | None


@dataclass
class HealthPage:
    database_ok: bool
    database_url: str
    broker_url: str
    queue_lengths: dict[str, int | None]
    jobs_waiting: int
    deliveries_waiting: int
    running: list[RunningJob]
    workers: list[WorkerBeat]
    disk: DiskSpace
    last_delivery: LastDelivery | None
    now: dt.datetime

    @property
    def workers_alive(self) -> int:
        return sum(w.alive for w in self.workers)


def health_page(settings: Settings, database: JobDatabase) -> HealthPage:
    ok = database_reachable(database)
    running: list[RunningJob] = []
    jobs_waiting = deliveries_waiting = 0
    if ok:
        with database.session() as session:
            running = [
                RunningJob(job.id, job.worker, job.heartbeat_at)
                for job in session.scalars(
                    select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.id)
                )
            ]
            jobs_waiting = session.scalar(select(func.count()).where(Job.status == JobStatus.QUEUED)) or 0
            deliveries_waiting = (
                session.scalar(
                    select(func.count()).where(
                        Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.RETRYING])
                    )
                )
                or 0
            )
    shown = settings.shown()  # the URLs without passwords
    return HealthPage(
        database_ok=ok,
        database_url=shown["database_url"],
        broker_url=shown["broker_url"],
        queue_lengths=queue_lengths(settings),
        jobs_waiting=jobs_waiting,
        deliveries_waiting=deliveries_waiting,
        running=running,
        workers=read_beats(database) if ok else [],
        disk=instance_store_disk(settings),
        last_delivery=last_delivery(database) if ok else None,
        now=utcnow(),
    )
