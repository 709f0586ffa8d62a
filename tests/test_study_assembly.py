"""Study assembly with real parts: LIDC slices received by a real Listener into a SQLite job database,
jobs queued on a real Celery app over the embedded filesystem broker, time driven by `tick(now=...)`."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from cad_node.job_database import (
    Delivery,
    DeliveryStatus,
    Job,
    JobDatabase,
    JobStatus,
    Study,
    StudyStatus,
    utcnow,
)
from cad_node.job_queue import ANALYSE_TASK, ANALYSIS_QUEUE, EXPORT_QUEUE, EXPORT_TASK, JobQueue, make_celery
from cad_node.listener import SUCCESS, Listener
from cad_node.schema_migration import upgrade
from cad_node.settings import Settings
from cad_node.study_assembly import REQUEUE_AFTER, StudyAssembler
from tests.peers import free_port
from tests.test_listener import SENDER, rewritten, send

QUIET_S = 20.0
SLICES = 12  # enough with the loosened rules below; a whole LIDC series would only cost time


@dataclass
class Node:
    settings: Settings
    listener: Listener
    database: JobDatabase
    assembler: StudyAssembler


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings = Settings(
        data_dir=tmp_path / "node",
        host="127.0.0.1",
        port=free_port(),
        allowed_callers=[SENDER],
        min_free_disk_mb=0,
        quiet_period_s=QUIET_S,
        min_slices=10,
        min_coverage_mm=20.0,
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    database = JobDatabase(settings.effective_database_url)
    listener = Listener(settings, database)
    listener.start()
    queue = JobQueue(make_celery(settings))
    assembler = StudyAssembler(database, queue, settings.selection_rules, settings.quiet_period_s)
    yield Node(settings, listener, database, assembler)
    listener.stop()
    database.close()


@pytest.fixture(scope="module")
def ordered_slices(lidc_series_dir: Callable[[str], Path]) -> list[Path]:
    """LIDC-IDRI-0001's slices from feet to head (the file names are not in that order)."""

    def height(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    return sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"), key=height)[40 : 40 + SLICES]


def new_series(sources: Sequence[Path], folder: Path, **attributes: object) -> list[Path]:
    """The slices again as another series of the same study: new UIDs, the given attributes changed."""
    series_uid = generate_uid()

    def change(dataset: pydicom.Dataset) -> None:
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.SeriesNumber = 99
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)

    return [rewritten(path, folder / path.name, change) for path in sources]


def receive(node: Node, files: Sequence[Path]) -> None:
    assert send(node.listener, files) == [SUCCESS] * len(files)


def quiet_for(node: Node, seconds: float) -> dt.datetime:
    """Moves the study's times back as if its last instance had come `seconds` ago; gives now.

    The listener stamps arrivals with the real clock, and `tick(now)` records `now` as the time of
    selection, so a `now` in the future would make later arrivals look older than the selection."""
    with node.database.session() as session:
        row = session.scalars(select(Study)).one()
        earlier = dt.timedelta(seconds=seconds) - (utcnow() - row.last_received_at)
        row.last_received_at -= earlier
        row.first_received_at -= earlier
        if row.selected_at is not None:
            row.selected_at -= earlier
    return utcnow()


def study(node: Node) -> Study:
    with node.database.session() as session:
        return session.scalars(select(Study)).one()


def jobs(node: Node) -> list[Job]:
    with node.database.session() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def queued_messages(node: Node, queue: str = ANALYSIS_QUEUE) -> list[tuple[str, list[object]]]:
    """The task name and arguments of each message waiting in the filesystem broker's queue."""
    messages = []
    for path in sorted((node.settings.queue_dir / "messages").glob(f"*.{queue}.msg")):
        message = json.loads(path.read_text())
        args, _kwargs, _options = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], args))
    return messages


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_study_is_not_due_before_the_quiet_period(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices)
    assert node.assembler.tick(now=quiet_for(node, QUIET_S - 1)) == []
    assert jobs(node) == [] and queued_messages(node) == []
    assert study(node).status == StudyStatus.RECEIVING


def test_due_study_gets_one_job_with_the_chosen_series(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices)
    series_uid = pydicom.dcmread(ordered_slices[0], stop_before_pixels=True).SeriesInstanceUID
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    [job] = jobs(node)
    assert job.id == job_id
    assert (job.status, job.series_uid) == (JobStatus.QUEUED, series_uid)
    assert job.enqueued_at is not None
    assert job.selection["chosen"] == series_uid
    assert "only eligible series (2.5 mm)" in job.selection["why"]
    assert job.selection["verdicts"] == {series_uid: "chosen"}
    assert [s["slices"] for s in job.selection["series"]] == [SLICES]
    assert study(node).status == StudyStatus.QUEUED
    assert queued_messages(node) == [(ANALYSE_TASK, [job_id])]
    # Nothing new arrived: later ticks do not assemble the study again.
    assert node.assembler.tick(now=quiet_for(node, QUIET_S + 60)) == []
    assert len(jobs(node)) == 1 and len(queued_messages(node)) == 1


def test_study_without_eligible_series_is_skipped_with_the_reason(
    node: Node, ordered_slices: list[Path]
) -> None:
    receive(node, ordered_slices[:4])
    assert node.assembler.tick(now=quiet_for(node, QUIET_S + 1)) == []
    [job] = jobs(node)
    assert job.status == JobStatus.SKIPPED and job.series_uid is None
    assert job.reason.startswith("no eligible series: ")
    assert "4 slices < 10" in job.reason and "covers" in job.reason
    assert job.finished_at is not None
    assert study(node).status == StudyStatus.SKIPPED
    assert queued_messages(node) == []


def test_late_localizer_does_not_change_the_chosen_series(
    node: Node, ordered_slices: list[Path], tmp_path: Path
) -> None:
    receive(node, ordered_slices)
    [first_job] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    scout = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer = new_series(ordered_slices[:1], tmp_path / "scout", ImageType=scout)
    receive(node, localizer)
    assert node.assembler.tick(now=quiet_for(node, QUIET_S - 1)) == []  # quiet period again
    assert node.assembler.tick(now=quiet_for(node, QUIET_S + 1)) == []
    [job] = jobs(node)
    assert (job.id, job.status) == (first_job, JobStatus.QUEUED)
    note = study(node).note
    assert f"job {first_job}" in note and "did not change the chosen series" in note
    assert study(node).instance_count == SLICES + 1
    assert queued_messages(node) == [(ANALYSE_TASK, [first_job])]


def test_thinner_series_arriving_late_supersedes_the_queued_job(
    node: Node, ordered_slices: list[Path], tmp_path: Path
) -> None:
    receive(node, ordered_slices)
    [first_job] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    thin = new_series(ordered_slices, tmp_path / "thin", SliceThickness=1.0, SeriesDescription="thin")
    thin_uid = pydicom.dcmread(thin[0], stop_before_pixels=True).SeriesInstanceUID
    receive(node, thin)
    [second_job] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    old, new = jobs(node)
    assert (old.id, new.id) == (first_job, second_job)
    assert old.status == JobStatus.SUPERSEDED
    assert old.reason.startswith("chosen series changed: ")
    assert (new.status, new.series_uid, new.selection["chosen"]) == (JobStatus.QUEUED, thin_uid, thin_uid)
    assert "thinnest eligible (1.0 mm)" in new.selection["why"]
    assert f"job {first_job} superseded" in study(node).note
    assert queued_messages(node) == [(ANALYSE_TASK, [first_job]), (ANALYSE_TASK, [second_job])]


def test_missing_slices_arriving_late_turn_a_skipped_study_into_a_job(
    node: Node, ordered_slices: list[Path]
) -> None:
    receive(node, ordered_slices[:6])
    node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    [skipped] = jobs(node)
    assert skipped.status == JobStatus.SKIPPED
    receive(node, ordered_slices[6:])
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    old, new = jobs(node)
    assert (old.status, new.id, new.status) == (JobStatus.SUPERSEDED, job_id, JobStatus.QUEUED)
    assert old.reason.startswith("chosen series changed: ")
    assert study(node).status == StudyStatus.QUEUED


def test_more_slices_of_the_chosen_series_give_a_new_job(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices[:-1])
    [first_job] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    receive(node, ordered_slices[-1:])
    [second_job] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    old, new = jobs(node)
    assert (old.id, old.status) == (first_job, JobStatus.SUPERSEDED)
    assert (new.id, new.series_uid) == (second_job, old.series_uid)
    assert new.series_fingerprint != old.series_fingerprint


def test_overdue_queued_job_is_sent_again(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices)
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    [job] = jobs(node)
    assert job.enqueued_at is not None
    assert node.assembler.overdue_jobs(job.enqueued_at + REQUEUE_AFTER - dt.timedelta(seconds=1)) == []
    later = job.enqueued_at + REQUEUE_AFTER + dt.timedelta(seconds=1)
    assert node.assembler.overdue_jobs(later) == [job_id]
    node.assembler.tick(now=later)
    assert queued_messages(node) == [(ANALYSE_TASK, [job_id])] * 2
    [again] = jobs(node)
    assert again.status == JobStatus.QUEUED and again.enqueued_at > job.enqueued_at  # type: ignore[operator]


def test_running_job_of_a_dead_worker_is_taken_back(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices)
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    alive = f"{socket.gethostname()}:{os.getpid()}"
    with node.database.session() as session:
        job = session.get_one(Job, job_id)
        job.status, job.worker, job.heartbeat_at = JobStatus.RUNNING, alive, utcnow()
    assert node.assembler.tick() == []
    assert jobs(node)[0].status == JobStatus.RUNNING  # its worker (this process) lives: left alone
    with node.database.session() as session:
        session.get_one(Job, job_id).worker = f"{socket.gethostname()}:{dead_pid()}"
    node.assembler.tick()
    [job] = jobs(node)
    assert job.status == JobStatus.QUEUED
    assert queued_messages(node) == [(ANALYSE_TASK, [job_id])] * 2


def test_running_job_with_a_stale_heartbeat_is_taken_back(node: Node, ordered_slices: list[Path]) -> None:
    receive(node, ordered_slices)
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    with node.database.session() as session:
        job = session.get_one(Job, job_id)
        job.status, job.worker = JobStatus.RUNNING, "gpu-box-7:4242"  # another host: its pid says nothing
        job.heartbeat_at = utcnow()
    assert node.assembler.overdue_jobs(utcnow() + dt.timedelta(minutes=5)) == []
    assert node.assembler.overdue_jobs(utcnow() + dt.timedelta(minutes=16)) == [job_id]
    assert jobs(node)[0].status == JobStatus.QUEUED


def test_job_whose_message_could_not_be_sent_is_sent_by_a_later_tick(
    node: Node, ordered_slices: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    receive(node, ordered_slices)
    messages = node.settings.queue_dir / "messages"
    shutil.rmtree(messages)
    messages.write_text("in the way")  # the broker cannot take a message now
    caplog.set_level(logging.INFO, logger="cad_node")
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    [job] = jobs(node)
    assert (job.status, job.enqueued_at) == (JobStatus.QUEUED, None)
    assert any(f"job {job_id}: could not reach the queue" in r.getMessage() for r in caplog.records)
    messages.unlink()
    messages.mkdir()
    assert node.assembler.tick() == []  # nothing new to assemble, but the job's message goes now
    assert queued_messages(node) == [(ANALYSE_TASK, [job_id])]
    assert jobs(node)[0].enqueued_at is not None


def test_delivery_that_stopped_moving_gets_its_export_message_again(
    node: Node, ordered_slices: list[Path]
) -> None:
    receive(node, ordered_slices)
    [job_id] = node.assembler.tick(now=quiet_for(node, QUIET_S + 1))
    with node.database.session() as session:
        session.get_one(Job, job_id).status = JobStatus.DONE
        session.add(Delivery(job_id=job_id, destination="PACS@127.0.0.1:104", status=DeliveryStatus.RETRYING))
    with node.database.session() as session:
        [delivery] = session.scalars(select(Delivery)).all()
    assert node.assembler.overdue_deliveries(delivery.updated_at + REQUEUE_AFTER / 2) == []
    later = delivery.updated_at + REQUEUE_AFTER + dt.timedelta(seconds=1)
    assert node.assembler.overdue_deliveries(later) == [(job_id, "PACS@127.0.0.1:104")]
    node.assembler.tick(now=later)
    assert queued_messages(node, EXPORT_QUEUE) == [(EXPORT_TASK, [job_id, "PACS@127.0.0.1:104"])]
    assert node.assembler.overdue_deliveries(later) == []  # its clock restarted: sent once
