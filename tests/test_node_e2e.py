"""The node end to end, with real processes: dcmtk and Orthanc as the PACS, `cad-node up` as the node."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cad_node.result_reading import reported_nodules
from models.lidc import read_lidc_case
from tests.node_process import RunningNode
from tests.peers import Orthanc, Storescp, dcmtk_env, storescu, wait_until

pytestmark = pytest.mark.slow

ANALYSIS_TIMEOUT_S = 300.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
# What the node sends per study with its default settings: SR and SEG, and the extras for viewers
# without SR support (presentation state, key images, summary page).
RESULT_CLASSES = sorted([SR_CLASS, SEG_CLASS, GSPS_CLASS, KOS_CLASS, PDF_CLASS])
RESULT_MODALITIES = ["DOC", "KO", "PR", "SEG", "SR"]


def ct_files(series_dir: Path) -> list[Path]:
    return sorted(series_dir.glob("*.dcm"))


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def by_sop_class(files: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        dataset = pydicom.dcmread(path)
        found.setdefault(str(dataset.SOPClassUID), []).append(dataset)
    return found


@pytest.mark.usefixtures("dcmtk")
def test_storescu_to_node_to_storescp(lidc_series_dir: Callable[[str], Path]) -> None:
    """Acceptance 1: LIDC-IDRI-0001 pushed by storescu comes back to storescp as one SR and one SEG (and
    one of each extra object) that pass dciodvfy, read back with highdicom, and place a nodule within
    10 mm of the readers'."""
    series_dir = lidc_series_dir("LIDC-IDRI-0001")
    files = ct_files(series_dir)
    with Storescp(ae_title="PACS") as pacs, RunningNode(destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as node:
        storescu(files, node.port, node.ae_title, calling_aet="PACS")
        received = pacs.wait_for(len(RESULT_CLASSES), timeout=ANALYSIS_TIMEOUT_S)
        job = node.wait_for_job("done", timeout=30)
        assert job["deliveries"] == {f"PACS@127.0.0.1:{pacs.port}": "delivered"}

        # The same instances again: stored once, no second analysis, nothing more sent.
        storescu(files, node.port, node.ae_title, calling_aet="PACS")
        time.sleep(node.quiet_period_s + 3)
        assert len(node.jobs()) == 1
        assert node.job(job["id"])["study_instances"] == len(files)
        assert len(pacs.received()) == len(RESULT_CLASSES)
        objects = by_sop_class(received)
        errors = {path.name: dciodvfy_errors(path) for path in received}

    assert sorted(objects) == RESULT_CLASSES
    assert all(len(found) == 1 for found in objects.values())
    assert errors == {path.name: [] for path in received}

    source = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    sr = hd.sr.Comprehensive3DSR.from_dataset(objects[SR_CLASS][0])
    seg = hd.seg.Segmentation.from_dataset(objects[SEG_CLASS][0])
    ct = next(iter(source.values()))
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == ct.StudyInstanceUID
    assert sr.SeriesInstanceUID != ct.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert len(seg.SegmentSequence) == len(sr.content.get_planar_roi_measurement_groups()) >= 1

    nodule = read_lidc_case(series_dir).targets()[0]
    reported = reported_nodules(objects[SR_CLASS][0], source)
    distances = [float(np.linalg.norm(np.subtract(n.centre_mm, nodule.centre_xyz))) for n in reported]
    assert min(distances) <= 10.0, distances


@pytest.mark.usefixtures("dcmtk")
def test_a_study_with_no_eligible_series_is_skipped(lidc_series_dir: Callable[[str], Path]) -> None:
    """Acceptance 3: 20 slices cannot cover the lungs: the job ends skipped, with the reason."""
    files = ct_files(lidc_series_dir("LIDC-IDRI-0001"))[:20]
    with RunningNode(allowed_callers=["PACS"]) as node:
        storescu(files, node.port, node.ae_title, calling_aet="PACS")
        job = node.wait_for_job("skipped", timeout=60)
        listing = node.cli("jobs", "list")
    assert job["reason"].startswith("no eligible series") and "20 slices < 40" in job["reason"]
    assert "skipped" in listing and job["reason"][:40] in listing


@pytest.mark.usefixtures("dcmtk")
def test_an_unknown_calling_ae_title_is_refused(lidc_series_dir: Callable[[str], Path]) -> None:
    """Acceptance 4: only the configured callers may associate; the log says who was refused."""
    with RunningNode(allowed_callers=["PACS@127.0.0.1"]) as node:

        def echo(calling: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["echoscu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                capture_output=True,
                text=True,
                env=dcmtk_env(),
                timeout=30,
                check=False,
            )

        assert echo("PACS").returncode == 0
        refused = echo("INTRUDER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        with pytest.raises(RuntimeError):
            storescu(ct_files(lidc_series_dir("LIDC-IDRI-0001"))[:3], node.port, node.ae_title, "INTRUDER")
        wait_until(lambda: "INTRUDER" in node.full_log(), 10, what="the refusal in the node's log")
        assert "refused: calling AE title not allowed" in node.full_log()
        assert node.jobs() == []


@pytest.mark.usefixtures("dcmtk")
def test_orthanc_forwards_to_node_and_gets_one_sr_and_one_seg(
    require_tool: Callable[[str], str], lidc_series_dir: Callable[[str], Path]
) -> None:
    """Acceptance 2: through a real Orthanc with auto-forwarding, the study ends with exactly one SR
    series and one SEG series added (and one series of each extra object), and nothing duplicated."""
    require_tool("Orthanc")
    files = ct_files(lidc_series_dir("LIDC-IDRI-0001"))
    node = RunningNode()
    with Orthanc(node=f"{node.ae_title}@127.0.0.1:{node.port}", stable_age=2) as pacs:
        node.destinations = [f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"]
        node.allowed_callers = [f"{pacs.ae_title}@127.0.0.1"]
        with node:
            storescu(files, pacs.dicom_port, pacs.ae_title, calling_aet="MODALITY")

            def results_back() -> list[dict[str, object]] | None:
                studies = pacs.studies()
                if len(studies) != 1:
                    return None
                series = pacs.series_of_study(studies[0])
                return series if {"SR", "SEG"} <= {s["Modality"] for s in series} else None

            wait_until(results_back, ANALYSIS_TIMEOUT_S, interval=1.0, what="SR and SEG in Orthanc")
            # Orthanc sees the study become stable again with the results in it; nothing may follow.
            time.sleep(2 * 2 + node.quiet_period_s + 4)
            series = pacs.series_of_study(pacs.studies()[0])
            jobs = node.jobs()
    modalities = sorted(str(s["Modality"]) for s in series)
    assert modalities == sorted(["CT", *RESULT_MODALITIES]), series
    counts = {str(s["Modality"]): s["Instances"] for s in series}
    assert counts == {"CT": len(files), **dict.fromkeys(RESULT_MODALITIES, 1)}
    assert [j["status"] for j in jobs] == ["done"]


@pytest.mark.usefixtures("dcmtk")
def test_a_job_survives_its_worker_dying(lidc_series_dir: Callable[[str], Path]) -> None:
    """Tasks are acknowledged late: when the process analysing a study is killed, the job runs again in a
    new worker process and the results still arrive, once."""
    files = ct_files(lidc_series_dir("LIDC-IDRI-0001"))
    with Storescp(ae_title="PACS") as pacs, RunningNode(destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as node:
        storescu(files, node.port, node.ae_title, calling_aet="PACS")
        running = node.wait_for_job("running", timeout=60)
        worker = node.job(running["id"])["worker"]
        os.kill(int(worker.rpartition(":")[2]), signal.SIGKILL)
        received = pacs.wait_for(len(RESULT_CLASSES), timeout=ANALYSIS_TIMEOUT_S)
        job = node.wait_for_job("done", timeout=30)
        details = node.job(job["id"])
        assert details["attempts"] == 2
        assert details["worker"] != worker
        assert len(received) == len(RESULT_CLASSES) and len(node.jobs()) == 1
