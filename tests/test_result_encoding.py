"""DICOM results (SR TID 1500 and SEG) of a nodule on the real scan LIDC-IDRI-0001: validity (dciodvfy),
what highdicom reads back, and the SEG's round trip onto the source slices, single- and multi-frame."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from matplotlib.path import Path as Polygon
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from cad_node.algorithm import AlgorithmIdentity, uid_from_digest, weights_digest
from cad_node.result_encoding import EncodedResults, encode_results, write_results
from cad_node.result_sr import LUNG_RADS_SUGGESTION, NODULE_TYPE, NODULE_TYPES
from models.findings import Finding, measure_finding
from models.lidc import read_lidc_case
from models.measurements import BoxMask
from models.series_loading import CtSeries, load_series
from models.volume import Volume

ALGORITHM = AlgorithmIdentity(
    name="cad-node lung nodule CAD",
    version="0.1.0",
    software_version="0.1.0",
    manufacturer="cad-node project",
    device_uid="2.25.123456789012345678901234567890",
)
MULTI_FRAME_SLICES = slice(80, 100)  # LIDC-IDRI-0001's nodule lies on slices 86 to 93


def make_finding(volume: Volume, mask: BoxMask) -> Finding:
    """A finding measured from a mask as the pipeline does, without the networks."""
    centre_x = volume.index_to_patient(mask.centroid_kji())[0]
    return measure_finding(volume, mask, 0.95, "left" if centre_x > 0 else "right", "lower")  # LPS: +x left


@dataclasses.dataclass(frozen=True)
class Encoded:
    series: CtSeries
    finding: Finding
    results: EncodedResults
    sr_path: Path
    seg_path: Path


def _encode(
    series: CtSeries, findings: Sequence[Finding], out_dir: Path
) -> tuple[EncodedResults, list[Path]]:
    results = encode_results(series.headers, series.frame_numbers, findings, ALGORITHM)
    return results, write_results(results, out_dir)


@pytest.fixture(scope="module")
def lidc_0001(lidc_series_dir: Callable[[str], Path]) -> Path:
    return lidc_series_dir("LIDC-IDRI-0001")


@pytest.fixture(scope="module")
def single_frame(lidc_0001: Path, tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    series = load_series(lidc_0001)
    (nodule,) = read_lidc_case(lidc_0001).nodules
    finding = make_finding(series.volume, nodule.consensus)
    results, paths = _encode(series, [finding], tmp_path_factory.mktemp("single"))
    return Encoded(series, finding, results, *paths)


@pytest.fixture(scope="module")
def multi_frame(single_frame: Encoded, tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    """The nodule's slices as one Legacy Converted Enhanced CT image; the finding moved onto its grid."""
    folder = tmp_path_factory.mktemp("multi")
    datasets = [pydicom.dcmread(p) for p in single_frame.series.paths[MULTI_FRAME_SLICES]]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.save_as(folder / "enhanced.dcm")
    series = load_series(folder / "enhanced.dcm")
    first = MULTI_FRAME_SLICES.start
    mask = single_frame.finding.mask
    finding = dataclasses.replace(
        single_frame.finding,
        mask=BoxMask(offset=(mask.offset[0] - first, mask.offset[1], mask.offset[2]), array=mask.array),
        axial_slice_index=single_frame.finding.axial_slice_index - first,
    )
    np.testing.assert_array_equal(series.volume.hu, single_frame.series.volume.hu[MULTI_FRAME_SLICES])
    results, paths = _encode(series, [finding], folder / "results")
    return Encoded(series, finding, results, *paths)


@pytest.fixture(params=["single_frame", "multi_frame"])
def encoded(request: pytest.FixtureRequest) -> Encoded:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def two_nodules(single_frame: Encoded, tmp_path_factory: pytest.TempPathFactory) -> tuple[Encoded, Finding]:
    """The LIDC nodule and a small ball that shares some of its slices and overlaps it."""
    series = single_frame.series
    kji = np.indices((7, 7, 7)) - 3
    ball = (kji**2).sum(axis=0) <= 9
    k, j, i = (int(v) for v in np.argwhere(single_frame.finding.mask.full(series.volume.shape))[0])
    second = make_finding(series.volume, BoxMask(offset=(k - 1, j - 3, i - 3), array=ball))
    results, paths = _encode(series, [single_frame.finding, second], tmp_path_factory.mktemp("two"))
    return Encoded(series, single_frame.finding, results, *paths), second


def dciodvfy_errors(dciodvfy: str, path: Path) -> tuple[list[str], list[str]]:
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [w for w in lines if w.startswith("Warning")]


# --- the algorithm's identity --------------------------------------------------------------------


def test_device_uid_follows_the_weight_bytes(tmp_path: Path) -> None:
    (tmp_path / "detector.pt").write_bytes(b"weights one")
    (tmp_path / "notes.txt").write_text("not a weight file")
    first = AlgorithmIdentity.for_weights("0.1.0", tmp_path)
    assert AlgorithmIdentity.for_weights("0.1.0", tmp_path).device_uid == first.device_uid
    assert UID(first.device_uid).is_valid and first.device_uid.startswith("2.25.")
    (tmp_path / "notes.txt").write_text("changed, still not a weight file")
    assert AlgorithmIdentity.for_weights("0.1.0", tmp_path).device_uid == first.device_uid
    (tmp_path / "detector.pt").write_bytes(b"weights two")
    assert AlgorithmIdentity.for_weights("0.1.0", tmp_path).device_uid != first.device_uid
    assert first.manufacturer == "cad-node project" and first.version == "0.1.0"


def test_device_uid_needs_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weight files"):
        weights_digest(tmp_path)
    assert uid_from_digest("f" * 64) == f"2.25.{2**128 - 1}"
    assert len(uid_from_digest("f" * 64)) <= 64


# --- validity --------------------------------------------------------------------------------------


def test_sr_and_seg_pass_dciodvfy(encoded: Encoded, require_tool: Callable[[str], str]) -> None:
    dciodvfy = require_tool("dciodvfy")
    for path in (encoded.sr_path, encoded.seg_path):
        errors, _ = dciodvfy_errors(dciodvfy, path)
        assert errors == [], f"{path.name}: {errors}"


def test_no_findings_gives_a_valid_report_and_no_seg(
    single_frame: Encoded, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    (tmp_path / "seg.dcm").write_bytes(b"a SEG from an earlier run")
    results, paths = _encode(single_frame.series, [], tmp_path)
    assert results.seg is None
    assert [p.name for p in paths] == ["sr.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr.dcm"]  # no temporary files left
    errors, _ = dciodvfy_errors(require_tool("dciodvfy"), paths[0])
    assert errors == []
    sr = hd.sr.srread(paths[0])
    assert sr.content.get_planar_roi_measurement_groups() == []
    summary = _summary(sr)
    assert summary == hd.sr.CodedConcept.from_code(codes.DCM.AllAlgorithmsSucceededWithoutFindings)


def _summary(sr: hd.sr.Comprehensive3DSR) -> hd.sr.CodedConcept:
    (item,) = hd.sr.utils.find_content_items(
        sr, name=codes.DCM.CADProcessingAndFindingsSummary, recursive=True
    )
    return hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])


# --- the SR read back ------------------------------------------------------------------------------


def _measurement(group: object, name: object, derivation: object = None) -> float:
    matches = [
        m
        for m in group.get_measurements(name=name)  # type: ignore[attr-defined]
        if derivation is None or m.derivation == derivation
    ]
    assert len(matches) == 1
    return float(matches[0].value)


def test_sr_reads_back_the_nodule(encoded: Encoded) -> None:
    sr = hd.sr.srread(encoded.sr_path)
    finding = encoded.finding
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:Nodule 1"
    assert group.finding_type == codes.SCT.Nodule
    (site,) = group.finding_sites
    assert site.value == codes.SCT.LowerZoneOfLung
    assert site.laterality == codes.SCT.Left
    assert _measurement(group, codes.SCT.LongAxis) == pytest.approx(finding.long_axis_mm, abs=0.05)
    assert _measurement(group, codes.SCT.ShortAxis) == pytest.approx(finding.short_axis_mm, abs=0.05)
    assert _measurement(group, codes.SCT.Volume) == pytest.approx(finding.volume_mm3, abs=0.5)
    mean = _measurement(group, codes.DCM.AttenuationCoefficient, codes.SCT.Mean)
    assert mean == pytest.approx(finding.mean_hu, abs=0.5)
    (nodule_type,) = group.get_qualitative_evaluations(name=NODULE_TYPE)
    assert nodule_type.value == NODULE_TYPES[finding.nodule_type] == NODULE_TYPES["solid"]
    (lung_rads,) = group.get_qualitative_evaluations(name=LUNG_RADS_SUGGESTION)
    assert lung_rads.value.meaning == f"Lung-RADS {finding.lung_rads} (suggestion)"
    assert finding.lung_rads == "4B"  # solid, mean diameter 29 mm
    assert "suggestion" in lung_rads.name.meaning.lower()
    assert _summary(sr) == hd.sr.CodedConcept.from_code(codes.DCM.AllAlgorithmsSucceededWithFindings)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CADNODE"


def test_sr_region_is_the_outline_on_the_referenced_slice(encoded: Encoded) -> None:
    sr = hd.sr.srread(encoded.sr_path)
    (group,) = sr.content.get_planar_roi_measurement_groups()
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    outline = region.value
    np.testing.assert_array_equal(outline[0], outline[-1])  # closed
    (reference,) = region.ContentSequence[0].ReferencedSOPSequence
    k = encoded.finding.axial_slice_index
    header = encoded.series.headers[k]
    assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID
    multi = "PerFrameFunctionalGroupsSequence" in header
    assert reference.get("ReferencedFrameNumber") == (encoded.series.frame_numbers[k] if multi else None)
    # inside the outline: the mask's pixels on that slice, give or take its edge
    plane = encoded.finding.mask.axial_slice(k, encoded.series.volume.shape[1:])
    inside = _rasterise(outline, plane.shape)
    overlap = (inside & plane).sum() / (inside | plane).sum()
    assert overlap > 0.95
    # and in patient space, on the nodule's slice around its centre
    to_patient = hd.spatial.ImageToReferenceTransformer.for_image(
        header, frame_number=encoded.series.frame_numbers[k] if multi else None
    )
    corners_mm = to_patient(outline)
    expected_z = encoded.series.volume.index_to_patient([k, 0, 0])[2]
    np.testing.assert_allclose(corners_mm[:, 2], expected_z, atol=1e-3)
    in_plane_centre = encoded.series.volume.index_to_patient([k, *np.argwhere(plane).mean(axis=0)])
    assert np.linalg.norm(corners_mm[:-1].mean(axis=0)[:2] - in_plane_centre[:2]) < 3.0


def test_sr_group_holds_what_ohif_loads_into_its_measurement_panel(encoded: Encoded) -> None:
    """OHIF hydrates a group whose tracking identifier starts with a Cornerstone tool's name and whose
    first NUM holds the outline (INFERRED FROM); the group's comment becomes the label. Here the first
    NUM is the area inside the outline on the key slice, and the comment is the nodule's caption."""
    sr = hd.sr.srread(encoded.sr_path)
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert str(group.tracking_identifier).startswith("Cornerstone3DTools@^0.1.0:PlanarFreehandROI:")
    first_num = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
    assert first_num.ConceptNameCodeSequence[0].CodeMeaning == "Area"
    unit = first_num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mm2", "UCUM")
    (outline,) = [item for item in first_num.ContentSequence if item.ValueType == "SCOORD"]
    assert outline.RelationshipType == "INFERRED FROM"
    np.testing.assert_array_equal(outline.GraphicData, group.roi.GraphicData)
    assert (
        outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    )
    area = float(first_num.MeasuredValueSequence[0].NumericValue)
    k = encoded.finding.axial_slice_index
    header = encoded.series.headers[k]
    if "PixelSpacing" in header:
        x, y = group.roi.value[:, 0], group.roi.value[:, 1]
        polygon_px = abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2
        assert area == pytest.approx(polygon_px * float(np.prod(header.PixelSpacing)), abs=0.05)
    plane = encoded.finding.mask.axial_slice(k, encoded.series.volume.shape[1:])
    assert area == pytest.approx(plane.sum() * float(np.prod(encoded.series.volume.spacing[1:])), rel=0.1)
    (comment,) = [
        item
        for item in group[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121106"  # DCM Comment
    ]
    assert comment.TextValue == f"Nodule 1: solid, Lung-RADS {encoded.finding.lung_rads} (suggestion)"


def _rasterise(outline: npt.NDArray[np.float64], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Pixels whose centre ((column, row) = (i + 0.5, j + 0.5)) lies inside the polygon."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    centres = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
    return Polygon(outline).contains_points(centres).reshape(shape)


def test_sr_and_seg_name_each_nodule_with_the_same_tracking_identifier(encoded: Encoded) -> None:
    sr = hd.sr.srread(encoded.sr_path)
    seg = encoded.results.seg
    assert seg is not None
    (planar,) = sr.content.get_planar_roi_measurement_groups()
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    segment = seg.SegmentSequence[0]
    assert segment.TrackingUID == planar.tracking_uid
    assert segment.TrackingID == str(planar.tracking_identifier)
    assert segment.TrackingID.endswith(":Nodule 1") and segment.SegmentLabel == "Nodule 1"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


# --- the SEG round trip ----------------------------------------------------------------------------


def test_seg_frames_map_back_onto_their_source_slices(encoded: Encoded) -> None:
    seg = hd.seg.segread(encoded.seg_path)
    assert seg.FrameOfReferenceUID == encoded.series.headers[0].FrameOfReferenceUID
    (segment,) = seg.SegmentSequence
    assert hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]) == codes.SCT.Nodule
    assert (
        hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyCategoryCodeSequence[0])
        == codes.SCT.MorphologicallyAbnormalStructure
    )
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == ALGORITHM.name
    (rebuilt,) = _rebuilt_segments(seg, encoded.series)
    np.testing.assert_array_equal(rebuilt, encoded.finding.mask.full(encoded.series.volume.shape))


def test_two_overlapping_nodules_are_two_segments(two_nodules: tuple[Encoded, Finding]) -> None:
    encoded, second = two_nodules
    shape = encoded.series.volume.shape
    masks = [encoded.finding.mask.full(shape), second.mask.full(shape)]
    assert (masks[0] & masks[1]).any() and (masks[1] & ~masks[0]).any()
    seg = hd.seg.segread(encoded.seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1", "Nodule 2"]
    for rebuilt, mask in zip(_rebuilt_segments(seg, encoded.series), masks, strict=True):
        np.testing.assert_array_equal(rebuilt, mask)
    sr = hd.sr.srread(encoded.sr_path)
    groups = sr.content.get_planar_roi_measurement_groups()
    prefix = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:"
    assert [g.tracking_identifier for g in groups] == [f"{prefix}Nodule 1", f"{prefix}Nodule 2"]
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in seg.SegmentSequence]
    assert _measurement(groups[1], codes.SCT.Volume) == pytest.approx(second.volume_mm3, abs=0.5)


def _rebuilt_segments(seg: hd.seg.Segmentation, series: CtSeries) -> list[npt.NDArray[np.bool_]]:
    """Each segment on the source grid, from the SEG's frames alone: each frame goes to the slice of
    the source image (and frame) it references, which must lie at the frame's position."""
    assert seg.SegmentationType == "BINARY"
    slice_of = {
        (h.SOPInstanceUID, n): k
        for k, (h, n) in enumerate(zip(series.headers, series.frame_numbers, strict=True))
    }
    multi = "PerFrameFunctionalGroupsSequence" in series.headers[0]
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    rebuilt = np.zeros((len(seg.SegmentSequence), *series.volume.shape), dtype=bool)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        identification = groups if "SegmentIdentificationSequence" in groups else shared
        segment = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (source,) = groups.DerivationImageSequence[0].SourceImageSequence
        frame_number = int(source.ReferencedFrameNumber) if multi else 1
        k = slice_of[(source.ReferencedSOPInstanceUID, frame_number)]
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, series.volume.index_to_patient([k, 0, 0]), atol=1e-3)
        assert not rebuilt[segment - 1, k].any(), "two frames of one segment on one slice"
        rebuilt[segment - 1, k] = frame.astype(bool)
    return list(rebuilt)


def test_seg_volume_matches_the_mask_in_patient_space(single_frame: Encoded) -> None:
    """highdicom's own reading of the geometry: the SEG's voxels land where the mask's do."""
    seg = hd.seg.segread(single_frame.seg_path)
    volume = seg.get_volume(combine_segments=False)
    voxels = np.argwhere(volume.array[..., 0])
    seg_mm = np.asarray(volume.map_indices_to_reference(voxels))
    mask = single_frame.finding.mask
    mask_mm = single_frame.series.volume.index_to_patient(np.argwhere(mask.array) + np.asarray(mask.offset))
    assert len(seg_mm) == len(mask_mm)
    key = lambda points: np.round(points, 2).tolist()  # noqa: E731
    assert sorted(key(seg_mm)) == sorted(key(mask_mm))


# --- the results as new series in the source study (IHE AI Results) ---------------------------------


def test_results_are_new_series_in_the_source_study(encoded: Encoded) -> None:
    source = encoded.series.headers[0]
    sr, seg = hd.sr.srread(encoded.sr_path), hd.seg.segread(encoded.seg_path)
    for dataset, description in ((sr, "CAD nodules SR"), (seg, "CAD nodules SEG")):
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
            assert dataset.get(keyword) == source.get(keyword), keyword
        assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
        assert dataset.SeriesDescription == description
        assert dataset.Manufacturer == ALGORITHM.manufacturer
        assert dataset.ManufacturerModelName == ALGORITHM.name
        assert list(dataset.SoftwareVersions) == ["cad-node 0.1.0", "model 0.1.0"]
        (ours,) = [e for e in dataset.ContributingEquipmentSequence if "DeviceUID" in e]
        assert ours.DeviceUID == ALGORITHM.device_uid
        assert ours.Manufacturer == ALGORITHM.manufacturer
        assert ours.ManufacturerModelName == ALGORITHM.name
        purpose = ours.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert sr.SeriesInstanceUID != seg.SeriesInstanceUID
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"


def test_encoding_never_imports_torch() -> None:
    code = "import sys, cad_node.result_encoding; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_rejects_headers_that_do_not_match_the_frames(single_frame: Encoded) -> None:
    with pytest.raises(ValueError, match="frame numbers"):
        encode_results(single_frame.series.headers, single_frame.series.frame_numbers[:-1], [], ALGORITHM)
