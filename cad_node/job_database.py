"""The job database: every study, instance, job, step, finding, result and delivery.

SQLite in the data folder by default (WAL, so the listener and the workers share it), PostgreSQL by
`CAD_NODE_DATABASE_URL`. The schema is made and changed by Alembic (`cad-node db upgrade`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import NullPool

UID = String(64)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class StudyStatus(StrEnum):
    RECEIVING = "receiving"  # instances arriving; complete after the quiet period
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a later job on the same study, after its chosen series changed


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    calling_host: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.RECEIVING, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # When the series were last chosen; instances received after it make the study due again.
    selected_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # When the retention policy removed the received instances from the store.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    series_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    selection: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    error_trace: Mapped[str] = mapped_column(
        Text, default="", server_default=""
    )  # the traceback of a failure, for admins
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str] = mapped_column(String(32), default="")
    worker: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    study: Mapped[Study] = relationship(back_populates="jobs")
    steps: Mapped[list[Step]] = relationship(back_populates="job", order_by="Step.id")
    findings: Mapped[list[FindingRecord]] = relationship(
        back_populates="job", order_by="FindingRecord.number"
    )
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", order_by="ResultObject.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")


class Step(Base):
    """One step of a job and how long it took."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="steps")


class FindingRecord(Base):
    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    probability: Mapped[float] = mapped_column(Float)
    nodule_type: Mapped[str] = mapped_column(String(16))
    long_axis_mm: Mapped[float] = mapped_column(Float)
    short_axis_mm: Mapped[float] = mapped_column(Float)
    volume_mm3: Mapped[float] = mapped_column(Float)
    lung_rads: Mapped[str] = mapped_column(String(8))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    job: Mapped[Job] = relationship(back_populates="findings")


class ResultObject(Base):
    """A DICOM object the node made (SR, SEG)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="results")


class Delivery(Base):
    """The results of one job to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    job: Mapped[Job] = relationship(back_populates="deliveries")
    attempt_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id"
    )


class DeliveryAttempt(Base):
    """One C-STORE attempt of a delivery: when, how long, which objects the peer stored, what went wrong.

    A later attempt sends only what no earlier one had stored, so a retry never gives the PACS an
    object twice."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    seconds: Mapped[float] = mapped_column(Float)
    error: Mapped[str] = mapped_column(Text, default="")
    stored: Mapped[list[str]] = mapped_column(default=list)  # SOP instance UIDs

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_log")


class WorkerBeat(Base):
    """A worker process's last sign of life; the dashboard's and the metrics' "workers alive"."""

    __tablename__ = "worker_beats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # <queue>@<host>-<pid>
    queue: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    beat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """`pooled=False`: a connection per use, nothing held open (for a process that forks)."""
    pool = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


class JobDatabase:
    def __init__(self, url: str, *, pooled: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, pooled=pooled)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
