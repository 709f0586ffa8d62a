"""A job database with the rows a node has after a few days' work, for the dashboard's tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cad_node.job_database import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    FindingRecord,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    ResultObject,
    Step,
    Study,
    StudyStatus,
)
from cad_node.schema_migration import upgrade
from cad_node.settings import Settings

TOKEN = "test-admin-token-8c1f0e"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
PACS = "PACS@10.0.0.5:104"
STEPS = {
    "load series": 0.8,
    "preprocessing": 1.2,
    "candidate detection": 3.4,
    "false-positive reduction": 0.6,
    "segmentation and measurement": 2.1,
    "encode results": 0.3,
    "write results": 0.1,
}
TRACE = (
    "Traceback (most recent call last):\n"
    '  File "/work/main/workers/analysis.py", line 133, in run_analysis\n'
    "    series = load_series(paths)\n"
    "models.series_loading.SeriesError: slice spacing is not uniform (1.25 mm and 2.5 mm)\n"
)
UNREACHABLE = f"{PACS} could not be reached"


@dataclass
class Node:
    settings: Settings
    database: JobDatabase
    done: int  # delivered, with findings and the patient's instance on disk
    failed: int  # analysis failed with a traceback
    undelivered: int  # done, its delivery failed after three attempts
    skipped: int
    queued: int


def instance_file(path: Path, study_uid: str, series_uid: str) -> Path:
    """A tiny CT header with the patient's name, as the listener would have stored it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "CT"
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


# The jobs are spread over the last days, so the screenshots look like a node at work.
FIRST_DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=5)


def day(number: int) -> dt.date:
    """The day of job `number` (1 to 5), UTC."""
    return FIRST_DAY + dt.timedelta(days=number - 1)


def at(number: int, hour: int = 9) -> dt.datetime:
    return dt.datetime.combine(day(number), dt.time(hour))


def make_node(data_dir: Path, **settings: object) -> Node:
    config = Settings(data_dir=data_dir, admin_token=TOKEN, min_free_disk_mb=1, **settings)  # type: ignore[arg-type]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(config.effective_database_url)
    database = JobDatabase(config.effective_database_url)
    with database.session() as session:

        def study(status: str, day: int, instances: int) -> Study:
            row = Study(
                study_uid=generate_uid(),
                calling_ae="PACS",
                calling_host="10.0.0.5",
                status=status,
                instance_count=instances,
                first_received_at=at(day, 8),
                last_received_at=at(day, 8),
            )
            session.add(row)
            return row

        def job(owner: Study, status: str, day: int, reason: str, series_uid: str | None) -> Job:
            selection = {
                "chosen": series_uid,
                "why": "thinnest eligible series: series 3 (1.00 mm) over series 2 (5.00 mm)",
                "verdicts": {series_uid or "": "chosen", "1.2.3.2": "slices 5.00 mm thick (at most 3 mm)"},
                "series": [
                    {"series_uid": series_uid, "series_number": 3, "description": "LUNG 1.0", "slices": 300,
                     "slice_thickness_mm": 1.0, "coverage_mm": 300.0, "kernel": "LUNG"},
                    {"series_uid": "1.2.3.2", "series_number": 2, "description": "BODY 5.0", "slices": 60,
                     "slice_thickness_mm": 5.0, "coverage_mm": 300.0, "kernel": "STANDARD"},
                ],
            }  # fmt: skip
            row = Job(
                study=owner,
                status=status,
                series_uid=series_uid,
                selection=selection if series_uid else {"why": reason, "series": [], "verdicts": {}},
                reason=reason,
                created_at=at(day),
                started_at=at(day) if status != JobStatus.QUEUED else None,
                finished_at=at(day) + dt.timedelta(seconds=9) if status != JobStatus.QUEUED else None,
                worker="node1:4242" if status != JobStatus.QUEUED else "",
                attempts=1,
                model_version="0.1.0",
            )
            session.add(row)
            return row

        first = study(StudyStatus.DONE, 1, 300)
        series_uid = generate_uid()
        path = instance_file(config.instances_dir / "a" / "b" / "c.dcm", first.study_uid, series_uid)
        session.add(
            Instance(
                sop_instance_uid=generate_uid(),
                sop_class_uid=CTImageStorage,
                series_uid=series_uid,
                study=first,
                modality="CT",
                path=str(path),
                size_bytes=path.stat().st_size,
                transfer_syntax=ExplicitVRLittleEndian,
            )
        )
        done = job(first, JobStatus.DONE, 1, "2 nodules found", series_uid)
        for name, seconds in STEPS.items():
            session.add(Step(job=done, name=name, seconds=seconds))
        for number, (kind, long_axis) in enumerate((("solid", 9.4), ("part-solid", 12.0)), start=1):
            session.add(
                FindingRecord(
                    job=done,
                    number=number,
                    probability=0.91,
                    nodule_type=kind,
                    long_axis_mm=long_axis,
                    short_axis_mm=6.1,
                    volume_mm3=310.0,
                    lung_rads="4A",
                    details={"side": "right", "zone": "upper", "mean_hu": -35.0},
                )
            )
        session.add(
            ResultObject(job=done, kind="SR", sop_instance_uid="1.2.9.1", series_uid="1.2.9", path="x")
        )
        delivered = Delivery(
            job=done, destination=PACS, status=DeliveryStatus.DELIVERED, attempts=1, delivered_at=at(1, 10)
        )
        session.add(delivered)
        session.add(DeliveryAttempt(delivery=delivered, started_at=at(1, 10), seconds=0.4, error=""))

        failed = job(study(StudyStatus.FAILED, 2, 120), JobStatus.FAILED, 2, "SeriesError: ...", "1.2.3.4")
        failed.error_trace = TRACE
        session.add(Step(job=failed, name="load series", seconds=1.5))

        undelivered = job(study(StudyStatus.DONE, 3, 200), JobStatus.DONE, 3, "0 nodules found", "1.2.3.5")
        session.add(Step(job=undelivered, name="candidate detection", seconds=40.0))
        lost = Delivery(job=undelivered, destination=PACS, status=DeliveryStatus.FAILED, attempts=3)
        lost.last_error = UNREACHABLE
        session.add(lost)
        for n in range(3):
            session.add(
                DeliveryAttempt(delivery=lost, started_at=at(3, 10 + n), seconds=2.0, error=UNREACHABLE)
            )

        skipped = job(study(StudyStatus.SKIPPED, 4, 2), JobStatus.SKIPPED, 4, "no eligible series", None)
        queued = job(study(StudyStatus.QUEUED, 5, 150), JobStatus.QUEUED, 5, "", "1.2.3.7")
        session.flush()
        ids = (done.id, failed.id, undelivered.id, skipped.id, queued.id)
    return Node(config, database, *ids)
