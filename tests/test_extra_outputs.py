"""The extra results for viewers without SR support, on the real scan LIDC-IDRI-0001: the presentation
state (GSPS), the key images (KOS) and the summary page (Encapsulated PDF). Validity (dciodvfy), what
highdicom and pydicom read back, where the outline lies, which images are key, what the page says
(ghostscript renders and reads the PDF), and which of them the settings choose."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from click.testing import CliRunner
from matplotlib.path import Path as Polygon
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cad_node.cli import main
from cad_node.result_encoding import EXTRA_FILES, EXTRA_OUTPUTS, EncodedResults, encode_results, write_results
from cad_node.result_gsps import LUNG_WINDOW, nodule_label
from cad_node.result_kos import KOS_TITLE
from cad_node.result_summary import DECISION_AID, NO_FINDINGS
from cad_node.settings import Settings
from models.findings import Finding
from models.lidc import read_lidc_case
from models.measurements import BoxMask
from models.series_loading import CtSeries, load_series
from tests.test_result_encoding import ALGORITHM, MULTI_FRAME_SLICES, dciodvfy_errors, make_finding


@dataclasses.dataclass(frozen=True)
class Encoded:
    series: CtSeries
    findings: list[Finding]
    results: EncodedResults
    folder: Path

    def path(self, extra: str) -> Path:
        return self.folder / EXTRA_FILES[extra]  # type: ignore[index]


def _encode(series: CtSeries, findings: Sequence[Finding], folder: Path, extras: Sequence[str]) -> Encoded:
    results = encode_results(
        series.headers, series.frame_numbers, findings, ALGORITHM, extras=extras, volume=series.volume
    )
    write_results(results, folder)
    return Encoded(series, list(findings), results, folder)


@pytest.fixture(scope="module")
def lidc(lidc_series_dir: Callable[[str], Path]) -> tuple[CtSeries, Finding]:
    folder = lidc_series_dir("LIDC-IDRI-0001")
    series = load_series(folder)
    (nodule,) = read_lidc_case(folder).nodules
    return series, make_finding(series.volume, nodule.consensus)


@pytest.fixture(scope="module")
def single_frame(lidc: tuple[CtSeries, Finding], tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    series, finding = lidc
    return _encode(series, [finding], tmp_path_factory.mktemp("single"), EXTRA_OUTPUTS)


@pytest.fixture(scope="module")
def multi_frame(lidc: tuple[CtSeries, Finding], tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    """The nodule's slices as one Legacy Converted Enhanced CT image; the finding moved onto its grid."""
    series, finding = lidc
    folder = tmp_path_factory.mktemp("multi")
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in series.paths[MULTI_FRAME_SLICES]],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.save_as(folder / "enhanced.dcm")
    first = MULTI_FRAME_SLICES.start
    mask = finding.mask
    moved = dataclasses.replace(
        finding,
        mask=BoxMask(offset=(mask.offset[0] - first, mask.offset[1], mask.offset[2]), array=mask.array),
        axial_slice_index=finding.axial_slice_index - first,
    )
    return _encode(load_series(folder / "enhanced.dcm"), [moved], folder / "results", EXTRA_OUTPUTS)


@pytest.fixture(params=["single_frame", "multi_frame"])
def encoded(request: pytest.FixtureRequest) -> Encoded:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def three_nodules(lidc: tuple[CtSeries, Finding], tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    """The LIDC nodule, a small ball 30 slices away, and one more on the LIDC nodule's key slice."""
    series, finding = lidc
    kji = np.indices((7, 7, 7)) - 3
    ball = (kji**2).sum(axis=0) <= 9
    k = finding.axial_slice_index
    far = make_finding(series.volume, BoxMask(offset=(k - 33, 250, 150), array=ball))
    beside = make_finding(series.volume, BoxMask(offset=(k - 3, 300, 400), array=ball))
    assert far.axial_slice_index != k and beside.axial_slice_index == k
    return _encode(series, [finding, far, beside], tmp_path_factory.mktemp("three"), EXTRA_OUTPUTS)


def _slice_of(series: CtSeries) -> dict[tuple[str, int], int]:
    return {
        (str(h.SOPInstanceUID), n): k
        for k, (h, n) in enumerate(zip(series.headers, series.frame_numbers, strict=True))
    }


def _is_multi_frame(series: CtSeries) -> bool:
    return "PerFrameFunctionalGroupsSequence" in series.headers[0]


# --- validity ----------------------------------------------------------------------------------------


def test_extras_pass_dciodvfy(encoded: Encoded, require_tool: Callable[[str], str]) -> None:
    dciodvfy = require_tool("dciodvfy")
    for extra in EXTRA_OUTPUTS:
        errors, _ = dciodvfy_errors(dciodvfy, encoded.path(extra))
        assert errors == [], f"{extra}: {errors}"


def test_extras_are_new_series_in_the_source_study(single_frame: Encoded) -> None:
    source = single_frame.series.headers[0]
    sr = single_frame.results.sr
    expected = {
        "gsps": ("PR", "CAD nodules GSPS"),
        "kos": ("KO", "CAD key images"),
        "summary": ("DOC", "CAD nodules summary"),
    }
    series_uids = {sr.SeriesInstanceUID, source.SeriesInstanceUID}
    for extra, (modality, description) in expected.items():
        dataset = pydicom.dcmread(single_frame.path(extra))
        assert (dataset.Modality, dataset.SeriesDescription) == (modality, description)
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
            assert dataset.get(keyword) == source.get(keyword), keyword
        assert dataset.SeriesInstanceUID not in series_uids
        series_uids.add(dataset.SeriesInstanceUID)
        assert dataset.Manufacturer == ALGORITHM.manufacturer
        (ours,) = [e for e in dataset.ContributingEquipmentSequence if "DeviceUID" in e]
        assert ours.DeviceUID == ALGORITHM.device_uid
        assert ours.ManufacturerModelName == ALGORITHM.name
        assert list(ours.SoftwareVersions) == ["cad-node 0.1.0", "model 0.1.0"]
        purpose = ours.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")


# --- the presentation state --------------------------------------------------------------------------


def test_gsps_references_the_series_and_sets_a_lung_window(encoded: Encoded) -> None:
    gsps = pydicom.dcmread(encoded.path("gsps"))
    assert gsps.SOPClassUID == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == encoded.series.series_instance_uid
    referenced = {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedImageSequence}
    assert referenced == set(encoded.series.sop_instance_uids)
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == LUNG_WINDOW
    source = encoded.series.headers[0]
    if not _is_multi_frame(encoded.series):  # a multi-frame CT keeps its rescale per frame
        assert float(gsps.RescaleSlope) == float(source.RescaleSlope)
        assert float(gsps.RescaleIntercept) == float(source.RescaleIntercept)


def test_gsps_outline_lies_on_the_nodule_of_its_key_slice(encoded: Encoded) -> None:
    gsps = pydicom.dcmread(encoded.path("gsps"))
    series, (finding,) = encoded.series, encoded.findings
    sr = hd.sr.srread(encoded.folder / "sr.dcm")
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.GraphicLayer == gsps.GraphicLayerSequence[0].GraphicLayer
    (image,) = annotation.ReferencedImageSequence
    frame = int(image.ReferencedFrameNumber) if "ReferencedFrameNumber" in image else 1
    k = _slice_of(series)[(image.ReferencedSOPInstanceUID, frame)]
    assert k == finding.axial_slice_index
    assert ("ReferencedFrameNumber" in image) == _is_multi_frame(series)
    (outline,) = annotation.GraphicObjectSequence
    assert (outline.GraphicType, outline.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
    assert (outline.TrackingID, outline.TrackingUID) == (group.tracking_identifier, group.tracking_uid)
    points = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
    np.testing.assert_array_equal(points[0], points[-1])
    plane = finding.mask.axial_slice(k, series.volume.shape[1:])
    inside = _rasterise(points, plane.shape)
    assert (inside & plane).sum() / (inside | plane).sum() > 0.95

    (label,) = annotation.TextObjectSequence
    assert label.UnformattedTextValue == nodule_label(1, finding)
    assert label.UnformattedTextValue.endswith(f"solid, Lung-RADS {finding.lung_rads} (CAD suggestion)")
    assert np.min(np.linalg.norm(points - np.asarray(label.AnchorPoint, dtype=float), axis=1)) < 1e-6
    left, top = label.BoundingBoxTopLeftHandCorner
    right, bottom = label.BoundingBoxBottomRightHandCorner
    assert 0 <= left < right < series.headers[0].Columns and 0 <= top < bottom < series.headers[0].Rows
    assert bottom <= points[:, 1].min() or top >= points[:, 1].max()  # beside the nodule, not over it


def _rasterise(outline: npt.NDArray[np.float64], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    centres = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
    return Polygon(outline).contains_points(centres).reshape(shape)


# --- the key images ----------------------------------------------------------------------------------


def _key_references(path: Path) -> tuple[hd.ko.KeyObjectSelectionDocument, list[pydicom.Dataset]]:
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    items = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    return kos, [i.ReferencedSOPSequence[0] for i in items]


def test_kos_lists_exactly_the_key_slice(encoded: Encoded) -> None:
    kos, references = _key_references(encoded.path("kos"))
    series, (finding,) = encoded.series, encoded.findings
    key = series.headers[finding.axial_slice_index]
    (reference,) = references
    assert reference.ReferencedSOPInstanceUID == key.SOPInstanceUID
    if _is_multi_frame(series):
        assert int(reference.ReferencedFrameNumber) == series.frame_numbers[finding.axial_slice_index]
    else:
        assert "ReferencedFrameNumber" not in reference
    gsps = encoded.results.gsps
    assert gsps is not None
    (state,) = reference.ReferencedSOPSequence  # the key image opens with the outline drawn
    assert state.ReferencedSOPInstanceUID == gsps.SOPInstanceUID
    assert (
        hd.sr.CodedConcept.from_dataset(kos.ConceptNameCodeSequence[0]) == KOS_TITLE == codes.DCM.OfInterest
    )
    (description,) = [
        i for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]  # DCM 113012 Key Object Description
    assert "Nodule 1" in description.TextValue and "largest" in description.TextValue
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert evidence == {key.SOPInstanceUID, gsps.SOPInstanceUID}


def test_three_nodules_on_two_key_slices(three_nodules: Encoded) -> None:
    series, findings = three_nodules.series, three_nodules.findings
    _, references = _key_references(three_nodules.path("kos"))
    keys = sorted({f.axial_slice_index for f in findings})
    assert len(keys) == 2
    assert [r.ReferencedSOPInstanceUID for r in references] == [
        series.headers[k].SOPInstanceUID for k in keys
    ]
    gsps = pydicom.dcmread(three_nodules.path("gsps"))
    annotations = gsps.GraphicAnnotationSequence
    assert [a.GraphicObjectSequence[0].TrackingID.split(":")[-1] for a in annotations] == [
        "Nodule 1",
        "Nodule 2",
        "Nodule 3",
    ]
    for annotation, finding in zip(annotations, findings, strict=True):
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
            series.headers[finding.axial_slice_index].SOPInstanceUID
        )


# --- the summary page --------------------------------------------------------------------------------


def _pdf(path: Path, folder: Path) -> Path:
    dataset = pydicom.dcmread(path)
    assert dataset.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage
    assert dataset.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(dataset.EncapsulatedDocument)[: int(dataset.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-")
    pdf = folder / "summary.pdf"
    pdf.write_bytes(document)
    return pdf


def _page_text(gs: str, pdf: Path) -> str:
    run = subprocess.run(
        [gs, "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-sDEVICE=txtwrite", "-sOutputFile=-", str(pdf)],
        capture_output=True,
        text=True,
        check=True,
    )
    return " ".join(run.stdout.split())


def _page_count(gs: str, pdf: Path, folder: Path) -> int:
    subprocess.run(
        [
            gs,
            "-q",
            "-dSAFER",
            "-dBATCH",
            "-dNOPAUSE",
            "-sDEVICE=pnggray",
            "-r20",
            "-o",
            str(folder / "p%d.png"),
            pdf,
        ],
        check=True,
    )
    return len(list(folder.glob("p*.png")))


def test_summary_is_one_page_with_the_nodule_rows(
    three_nodules: Encoded, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    gs = require_tool("gs")
    pdf = _pdf(three_nodules.path("summary"), tmp_path)
    assert _page_count(gs, pdf, tmp_path) == 1
    text = _page_text(gs, pdf)
    source = three_nodules.series.headers[0]
    assert f"ID: {source.PatientID}" in text
    assert "Study date: 2000-01-01" in text
    assert "3 nodules found by the CAD algorithm" in text
    for number, finding in enumerate(three_nodules.findings, start=1):
        key = three_nodules.series.headers[finding.axial_slice_index]
        row = (
            f"Nodule {number} {finding.side.capitalize()} {finding.zone} zone {finding.nodule_type} "
            f"{finding.long_axis_mm:.0f} x {finding.short_axis_mm:.0f} {finding.volume_mm3:,.0f} "
            f"{finding.lung_rads} {finding.probability:.2f} {key.InstanceNumber}"
        )
        assert row in text
    assert " ".join(DECISION_AID.split()) in text
    assert f"{ALGORITHM.name}, model {ALGORITHM.version}" in text
    dataset = pydicom.dcmread(three_nodules.path("summary"))
    sources = {str(i.ReferencedSOPInstanceUID) for i in dataset.SourceInstanceSequence}
    assert sources == {
        three_nodules.series.headers[f.axial_slice_index].SOPInstanceUID for f in three_nodules.findings
    }
    assert dataset.BurnedInAnnotation == "YES" and dataset.VerificationFlag == "UNVERIFIED"


def test_summary_thumbnail_shows_the_key_slice_in_lung_window(
    single_frame: Encoded, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """The rendered page is mostly white paper, with one dark lung thumbnail of the nodule."""
    from PIL import Image

    gs = require_tool("gs")
    pdf = _pdf(single_frame.path("summary"), tmp_path)
    _page_count(gs, pdf, tmp_path)
    page = np.asarray(Image.open(tmp_path / "p1.png"))
    assert (page > 240).mean() > 0.8
    assert (page < 100).sum() > 100  # lung parenchyma at -600 +- 750 HU is dark grey


# --- no findings, and the choice of extras -----------------------------------------------------------


def test_no_findings_gives_a_summary_that_says_so(
    lidc: tuple[CtSeries, Finding], tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    series, _ = lidc
    for stale in ("gsps.dcm", "kos.dcm"):
        (tmp_path / stale).write_bytes(b"from an earlier run")
    encoded = _encode(series, [], tmp_path, EXTRA_OUTPUTS)
    assert encoded.results.gsps is None and encoded.results.kos is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr.dcm", "summary.dcm"]
    errors, _ = dciodvfy_errors(require_tool("dciodvfy"), encoded.path("summary"))
    assert errors == []
    (tmp_path / "pdf").mkdir()
    text = _page_text(require_tool("gs"), _pdf(encoded.path("summary"), tmp_path / "pdf"))
    assert NO_FINDINGS in text
    assert " ".join(DECISION_AID.split()) in text
    assert "Nodule 1" not in text


def test_settings_choose_the_extras(lidc: tuple[CtSeries, Finding], tmp_path: Path) -> None:
    series, finding = lidc
    assert Settings().extra_outputs == list(EXTRA_OUTPUTS) == ["gsps", "kos", "summary"]
    (tmp_path / "summary.dcm").write_bytes(b"from an earlier run")
    chosen = Settings(extra_outputs=["kos"]).extra_outputs
    encoded = _encode(series, [finding], tmp_path, chosen)
    assert (
        encoded.results.kos is not None and encoded.results.gsps is None and encoded.results.summary is None
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kos.dcm", "seg.dcm", "sr.dcm"]
    _, (reference,) = _key_references(encoded.path("kos"))
    assert "ReferencedSOPSequence" not in reference  # no presentation state to open it with
    assert _encode(series, [finding], tmp_path, []).results.extras() == {e: None for e in EXTRA_OUTPUTS}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "sr.dcm"]


def test_settings_take_the_extras_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAD_NODE_EXTRA_OUTPUTS", '["summary", "gsps"]')
    assert Settings().extra_outputs == ["summary", "gsps"]
    monkeypatch.setenv("CAD_NODE_EXTRA_OUTPUTS", "[]")
    assert Settings().extra_outputs == []
    monkeypatch.setenv("CAD_NODE_EXTRA_OUTPUTS", '["pdf"]')
    with pytest.raises(ValueError, match="extra_outputs"):
        Settings()


def test_unknown_extras_and_a_summary_without_pixels_are_refused(lidc: tuple[CtSeries, Finding]) -> None:
    series, finding = lidc
    with pytest.raises(ValueError, match="unknown extra outputs"):
        encode_results(series.headers, series.frame_numbers, [finding], ALGORITHM, extras=["pdf"])
    with pytest.raises(ValueError, match="volume"):
        encode_results(series.headers, series.frame_numbers, [finding], ALGORITHM, extras=["summary"])


def test_analyze_refuses_unknown_extras_before_it_loads_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["analyze", str(tmp_path), "--out", str(tmp_path), "--extras", "gsps,pdf"]
    )
    assert result.exit_code == 2
    assert "--extras" in result.output
