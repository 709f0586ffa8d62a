"""Storage retention: a study's received instances and result files are removed `retention_hours` after
its work ended, while every row of the job database stays (`Study.purged_at` says when).

A study's work has ended when every job of it is done, skipped or superseded and every delivery of
each job was delivered; a done job with no delivery at all (no destination configured) keeps its
files, since the results then exist only here. Its retention time starts at the latest of its last
delivery, its last job's end and its last received instance. Studies still receiving, queued,
analysing or failed, and any job or delivery still pending, retrying or failed, keep everything.
Nothing outside the instance store and the results folder is ever removed, whatever a row says.
A study that receives new instances after its purge is swept again once its new work has ended.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import selectinload

from cad_node.instance_store import InstanceStore
from cad_node.job_database import (
    DeliveryStatus,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    ResultObject,
    Study,
    StudyStatus,
    utcnow,
)
from cad_node.settings import Settings

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 300.0
_ENDED_JOBS = (JobStatus.DONE, JobStatus.SKIPPED, JobStatus.SUPERSEDED)


@dataclass(frozen=True)
class Purge:
    """What the sweep removed of one study."""

    study_id: int
    instance_files: int
    result_files: int
    bytes_removed: int


def retention_start(study: Study) -> dt.datetime | None:
    """When the study's retention time began; None while its work has not ended."""
    if study.status not in (StudyStatus.DONE, StudyStatus.SKIPPED) or not study.jobs:
        return None
    times = [study.last_received_at]
    for job in study.jobs:
        if job.status not in _ENDED_JOBS:
            return None
        if job.status == JobStatus.DONE and not job.deliveries:
            return None
        for delivery in job.deliveries:
            if delivery.status != DeliveryStatus.DELIVERED or delivery.delivered_at is None:
                return None
            times.append(delivery.delivered_at)
        if job.finished_at is not None:
            times.append(job.finished_at)
    return max(times)


class RetentionSweep:
    def __init__(self, settings: Settings, database: JobDatabase) -> None:
        self.database = database
        self.retention = dt.timedelta(hours=settings.retention_hours)
        self.store = InstanceStore(settings.instances_dir)
        self.results_dir = settings.results_dir

    def run(self, stop: threading.Event, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweep until `stop` is set; first remove the temporary files of writes a crash cut short."""
        try:
            if stale := self.store.remove_stale_parts():
                log.warning("removed %d unfinished temporary files from the instance store", stale)
        except OSError as error:
            log.error("could not look for unfinished temporary files in the instance store: %s", error)
        while not stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("retention sweep failed; trying again later")
            stop.wait(interval_s)

    def sweep(self, now: dt.datetime | None = None) -> list[Purge]:
        """Remove the files of every study whose retention time has passed; what was removed."""
        if not self.retention:
            return []
        now = now or utcnow()
        cutoff = now - self.retention
        with self.database.session() as session:
            candidates = session.scalars(
                select(Study)
                .where(
                    Study.status.in_([StudyStatus.DONE, StudyStatus.SKIPPED]),
                    or_(Study.purged_at.is_(None), Study.last_received_at > Study.purged_at),
                    Study.last_received_at <= cutoff,
                )
                .options(selectinload(Study.jobs).selectinload(Job.deliveries))
            ).all()
            expired = [
                (study.id, study.last_received_at)
                for study in candidates
                if (started := retention_start(study)) is not None and started <= cutoff
            ]
        return [self.purge(study_id, last_received_at, now) for study_id, last_received_at in expired]

    def purge(self, study_id: int, last_received_at: dt.datetime, now: dt.datetime) -> Purge:
        """Remove the study's instance and result files, then mark it purged. Removing again what is
        already gone is harmless, so a sweep cut short is simply finished by the next one."""
        with self.database.session() as session:
            instance_paths = session.scalars(
                select(Instance.path).where(Instance.study_id == study_id, Instance.received_at <= now)
            ).all()
            result_paths = session.scalars(
                select(ResultObject.path).join(Job).where(Job.study_id == study_id)
            ).all()
        instances, instance_bytes = remove_files(instance_paths, self.store.root)
        results, result_bytes = remove_files(result_paths, self.results_dir)
        with self.database.session() as session:
            # Unless an instance arrived meanwhile: then the study is due again and swept later.
            session.execute(
                update(Study)
                .where(Study.id == study_id, Study.last_received_at == last_received_at)
                .values(purged_at=now)
            )
        purge = Purge(study_id, instances, results, instance_bytes + result_bytes)
        log.info(
            "study %d: %d received instances and %d result files removed (%.1f MB), retention %s h",
            study_id,
            instances,
            results,
            purge.bytes_removed / 1e6,
            f"{self.retention.total_seconds() / 3600:g}",
        )
        return purge


def remove_files(paths: Iterable[str], root: Path) -> tuple[int, int]:
    """Remove the regular files among `paths` that lie inside `root`, then the folders they leave empty
    (never `root` itself); how many files and bytes. Anything else is left alone and logged."""
    base = root.resolve()
    count = size = 0
    folders: set[Path] = set()
    for text in paths:
        given = Path(text)
        path = given.parent.resolve() / given.name  # a link as the last part stays a link, not its target
        if not path.is_relative_to(base) or path == base:
            log.warning("a recorded file outside %s was left in place", base)
            continue
        if path.is_symlink() or (path.exists() and not path.is_file()):
            log.warning("a recorded path in %s is not a regular file; left in place", base)
            continue
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        count, size = count + 1, size + length
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        _remove_empty_folders(folder, base)
    return count, size


def _remove_empty_folders(folder: Path, base: Path) -> None:
    while folder != base and folder.is_relative_to(base):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone with a sibling's walk): stop here
            if folder.exists():
                return
        folder = folder.parent
