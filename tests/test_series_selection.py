"""Series selection: the real LIDC series, and variants of LIDC-IDRI-0001 that a PACS sends beside
the series worth analysing (localizer, thick, gapped, coronal, derived, short, SR).

The variants are written headers only: selection never reads pixel data."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cad_node.series_selection import (
    CHOSEN,
    SelectionRules,
    select_series,
    summarise_series,
    summarise_study,
)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
RULES = SelectionRules()

Change = Callable[[Dataset, int], None]


@pytest.fixture(scope="module")
def lidc_0001(lidc_series_dir: Callable[[str], Path]) -> list[Path]:
    return sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))  # not the reader XML


@pytest.fixture(scope="module")
def lidc_0002(lidc_series_dir: Callable[[str], Path]) -> list[Path]:
    return sorted(lidc_series_dir("LIDC-IDRI-0002").glob("*.dcm"))


@pytest.fixture(scope="module")
def lidc_0001_slices(lidc_0001: list[Path]) -> list[Dataset]:
    """LIDC-IDRI-0001's headers in slice order, feet to head."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in lidc_0001]
    return sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def make_series(
    lidc_0001_slices: list[Dataset], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., list[Path]]:
    """``make_series(name, change, keep=...)``: a new series (new UIDs, its own series number) from the
    LIDC-IDRI-0001 slices at the indices ``keep``, each header passed through ``change(header, k)``."""
    root = tmp_path_factory.mktemp("variants")
    numbers = iter(range(100, 1000))

    def make(name: str, change: Change | None = None, keep: Sequence[int] | None = None) -> list[Path]:
        series_number = next(numbers)
        out = root / f"{name}-{series_number}"
        out.mkdir()
        series_uid = generate_uid(entropy_srcs=[name, str(series_number)])
        indices = range(len(lidc_0001_slices)) if keep is None else keep
        paths = []
        for k, index in enumerate(indices):
            header = copy.deepcopy(lidc_0001_slices[index])
            header.SeriesInstanceUID = series_uid
            header.SeriesNumber = series_number
            header.SeriesDescription = name
            header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[series_uid, str(k)]
            )
            if change is not None:
                change(header, k)
            path = out / f"{k:04d}.dcm"
            header.save_as(path)
            paths.append(path)
        return paths

    return make


def set_attribute(keyword: str, value: object) -> Change:
    return lambda header, _k: setattr(header, keyword, value)


def series_uid_of(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def write_sr(folder: Path) -> list[Path]:
    """A Comprehensive SR object, as a previous CAD result or a dose report sits in a study."""
    folder.mkdir()
    sr = Dataset()
    sr.SOPClassUID = COMPREHENSIVE_SR
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.SeriesNumber = 999
    sr.SeriesDescription = "Dose Report"
    sr.Modality = "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return [path]


# --- the variants, each with the verdict it must get ----------------------------------------------


def localizer(make_series: Callable[..., list[Path]]) -> list[Path]:
    def change(header: Dataset, k: int) -> None:
        header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        header.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    return make_series("localizer", change, keep=[60, 61])


def thick(make_series: Callable[..., list[Path]]) -> list[Path]:
    return make_series("thick", set_attribute("SliceThickness", 5.0), keep=range(0, 133, 2))


def gapped(make_series: Callable[..., list[Path]]) -> list[Path]:
    return make_series("gap", keep=[k for k in range(133) if k != 42])


def coronal(make_series: Callable[..., list[Path]]) -> list[Path]:
    """A coronal reconstruction from the raw data: ORIGINAL, but not axial."""

    def change(header: Dataset, k: int) -> None:
        header.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        header.ImagePositionPatient = [-166.0, -150.0 + 2.5 * k, -10.0]

    return make_series("coronal", change, keep=range(120))


def derived(make_series: Callable[..., list[Path]]) -> list[Path]:
    return make_series("derived", set_attribute("ImageType", ["DERIVED", "SECONDARY", "AXIAL"]))


def short(make_series: Callable[..., list[Path]]) -> list[Path]:
    return make_series("short", keep=range(40, 60))


def test_lidc_0001_alone_is_chosen_with_a_readable_why(lidc_0001: list[Path]) -> None:
    summary = summarise_series(lidc_0001)
    assert summary.slices == summary.instances == 133
    assert summary.modality == "CT"
    assert summary.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert summary.slice_thickness_mm == pytest.approx(2.5)
    assert summary.spacing_mm == pytest.approx(2.5)
    assert summary.spacing_max_deviation_mm == pytest.approx(0, abs=1e-6)
    assert summary.coverage_mm == pytest.approx(330.0)
    assert summary.positions_mm[0] == pytest.approx(-340.0)
    assert summary.kernel == "STANDARD"
    assert summary.pixel_spacing_mm == pytest.approx((0.703125, 0.703125))
    assert (summary.rows, summary.columns) == (512, 512)
    assert len(summary.paths) == 133

    selection = select_series([summary], RULES)
    assert selection.chosen == summary
    assert selection.verdicts == {summary.series_uid: CHOSEN}
    assert selection.why == (
        "series 3000566: only eligible series (2.5 mm), kernel STANDARD, 133 slices over 330 mm; "
        "no other series"
    )


def test_lidc_0002_an_original_secondary_reconstruction_is_eligible(lidc_0002: list[Path]) -> None:
    # ORIGINAL\SECONDARY: reconstructed after the examination from the raw data, still original pixels
    summary = summarise_series(lidc_0002)
    assert summary.image_type == ("ORIGINAL", "SECONDARY", "AXIAL")
    assert (summary.slices, summary.slice_thickness_mm, summary.coverage_mm) == (261, 1.25, 325.0)
    assert select_series([summary], RULES).chosen == summary


def test_in_a_mixed_study_the_diagnostic_series_is_chosen_and_each_other_is_explained(
    lidc_0001: list[Path], make_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    files = {
        "original": lidc_0001,
        "localizer": localizer(make_series),
        "thick": thick(make_series),
        "gap": gapped(make_series),
        "coronal": coronal(make_series),
        "derived": derived(make_series),
        "short": short(make_series),
        "sr": write_sr(tmp_path / "sr"),
    }
    uid = {name: series_uid_of(paths) for name, paths in files.items()}
    summaries = summarise_study({uid[name]: paths for name, paths in files.items()})
    assert [s.series_uid for s in summaries] == list(uid.values())
    selection = select_series(summaries, RULES)

    assert selection.chosen is not None and selection.chosen.series_uid == uid["original"]
    assert {name: selection.verdicts[uid[name]] for name in files} == {
        "original": CHOSEN,
        "localizer": "localizer",
        "thick": "slice thickness 5.0 mm > 3.0 mm",
        "gap": "non-uniform spacing (gap of 5.0 mm after slice 42 of 132, expected 2.5 mm)",
        "coronal": "not axial (coronal)",
        "derived": "DERIVED image",
        "short": "20 slices < 40; covers 48 mm < 150 mm",
        "sr": "modality SR",
    }
    assert selection.why.endswith("133 slices over 330 mm; 7 other series not eligible")
    stored = json.loads(selection.to_json())
    assert stored["chosen"] == uid["original"]
    assert stored["verdicts"] == selection.verdicts
    assert [s["series_uid"] for s in stored["series"]] == list(uid.values())


def test_thinner_beats_thicker_even_with_a_sharper_kernel(
    lidc_0002: list[Path], make_series: Callable[..., list[Path]]
) -> None:
    thick_lung = summarise_series(make_series("thick-lung", set_attribute("ConvolutionKernel", "LUNG")))
    thin_soft = summarise_series(lidc_0002)
    selection = select_series([thick_lung, thin_soft], RULES)
    assert selection.chosen == thin_soft
    assert (
        selection.verdicts[thick_lung.series_uid] == "eligible but not preferred: thicker (2.5 mm vs 1.25 mm)"
    )
    assert selection.why == (
        "series 3000522: thinnest eligible (1.25 mm), kernel STANDARD, 261 slices over 325 mm; "
        "1 other eligible series not preferred"
    )


def test_a_lung_kernel_beats_a_soft_one_at_equal_thickness(
    lidc_0001: list[Path], make_series: Callable[..., list[Path]]
) -> None:
    def lung(header: Dataset, k: int) -> None:
        header.ConvolutionKernel = "B70f"
        header.SliceThickness = 2.55  # within the tolerance: as thin as the soft series

    soft = summarise_series(lidc_0001)
    sharp = summarise_series(make_series("lung-kernel", lung, keep=range(5, 128)))  # fewer slices, still wins
    selection = select_series([soft, sharp], RULES)
    assert selection.chosen == sharp
    assert selection.verdicts[soft.series_uid] == (
        "eligible but not preferred: not a lung/sharp kernel (STANDARD vs B70f)"
    )
    assert "thinnest eligible (2.55 mm), lung/sharp kernel B70f, 123 slices" in selection.why


def test_at_equal_thickness_and_kernel_the_most_slices_win(
    lidc_0001: list[Path], make_series: Callable[..., list[Path]]
) -> None:
    full = summarise_series(lidc_0001)
    cropped = summarise_series(make_series("cropped", keep=range(10, 133)))
    selection = select_series([cropped, full], RULES)
    assert selection.chosen == full
    assert selection.verdicts[cropped.series_uid] == "eligible but not preferred: fewer slices (123 vs 133)"


def test_nothing_eligible_skips_the_study_with_every_reason(
    make_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    files = [localizer(make_series), thick(make_series), write_sr(tmp_path / "sr")]
    series = summarise_study({series_uid_of(paths): paths for paths in files})
    selection = select_series(series, RULES)
    assert selection.chosen is None
    assert selection.why.startswith("no eligible series: ")
    for reason in ("localizer", "slice thickness 5.0 mm > 3.0 mm", '"Dose Report": modality SR'):
        assert reason in selection.why
    assert json.loads(selection.to_json())["chosen"] is None
    assert select_series([], RULES).why == "no series in the study"


def test_an_unreadable_file_is_reported_not_raised(
    make_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    paths = make_series("damaged")
    paths[50].write_bytes(b"DICM? no: " + bytes(200))
    broken = tmp_path / "all-broken.dcm"
    broken.write_bytes(b"")
    series = summarise_study({series_uid_of(paths): paths, "1.2.3.4": [broken]})
    selection = select_series(series, RULES)
    assert selection.chosen is None
    assert selection.verdicts[series_uid_of(paths)].startswith("1 of 133 files unreadable (0050.dcm: ")
    assert selection.verdicts["1.2.3.4"].startswith("1 of 1 files unreadable (all-broken.dcm: ")


def test_tilted_slices_are_refused(make_series: Callable[..., list[Path]]) -> None:
    def tilt(header: Dataset, k: int) -> None:
        x, y, z = (float(v) for v in header.ImagePositionPatient)
        header.ImagePositionPatient = [x, y + 0.5 * k, z]

    selection = select_series([summarise_series(make_series("tilted", tilt))], RULES)
    assert selection.verdicts[selection.series[0].series_uid] == "gantry tilt of 11.3 degrees"


def test_the_rules_are_configurable(lidc_0001: list[Path]) -> None:
    summary = summarise_series(lidc_0001)
    strict = SelectionRules(max_slice_thickness_mm=2.0, min_coverage_mm=400.0)
    assert select_series([summary], strict).verdicts[summary.series_uid] == (
        "slice thickness 2.5 mm > 2.0 mm; covers 330 mm < 400 mm"
    )


@pytest.mark.parametrize(
    ("kernel", "preferred"),
    [
        (("B70f",), True),
        (("B60f",), True),
        (("Br59d", "3"), True),  # Siemens: kernel and iterative strength
        (("Bl57d",), True),
        (("I70f",), True),
        (("B30f",), False),
        (("Br40d", "3"), False),
        (("LUNG",), True),
        (("HD LUNG",), True),
        (("BONEPLUS",), True),
        (("BONE",), True),
        (("EDGE",), True),
        (("DETAIL",), True),
        (("STANDARD",), False),
        (("SOFT",), False),
        (("L",), True),
        (("YB",), True),
        (("YC",), True),
        (("D",), True),
        (("E",), True),
        (("B",), False),  # Philips B is a standard body kernel
        (("C",), False),
        (("YA",), False),
        (("FC52",), True),
        (("FC86",), True),
        (("FC13",), False),
        (("FC50",), False),
        ((), False),
    ],
)
def test_lung_and_sharp_kernels_of_the_main_vendors(kernel: tuple[str, ...], preferred: bool) -> None:
    assert RULES.is_preferred_kernel(kernel) is preferred


def test_enhanced_ct_is_summarised_frame_by_frame(lidc_0001: list[Path], tmp_path: Path) -> None:
    from tests.test_series_loading import to_enhanced_ct

    path = to_enhanced_ct(lidc_0001, tmp_path / "enhanced.dcm")
    summary = summarise_series([path])
    single = summarise_series(lidc_0001)
    assert (summary.instances, summary.slices) == (1, 133)
    assert summary.slice_thickness_mm == pytest.approx(2.5)
    assert summary.positions_mm == pytest.approx(single.positions_mm)
    assert summary.pixel_spacing_mm == pytest.approx(single.pixel_spacing_mm)
    assert summary.kernel == "STANDARD"
    selection = select_series([summary], RULES)
    assert selection.chosen == summary


def test_legacy_converted_enhanced_ct_reads_its_kernel_from_the_converted_attributes(
    lidc_0001: list[Path], tmp_path: Path
) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    converted = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in summarise_series(lidc_0001).paths[40:60]],  # 20 neighbours
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.save_as(tmp_path / "legacy.dcm")
    summary = summarise_series([tmp_path / "legacy.dcm"])
    assert (summary.slices, summary.kernel) == (20, "STANDARD")
    assert select_series([summary], RULES).verdicts[summary.series_uid] == (
        "20 slices < 40; covers 48 mm < 150 mm"
    )


def test_selection_does_not_import_torch() -> None:
    code = "import sys, cad_node.series_selection; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("orientation", "verdict"),
    [
        ((0, 1, 0, 0, 0, -1), "not axial (sagittal)"),
        ((1, 0, 0, 0, 0, -1), "not axial (coronal)"),
        ((1, 0, 0, 0, 0.866025, -0.5), "not axial (oblique, 30 degrees from axial)"),
        ((1, 0, 0, 0, 0.996195, -0.087156), CHOSEN),  # 5 degrees: axial enough
    ],
)
def test_the_plane_is_named(lidc_0001: list[Path], orientation: tuple[float, ...], verdict: str) -> None:
    summary = dataclasses.replace(summarise_series(lidc_0001), orientation=orientation)
    assert select_series([summary], RULES).verdicts[summary.series_uid] == verdict
