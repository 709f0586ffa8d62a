"""Series to volume: real LIDC geometry, compressed transfer syntaxes, and every broken series refused
with a message that says why."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from models.series_loading import ENHANCED_CT_IMAGE_STORAGE, SeriesError, load_series
from models.series_writing import AcquisitionParameters, SeriesIdentity, write_ct_series
from models.volume import Volume

IDENTITY = SeriesIdentity(
    patient_name="SYNTHETIC^LOADER", patient_id="SYN-LOADER", study_description="t", series_description="t"
)
ACQUISITION = AcquisitionParameters(slice_thickness_mm=2.0, kvp=120, convolution_kernel="STANDARD")


def small_volume(n_slices: int = 8, direction: np.ndarray | None = None) -> Volume:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, size=(n_slices, 24, 20)).astype(np.float32)
    kwargs = {} if direction is None else {"direction": direction}
    return Volume(hu=hu, spacing=(2.0, 0.7, 0.8), origin=(-10.0, 20.0, -300.0), **kwargs)


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    out = tmp_path / "series"
    write_ct_series(small_volume(), out, IDENTITY, ACQUISITION, uid_seed="loader")
    return out


def edit(folder: Path, index: int, change: Callable[[pydicom.Dataset], None]) -> None:
    path = sorted(folder.glob("*.dcm"))[index]
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)


# --- real CT --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc_0001(lidc_series_dir: Callable[[str], Path]) -> Path:
    return lidc_series_dir("LIDC-IDRI-0001")


def test_lidc_0001_loads_with_its_geometry(lidc_0001: Path) -> None:
    volume = load_series(lidc_0001).volume
    assert volume.shape == (133, 512, 512)
    assert volume.spacing[0] == pytest.approx(2.5)
    assert volume.spacing[1] == pytest.approx(0.703, abs=1e-3)
    assert volume.spacing[2] == pytest.approx(0.703, abs=1e-3)
    assert volume.hu[volume.nearest_index((56.2, 86.2, -115.9))] > 0  # the nodule: solid tissue
    assert volume.hu.min() == -1024  # the -2000 padding outside the scan circle is air, not a value
    # slices run from feet to head, positions 2.5 mm apart along +z
    assert volume.index_to_patient((0, 0, 0))[2] == pytest.approx(-340.0)
    assert volume.index_to_patient((132, 0, 0))[2] == pytest.approx(-10.0)


def test_file_order_and_names_do_not_matter(lidc_0001: Path, tmp_path: Path) -> None:
    files = list(load_series(lidc_0001).paths[40:60])  # 20 neighbouring slices
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for rank, source in enumerate(np.random.default_rng(1).permutation(len(files))):
        shutil.copy(files[source], shuffled / f"x{rank:03d}")
    by_list = load_series(files)
    by_folder = load_series(shuffled)
    np.testing.assert_array_equal(by_list.volume.hu, by_folder.volume.hu)
    assert by_list.sop_instance_uids == by_folder.sop_instance_uids


def _dcmtk(
    require_tool: Callable[[str], str], program: str, options: list[str], source: Path, target: Path
) -> None:
    subprocess.run(
        [require_tool(program), *options, str(source), str(target)], check=True, capture_output=True
    )


def test_jpeg_lossless_reencoding_gives_identical_voxels(
    lidc_0001: Path, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    target = tmp_path / "jpeg"
    target.mkdir()
    for source in sorted(lidc_0001.glob("*.dcm")):
        _dcmtk(require_tool, "dcmcjpeg", ["--encode-lossless-sv1"], source, target / source.name)
    encoded = pydicom.dcmread(next(target.iterdir()), stop_before_pixels=True)
    assert (
        encoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    )  # JPEG Lossless, first-order prediction
    np.testing.assert_array_equal(load_series(target).volume.hu, load_series(lidc_0001).volume.hu)


@pytest.mark.parametrize(
    "syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=["jpeg-ls", "jpeg2000", "rle"]
)
def test_other_compressed_syntaxes_decode_to_identical_voxels(
    lidc_0001: Path, tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    files = list(load_series(lidc_0001).paths[60:70])
    target = tmp_path / "compressed"
    target.mkdir()
    for source in files:
        dataset = pydicom.dcmread(source)
        dataset.compress(syntax)
        dataset.save_as(target / source.name)
    assert pydicom.dcmread(next(target.iterdir())).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(target).volume.hu, load_series(files).volume.hu)


# --- geometry -------------------------------------------------------------------------------------


def test_written_volume_round_trips(series_dir: Path) -> None:
    original = small_volume()
    loaded = load_series(series_dir).volume
    np.testing.assert_array_equal(loaded.hu, original.hu)
    np.testing.assert_allclose(loaded.spacing, original.spacing)
    np.testing.assert_allclose(loaded.origin, original.origin)
    np.testing.assert_allclose(loaded.direction, original.direction, atol=1e-6)


def test_oblique_reversed_series_keeps_patient_positions(tmp_path: Path) -> None:
    angle = np.radians(20)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    direction = rotation @ np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # head to feet
    original = small_volume(direction=direction)
    write_ct_series(original, tmp_path / "s", IDENTITY, ACQUISITION)
    loaded = load_series(tmp_path / "s").volume
    probe = np.array([[0, 0, 0], [7, 23, 19], [3, 5, 11]], dtype=float)
    for kji in probe:
        xyz = original.index_to_patient(kji)
        back = loaded.patient_to_index(xyz)
        assert loaded.hu[tuple(np.rint(back).astype(int))] == original.hu[tuple(kji.astype(int))]


def test_pixel_padding_value_becomes_air(series_dir: Path) -> None:
    def pad(dataset: pydicom.Dataset) -> None:
        pixels = dataset.pixel_array.copy()
        pixels[0, :5] = -2000
        dataset.PixelData = pixels.tobytes()
        dataset.add_new("PixelPaddingValue", "US", 63536)  # -2000 as GE writes it for signed pixels

    edit(series_dir, 0, pad)
    volume = load_series(series_dir).volume
    assert np.all(volume.hu[0, 0, :5] == -1024)
    assert np.all(volume.hu[0, 0, 5:] == small_volume().hu[0, 0, 5:])


def test_rescale_slope_and_intercept_apply_per_slice(series_dir: Path) -> None:
    def rescale(dataset: pydicom.Dataset) -> None:
        dataset.RescaleSlope = 2
        dataset.RescaleIntercept = -2048

    edit(series_dir, 3, rescale)
    stored = pydicom.dcmread(sorted(series_dir.glob("*.dcm"))[3]).pixel_array.astype(np.float32)
    assert np.array_equal(load_series(series_dir).volume.hu[3], np.maximum(stored * 2 - 2048, -1024))


def test_the_same_instance_twice_is_one_slice(series_dir: Path) -> None:
    first = sorted(series_dir.glob("*.dcm"))[0]
    shutil.copy(first, series_dir / "again.dcm")
    assert load_series(series_dir).volume.shape[0] == 8


def test_non_dicom_files_in_a_folder_are_ignored(series_dir: Path) -> None:
    (series_dir / "notes.xml").write_text("<x/>")
    assert load_series(series_dir).volume.shape[0] == 8


# --- broken series: each refused with its reason ------------------------------------------------


def _position(index: int, shift: tuple[float, float, float]) -> Callable[[pydicom.Dataset], None]:
    def change(dataset: pydicom.Dataset) -> None:
        dataset.ImagePositionPatient = [
            float(v) + s for v, s in zip(dataset.ImagePositionPatient, shift, strict=True)
        ]

    return change


def test_mixed_orientations(series_dir: Path) -> None:
    edit(series_dir, 2, lambda d: setattr(d, "ImageOrientationPatient", [1, 0, 0, 0, 0.8660254, -0.5]))
    with pytest.raises(SeriesError, match="mixed orientations"):
        load_series(series_dir)


def test_mixed_sizes(series_dir: Path, tmp_path: Path) -> None:
    other = Volume(
        hu=np.zeros((2, 30, 20), np.float32), spacing=(2.0, 0.7, 0.8), origin=(-10.0, 20.0, -250.0)
    )
    write_ct_series(other, tmp_path / "other", IDENTITY, ACQUISITION)
    series_uid = pydicom.dcmread(next(series_dir.iterdir())).SeriesInstanceUID
    for path in (tmp_path / "other").iterdir():
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.save_as(series_dir / f"z{path.name}")
    with pytest.raises(SeriesError, match=r"mixed image sizes or pixel spacings.*24 x 20.*30 x 20"):
        load_series(series_dir)


def test_mixed_pixel_spacing(series_dir: Path) -> None:
    edit(series_dir, 1, lambda d: setattr(d, "PixelSpacing", [0.9, 0.9]))
    with pytest.raises(SeriesError, match="mixed image sizes or pixel spacings"):
        load_series(series_dir)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry(series_dir: Path, keyword: str) -> None:
    edit(series_dir, 4, lambda d: delattr(d, keyword))
    with pytest.raises(SeriesError, match=f"missing geometry: no {keyword}"):
        load_series(series_dir)


def test_duplicate_positions(series_dir: Path) -> None:
    edit(series_dir, 5, _position(5, (0.0, 0.0, -2.0)))  # now where slice 4 is
    with pytest.raises(SeriesError, match=r"duplicate slice positions: .* both lie at"):
        load_series(series_dir)


def test_missing_slice_is_non_uniform_spacing(series_dir: Path) -> None:
    sorted(series_dir.glob("*.dcm"))[3].unlink()
    with pytest.raises(SeriesError, match=r"non-uniform slice spacing: .* is 4\.000 mm where .* 2\.000 mm"):
        load_series(series_dir)


def test_small_jitter_within_tolerance_is_accepted(series_dir: Path) -> None:
    edit(series_dir, 3, _position(3, (0.0, 0.0, 0.05)))
    assert load_series(series_dir).volume.spacing[0] == pytest.approx(2.0)


def test_gantry_tilt_by_geometry(series_dir: Path) -> None:
    for index in range(8):
        edit(
            series_dir, index, _position(index, (0.0, index * 0.5, 0.0))
        )  # each slice shifted: sheared stack
    with pytest.raises(
        SeriesError, match=r"gantry tilt: each slice is shifted 0\.50 mm .*about 14\.0 degrees"
    ):
        load_series(series_dir)


def test_gantry_tilt_by_attribute(series_dir: Path) -> None:
    for index in range(8):
        edit(series_dir, index, lambda d: setattr(d, "GantryDetectorTilt", 15))
    with pytest.raises(SeriesError, match=r"gantry tilt of 15\.0 degrees"):
        load_series(series_dir)


def test_two_series_in_one_folder(series_dir: Path) -> None:
    edit(series_dir, 0, lambda d: setattr(d, "SeriesInstanceUID", "1.2.3.4"))
    with pytest.raises(SeriesError, match="belong to 2 series"):
        load_series(series_dir)


def test_not_ct(series_dir: Path) -> None:
    edit(series_dir, 0, lambda d: setattr(d, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"))
    with pytest.raises(SeriesError, match="MR Image Storage is not CT Image Storage"):
        load_series(series_dir)


def test_a_single_slice_is_not_a_volume(series_dir: Path) -> None:
    with pytest.raises(SeriesError, match="at least 2 slices"):
        load_series(sorted(series_dir.glob("*.dcm"))[:1])


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="no DICOM files"):
        load_series(tmp_path)


def test_a_listed_file_that_is_not_dicom(series_dir: Path) -> None:
    (series_dir / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match=r"notes\.txt is not a readable DICOM file"):
        load_series([*sorted(series_dir.glob("*.dcm")), series_dir / "notes.txt"])


def test_undecodable_pixel_data(series_dir: Path) -> None:
    edit(series_dir, 0, lambda d: setattr(d, "PixelData", b"\x00" * 10))
    with pytest.raises(SeriesError, match="cannot decode pixel data"):
        load_series(series_dir)


# --- multi-frame CT: one slice per frame, the same checks and messages ---------------------------


def test_legacy_converted_enhanced_ct_loads_as_its_single_frame_slices(
    lidc_0001: Path, tmp_path: Path
) -> None:
    files = list(load_series(lidc_0001).paths[40:60])
    converted = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in files],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.save_as(tmp_path / "legacy.dcm")
    single = load_series(files)
    multi = load_series(tmp_path / "legacy.dcm")
    np.testing.assert_array_equal(multi.volume.hu, single.volume.hu)
    assert multi.volume.spacing == pytest.approx(single.volume.spacing)
    assert multi.volume.origin == pytest.approx(single.volume.origin)
    np.testing.assert_allclose(multi.volume.direction, single.volume.direction)
    assert sorted(multi.frame_numbers) == list(range(1, 21))
    assert set(multi.sop_instance_uids) == {converted.SOPInstanceUID}
    # each slice's frame is the one converted from the single-frame slice at the same place
    per_frame = converted.PerFrameFunctionalGroupsSequence
    sources = [
        per_frame[n - 1].ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
        for n in multi.frame_numbers
    ]
    assert tuple(sources) == single.sop_instance_uids


def _macro(keyword: str, **values: object) -> Dataset:
    """A functional group: ``keyword`` holding one item with ``values``."""
    item = Dataset()
    for name, value in values.items():
        setattr(item, name, value)
    group = Dataset()
    setattr(group, keyword, [item])
    return group


def to_enhanced_ct(files: Sequence[Path], target: Path) -> Path:
    """An Enhanced CT image with the slices of ``files`` as its frames, in that order: geometry and
    rescale moved into the functional groups, as a scanner writes them."""
    slices = [pydicom.dcmread(f) for f in files]
    dataset = pydicom.dcmread(files[0])
    moved = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"]
    for keyword in [*moved, "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceLocation"]:
        if keyword in dataset:
            delattr(dataset, keyword)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.NumberOfFrames = len(slices)
    shared = Dataset()
    shared.update(
        _macro("PlaneOrientationSequence", ImageOrientationPatient=slices[0].ImageOrientationPatient)
    )
    shared.update(
        _macro(
            "PixelMeasuresSequence",
            PixelSpacing=slices[0].PixelSpacing,
            SliceThickness=slices[0].SliceThickness,
        )
    )
    shared.update(
        _macro(
            "PixelValueTransformationSequence",
            RescaleSlope=slices[0].RescaleSlope,
            RescaleIntercept=slices[0].RescaleIntercept,
            RescaleType="HU",
        )
    )
    dataset.SharedFunctionalGroupsSequence = [shared]
    dataset.PerFrameFunctionalGroupsSequence = [
        _macro("PlanePositionSequence", ImagePositionPatient=s.ImagePositionPatient) for s in slices
    ]
    dataset.PixelData = b"".join(s.PixelData for s in slices)
    dataset.save_as(target)
    return target


@pytest.fixture
def enhanced_ct(series_dir: Path, tmp_path: Path) -> Path:
    return to_enhanced_ct(sorted(series_dir.glob("*.dcm")), tmp_path / "enhanced.dcm")


def edit_instance(path: Path, change: Callable[[Dataset], None]) -> None:
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)


def edit_frame(path: Path, index: int, change: Callable[[Dataset], None]) -> None:
    """Apply ``change`` to the per-frame functional groups of frame ``index + 1``."""
    edit_instance(path, lambda d: change(d.PerFrameFunctionalGroupsSequence[index]))


def test_enhanced_ct_round_trips_in_any_frame_order(series_dir: Path, tmp_path: Path) -> None:
    files = sorted(series_dir.glob("*.dcm"))
    frame_order = [5, 2, 7, 0, 3, 6, 1, 4]
    path = to_enhanced_ct([files[k] for k in frame_order], tmp_path / "enhanced.dcm")
    series = load_series(path)
    original = small_volume()
    np.testing.assert_array_equal(series.volume.hu, original.hu)
    np.testing.assert_allclose(series.volume.spacing, original.spacing)
    np.testing.assert_allclose(series.volume.origin, original.origin)
    np.testing.assert_allclose(series.volume.direction, original.direction, atol=1e-6)
    assert series.frame_numbers == tuple(frame_order.index(k) + 1 for k in range(8))
    assert series.paths == (path,) * 8
    assert len(set(series.sop_instance_uids)) == 1


def test_compressed_multi_frame_decodes_to_identical_voxels(enhanced_ct: Path) -> None:
    dataset = pydicom.dcmread(enhanced_ct)
    dataset.compress(RLELossless)
    dataset.save_as(enhanced_ct)
    np.testing.assert_array_equal(load_series(enhanced_ct).volume.hu, small_volume().hu)


def test_a_series_of_several_multi_frame_instances(series_dir: Path, tmp_path: Path) -> None:
    files = sorted(series_dir.glob("*.dcm"))
    to_enhanced_ct(files[:4], tmp_path / "a.dcm")
    to_enhanced_ct(files[4:], tmp_path / "b.dcm")
    shutil.copy(tmp_path / "b.dcm", tmp_path / "b-again.dcm")  # received twice: still 4 slices
    series = load_series([tmp_path / "a.dcm", tmp_path / "b.dcm", tmp_path / "b-again.dcm"])
    np.testing.assert_array_equal(series.volume.hu, small_volume().hu)
    assert series.frame_numbers == (1, 2, 3, 4, 1, 2, 3, 4)
    assert len(set(series.sop_instance_uids)) == 2


def test_per_frame_rescale_overrides_the_shared_one(enhanced_ct: Path) -> None:
    def rescale(groups: Dataset) -> None:
        groups.update(_macro("PixelValueTransformationSequence", RescaleSlope=2, RescaleIntercept=-2048))

    edit_frame(enhanced_ct, 3, rescale)
    stored = pydicom.dcmread(enhanced_ct).pixel_array[3].astype(np.float32)
    hu = load_series(enhanced_ct).volume.hu
    assert np.array_equal(hu[3], np.maximum(stored * 2 - 2048, -1024))
    assert np.array_equal(hu[2], small_volume().hu[2])


def test_multi_frame_mixed_orientations(enhanced_ct: Path) -> None:
    edit_frame(
        enhanced_ct,
        2,
        lambda g: g.update(
            _macro("PlaneOrientationSequence", ImageOrientationPatient=[1, 0, 0, 0, 0.8660254, -0.5])
        ),
    )
    with pytest.raises(
        SeriesError, match=r"mixed orientations: enhanced\.dcm frame 1 has .*, enhanced\.dcm frame 3 has"
    ):
        load_series(enhanced_ct)


def test_multi_frame_duplicate_positions(enhanced_ct: Path) -> None:
    position = pydicom.dcmread(enhanced_ct).PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0]
    edit_frame(
        enhanced_ct,
        5,
        lambda g: setattr(g.PlanePositionSequence[0], "ImagePositionPatient", position.ImagePositionPatient),
    )
    with pytest.raises(
        SeriesError,
        match=r"duplicate slice positions: enhanced\.dcm frame 5 and enhanced\.dcm frame 6 both lie at",
    ):
        load_series(enhanced_ct)


def test_multi_frame_missing_position(enhanced_ct: Path) -> None:
    edit_frame(enhanced_ct, 4, lambda g: delattr(g, "PlanePositionSequence"))
    with pytest.raises(
        SeriesError, match=r"enhanced\.dcm frame 5: missing geometry: no ImagePositionPatient"
    ):
        load_series(enhanced_ct)


@pytest.mark.parametrize(
    ("group", "keyword"),
    [("PlaneOrientationSequence", "ImageOrientationPatient"), ("PixelMeasuresSequence", "PixelSpacing")],
)
def test_multi_frame_missing_shared_geometry(enhanced_ct: Path, group: str, keyword: str) -> None:
    edit_instance(enhanced_ct, lambda d: delattr(d.SharedFunctionalGroupsSequence[0], group))
    with pytest.raises(SeriesError, match=f"missing geometry: no {keyword}"):
        load_series(enhanced_ct)


def test_multi_frame_missing_frame_is_non_uniform_spacing(series_dir: Path, tmp_path: Path) -> None:
    files = sorted(series_dir.glob("*.dcm"))
    path = to_enhanced_ct([*files[:3], *files[4:]], tmp_path / "enhanced.dcm")
    with pytest.raises(SeriesError, match=r"non-uniform slice spacing: .* is 4\.000 mm where .* 2\.000 mm"):
        load_series(path)


def test_multi_frame_gantry_tilt_by_geometry(enhanced_ct: Path) -> None:
    dataset = pydicom.dcmread(enhanced_ct)
    for index, groups in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        plane = groups.PlanePositionSequence[0]
        plane.ImagePositionPatient = [
            float(v) + s for v, s in zip(plane.ImagePositionPatient, (0, index * 0.5, 0), strict=True)
        ]
    dataset.save_as(enhanced_ct)
    with pytest.raises(SeriesError, match=r"gantry tilt: each slice is shifted 0\.50 mm"):
        load_series(enhanced_ct)


def test_frame_count_that_disagrees_with_the_functional_groups(enhanced_ct: Path) -> None:
    edit_instance(enhanced_ct, lambda d: setattr(d, "NumberOfFrames", 7))
    with pytest.raises(
        SeriesError, match="Number of Frames is 7 but the Per-frame Functional Groups Sequence has 8"
    ):
        load_series(enhanced_ct)


def test_single_frame_and_multi_frame_in_one_series(series_dir: Path, tmp_path: Path) -> None:
    files = sorted(series_dir.glob("*.dcm"))
    multi = to_enhanced_ct(files[4:], tmp_path / "enhanced.dcm")
    with pytest.raises(
        SeriesError, match=r"mixes single-frame CT images .* and multi-frame ones \(enhanced\.dcm\)"
    ):
        load_series([*files[:4], multi])
