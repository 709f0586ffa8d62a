"""The analysis of one job: chosen series -> pipeline -> SR and SEG -> deliveries queued.

Runs inside a Celery worker process. The networks load once per process, on the first job, so that
CUDA (where there is a GPU) starts in the process that uses it, never before a fork.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import traceback
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cad_node.algorithm import AlgorithmIdentity
from cad_node.job_database import (
    Delivery,
    FindingRecord,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    ResultObject,
    Step,
    Study,
    StudyStatus,
    utcnow,
)
from cad_node.job_queue import JobQueue
from cad_node.result_encoding import EncodedResults, encode_results, write_results
from cad_node.settings import Settings
from cad_node.study_assembly import worker_is_gone
from models.findings import Finding
from models.pipeline import WEIGHTS_DIR, Pipeline, analyze
from models.series_loading import load_series

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@functools.cache
def shipped_pipeline(device: str) -> Pipeline:
    pipeline = Pipeline.load(device=device or None)
    log.info("model %s loaded on %s in process %d", pipeline.version, pipeline.device, os.getpid())
    return pipeline


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRun:
    """One claimed job, with its clock: each step's time goes to the job database as it ends."""

    def __init__(self, database: JobDatabase, job_id: int) -> None:
        self.database = database
        self.job_id = job_id
        self._clock = time.perf_counter()

    def step(self, name: str, seconds: float | None = None) -> None:
        now = time.perf_counter()
        elapsed = now - self._clock if seconds is None else seconds
        self._clock = now
        with self.database.session() as session:
            session.add(Step(job_id=self.job_id, name=name, seconds=round(elapsed, 3)))
            session.get_one(Job, self.job_id).heartbeat_at = utcnow()

    def beat(self) -> None:
        with self.database.session() as session:
            session.get_one(Job, self.job_id).heartbeat_at = utcnow()


def claim(database: JobDatabase, job_id: int) -> list[Path] | None:
    """Take the job if it is waiting, or if the worker that had it died; its series' files, in no order."""
    with database.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %d is not in the job database; message dropped", job_id)
            return None
        if job.status == JobStatus.RUNNING and not worker_is_gone(job, utcnow()):
            log.info("job %d is running in %s; duplicate message dropped", job_id, job.worker)
            return None
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            log.info("job %d is %s; nothing to do", job_id, job.status)
            return None
        if job.attempts >= MAX_ATTEMPTS:
            _finish(
                session, job, JobStatus.FAILED, f"the worker stopped {job.attempts} times during this job"
            )
            return None
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
            .values(
                status=JobStatus.RUNNING,
                attempts=job.attempts + 1,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
                worker=worker_name(),
            )
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
        session.get_one(Study, job.study_id).status = StudyStatus.ANALYSING
        paths = session.scalars(
            select(Instance.path).where(
                Instance.study_id == job.study_id, Instance.series_uid == job.series_uid
            )
        ).all()
        return [Path(p) for p in paths]


def run_analysis(job_id: int, settings: Settings, database: JobDatabase, queue: JobQueue) -> None:
    paths = claim(database, job_id)
    if paths is None:
        return
    run = JobRun(database, job_id)
    try:
        pipeline = shipped_pipeline(settings.device)
        series = load_series(paths)
        run.step("load series")
        analysis = analyze(series.volume, pipeline, progress=lambda _: run.beat())
        for name, seconds in analysis.seconds.items():
            run.step(name, seconds)
        algorithm = AlgorithmIdentity.for_weights(pipeline.version, WEIGHTS_DIR)
        results = encode_results(
            series.headers,
            series.frame_numbers,
            analysis.findings,
            algorithm,
            extras=settings.extra_outputs,
            volume=series.volume,
        )
        run.step("encode results")
        if _superseded(database, job_id):
            log.info("job %d was superseded while it ran; its results are not kept", job_id)
            return
        written = write_results(results, settings.results_dir / f"job-{job_id}")
        run.step("write results")
        _record(
            database, job_id, pipeline.version, analysis.findings, results, written, settings.destinations
        )
    except Exception as error:
        log.exception("job %d failed", job_id)
        with database.session() as session:
            job = session.get_one(Job, job_id)
            job.error_trace = traceback.format_exc()
            _finish(session, job, JobStatus.FAILED, f"{type(error).__name__}: {error}")
        return
    for destination in settings.destinations:
        queue.export(job_id, destination)
    log.info("job %d done: %d findings", job_id, len(analysis.findings))


def _superseded(database: JobDatabase, job_id: int) -> bool:
    with database.session() as session:
        return session.get_one(Job, job_id).status == JobStatus.SUPERSEDED


def _record(
    database: JobDatabase,
    job_id: int,
    version: str,
    findings: list[Finding],
    results: EncodedResults,
    written: list[Path],
    destinations: list[str],
) -> None:
    made = {name: dataset for name, dataset in results.by_file().items() if dataset is not None}
    with database.session() as session:
        job = session.get_one(Job, job_id)
        job.model_version = version
        for number, finding in enumerate(findings, start=1):
            session.add(
                FindingRecord(
                    job=job,
                    number=number,
                    probability=finding.probability,
                    nodule_type=finding.nodule_type,
                    long_axis_mm=finding.long_axis_mm,
                    short_axis_mm=finding.short_axis_mm,
                    volume_mm3=finding.volume_mm3,
                    lung_rads=finding.lung_rads,
                    details=finding.to_json(),
                )
            )
        for path in written:
            header = made[path.name]
            session.add(
                ResultObject(
                    job=job,
                    kind=str(header.Modality),
                    sop_instance_uid=str(header.SOPInstanceUID),
                    series_uid=str(header.SeriesInstanceUID),
                    path=str(path),
                )
            )
        for destination in destinations:
            session.add(Delivery(job=job, destination=destination))
        _finish(session, job, JobStatus.DONE, f"{len(findings)} nodules found")


def _finish(session: Session, job: Job, status: JobStatus, reason: str) -> None:
    job.status = status
    job.reason = reason
    job.finished_at = utcnow()
    job.study.status = StudyStatus.DONE if status == JobStatus.DONE else StudyStatus.FAILED
