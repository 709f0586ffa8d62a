"""The node as a hospital runs it: Celery on Redis, the job database on PostgreSQL, one listener and
two analysis worker processes; four senders push eight studies at once."""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.node_process import SplitNode
from tests.peers import Storescp, storescu
from tests.test_node_e2e import RESULT_MODALITIES

pytestmark = pytest.mark.slow

STUDIES = 8
SENDERS = 4
TIMEOUT_S = 900.0


def copy_as_new_study(files: list[Path], folder: Path, number: int) -> list[Path]:
    """The series as another patient's study: new study, series and instance UIDs, same pixels."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for index, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.PatientID = f"E2E-{number:02d}"
        copy = folder / f"{index:04d}.dcm"
        dataset.save_as(copy)
        copies.append(copy)
    return copies


def push_all(groups: list[list[Path]], port: int, called: str) -> list[BaseException]:
    """Each group of files from its own sender, all at once; the errors, if any."""
    errors: list[BaseException] = []

    def send(files: list[Path], calling: str) -> None:
        try:
            storescu(files, port, called, calling_aet=calling)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=send, args=(files, f"SENDER{number}"))
        for number, files in enumerate(groups, start=1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.usefixtures("dcmtk")
def test_four_senders_eight_studies_on_redis_and_postgresql(
    tmp_path: Path, lidc_series_dir: Callable[[str], Path], redis_url: str, postgres_url: str
) -> None:
    source = sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))
    studies = [copy_as_new_study(source, tmp_path / f"study-{n}", n) for n in range(STUDIES)]
    per_sender = STUDIES // SENDERS
    groups = [
        list(itertools.chain.from_iterable(studies[s * per_sender : (s + 1) * per_sender]))
        for s in range(SENDERS)
    ]
    callers = [f"SENDER{n}" for n in range(1, SENDERS + 1)]
    with Storescp(ae_title="PACS") as pacs:
        node = SplitNode(
            broker_url=redis_url,
            database_url=postgres_url,
            analysis_workers=2,
            destinations=[f"PACS@127.0.0.1:{pacs.port}"],
            allowed_callers=callers,
        )
        with node:
            assert push_all(groups, node.port, node.ae_title) == []
            received = pacs.wait_for(len(RESULT_MODALITIES) * STUDIES, timeout=TIMEOUT_S)
            jobs = node.jobs()
            details = [json.loads(node.cli("jobs", "show", str(job["id"]))) for job in jobs]
            listed = dashboard_rows(node.dashboard_page("/"))
            workers = {d["worker"] for d in details}
        uids = Counter((str(d.StudyInstanceUID), str(d.Modality)) for d in map(pydicom.dcmread, received))

    expected_studies = {str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in studies}
    assert [job["status"] for job in jobs] == ["done"] * STUDIES
    assert {job["study_uid"] for job in jobs} == expected_studies  # each study analysed once
    assert all(d["attempts"] == 1 and d["study_instances"] == len(source) for d in details)  # nothing lost
    assert uids == Counter({(uid, kind): 1 for uid in expected_studies for kind in RESULT_MODALITIES})  # once
    assert all([x["status"] for x in d["deliveries"]] == ["delivered"] for d in details)
    assert len(workers) == 2  # both analysis workers took studies
    assert listed == [(job["id"], job["status"]) for job in jobs]  # the dashboard and jobs list agree


def dashboard_rows(page: str) -> list[tuple[int, str]]:
    """(job, state) of each row of the dashboard's job list."""
    rows = re.findall(r'<a href="/jobs/(\d+)">\d+</a>.*?<span class="state (\w+)">', page, flags=re.DOTALL)
    return [(int(job), state) for job, state in rows]
