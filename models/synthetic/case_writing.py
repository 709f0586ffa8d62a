"""A case on disk: its DICOM CT series, ground_truth.json and the label map beside it, and, when asked,
a preview montage of every nodule with its ground-truth outline."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from models.ground_truth import IgnoreMark, write_ground_truth
from models.lidc import LidcError, build_lidc_case, find_lidc_xml, parse_lidc_xml
from models.lungs import LungSegmentationError
from models.preview import PreviewItem, nodule_montage
from models.series_loading import CtSeries, SeriesError, load_series
from models.series_writing import AcquisitionParameters, SeriesIdentity, write_ct_series
from models.synthetic.cases import Case, insert_into_real, synthesize_case
from models.synthetic.placement import PlacementError

PREVIEW_NAME = "preview.png"
# Fixed, so that the same seed writes the same files.
SYNTHETIC_STUDY_DATETIME = dt.datetime(2026, 1, 1, 9, 0, 0)


@dataclass(frozen=True)
class WrittenCase:
    series_files: list[Path]
    ground_truth: Path
    preview: Path | None


def synthetic_identity(seed: int) -> SeriesIdentity:
    return SeriesIdentity(
        patient_name=f"SYNTHETIC^CASE {seed}",
        patient_id=f"SYN-{seed:06d}",
        study_description="SYNTHETIC CHEST CT",
        series_description="SYNTHETIC CHEST CT WITH NODULES",
        accession_number=f"SYN{seed:06d}",
        study_datetime=SYNTHETIC_STUDY_DATETIME,
    )


def insertion_identity(seed: int, background: Dataset) -> SeriesIdentity:
    source = str(background.get("PatientID", "") or "unknown")
    return SeriesIdentity(
        patient_name=f"SYNTHETIC^INSERTED {seed}",
        patient_id=f"SYN-INS-{seed:06d}",
        study_description="CHEST CT WITH SYNTHETIC NODULES",
        series_description="REAL CT + SYNTHETIC NODULES",
        accession_number=f"SYNI{seed:06d}",
        study_datetime=SYNTHETIC_STUDY_DATETIME,
        derivation_description=(
            f"Synthetic nodules inserted by cad-node into the de-identified CT series {source} "
            f"({background.get('SeriesInstanceUID', '')})"
        )[:1024],
    )


def synthetic_acquisition_parameters(case: Case) -> AcquisitionParameters:
    acquisition = case.acquisition
    if acquisition is None:
        raise ValueError("a case inserted into real CT has no synthetic acquisition")
    return AcquisitionParameters(
        slice_thickness_mm=acquisition.slice_thickness,
        kvp=acquisition.kvp,
        convolution_kernel=acquisition.convolution_kernel,
    )


def background_acquisition_parameters(background: Dataset) -> AcquisitionParameters:
    return AcquisitionParameters(
        slice_thickness_mm=float(background.get("SliceThickness", 0) or 0) or 1.0,
        kvp=float(background.get("KVP", 120) or 120),
        convolution_kernel=str(background.get("ConvolutionKernel", "STANDARD") or "STANDARD")[:16],
    )


def write_case(
    case: Case,
    out_dir: Path,
    identity: SeriesIdentity,
    acquisition: AcquisitionParameters,
    *,
    case_info: dict[str, object],
    uid_seed: str,
    preview: bool,
) -> WrittenCase:
    files = write_ct_series(case.volume, out_dir, identity, acquisition, uid_seed=uid_seed)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    info = {
        **case_info,
        "study_instance_uid": str(header.StudyInstanceUID),
        "series_instance_uid": str(header.SeriesInstanceUID),
        "frame_of_reference_uid": str(header.FrameOfReferenceUID),
        "shape_kji": list(case.volume.shape),
        "spacing_kji_mm": [round(s, 4) for s in case.volume.spacing],
    }
    truth = write_ground_truth(out_dir, case.volume, case.nodules, case=info, ignore=case.ignore)
    montage = None
    if preview:
        montage = write_preview(case, out_dir / PREVIEW_NAME, title=str(case_info.get("title", out_dir.name)))
    return WrittenCase(series_files=files, ground_truth=truth, preview=montage)


def write_preview(case: Case, out_png: Path, *, title: str) -> Path:
    items = [
        PreviewItem(
            label=(
                f"#{n.label} {n.nodule_type} {n.shape}, {n.location}\n"
                f"{n.long_axis_mm:.1f} x {n.short_axis_mm:.1f} mm, {n.mean_hu:.0f} HU"
            ),
            centre_kji=(float(n.axial_slice_index), *case.volume.patient_to_index(n.centre_mm)[1:]),
            outline=n.mask.axial_slice(n.axial_slice_index, case.volume.shape[1:]),
        )
        for n in case.nodules
    ]
    return nodule_montage(case.volume, items, out_png, title=title)


class SynthesisError(RuntimeError):
    """The case cannot be made: an unreadable background, or no room for the nodules."""


@dataclass(frozen=True)
class SynthesisResult:
    series_files: list[Path]
    ground_truth: Path
    preview: Path | None
    summary: str


def synthesize(
    out_dir: Path,
    *,
    seed: int,
    n_nodules: int,
    background: Path | None = None,
    n_slices: int | None = None,
    preview: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> SynthesisResult:
    """`cad-node synth`: a synthetic chest, or nodules inserted into the real series in `background`."""
    try:
        if background is None:
            progress(f"synthetic chest, seed {seed}: anatomy, {n_nodules} nodules, acquisition noise")
            case = synthesize_case(seed, n_nodules, n_slices=n_slices)
            identity, acquisition = synthetic_identity(seed), synthetic_acquisition_parameters(case)
            info: dict[str, object] = {
                "kind": "synthetic",
                "seed": seed,
                "acquisition": asdict(case.acquisition),
            }
        else:
            progress(f"reading the background series {background}")
            series = load_series(background)
            ignore = _real_marks(background, series)
            progress(f"inserting {n_nodules} nodules, clear of {len(ignore)} real reader marks")
            case = insert_into_real(series.volume, seed, n_nodules, ignore=ignore)
            identity = insertion_identity(seed, series.headers[0])
            acquisition = background_acquisition_parameters(series.headers[0])
            info = {
                "kind": "insertion",
                "seed": seed,
                "background_series_instance_uid": series.series_instance_uid,
            }
    except (SeriesError, LungSegmentationError, PlacementError, LidcError) as error:
        raise SynthesisError(str(error)) from error
    info["title"] = f"{identity.series_description}, seed {seed}"
    progress(f"writing {case.volume.shape[0]} slices, ground truth{' and preview' if preview else ''}")
    written = write_case(
        case,
        out_dir,
        identity,
        acquisition,
        case_info=info,
        uid_seed=f"cad-node synth {info['kind']} {seed}",
        preview=preview,
    )
    return SynthesisResult(
        series_files=written.series_files,
        ground_truth=written.ground_truth,
        preview=written.preview,
        summary=_summary(case),
    )


def _real_marks(background: Path, series: CtSeries) -> list[IgnoreMark]:
    """Every reader mark of an LIDC series (nodules of any size, non-nodules): no synthetic nodule goes
    there, and an evaluation counts a detection there as neither hit nor false positive."""
    try:
        xml = find_lidc_xml(background, series.series_instance_uid)
    except LidcError:
        return []
    return build_lidc_case(parse_lidc_xml(xml), series.volume, series.sop_instance_uids).every_mark()


def _summary(case: Case) -> str:
    header = f"{'#':>2}  {'type':<12} {'shape':<10} {'location':<13} {'long x short mm':>15} {'HU':>6}"
    lines = [f"{header} {'Lung-RADS':>9}  centre (mm)"]
    for n in case.nodules:
        centre = ", ".join(f"{v:.1f}" for v in n.centre_mm)
        lines.append(
            f"{n.label:>2}  {n.nodule_type:<12} {n.shape:<10} {n.location:<13} "
            f"{n.long_axis_mm:>6.1f} x {n.short_axis_mm:<6.1f} {n.mean_hu:>6.0f} {n.lung_rads:>9}  ({centre})"
        )
    return "\n".join(lines)
