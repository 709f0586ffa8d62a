"""The test PACS of orthanc/: a real Orthanc forwards a stable CT study to the node once, and only once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from tests.peers import Orthanc, Storescp, storescu

NODE_AET = "CADNODE"
STABLE_AGE_S = 2
LIDC_SLICES = 133
FORWARD_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow


@pytest.fixture
def dcmtk_and_orthanc(require_tool: Callable[[str], str]) -> None:
    for program in ("storescp", "storescu", "echoscu", "Orthanc"):
        require_tool(program)


def result_sr(ct_slice: pydicom.Dataset) -> pydicom.Dataset:
    """A small SR in the CT's study, standing in for the node's results."""
    content = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value="test result",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[ct_slice],
        content=content,
        series_instance_uid=hd.UID(),
        series_number=9001,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="cad-node tests",
    )


def forwarded_marker(pacs: Orthanc, study_id: str) -> str:
    return pacs.study_metadata(study_id).get("CadNodeForwarded", "")


def is_stable(pacs: Orthanc, study_id: str) -> bool:
    return bool(pacs.rest(f"/studies/{study_id}")["IsStable"])


@pytest.mark.usefixtures("dcmtk_and_orthanc")
def test_orthanc_forwards_a_stable_ct_study_once(
    lidc_series_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    slices = sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))
    assert len(slices) == LIDC_SLICES
    first = pydicom.dcmread(slices[0], stop_before_pixels=True)

    with (
        Storescp(ae_title=NODE_AET) as node,
        Orthanc(node=f"{NODE_AET}@127.0.0.1:{node.port}", stable_age=STABLE_AGE_S) as pacs,
    ):
        pushed_at = time.monotonic()
        push_s = storescu(slices, pacs.dicom_port, pacs.ae_title)
        received = node.wait_for(LIDC_SLICES, timeout=FORWARD_TIMEOUT_S)
        print(f"push into Orthanc {push_s:.2f} s; CT at the node {time.monotonic() - pushed_at:.2f} s after")

        forwarded = [pydicom.dcmread(path, stop_before_pixels=True) for path in received]
        assert {ds.Modality for ds in forwarded} == {"CT"}
        assert {ds.StudyInstanceUID for ds in forwarded} == {first.StudyInstanceUID}
        assert len({ds.SOPInstanceUID for ds in forwarded}) == LIDC_SLICES

        (study_id,) = pacs.studies()
        assert pacs.wait_until(lambda: forwarded_marker(pacs, study_id), 10, "study marked as forwarded")

        # The node's results come back into the study: it becomes stable again, and is not forwarded again.
        sr_path = tmp_path / "result_sr.dcm"
        result_sr(first).save_as(sr_path)
        storescu([sr_path], pacs.dicom_port, pacs.ae_title, calling_aet=NODE_AET)
        pacs.wait_until(lambda: len(pacs.series_of_study(study_id)) == 2, 10, "the SR is in the study")
        pacs.wait_until(
            lambda: f"autoforward: study {study_id}" in pacs.log() and "already forwarded" in pacs.log(),
            STABLE_AGE_S + 10,
            "autoforward saw the study stable again",
        )
        assert is_stable(pacs, study_id)
        time.sleep(STABLE_AGE_S + 1)

        assert len(node.received()) == LIDC_SLICES
        series = {s["Modality"]: s for s in pacs.series_of_study(study_id)}
        assert series["CT"]["Instances"] == LIDC_SLICES
        assert series["CT"]["SeriesInstanceUID"] == first.SeriesInstanceUID
        assert series["SR"]["Instances"] == 1
        assert pacs.log().count("autoforward: forwarded study") == 1
