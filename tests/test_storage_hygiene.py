"""Storage hygiene with real parts: the disk watermark of the listener (pynetdicom over loopback, files on
disk, a SQLite job database, a tiny tmpfs that really fills) and the retention sweep (real files, real
SQLite rows, `cad-node jobs show`)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from cad_node.cli import main
from cad_node.disk_watermark import MB, DiskWatermark
from cad_node.export import send_files
from cad_node.instance_store import InstanceStore
from cad_node.job_database import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobDatabase,
    JobStatus,
    ResultObject,
    Study,
    StudyStatus,
)
from cad_node.listener import OUT_OF_RESOURCES, Listener
from cad_node.schema_migration import upgrade
from cad_node.settings import Peer, Settings
from cad_node.storage_retention import RetentionSweep
from tests.peers import free_port

SENDER = "HYGIENE"
GB = 1 << 30


def write_ct(folder: Path, count: int, study_uid: str | None = None, side: int = 64) -> list[Path]:
    """`count` CT slices of one new series (`side` x `side`, 16 bits) in a study, as DICOM files."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
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
        dataset.PatientName = "HYGIENE^PATIENT"
        dataset.PatientID = "PID-HYGIENE-7"
        dataset.Modality = "CT"
        dataset.InstanceNumber = number
        dataset.Rows = dataset.Columns = side
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 1
        dataset.PixelData = bytes(side * side * 2)
        path = folder / f"{study_uid[-8:]}-{number:03d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------- the watermark


def push(node: Listener, files: list[Path]) -> list[int]:
    """C-STORE the files to the node as the node's own SCU does; each file's status (0 for success)."""
    report = send_files(files, Peer(node.settings.ae_title, "127.0.0.1", node.settings.port), SENDER)
    return [
        int(report.failed[str(f)].removeprefix("status 0x"), 16) if str(f) in report.failed else 0
        for f in files
    ]


def files_in_store(node: Listener) -> list[Path]:
    """Every file under the instance store, temporary ones included."""
    root = node.settings.instances_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def recorded(node: Listener) -> tuple[int, int]:
    with node.database.session() as session:
        return len(session.scalars(select(Study.id)).all()), len(session.scalars(select(Instance.id)).all())


def free_mb(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free // MB


def test_new_study_below_the_watermark_gets_a_failure_status_and_leaves_nothing(
    start_node: Callable[..., Listener], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    above_free = free_mb(tmp_path) + 1000  # the watermark above the free space there really is
    node = start_node(min_free_disk_mb=above_free)
    caplog.set_level(logging.INFO, logger="cad_node")
    files = write_ct(tmp_path / "send", 3)
    assert push(node, files) == [OUT_OF_RESOURCES] * 3
    assert files_in_store(node) == []  # no instance, no temporary .incoming-*.part
    assert recorded(node) == (0, 0)
    refusals = [r for r in caplog.records if "refused" in r.getMessage() and r.levelno >= logging.ERROR]
    assert len(refusals) == 1, "the refusal is logged once per study, not once per instance"
    message = refusals[0].getMessage()
    assert SENDER in message and "watermark min_free_disk_mb" in message and "new studies" in message
    for secret in ("HYGIENE^PATIENT", "PID-HYGIENE-7"):
        assert all(secret not in r.getMessage() for r in caplog.records)


def test_study_being_received_finishes_below_the_watermark_but_not_below_the_floor(
    start_node: Callable[..., Listener], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(quiet_period_s=600)
    study_uid = generate_uid()
    first = write_ct(tmp_path / "a", 4, study_uid=study_uid)
    more = write_ct(tmp_path / "a2", 2, study_uid=study_uid)  # a second series of the same study
    assert push(node, first[:2]) == [0, 0]

    above_free = (free_mb(tmp_path) + 1000) * MB
    node.disk = DiskWatermark(watermark_bytes=above_free, floor_bytes=0)  # the disk "fell" below
    caplog.set_level(logging.INFO, logger="cad_node")
    assert push(node, first[2:] + more) == [0, 0, 0, 0], "the study in progress may finish"
    assert push(node, write_ct(tmp_path / "b", 2)) == [OUT_OF_RESOURCES] * 2, "a new study may not start"
    assert recorded(node) == (1, 6)

    node.disk = DiskWatermark(watermark_bytes=above_free, floor_bytes=above_free)
    late = write_ct(tmp_path / "a3", 1, study_uid=study_uid)
    assert push(node, late) == [OUT_OF_RESOURCES], "below the hard floor nothing is kept"
    assert recorded(node) == (1, 6)
    assert len(files_in_store(node)) == 6
    assert any("hard floor disk_floor_mb" in r.getMessage() for r in caplog.records)


def test_floor_is_never_above_the_watermark() -> None:
    disk = DiskWatermark.from_settings(Settings(min_free_disk_mb=100, disk_floor_mb=500))
    assert (disk.watermark_bytes, disk.floor_bytes) == (100 * MB, 100 * MB)
    disk = DiskWatermark(watermark_bytes=100 * MB, floor_bytes=50 * MB)
    assert disk.refusal(free_bytes=150 * MB, size=10 * MB, study_in_progress=False) is None
    assert "watermark" in str(disk.refusal(free_bytes=105 * MB, size=10 * MB, study_in_progress=False))
    assert disk.refusal(free_bytes=105 * MB, size=10 * MB, study_in_progress=True) is None
    assert "hard floor" in str(disk.refusal(free_bytes=55 * MB, size=10 * MB, study_in_progress=True))
    assert Settings().min_free_disk_mb == 1024 and Settings().disk_floor_mb == 256


@contextmanager
def tiny_disk(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` (root only). Skips where it cannot be mounted, fails in CI."""
    folder.mkdir(parents=True, exist_ok=True)
    why = ""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        why = "mounting a tmpfs needs root and mount(8)"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            why = f"mount -t tmpfs failed: {done.stderr.strip()}"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI is set: the disk-full test must run there")
        pytest.skip(why)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def test_disk_filling_during_a_write_gives_a_failure_status_and_leaves_nothing_half_written(
    start_node: Callable[..., Listener],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "node-tiny"
    with tiny_disk(data_dir / "instances", "2m") as store:
        filler = store / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(store).free - 200 * 1024))  # about 200 KiB left
        node = start_node(data_dir=data_dir)
        # Another writer takes the space after the check: the check saw room, the write finds none.
        monkeypatch.setattr(node.store, "free_bytes", lambda: 10 * GB)
        caplog.set_level(logging.INFO, logger="cad_node")
        [big] = write_ct(tmp_path / "big", 1, side=512)  # 512 KiB of pixels: fails part-way
        assert push(node, [big]) == [OUT_OF_RESOURCES]
        assert files_in_store(node) == [filler], "no instance and no temporary file left"
        assert recorded(node) == (0, 0)
        assert any(
            r.levelno >= logging.ERROR and "could not store" in r.getMessage() and SENDER in r.getMessage()
            for r in caplog.records
        )
        assert any("No space left" in (r.exc_text or "") for r in caplog.records if r.exc_info)

        filler.unlink()  # room again: the same instance is now kept whole
        assert push(node, [big]) == [0]
        with node.database.session() as session:
            [row] = session.scalars(select(Instance)).all()
            assert Path(row.path).read_bytes()[-512 * 512 * 2 :] == bytes(512 * 512 * 2)
        assert [p for p in files_in_store(node) if p.name.startswith(".incoming-")] == []
        node.stop()


def test_database_failing_after_the_write_leaves_no_file(
    start_node: Callable[..., Listener], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    real_session = node.database.session
    calls: list[int] = []

    @contextmanager
    def session_failing_once() -> Iterator[Any]:
        calls.append(1)
        with real_session() as session:
            yield session
            if len(calls) == 1:  # the first transaction: the instance's, after its file was written
                raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(node.database, "session", session_failing_once)
    files = write_ct(tmp_path / "send", 1)
    assert push(node, files) == [OUT_OF_RESOURCES]
    assert files_in_store(node) == []
    assert recorded(node) == (0, 0)


# ---------------------------------------------------------------------------------------- retention

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
HOURS = dt.timedelta(hours=1)


@dataclass
class StoredStudy:
    study_id: int
    job_ids: list[int]
    instances: list[Path]
    results: list[Path]


class RetentionNode:
    def __init__(self, data_dir: Path, retention_hours: float = 72.0) -> None:
        self.settings = Settings(data_dir=data_dir, retention_hours=retention_hours)
        data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings.effective_database_url)
        self.database = JobDatabase(self.settings.effective_database_url)
        self.store = InstanceStore(self.settings.instances_dir)
        self.sweep = RetentionSweep(self.settings, self.database)

    def add_study(
        self,
        status: StudyStatus,
        jobs: list[tuple[JobStatus, list[tuple[DeliveryStatus, dt.datetime | None]]]],
        received_at: dt.datetime,
        series: int = 2,
    ) -> StoredStudy:
        study_uid = generate_uid()
        instances = []
        results = []
        with self.database.session() as session:
            study = Study(
                study_uid=study_uid,
                calling_ae=SENDER,
                calling_host="127.0.0.1",
                status=status,
                instance_count=2 * series,
                first_received_at=received_at,
                last_received_at=received_at,
                selected_at=received_at,
            )
            session.add(study)
            for _ in range(series):
                series_uid = generate_uid()
                for _ in range(2):
                    sop_uid = generate_uid()
                    path = self.store.path_for(study_uid, series_uid, sop_uid)
                    self.store.write(path, b"DICM" + bytes(1000))
                    instances.append(path)
                    session.add(
                        Instance(
                            sop_instance_uid=sop_uid,
                            sop_class_uid=CTImageStorage,
                            series_uid=series_uid,
                            study=study,
                            modality="CT",
                            path=str(path),
                            size_bytes=1004,
                            transfer_syntax=ExplicitVRLittleEndian,
                            received_at=received_at,
                        )
                    )
            job_rows = []
            for job_status, deliveries in jobs:
                job = Job(study=study, status=job_status, finished_at=received_at + HOURS)
                session.add(job)
                session.flush()
                job_rows.append(job)
                if job_status == JobStatus.DONE:
                    folder = self.settings.results_dir / f"job-{job.id}"
                    folder.mkdir(parents=True)
                    for kind in ("SR", "SEG"):
                        path = folder / f"{kind.lower()}.dcm"
                        path.write_bytes(b"result")
                        results.append(path)
                        session.add(
                            ResultObject(
                                job=job,
                                kind=kind,
                                sop_instance_uid=generate_uid(),
                                series_uid=generate_uid(),
                                path=str(path),
                            )
                        )
                for number, (delivery_status, delivered_at) in enumerate(deliveries):
                    session.add(
                        Delivery(
                            job=job,
                            destination=f"PACS{number}@10.0.0.5:104",
                            status=delivery_status,
                            delivered_at=delivered_at,
                        )
                    )
            session.flush()
            return StoredStudy(study.id, [j.id for j in job_rows], instances, results)

    def purged_at(self, study_id: int) -> dt.datetime | None:
        with self.database.session() as session:
            return session.get_one(Study, study_id).purged_at

    def rows(self, study_id: int) -> tuple[int, int]:
        with self.database.session() as session:
            instances = session.scalars(select(Instance.id).where(Instance.study_id == study_id)).all()
            results = session.scalars(select(ResultObject.id).join(Job).where(Job.study_id == study_id)).all()
            return len(instances), len(results)


@pytest.fixture
def retention(tmp_path: Path) -> Iterator[RetentionNode]:
    node = RetentionNode(tmp_path / "node")
    yield node
    node.database.close()


def delivered(at: dt.datetime) -> tuple[DeliveryStatus, dt.datetime]:
    return DeliveryStatus.DELIVERED, at


def test_delivered_study_is_removed_after_the_retention_time_and_its_records_stay(
    retention: RetentionNode,
) -> None:
    received = NOW - 100 * HOURS
    last_delivery = NOW - 73 * HOURS
    study = retention.add_study(
        StudyStatus.DONE,
        [(JobStatus.DONE, [delivered(NOW - 74 * HOURS), delivered(last_delivery)])],
        received,
    )
    other = retention.add_study(StudyStatus.DONE, [(JobStatus.DONE, [delivered(NOW - 2 * HOURS)])], received)

    # 71 h after the last delivery: not yet.
    assert retention.sweep.sweep(now=last_delivery + 71 * HOURS) == []
    assert all(p.is_file() for p in study.instances + study.results)

    [purge] = retention.sweep.sweep(now=NOW)
    assert (purge.study_id, purge.instance_files, purge.result_files) == (study.study_id, 4, 2)
    assert not any(p.exists() for p in study.instances + study.results)
    study_folder = study.instances[0].parent.parent
    assert not study_folder.exists(), "the study's emptied folders go too"
    assert not study.results[0].parent.exists()
    assert retention.settings.instances_dir.is_dir() and retention.settings.results_dir.is_dir()
    assert retention.purged_at(study.study_id) == NOW
    assert retention.rows(study.study_id) == (4, 2), "every row stays, paths and all"
    assert all(p.is_file() for p in other.instances + other.results), "another study is untouched"
    assert retention.purged_at(other.study_id) is None
    assert retention.sweep.sweep(now=NOW + HOURS) == [], "a purged study is not swept again"


def test_skipped_study_is_removed_after_the_retention_time(retention: RetentionNode) -> None:
    study = retention.add_study(StudyStatus.SKIPPED, [(JobStatus.SKIPPED, [])], NOW - 80 * HOURS)
    [purge] = retention.sweep.sweep(now=NOW)
    assert purge.instance_files == 4 and not any(p.exists() for p in study.instances)


@pytest.mark.parametrize(
    ("study_status", "jobs"),
    [
        pytest.param(
            StudyStatus.DONE, [(JobStatus.DONE, [(DeliveryStatus.FAILED, None)])], id="failed-delivery"
        ),
        pytest.param(StudyStatus.DONE, [(JobStatus.DONE, [(DeliveryStatus.PENDING, None)])], id="pending"),
        pytest.param(StudyStatus.DONE, [(JobStatus.DONE, [(DeliveryStatus.RETRYING, None)])], id="retrying"),
        pytest.param(
            StudyStatus.DONE,
            [(JobStatus.DONE, [delivered(NOW - 100 * HOURS), (DeliveryStatus.FAILED, None)])],
            id="one-of-two-failed",
        ),
        pytest.param(
            StudyStatus.QUEUED,
            [(JobStatus.DONE, [delivered(NOW - 100 * HOURS)]), (JobStatus.QUEUED, [])],
            id="queued-job",
        ),
        pytest.param(StudyStatus.ANALYSING, [(JobStatus.RUNNING, [])], id="running-job"),
        pytest.param(StudyStatus.FAILED, [(JobStatus.FAILED, [])], id="failed-job"),
        pytest.param(StudyStatus.RECEIVING, [], id="receiving"),
        pytest.param(StudyStatus.DONE, [(JobStatus.DONE, [])], id="nowhere-to-deliver"),
    ],
)
def test_study_with_work_left_keeps_its_files(
    retention: RetentionNode, study_status: StudyStatus, jobs: list[Any]
) -> None:
    study = retention.add_study(study_status, jobs, NOW - 200 * HOURS)
    assert retention.sweep.sweep(now=NOW) == []
    assert all(p.is_file() for p in study.instances + study.results)
    assert retention.purged_at(study.study_id) is None


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    node = RetentionNode(tmp_path / "node", retention_hours=0)
    study = node.add_study(
        StudyStatus.DONE, [(JobStatus.DONE, [delivered(NOW - 1000 * HOURS)])], NOW - 1000 * HOURS
    )
    assert node.sweep.sweep(now=NOW) == []
    assert all(p.is_file() for p in study.instances)
    node.database.close()


def test_nothing_outside_the_store_is_removed_whatever_a_row_says(
    retention: RetentionNode, tmp_path: Path
) -> None:
    study = retention.add_study(
        StudyStatus.DONE, [(JobStatus.DONE, [delivered(NOW - 80 * HOURS)])], NOW - 90 * HOURS
    )
    outside = tmp_path / "precious.dcm"
    outside.write_bytes(b"not the node's")
    inside_name = retention.settings.instances_dir / "1.2" / "3.4"
    inside_name.mkdir(parents=True)
    link = inside_name / "5.6.dcm"
    link.symlink_to(outside)  # a link in the store pointing out of it
    sneaky = retention.settings.instances_dir / ".." / ".." / "precious.dcm"  # a path climbing out
    assert sneaky.resolve() == outside.resolve()
    with retention.database.session() as session:
        for number, path in enumerate([outside, link, sneaky]):
            session.add(
                Instance(
                    sop_instance_uid=f"9.9.{number}",
                    sop_class_uid=CTImageStorage,
                    series_uid="9.9",
                    study_id=study.study_id,
                    modality="CT",
                    path=str(path),
                    size_bytes=14,
                    transfer_syntax=ExplicitVRLittleEndian,
                    received_at=NOW - 90 * HOURS,
                )
            )
    [purge] = retention.sweep.sweep(now=NOW)
    assert purge.instance_files == 4
    assert outside.read_bytes() == b"not the node's"
    assert link.is_symlink()


def test_study_receiving_instances_after_its_purge_is_swept_again(retention: RetentionNode) -> None:
    study = retention.add_study(
        StudyStatus.DONE, [(JobStatus.DONE, [delivered(NOW - 80 * HOURS)])], NOW - 90 * HOURS
    )
    assert len(retention.sweep.sweep(now=NOW)) == 1
    late = retention.store.path_for(
        *[study.instances[0].parent.parent.name, study.instances[0].parent.name, "1.2.3.999"]
    )
    retention.store.write(late, b"late")
    late_at = NOW + 2 * HOURS
    with retention.database.session() as session:
        session.add(
            Instance(
                sop_instance_uid="1.2.3.999",
                sop_class_uid=CTImageStorage,
                series_uid=late.parent.name,
                study_id=study.study_id,
                modality="CT",
                path=str(late),
                size_bytes=4,
                transfer_syntax=ExplicitVRLittleEndian,
                received_at=late_at,
            )
        )
        session.get_one(Study, study.study_id).last_received_at = late_at
    assert retention.sweep.sweep(now=late_at + 71 * HOURS) == []
    assert late.is_file()
    [again] = retention.sweep.sweep(now=late_at + 73 * HOURS)
    assert again.instance_files == 1 and not late.exists()


def test_jobs_show_says_the_files_were_removed(
    retention: RetentionNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("CAD_NODE_")]:
        monkeypatch.delenv(name)
    study = retention.add_study(
        StudyStatus.DONE, [(JobStatus.DONE, [delivered(NOW - 80 * HOURS)])], NOW - 90 * HOURS
    )
    data_dir = str(retention.settings.data_dir)
    shown = CliRunner().invoke(main, ["jobs", "show", str(study.job_ids[0]), "--data-dir", data_dir])
    assert shown.exit_code == 0, shown.output
    assert '"study_files": "kept"' in shown.output
    retention.sweep.sweep(now=NOW)
    shown = CliRunner().invoke(main, ["jobs", "show", str(study.job_ids[0]), "--data-dir", data_dir])
    assert shown.exit_code == 0, shown.output
    assert "removed by the retention policy at 2026-12-01T12:00:00Z" in shown.output


def test_sweep_thread_first_removes_temporary_files_a_crash_left(retention: RetentionNode) -> None:
    folder = retention.settings.instances_dir / "1.2" / "3.4"
    folder.mkdir(parents=True)
    stale, fresh, kept = folder / ".incoming-a.part", folder / ".incoming-b.part", folder / "5.6.dcm"
    for path in (stale, fresh, kept):
        path.write_bytes(b"x")
    os.utime(stale, (0, 0))
    stop = threading.Event()
    stop.set()
    retention.sweep.run(stop)
    assert not stale.exists() and fresh.exists() and kept.exists()


def test_the_listener_process_runs_the_sweep(tmp_path: Path) -> None:
    from cad_node.node_runtime import run_listener

    settings = Settings(
        data_dir=tmp_path / "node", host="127.0.0.1", port=free_port(), allowed_callers=[SENDER]
    )
    settings.data_dir.mkdir()
    upgrade(settings.effective_database_url)
    stale = settings.instances_dir / "1.2" / "3.4" / ".incoming-x.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"cut short")
    os.utime(stale, (0, 0))
    stop = threading.Event()
    stop.set()  # start, then stop at once: the sweep's thread still makes its first pass
    database = JobDatabase(settings.effective_database_url)
    run_listener(settings, database, stop)
    for _ in range(50):
        if not stale.exists():
            break
        threading.Event().wait(0.1)
    database.close()
    assert not stale.exists()
