"""Delivery of a job's results with real parts: dcmtk's storescp as the PACS, a port nobody listens on,
a SQLite job database, the filesystem broker, and `cad-node jobs retry` run as a program."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from cad_node.job_database import (
    Delivery,
    DeliveryStatus,
    Job,
    JobDatabase,
    JobStatus,
    ResultObject,
    Study,
    StudyStatus,
)
from cad_node.job_queue import EXPORT_QUEUE, EXPORT_TASK
from cad_node.schema_migration import upgrade
from cad_node.settings import Settings
from tests.peers import Storescp, free_port
from workers.delivery import run_delivery

REPOSITORY = Path(__file__).resolve().parents[1]
BACKOFF_S = 5.0
ATTEMPTS = 3


@dataclass
class Done:
    """A finished job with two result files, and its delivery rows."""

    settings: Settings
    database: JobDatabase
    job_id: int
    results: list[Path]

    def add_delivery(self, destination: str) -> None:
        with self.database.session() as session:
            session.add(Delivery(job_id=self.job_id, destination=destination, status=DeliveryStatus.PENDING))

    def delivery(self, destination: str) -> Delivery:
        with self.database.session() as session:
            return session.scalars(
                select(Delivery).where(Delivery.job_id == self.job_id, Delivery.destination == destination)
            ).one()

    def deliver(self, destination: str) -> float | None:
        return run_delivery(self.job_id, destination, self.settings, self.database)


@pytest.fixture
def done(tmp_path: Path, lidc_series_dir: Callable[[str], Path]) -> Done:
    settings = Settings(
        data_dir=tmp_path / "node", ae_title="CADNODE", export_attempts=ATTEMPTS, export_backoff_s=BACKOFF_S
    )
    settings.results_dir.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    database = JobDatabase(settings.effective_database_url)
    # Any small DICOM files stand in for the SR and SEG: two LIDC slices.
    results = [
        Path(shutil.copy(source, settings.results_dir / f"result{n}.dcm"))
        for n, source in enumerate(sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))[:2])
    ]
    first = pydicom.dcmread(results[0], stop_before_pixels=True)
    with database.session() as session:
        study = Study(
            study_uid=first.StudyInstanceUID,
            calling_ae="PACS",
            calling_host="127.0.0.1",
            status=StudyStatus.DONE,
            instance_count=0,
            note="",
        )
        job = Job(study=study, status=JobStatus.DONE, series_uid=first.SeriesInstanceUID)
        session.add(job)
        for kind, path in zip(("SR", "SEG"), results, strict=True):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            session.add(
                ResultObject(
                    job=job,
                    kind=kind,
                    sop_instance_uid=header.SOPInstanceUID,
                    series_uid=header.SeriesInstanceUID,
                    path=str(path),
                )
            )
        session.flush()
        job_id = job.id
    yield Done(settings, database, job_id, results)
    database.close()


def export_messages(settings: Settings) -> list[tuple[str, list[object]]]:
    messages = []
    for path in sorted((settings.queue_dir / "messages").glob(f"*.{EXPORT_QUEUE}.msg")):
        message = json.loads(path.read_text())
        args, _kwargs, _options = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], args))
    return messages


def cad_node(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("CAD_NODE_")}
    return subprocess.run(
        [sys.executable, "-m", "cad_node", *arguments],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_results_delivered_to_a_real_scp(done: Done) -> None:
    with Storescp(ae_title="PACS") as pacs:
        destination = f"PACS@127.0.0.1:{pacs.port}"
        done.add_delivery(destination)
        assert done.deliver(destination) is None
        received = [pydicom.dcmread(path) for path in pacs.wait_for(2)]  # read before storescp ends
    delivery = done.delivery(destination)
    assert (delivery.status, delivery.attempts, delivery.last_error) == (DeliveryStatus.DELIVERED, 1, "")
    assert delivery.delivered_at is not None
    by_uid = {dataset.SOPInstanceUID: dataset for dataset in map(pydicom.dcmread, done.results)}
    assert {dataset.SOPInstanceUID: dataset for dataset in received} == by_uid
    # A message for a delivery already made (a duplicate, or a retry after success) sends nothing.
    assert done.deliver(destination) is None
    assert done.delivery(destination).attempts == 1


class DiskFullOnce:
    """A pynetdicom storage SCP that answers 0xA700 (out of resources) the first time it is sent `refused`
    and stores everything else: a PACS whose disk filled up in the middle of an association."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.stored: list[str] = []
        self.refusals = 0
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = StoragePresentationContexts
        self.port = free_port()

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == self.refused and not self.refusals:
            self.refusals += 1
            return 0xA700
        self.stored.append(uid)
        return 0x0000

    def __enter__(self) -> DiskFullOnce:
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_a_retry_sends_only_what_the_peer_has_not_stored(done: Done) -> None:
    uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in done.results]
    with DiskFullOnce(refused=uids[0]) as pacs:
        destination = f"PACS@127.0.0.1:{pacs.port}"
        done.add_delivery(destination)
        assert done.deliver(destination) == BACKOFF_S
        first = done.delivery(destination)
        assert first.status == DeliveryStatus.RETRYING
        assert first.last_error == f"{done.results[0].name}: status 0xA700"
        assert pacs.stored == [uids[1]]
        assert done.deliver(destination) is None
        assert pacs.stored == [uids[1], uids[0]]  # each once: the second attempt did not resend uids[1]
    shown = cad_node("jobs", "show", str(done.job_id), "--data-dir", str(done.settings.data_dir))
    assert shown.returncode == 0, shown.stderr
    (delivery,) = json.loads(shown.stdout)["deliveries"]
    assert (delivery["status"], delivery["attempts"]) == (DeliveryStatus.DELIVERED, 2)
    assert [a["stored"] for a in delivery["attempt_log"]] == [[uids[1]], [uids[0]]]


def test_unreachable_destination_retries_with_growing_waits_then_fails_and_an_admin_retries(
    done: Done,
) -> None:
    destination = f"PACS@127.0.0.1:{free_port()}"  # nobody listens there
    done.add_delivery(destination)
    waits = []
    for attempt in range(1, ATTEMPTS):
        waits.append(done.deliver(destination))
        delivery = done.delivery(destination)
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.RETRYING, attempt)
        assert delivery.last_error == f"{destination} could not be reached"
        assert delivery.delivered_at is None
    assert waits == [BACKOFF_S, 2 * BACKOFF_S]
    assert done.deliver(destination) is None  # the last attempt
    failed = done.delivery(destination)
    assert (failed.status, failed.attempts) == (DeliveryStatus.FAILED, ATTEMPTS)
    assert "could not be reached" in failed.last_error

    retried = cad_node("jobs", "retry", str(done.job_id), "--data-dir", str(done.settings.data_dir))
    assert retried.returncode == 0, retried.stderr
    assert f"job {done.job_id}: delivery queued again to {destination}" in retried.stdout
    again = done.delivery(destination)
    assert (again.status, again.attempts) == (DeliveryStatus.PENDING, 0)
    assert export_messages(done.settings) == [(EXPORT_TASK, [done.job_id, destination])]
    # The next attempt counts from one again.
    assert done.deliver(destination) == BACKOFF_S

    nothing = cad_node("jobs", "retry", str(done.job_id), "--data-dir", str(done.settings.data_dir))
    assert nothing.returncode != 0 and "nothing to retry" in nothing.stderr


def test_destination_host_that_does_not_resolve_is_retried(done: Done) -> None:
    destination = "PACS@cad-node-test.invalid:104"  # .invalid never resolves (RFC 6761)
    done.add_delivery(destination)
    assert done.deliver(destination) == BACKOFF_S
    delivery = done.delivery(destination)
    assert delivery.status == DeliveryStatus.RETRYING
    assert delivery.last_error.startswith(f"{destination} could not be reached")


def test_missing_result_file_is_a_delivery_error(done: Done) -> None:
    done.results[1].unlink()
    destination = f"PACS@127.0.0.1:{free_port()}"
    done.add_delivery(destination)
    assert done.deliver(destination) == BACKOFF_S
    delivery = done.delivery(destination)
    assert delivery.status == DeliveryStatus.RETRYING
    assert done.results[1].name in delivery.last_error
