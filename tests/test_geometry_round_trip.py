"""The results' geometry, read back as a viewer would: each SEG frame onto the source slice it claims,
each SR region onto the image it references, against the finding's own mask and centre. The source is
part of LIDC-IDRI-0001 rewritten four ways that keep the patient's anatomy where it is: instances
numbered (and stored) head first or feet first, the image mirrored in x (row direction -x, so the
slice normal points to the feet), and the image turned by 90 degrees in plane."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import generate_uid

from cad_node.result_encoding import encode_results, write_results
from cad_node.result_reading import outline_centre_mm
from models.findings import Finding
from models.measurements import BoxMask
from models.series_loading import CtSeries, load_series
from tests.test_result_encoding import ALGORITHM, make_finding

SOURCE_SLICES = slice(55, 79)  # 24 slices of LIDC-IDRI-0001, 2.5 mm apart
CENTRE_KJI = (12, 300, 330)  # on the unchanged series: a slice centre, so one slice has the largest area
# An ellipsoid with a lobe towards +x: no mirror image or turn of it lands on itself.
RADII_MM = np.array([6.0, 4.0, 5.0])  # x, y, z
LOBE_OFFSET_MM = np.array([6.5, 1.5, 0.0])
LOBE_RADIUS_MM = 2.5
VARIANTS = ["head first", "feet first", "mirrored in x", "turned 90 degrees"]


@dataclasses.dataclass(frozen=True)
class Encoded:
    series: CtSeries
    finding: Finding
    sr_path: Path
    seg_path: Path


def write_variant(sources: list[Path], folder: Path, variant: str) -> None:
    """`sources` in ascending z. Each slice gets new UIDs (same study and frame of reference) and, for the
    two in-plane variants, its pixels rearranged and its geometry changed so that every voxel keeps its
    patient position."""
    folder.mkdir()
    series_uid = generate_uid()
    for n, path in enumerate(sources):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        # head first: instance 1 is the most cranial slice (as LIDC stores it), feet first the opposite
        dataset.InstanceNumber = len(sources) - n if variant != "feet first" else n + 1
        pixels = dataset.pixel_array
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        spacing = float(dataset.PixelSpacing[1])
        last_column_x = x + (int(dataset.Columns) - 1) * spacing
        if variant == "mirrored in x":
            dataset.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            dataset.ImagePositionPatient = [last_column_x, y, z]
            pixels = pixels[:, ::-1]
        elif variant == "turned 90 degrees":
            assert dataset.Rows == dataset.Columns and dataset.PixelSpacing[0] == dataset.PixelSpacing[1]
            # rows run along -x, columns along +y: pixel (r, c) is the source's (c, columns - 1 - r)
            dataset.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]
            dataset.ImagePositionPatient = [last_column_x, y, z]
            pixels = pixels[:, ::-1].T
        dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
        dataset.save_as(folder / f"{int(dataset.InstanceNumber):04d}.dcm", enforce_file_format=True)


def place_mask(series: CtSeries, centre_mm: npt.NDArray[np.float64]) -> BoxMask:
    """The ellipsoid and its lobe, as the voxels of the series' grid whose centres lie inside."""
    volume = series.volume
    corners = centre_mm + np.array([[sx, sy, sz] for sx in (-12, 12) for sy in (-12, 12) for sz in (-12, 12)])
    kji = volume.patient_to_index(corners)
    low = np.clip(np.floor(kji.min(axis=0)).astype(int), 0, None)
    high = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + 1, volume.shape)
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high, strict=True)), indexing="ij"), -1
    )
    offset = volume.index_to_patient(grid) - centre_mm
    inside = (((offset / RADII_MM) ** 2).sum(axis=-1) <= 1) | (
        np.linalg.norm(offset - LOBE_OFFSET_MM, axis=-1) <= LOBE_RADIUS_MM
    )
    return BoxMask.from_full(inside, offset=low)


@pytest.fixture(scope="module")
def lidc_part(lidc_series_dir: Callable[[str], Path]) -> list[Path]:
    return list(load_series(lidc_series_dir("LIDC-IDRI-0001")).paths[SOURCE_SLICES])


@pytest.fixture(scope="module")
def centre_mm(lidc_part: list[Path]) -> npt.NDArray[np.float64]:
    return load_series(lidc_part).volume.index_to_patient(CENTRE_KJI)


@pytest.fixture(scope="module")
def variants(
    lidc_part: list[Path], centre_mm: npt.NDArray[np.float64], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Encoded]:
    encoded = {}
    for variant in VARIANTS:
        folder = tmp_path_factory.mktemp("variant")
        write_variant(lidc_part, folder / "series", variant)
        series = load_series(folder / "series")
        finding = make_finding(series.volume, place_mask(series, centre_mm))
        results = encode_results(series.headers, series.frame_numbers, [finding], ALGORITHM)
        sr_path, seg_path = write_results(results, folder / "results")
        encoded[variant] = Encoded(series, finding, sr_path, seg_path)
    return encoded


@pytest.fixture(params=VARIANTS)
def encoded(request: pytest.FixtureRequest, variants: dict[str, Encoded]) -> Encoded:
    return variants[request.param]


def _mask_voxels_mm(encoded: Encoded) -> npt.NDArray[np.float64]:
    mask = encoded.finding.mask
    return encoded.series.volume.index_to_patient(np.argwhere(mask.array) + np.asarray(mask.offset))


def _as_set(points_mm: npt.NDArray[np.float64]) -> set[tuple[float, ...]]:
    return {tuple(p) for p in np.round(points_mm, 2).tolist()}


def test_the_variants_keep_the_anatomy_and_the_nodule_in_place(
    encoded: Encoded, lidc_part: list[Path], centre_mm: npt.NDArray[np.float64]
) -> None:
    """The premise: the variant's voxels at the nodule hold the same HU as the unchanged series' voxels
    at the same patient positions, and the mask is the same set of patient positions."""
    original = load_series(lidc_part)
    reference = place_mask(original, centre_mm)
    reference_mm = original.volume.index_to_patient(
        np.argwhere(reference.array) + np.asarray(reference.offset)
    )
    variant_mm = _mask_voxels_mm(encoded)
    assert _as_set(variant_mm) == _as_set(reference_mm)
    hu_at = {
        tuple(p): h
        for p, h in zip(
            np.round(reference_mm, 2).tolist(),
            original.volume.hu[reference.slices()][reference.array],
            strict=True,
        )
    }
    mask = encoded.finding.mask
    variant_hu = encoded.series.volume.hu[mask.slices()][mask.array]
    assert [hu_at[tuple(p)] for p in np.round(variant_mm, 2).tolist()] == variant_hu.tolist()


def test_seg_frames_map_back_onto_the_slices_they_claim(encoded: Encoded) -> None:
    series = encoded.series
    seg = pydicom.dcmread(encoded.seg_path)
    assert seg.FrameOfReferenceUID == series.headers[0].FrameOfReferenceUID
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)).astype(bool)
    slice_of = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    rebuilt = np.zeros(series.volume.shape, dtype=bool)
    seg_voxels_mm = []
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (source,) = groups.DerivationImageSequence[0].SourceImageSequence
        k = slice_of[source.ReferencedSOPInstanceUID]
        header = series.headers[k]
        position = np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        # by the reference and by position: the same slice
        np.testing.assert_allclose(
            position, np.asarray(header.ImagePositionPatient, dtype=np.float64), atol=1e-3
        )
        np.testing.assert_allclose(position, series.volume.index_to_patient([k, 0, 0]), atol=1e-3)
        np.testing.assert_allclose(orientation, np.asarray(header.ImageOrientationPatient, dtype=np.float64))
        assert not rebuilt[k].any(), "two frames on one slice"
        rebuilt[k] = frame
        rows, columns = np.nonzero(frame)
        seg_voxels_mm.append(
            position
            + np.outer(columns * column_spacing, orientation[:3])
            + np.outer(rows * row_spacing, orientation[3:])
        )
    # same slices, same voxels: on the source grid, and in patient space from the SEG's geometry alone
    np.testing.assert_array_equal(rebuilt, encoded.finding.mask.full(series.volume.shape))
    assert _as_set(np.concatenate(seg_voxels_mm)) == _as_set(_mask_voxels_mm(encoded))


def test_sr_region_maps_back_onto_the_largest_slice_around_the_centre(encoded: Encoded) -> None:
    series, finding = encoded.series, encoded.finding
    (group,) = hd.sr.srread(encoded.sr_path).content.get_planar_roi_measurement_groups()
    region = group.roi
    (reference,) = region.ContentSequence[0].ReferencedSOPSequence
    k = series.sop_instance_uids.index(reference.ReferencedSOPInstanceUID)
    areas = finding.mask.array.sum(axis=(1, 2))
    assert k == finding.axial_slice_index == finding.mask.offset[0] + int(np.argmax(areas))
    assert np.count_nonzero(areas == areas.max()) == 1  # the largest slice is one slice, in every variant
    centre = outline_centre_mm(np.asarray(region.value, dtype=np.float64), series.headers[k])
    plane = finding.mask.axial_slice(k, series.volume.shape[1:])
    expected = series.volume.index_to_patient([k, *np.argwhere(plane).mean(axis=0)])
    voxel_mm = max(float(v) for v in series.headers[k].PixelSpacing)
    assert np.linalg.norm(centre - expected) < voxel_mm
    assert centre[2] == pytest.approx(float(series.headers[k].ImagePositionPatient[2]), abs=1e-3)


def test_every_variant_reports_the_same_slice_and_centre(variants: dict[str, Encoded]) -> None:
    """Across the four variants: one physical slice, one centre (the outline's, within a voxel)."""
    found = []
    for encoded in variants.values():
        (group,) = hd.sr.srread(encoded.sr_path).content.get_planar_roi_measurement_groups()
        uid = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        header = encoded.series.headers[encoded.series.sop_instance_uids.index(uid)]
        found.append(outline_centre_mm(np.asarray(group.roi.value, dtype=np.float64), header))
    spread = np.ptp(np.asarray(found), axis=0)
    assert spread[2] < 1e-3 and np.linalg.norm(spread[:2]) < 0.71
