"""Series selection: which series of a received study the node analyses, and why.

A study arrives as files grouped by Series Instance UID. Each series is summarised from its headers
alone (no pixel data), judged against `SelectionRules`, and the best eligible one is chosen. Every
series gets a one-line verdict, so an admin can see why a study was analysed the way it was, or why
it was skipped.

Preference among eligible series: the thinnest slices (thicknesses within a tolerance count as
equal), then a lung or sharp reconstruction kernel, then the most slices.

Multi-frame (Enhanced and Legacy Converted Enhanced) CT is read frame by frame through the series
loader's own flattening of the functional groups, so selection and loading agree on the geometry.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from models.series_loading import (
    CT_IMAGE_STORAGE,
    DUPLICATE_TOLERANCE_MM,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    MULTI_FRAME_CT,
    ORIENTATION_TOLERANCE,
    TILT_TOLERANCE_MM,
    SeriesError,
)

# The loader's flattening of a multi-frame image into per-slice attributes (private there; one
# implementation for loading and selection, so both see the same geometry).
from models.series_loading import _slices_of as _loader_slices_of

# Whole Image Type values that mark a localizer; a series with one is called "localizer".
LOCALIZER_IMAGE_TYPES = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")

DEFAULT_EXCLUDED_IMAGE_TYPES = (
    *LOCALIZER_IMAGE_TYPES,
    "PROJECTION IMAGE",
    "MIP",
    "MINIP",
    "MPR",
    "CURVED MPR",
    "CSA MPR",
    "REFORMATTED",
    "VOLUME RENDER",
    "VOLUME RENDERING",
    "SURFACE RENDER",
    "CSA 3D",
    "3D",
    "SCREEN SAVE",
    "SCREENSHOT",
    "DOSE INFO",
    "DOSE REPORT",
)

# Lung or sharp reconstruction kernels, searched case-insensitively in each value of Convolution
# Kernel. Short vendor names (Philips "L", "D", ...) are anchored: as substrings they would match
# nearly any kernel name.
DEFAULT_PREFERRED_KERNELS = (
    r"LUNG",  # GE LUNG / HD LUNG, Canon LUNG, Philips LUNG ENHANCED
    r"^(HD\s*)?(BONE\s*(PLUS)?|EDGE|DETAIL)$",  # GE sharp kernels
    r"^[BIHQ][a-z]?[5-9]\d[a-z]?$",  # Siemens B60f, B70f, Br59d, Bl57, I70f, Hr64 (50 and up: sharp)
    r"^(L|YB|YC|YD|D|E)$",  # Philips lung and sharp kernels
    r"^FC\s*(5[1-6]|8[0-6])$",  # Canon/Toshiba lung kernels
)

DEFAULT_SOP_CLASSES = (
    str(CT_IMAGE_STORAGE),
    str(ENHANCED_CT_IMAGE_STORAGE),
    str(LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE),
)


@dataclass(frozen=True)
class SelectionRules:
    """What makes a series eligible for nodule detection, and which eligible one is preferred."""

    modalities: tuple[str, ...] = ("CT",)
    sop_classes: tuple[str, ...] = DEFAULT_SOP_CLASSES
    require_axial: bool = True
    axial_tolerance_deg: float = 10.0
    # Image Type value 1 ORIGINAL. Value 2 SECONDARY (e.g. a retrospective reconstruction from the
    # raw data, as in LIDC-IDRI-0002) is not a reason to refuse a series.
    require_original: bool = True
    excluded_image_types: tuple[str, ...] = DEFAULT_EXCLUDED_IMAGE_TYPES
    max_slice_thickness_mm: float = 3.0
    # Thin slices spaced far apart (interspaced high-resolution CT) leave most of the lungs unseen.
    max_slice_spacing_mm: float = 3.0
    min_coverage_mm: float = 150.0
    min_slices: int = 40
    spacing_tolerance_mm: float = 0.1
    # Thicknesses this close count as equal when choosing among eligible series.
    thickness_tolerance_mm: float = 0.1
    preferred_kernels: tuple[str, ...] = DEFAULT_PREFERRED_KERNELS

    def is_preferred_kernel(self, kernels: Iterable[str]) -> bool:
        return any(
            re.search(pattern, kernel.strip(), re.IGNORECASE)
            for kernel in kernels
            if kernel.strip()
            for pattern in self.preferred_kernels
        )


@dataclass(frozen=True)
class SeriesSummary:
    """What selection needs to know about one series, read from its headers.

    Geometry is per slice: one per single-frame instance, one per frame of a multi-frame instance.
    ``positions_mm`` are the slices' positions along the slice normal, ascending, and ``paths``
    the instances in that order. ``unreadable`` and ``inconsistencies`` each make the series
    ineligible; geometric fields are None where the headers do not give them.
    """

    series_uid: str
    series_number: int | None = None
    description: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    # Each distinct Image Type of the series' instances, the most common first.
    image_types: tuple[tuple[str, ...], ...] = ()
    instances: int = 0
    slices: int = 0
    slice_thickness_mm: float | None = None
    orientation: tuple[float, ...] | None = None
    positions_mm: tuple[float, ...] = ()
    spacing_mm: float | None = None
    spacing_max_deviation_mm: float | None = None
    coverage_mm: float = 0.0
    kernels: tuple[str, ...] = ()
    pixel_spacing_mm: tuple[float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    tilt_deg: float = 0.0
    paths: tuple[Path, ...] = ()
    unreadable: tuple[str, ...] = ()
    inconsistencies: tuple[str, ...] = ()

    @property
    def image_type(self) -> tuple[str, ...]:
        return self.image_types[0] if self.image_types else ()

    @property
    def kernel(self) -> str:
        return "\\".join(k for k in self.kernels if k)

    @property
    def normal(self) -> npt.NDArray[np.float64] | None:
        if self.orientation is None:
            return None
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def label(self) -> str:
        """How a person finds the series in a viewer: its number and description, else its UID."""
        parts = [f"series {self.series_number}" if self.series_number is not None else ""]
        if self.description:
            parts.append(f'"{self.description[:40]}"')
        return " ".join(p for p in parts if p) or f"series {self.series_uid}"

    def to_dict(self) -> dict[str, Any]:
        """The summary without per-slice detail, for the job database."""
        summary = asdict(self)
        for bulky in ("positions_mm", "paths"):
            del summary[bulky]
        summary["kernel"] = self.kernel
        return summary


@dataclass(frozen=True)
class Selection:
    """The series chosen for analysis (None: the study is skipped), why, and each series' verdict."""

    chosen: SeriesSummary | None
    why: str
    verdicts: dict[str, str] = field(default_factory=dict)
    series: tuple[SeriesSummary, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.series_uid if self.chosen is not None else None,
            "why": self.why,
            "verdicts": dict(self.verdicts),
            "series": [s.to_dict() for s in self.series],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


CHOSEN = "chosen"


# --- summarising a series from its headers --------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    path: Path
    attributes: Dataset


def summarise_study(files_by_series: Mapping[str, Sequence[str | Path]]) -> list[SeriesSummary]:
    """One summary per series, in the mapping's order."""
    return [summarise_series(paths, series_uid=uid) for uid, paths in files_by_series.items()]


def summarise_series(paths: Sequence[str | Path], *, series_uid: str | None = None) -> SeriesSummary:
    """Summarise one series from its files' headers (pixel data is never read). Files that cannot
    be read are listed in ``unreadable``; nothing here raises for a bad file."""
    headers, used_paths, unreadable = _read_headers(paths)
    uid = series_uid or (str(headers[0].get("SeriesInstanceUID", "")) if headers else "")
    if not headers:
        return SeriesSummary(series_uid=uid, instances=len(paths), unreadable=unreadable)
    try:
        return _summary(uid, len(paths), headers, used_paths, unreadable)
    except Exception as error:  # a malformed value met while converting; reported, never raised
        problem = f"headers cannot be interpreted: {type(error).__name__}: {str(error)[:80]}"
        return SeriesSummary(
            series_uid=uid, instances=len(paths), unreadable=unreadable, inconsistencies=(problem,)
        )


def _summary(
    uid: str, instances: int, headers: list[Dataset], paths: list[Path], unreadable: tuple[str, ...]
) -> SeriesSummary:
    headers, paths = _drop_repeated_instances(headers, paths)
    identity = _identity(headers)
    inconsistencies = _header_inconsistencies(headers, uid)
    slices: list[_Slice] = []
    for header, path in zip(headers, paths, strict=True):
        try:
            slices.extend(_Slice(s.path, s.attributes) for s in _loader_slices_of(header, path))
        except SeriesError as error:
            inconsistencies.append(str(error))
    geometry, geometry_problems = _geometry(slices)
    return SeriesSummary(
        series_uid=uid,
        **identity,
        instances=instances,
        slices=len(slices),
        **geometry,
        unreadable=unreadable,
        inconsistencies=tuple(inconsistencies + geometry_problems),
    )


def _read_headers(paths: Sequence[str | Path]) -> tuple[list[Dataset], list[Path], tuple[str, ...]]:
    headers: list[Dataset] = []
    used: list[Path] = []
    unreadable: list[str] = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            header.SOPInstanceUID  # noqa: B018  # every stored instance has one; absent: not an instance
        except Exception as error:  # pydicom raises many types for damaged files; each is reported
            unreadable.append(f"{Path(path).name}: {type(error).__name__}: {str(error)[:80]}")
            continue
        headers.append(header)
        used.append(Path(path))
    return headers, used, tuple(unreadable)


def _drop_repeated_instances(headers: list[Dataset], paths: list[Path]) -> tuple[list[Dataset], list[Path]]:
    """The same SOP instance received twice is one instance."""
    first: dict[str, int] = {}
    for index, header in enumerate(headers):
        first.setdefault(str(header.SOPInstanceUID), index)
    keep = sorted(first.values())
    return [headers[i] for i in keep], [paths[i] for i in keep]


def _identity(headers: list[Dataset]) -> dict[str, Any]:
    header = headers[0]
    number = header.get("SeriesNumber")
    image_types = Counter(tuple(str(v).strip().upper() for v in _values(h.get("ImageType"))) for h in headers)
    return {
        "series_number": int(number) if number not in (None, "") else None,
        "description": str(header.get("SeriesDescription", "") or "").strip(),
        "modality": "/".join(sorted({str(h.get("Modality", "") or "").upper() for h in headers})),
        "sop_class_uid": "/".join(sorted({str(h.get("SOPClassUID", "")) for h in headers})),
        "image_types": tuple(t for t, _ in image_types.most_common()),
        "kernels": _kernels(header),
    }


def _values(value: object) -> list[object]:
    """A DICOM value as a list: empty, one value, or each of a multi-valued element's values."""
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def _kernels(header: Dataset) -> tuple[str, ...]:
    """Convolution Kernel: top level for single-frame CT, in the CT Reconstruction functional group
    (or among a legacy conversion's unassigned attributes) for multi-frame CT."""
    if "ConvolutionKernel" in header:
        return tuple(str(v).strip() for v in _values(header.ConvolutionKernel))
    groups = [*header.get("SharedFunctionalGroupsSequence", [])[:1]]
    groups += [*header.get("PerFrameFunctionalGroupsSequence", [])[:1]]
    for group in groups:
        for sequence in (
            "CTReconstructionSequence",
            "UnassignedSharedConvertedAttributesSequence",
            "UnassignedPerFrameConvertedAttributesSequence",
        ):
            for item in group.get(sequence, [])[:1]:
                if "ConvolutionKernel" in item:
                    return tuple(str(v).strip() for v in _values(item.ConvolutionKernel))
    return ()


def _header_inconsistencies(headers: list[Dataset], series_uid: str) -> list[str]:
    problems = []
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        problems.append(f"files of {len(series)} different series mixed")
    elif series != {series_uid}:
        problems.append(f"the files carry Series Instance UID {series.pop()}, not {series_uid}")
    kinds = {h.get("SOPClassUID") in MULTI_FRAME_CT for h in headers}
    if len(kinds) > 1:
        problems.append("mixes single-frame and multi-frame instances")
    photometric = {str(h.get("PhotometricInterpretation", "MONOCHROME2")) for h in headers}
    if photometric - {"MONOCHROME2"}:
        problems.append(f"photometric interpretation {'/'.join(sorted(photometric))}, not MONOCHROME2")
    return problems


def _numbers(attributes: Dataset, keyword: str) -> list[float] | None:
    try:
        values = [float(v) for v in _values(attributes.get(keyword))]
    except (TypeError, ValueError):
        return None
    return values or None


def _geometry(slices: list[_Slice]) -> tuple[dict[str, Any], list[str]]:
    """The geometric fields of the summary, and what makes the geometry unusable."""
    orientations = [_numbers(s.attributes, "ImageOrientationPatient") for s in slices]
    positions = [_numbers(s.attributes, "ImagePositionPatient") for s in slices]
    if not slices or any(o is None or len(o) != 6 for o in orientations):
        return {}, []  # no image geometry: the verdict says so, after what kind of object this is
    if any(p is None or len(p) != 3 for p in positions):
        return {}, ["missing geometry: a slice without Image Position (Patient)"]
    orientation = np.array(orientations, dtype=float)
    if (np.abs(orientation - orientation[0]).max(axis=1) > ORIENTATION_TOLERANCE).any():
        return {}, ["mixed orientations in one series"]
    normal = np.cross(orientation[0, :3], orientation[0, 3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        return {}, ["Image Orientation (Patient) is not two orthonormal vectors"]
    xyz = np.array(positions, dtype=float)
    order = np.argsort(xyz @ normal, kind="stable")
    xyz = xyz[order]
    along = xyz @ normal
    geometry: dict[str, Any] = {
        "orientation": tuple(float(v) for v in orientation[0]),
        "positions_mm": tuple(float(v) for v in along),
        "coverage_mm": float(along[-1] - along[0]),
        "paths": tuple(dict.fromkeys(slices[i].path for i in order)),
        "tilt_deg": _tilt_deg(slices[0].attributes, xyz, normal),
        **_in_plane(slices),
    }
    problems = []
    frames = {
        (
            s.attributes.get("Rows"),
            s.attributes.get("Columns"),
            tuple(_numbers(s.attributes, "PixelSpacing") or ()),
        )
        for s in slices
    }
    if len(frames) > 1:
        problems.append(f"mixed image sizes or pixel spacings ({len(frames)} kinds)")
    if len(along) > 1:
        steps = np.diff(along)
        spacing = float(np.median(steps))
        geometry["spacing_mm"] = spacing
        geometry["spacing_max_deviation_mm"] = float(np.abs(steps - spacing).max())
        duplicates = int((steps < DUPLICATE_TOLERANCE_MM).sum())
        if duplicates:
            problems.append(f"{duplicates} duplicate slice positions (two reconstructions in one series?)")
    thickness = [t[0] for s in slices if (t := _numbers(s.attributes, "SliceThickness"))]
    if thickness:
        geometry["slice_thickness_mm"] = float(np.median(thickness))
    return geometry, problems


def _in_plane(slices: list[_Slice]) -> dict[str, Any]:
    first = slices[0].attributes
    spacing = _numbers(first, "PixelSpacing")
    return {
        "pixel_spacing_mm": (spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
        "rows": int(first.Rows) if "Rows" in first else None,
        "columns": int(first.Columns) if "Columns" in first else None,
    }


def _tilt_deg(attributes: Dataset, xyz: npt.NDArray[np.float64], normal: npt.NDArray[np.float64]) -> float:
    """Gantry tilt, from the attribute or from slices shifted in their own plane (the loader refuses
    both: tilted slices do not stack into a rectilinear volume)."""
    tilt = _numbers(attributes, "GantryDetectorTilt")
    recorded = abs(tilt[0]) if tilt else 0.0
    if len(xyz) < 2:
        return recorded
    step = (xyz[-1] - xyz[0]) / (len(xyz) - 1)
    shear = float(np.linalg.norm(step - (step @ normal) * normal))
    if shear <= TILT_TOLERANCE_MM:
        return recorded
    return max(recorded, float(np.degrees(np.arctan2(shear, abs(step @ normal)))))


# --- judging and choosing -----------------------------------------------------------------------


def select_series(series: Sequence[SeriesSummary], rules: SelectionRules | None = None) -> Selection:
    """Choose the series to analyse. Nothing eligible: ``chosen`` is None and ``why`` says, for each
    series, why it was refused."""
    rules = rules or SelectionRules()
    if not series:
        return Selection(chosen=None, why="no series in the study", verdicts={}, series=())
    refusals = {s.series_uid: ineligibility(s, rules) for s in series}
    eligible = [s for s in series if refusals[s.series_uid] is None]
    if not eligible:
        why = "no eligible series: " + "; ".join(f"{s.label}: {refusals[s.series_uid]}" for s in series)
        verdicts = {uid: reason or CHOSEN for uid, reason in refusals.items()}
        return Selection(chosen=None, why=why, verdicts=verdicts, series=tuple(series))
    thinnest = min(_thickness(s) for s in eligible)
    ranked = sorted(eligible, key=lambda s: _preference(s, thinnest, rules))
    chosen = ranked[0]
    verdicts = {s.series_uid: refusals[s.series_uid] or _compare(s, chosen, rules) for s in series}
    return Selection(
        chosen=chosen,
        why=_why(chosen, len(eligible), len(series), rules),
        verdicts=verdicts,
        series=tuple(series),
    )


def ineligibility(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    """Why the series cannot be analysed, or None when it is eligible. What the object is (modality,
    SOP class, image type) is judged first and alone; geometric shortcomings are all listed."""
    for check in (_unreadable, _kind, _image_type, _inconsistent, _orientation, _tilt):
        reason = check(summary, rules)
        if reason is not None:
            return reason
    reasons = _geometric_shortcomings(summary, rules)
    return "; ".join(reasons) if reasons else None


def _unreadable(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    if summary.instances == 0:
        return "no files"
    if not summary.unreadable:
        return None
    return f"{len(summary.unreadable)} of {summary.instances} files unreadable ({summary.unreadable[0]})"


def _kind(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    modalities = summary.modality.split("/")
    if any(m not in rules.modalities for m in modalities):
        return f"modality {summary.modality or 'missing'}"
    sop_classes = summary.sop_class_uid.split("/")
    if any(c not in rules.sop_classes for c in sop_classes):
        names = "/".join(UID(c).name or c for c in sop_classes)
        return f"SOP class {names} not accepted"
    return None


def _normalised(value: str) -> str:
    return " ".join(value.replace("_", " ").upper().split())


def _image_type(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    values = {_normalised(v) for image_type in summary.image_types for v in image_type}
    excluded = {_normalised(t) for t in rules.excluded_image_types}
    if values & {_normalised(t) for t in LOCALIZER_IMAGE_TYPES} & excluded:
        return "localizer"
    if values & excluded:
        return f"{'/'.join(sorted(values & excluded))} image"
    if rules.require_original:
        if not summary.image_types or any(not t for t in summary.image_types):
            return "no Image Type (cannot tell an ORIGINAL image)"
        first = sorted({t[0] for t in summary.image_types if t[0] != "ORIGINAL"})
        if first:
            return f"{'/'.join(first)} image"
    return None


def _inconsistent(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    if summary.inconsistencies:
        return "; ".join(summary.inconsistencies)
    if summary.orientation is None:
        return "no image geometry (no Image Orientation/Position (Patient))"
    return None


def _orientation(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    normal = summary.normal
    if normal is None or not rules.require_axial:
        return None
    off_axial = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if off_axial <= rules.axial_tolerance_deg:
        return None
    closest = int(np.argmax(np.abs(normal)))
    if closest < 2 and abs(normal[closest]) >= np.cos(np.radians(rules.axial_tolerance_deg)):
        return f"not axial ({('sagittal', 'coronal')[closest]})"
    return f"not axial (oblique, {off_axial:.0f} degrees from axial)"


def _tilt(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    if summary.tilt_deg > 0.01:
        return f"gantry tilt of {summary.tilt_deg:.1f} degrees"
    return None


def _geometric_shortcomings(summary: SeriesSummary, rules: SelectionRules) -> list[str]:
    reasons = []
    thickness = _thickness(summary)
    if thickness > rules.max_slice_thickness_mm:
        reasons.append(f"slice thickness {_mm(thickness)} mm > {_mm(rules.max_slice_thickness_mm)} mm")
    if summary.slices < rules.min_slices:
        reasons.append(f"{summary.slices} slices < {rules.min_slices}")
    if summary.coverage_mm < rules.min_coverage_mm:
        reasons.append(f"covers {summary.coverage_mm:.0f} mm < {rules.min_coverage_mm:.0f} mm")
    gap = _spacing_irregularity(summary, rules)
    if gap is not None:
        reasons.append(gap)
    elif (
        thickness <= rules.max_slice_thickness_mm  # thick slices are far apart too: said once is enough
        and summary.spacing_mm is not None
        and summary.spacing_mm > rules.max_slice_spacing_mm + 1e-6
    ):
        reasons.append(f"slice spacing {_mm(summary.spacing_mm)} mm > {_mm(rules.max_slice_spacing_mm)} mm")
    return reasons


def _mm(value: float) -> str:
    """1.25 -> "1.25", 5 -> "5.0": as many decimals as the value needs, up to three."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _spacing_irregularity(summary: SeriesSummary, rules: SelectionRules) -> str | None:
    if summary.spacing_mm is None or summary.spacing_max_deviation_mm is None:
        return None
    if summary.spacing_max_deviation_mm <= rules.spacing_tolerance_mm:
        return None
    steps = np.diff(summary.positions_mm)
    worst = int(np.argmax(np.abs(steps - summary.spacing_mm)))
    kind = "gap" if steps[worst] > summary.spacing_mm else "step"
    return (
        f"non-uniform spacing ({kind} of {_mm(steps[worst])} mm after slice {worst + 1} of "
        f"{summary.slices}, expected {_mm(summary.spacing_mm)} mm)"
    )


def _thickness(summary: SeriesSummary) -> float:
    """Slice thickness, else the spacing (Slice Thickness is type 2 in CT Image Storage)."""
    if summary.slice_thickness_mm is not None:
        return summary.slice_thickness_mm
    return summary.spacing_mm if summary.spacing_mm is not None else float("inf")


def _preference(summary: SeriesSummary, thinnest: float, rules: SelectionRules) -> tuple[Any, ...]:
    """Sort key: best first. Thicknesses within the tolerance of the thinnest count as equal."""
    thickness = _thickness(summary)
    among_thinnest = thickness <= thinnest + rules.thickness_tolerance_mm
    return (
        0.0 if among_thinnest else thickness,
        not rules.is_preferred_kernel(summary.kernels),
        -summary.slices,
        summary.series_uid,  # a stable choice between equals
    )


def _compare(other: SeriesSummary, chosen: SeriesSummary, rules: SelectionRules) -> str:
    """Why an eligible series lost to the chosen one."""
    if other.series_uid == chosen.series_uid:
        return CHOSEN
    lead = "eligible but not preferred: "
    mine, theirs = _thickness(other), _thickness(chosen)
    if mine > theirs + rules.thickness_tolerance_mm:
        return f"{lead}thicker ({_mm(mine)} mm vs {_mm(theirs)} mm)"
    chosen_sharp = rules.is_preferred_kernel(chosen.kernels)
    if chosen_sharp and not rules.is_preferred_kernel(other.kernels):
        return f"{lead}not a lung/sharp kernel ({other.kernel or 'none'} vs {chosen.kernel})"
    if other.slices < chosen.slices:
        return f"{lead}fewer slices ({other.slices} vs {chosen.slices})"
    return f"{lead}equal to the chosen series (tie broken by series UID)"


def _why(chosen: SeriesSummary, eligible: int, total: int, rules: SelectionRules) -> str:
    thickness = f"{_mm(_thickness(chosen))} mm"
    lead = f"thinnest eligible ({thickness})" if eligible > 1 else f"only eligible series ({thickness})"
    kernel = chosen.kernel or "not recorded"
    kernel_part = (
        f"lung/sharp kernel {kernel}" if rules.is_preferred_kernel(chosen.kernels) else f"kernel {kernel}"
    )
    others = []
    if eligible > 1:
        others.append(f"{eligible - 1} other eligible series not preferred")
    if total > eligible:
        others.append(f"{total - eligible} other series not eligible")
    label = f"{chosen.label}: " if chosen.series_number is not None or chosen.description else ""
    return f"{label}{lead}, {kernel_part}, {chosen.slices} slices over {chosen.coverage_mm:.0f} mm; " + (
        ", ".join(others) if others else "no other series"
    )
