from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from models.preview import PreviewItem, nodule_montage
from models.series_writing import (
    MAX_HU,
    MIN_HU,
    AcquisitionParameters,
    SeriesIdentity,
    write_ct_series,
)
from models.volume import Volume

FIXED_TIME = dt.datetime(2024, 1, 2, 3, 4, 5)
IDENTITY = SeriesIdentity(
    patient_name="SYNTHETIC^CASE 0042",
    patient_id="SYN-0042",
    study_description="Synthetic chest CT",
    series_description="Synthetic nodules",
    derivation_description="Synthetic nodules inserted into a synthetic lung phantom",
    study_datetime=FIXED_TIME,
)
ACQUISITION = AcquisitionParameters(
    slice_thickness_mm=1.25,
    kvp=120,
    convolution_kernel="LUNG",
    tube_current_ma=180,
    exposure_time_ms=500,
    ctdi_vol_mgy=3.2,
    spiral_pitch_factor=1.1,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _known_hu(shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(7)
    hu = rng.uniform(-1500.0, 3500.0, shape).astype(np.float32)
    hu[0, 0, :4] = [-0.5, 0.5, 1.5, -1024.0]  # half-way values round to even
    hu[1, 0, :2] = [-50000.0, 50000.0]  # beyond the representable range: clipped
    return hu


def axial_volume() -> Volume:
    return Volume(hu=_known_hu((12, 64, 64)), spacing=(1.25, 0.7, 0.7), origin=(-22.4, -30.0, -100.0))


def oblique_volume() -> Volume:
    # Rotated, and with the slice axis reversed (a left-handed kji frame), non-square pixels.
    direction = _rotation(0.3, -0.2, 0.5) @ np.diag([-1.0, 1.0, 1.0])
    return Volume(
        hu=_known_hu((7, 40, 56)), spacing=(2.5, 0.8, 0.6), origin=(12.3, -45.6, 78.9), direction=direction
    )


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.fixture(params=[axial_volume, oblique_volume], ids=["axial", "oblique"])
def volume(request: pytest.FixtureRequest) -> Volume:
    factory: Callable[[], Volume] = request.param
    return factory()


def test_one_file_per_slice_in_order(volume: Volume, tmp_path: Path) -> None:
    paths = write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION)
    datasets = _read(paths)
    assert len(paths) == volume.shape[0]
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, volume.shape[0] + 1))
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns) == volume.shape[1:]
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]


def test_geometry_matches_the_volume(volume: Volume, tmp_path: Path) -> None:
    datasets = _read(write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION))
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(ds.ImagePositionPatient, volume.index_to_patient((k, 0, 0)), atol=1e-6)
        np.testing.assert_allclose(ds.ImageOrientationPatient[:3], volume.direction[:, 2], atol=1e-9)
        np.testing.assert_allclose(ds.ImageOrientationPatient[3:], volume.direction[:, 1], atol=1e-9)
        np.testing.assert_allclose(ds.PixelSpacing, volume.spacing[1:])
        assert float(ds.SliceThickness) == ACQUISITION.slice_thickness_mm
        assert float(ds.SpacingBetweenSlices) == pytest.approx(volume.spacing[0])


def test_every_voxel_lands_where_the_volume_puts_it(volume: Volume, tmp_path: Path) -> None:
    """DICOM's own mapping (C.7.6.2.1.1) from each slice header reproduces index_to_patient."""
    datasets = _read(write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION))
    _, rows, columns = volume.shape
    j, i = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    for k, ds in enumerate(datasets):
        row_cosine, column_cosine = (
            np.array(ds.ImageOrientationPatient[:3]),
            np.array(ds.ImageOrientationPatient[3:]),
        )
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        xyz = (
            np.array(ds.ImagePositionPatient)
            + (i * column_spacing)[..., None] * row_cosine
            + (j * row_spacing)[..., None] * column_cosine
        )
        kji = np.stack([np.full_like(j, k), j, i], axis=-1)
        np.testing.assert_allclose(xyz, volume.index_to_patient(kji), atol=1e-6)


def test_slice_location_runs_along_the_normal(volume: Volume, tmp_path: Path) -> None:
    datasets = _read(write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION))
    locations = np.array([float(ds.SliceLocation) for ds in datasets])
    np.testing.assert_allclose(np.abs(np.diff(locations)), volume.spacing[0], atol=1e-6)


def test_stored_values_reproduce_rounded_hu(volume: Volume, tmp_path: Path) -> None:
    datasets = _read(write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION))
    expected = np.clip(np.rint(volume.hu.astype(np.float64)), MIN_HU, MAX_HU)
    for k, ds in enumerate(datasets):
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert ds.RescaleType == "HU"
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, expected[k])


def test_rounding_and_clipping_at_the_edges(tmp_path: Path) -> None:
    datasets = _read(write_ct_series(axial_volume(), tmp_path / "ct", IDENTITY, ACQUISITION))
    hu = [ds.pixel_array.astype(np.int64) + int(ds.RescaleIntercept) for ds in datasets[:2]]
    assert hu[0][0, :4].tolist() == [0, 0, 2, -1024]
    assert hu[1][0, :2].tolist() == [MIN_HU, MAX_HU]


def test_uids_are_unique_per_slice_and_shared_per_series(volume: Volume, tmp_path: Path) -> None:
    datasets = _read(write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION))
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == len(datasets)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[keyword].value for ds in datasets}) == 1
    shared = {datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, datasets[0].FrameOfReferenceUID}
    assert len(shared) == 3 and not shared & sop_uids


def test_the_same_seed_gives_the_same_files(tmp_path: Path) -> None:
    volume = axial_volume()
    first = write_ct_series(volume, tmp_path / "a", IDENTITY, ACQUISITION, uid_seed="case-0042")
    second = write_ct_series(volume, tmp_path / "b", IDENTITY, ACQUISITION, uid_seed="case-0042")
    other = write_ct_series(volume, tmp_path / "c", IDENTITY, ACQUISITION, uid_seed="case-0043")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert not {ds.SOPInstanceUID for ds in _read(first)} & {ds.SOPInstanceUID for ds in _read(other)}
    assert _read(first)[0].StudyInstanceUID != _read(other)[0].StudyInstanceUID


def test_without_a_seed_every_write_is_new(tmp_path: Path) -> None:
    volume = axial_volume()
    first = _read(write_ct_series(volume, tmp_path / "a", IDENTITY, ACQUISITION))
    second = _read(write_ct_series(volume, tmp_path / "b", IDENTITY, ACQUISITION))
    assert first[0].SeriesInstanceUID != second[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in first} & {ds.SOPInstanceUID for ds in second}


def test_given_uids_are_kept(tmp_path: Path) -> None:
    identity = SeriesIdentity(
        patient_name="SYNTHETIC^CASE 0001",
        patient_id="SYN-0001",
        study_description="Synthetic chest CT",
        series_description="Synthetic",
        study_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.5",
        frame_of_reference_uid="1.2.3.6",
    )
    ds = _read(write_ct_series(axial_volume(), tmp_path / "ct", identity, ACQUISITION, uid_seed="s"))[0]
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
        "1.2.3.4",
        "1.2.3.5",
        "1.2.3.6",
    )


def test_identity_and_synthetic_markers(tmp_path: Path) -> None:
    ds = _read(write_ct_series(axial_volume(), tmp_path / "ct", IDENTITY, ACQUISITION))[0]
    assert str(ds.PatientName) == "SYNTHETIC^CASE 0042"
    assert ds.PatientID == "SYN-0042"
    assert ds.PatientSex == "O"
    assert ds.PatientIdentityRemoved == "YES"
    assert "SYNTHETIC" in ds.ImageComments
    assert ds.DerivationDescription == IDENTITY.derivation_description
    assert (ds.StudyDate, ds.StudyTime) == ("20240102", "030405")
    assert (ds.BodyPartExamined, ds.PatientPosition, ds.Modality) == ("CHEST", "FFS", "CT")
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (-600.0, 1500.0)
    assert float(ds.KVP) == 120.0 and ds.ConvolutionKernel == "LUNG"


def test_refuses_non_finite_hu(tmp_path: Path) -> None:
    volume = axial_volume()
    hu = volume.hu.copy()
    hu[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_ct_series(volume.with_hu(hu), tmp_path / "ct", IDENTITY, ACQUISITION)


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "old.dcm").write_bytes(b"")
    with pytest.raises(FileExistsError):
        write_ct_series(axial_volume(), tmp_path, IDENTITY, ACQUISITION)


def test_refuses_values_the_vr_cannot_hold(tmp_path: Path) -> None:
    too_long = SeriesIdentity(
        patient_name="SYNTHETIC^CASE",
        patient_id="SYN",
        study_description="x" * 65,
        series_description="Synthetic",
    )
    with pytest.raises(ValueError):
        write_ct_series(axial_volume(), tmp_path / "ct", too_long, ACQUISITION)


def test_dciodvfy_finds_no_errors(volume: Volume, tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    dciodvfy = require_tool("dciodvfy")
    paths = write_ct_series(volume, tmp_path / "ct", IDENTITY, ACQUISITION)
    for path in (paths[0], paths[-1]):
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        report = (result.stdout + result.stderr).splitlines()
        assert "CTImage" in report, report
        errors = [line for line in report if line.startswith("Error")]
        assert errors == [], "\n".join(report)


def _sphere_volume() -> tuple[Volume, np.ndarray, tuple[int, int, int]]:
    shape = (20, 160, 140)
    spacing = (1.5, 0.6, 0.8)
    centre = (10, 60, 90)
    k, j, i = np.indices(shape, dtype=np.float64)
    radius_sq = sum(((a - c) * s) ** 2 for a, c, s in zip((k, j, i), centre, spacing, strict=True))
    mask = radius_sq <= 5.0**2
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[:, :, :8] = 40.0  # a chest wall at the left of the image
    hu[mask] = 30.0
    return Volume(hu=hu, spacing=spacing, origin=(0.0, 0.0, 0.0)), mask, centre


def test_nodule_montage_writes_a_png(tmp_path: Path) -> None:
    volume, mask, centre = _sphere_volume()
    items = [
        PreviewItem(
            label="#1 solid 10.0 mm", centre_kji=centre, outline=mask[round(centre[0])], colour="lime"
        ),
        PreviewItem(label="#2 no mask, near the edge", centre_kji=(5, 150, 3), outline=None, colour="orange"),
    ]
    out = nodule_montage(volume, items, tmp_path / "montage.png", title="synthetic sphere")
    assert out == tmp_path / "montage.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_nodule_montage_checks_its_input(tmp_path: Path) -> None:
    volume, mask, centre = _sphere_volume()
    with pytest.raises(ValueError):
        nodule_montage(volume, [], tmp_path / "m.png", title="empty")
    with pytest.raises(ValueError):
        bad = PreviewItem(label="bad", centre_kji=centre, outline=mask[0, :-1])
        nodule_montage(volume, [bad], tmp_path / "m.png", title="bad mask")
