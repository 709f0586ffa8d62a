"""Series to volume: a DICOM CT series (a folder or a list of files) becomes one Volume in HU.

Nothing is guessed: a set of files that cannot become one correct volume raises SeriesError
with the reason. Slices are ordered by their position along the slice normal.

A series is either single-frame CT images, one slice each, or multi-frame (Enhanced or Legacy
Converted Enhanced) CT images, one slice per frame. Both become the same list of slices, whose
geometry and pixel value attributes read as a single-frame image's do, so one set of checks and
one HU conversion serve both.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from models.volume import Volume

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
MULTI_FRAME_CT = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})
AIR_HU = -1024.0
ORIENTATION_TOLERANCE = 1e-3
DUPLICATE_TOLERANCE_MM = 0.01
DEFAULT_SPACING_TOLERANCE_MM = 0.1
TILT_TOLERANCE_MM = 0.05

# Where a multi-frame CT image keeps, in its functional groups, what a single-frame one has at top level.
# Legacy Converted images keep Gantry/Detector Tilt among their unassigned converted attributes.
_FUNCTIONAL_GROUP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "CTAcquisitionDetailsSequence": ("GantryDetectorTilt",),
    "UnassignedSharedConvertedAttributesSequence": ("GantryDetectorTilt",),
    "UnassignedPerFrameConvertedAttributesSequence": ("GantryDetectorTilt",),
}
# What every frame of a multi-frame image shares from the image's top level.
_INSTANCE_ATTRIBUTES = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelRepresentation",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)


class SeriesError(ValueError):
    """A set of DICOM files that cannot become one correct CT volume; the message says why."""


@dataclass(frozen=True, eq=False)
class CtSeries:
    """The volume and, per slice k, the instance it came from: ``headers[k]`` (without pixel data),
    ``paths[k]`` and the 1-based ``frame_numbers[k]`` within that instance (1 for single-frame).
    A multi-frame instance repeats its header, path and SOP Instance UID for each of its frames."""

    volume: Volume
    headers: tuple[Dataset, ...]
    paths: tuple[Path, ...]
    frame_numbers: tuple[int, ...]

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(str(h.SOPInstanceUID) for h in self.headers)

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


@dataclass(frozen=True, eq=False)
class _Slice:
    """One slice: a single-frame instance, or one frame of a multi-frame instance."""

    header: Dataset
    path: Path
    frame_number: int
    # The slice's geometry and pixel value attributes under their single-frame keywords: the header
    # itself for a single-frame image, the frame's functional groups flattened for a multi-frame one.
    attributes: Dataset
    name: str


def load_series(
    source: str | Path | Sequence[str | Path],
    *,
    spacing_tolerance_mm: float = DEFAULT_SPACING_TOLERANCE_MM,
) -> CtSeries:
    """Read one CT series into a volume. `source` is a folder (its DICOM files, not sub-folders)
    or an explicit list of files."""
    headers, paths = _read_headers(source)
    _check_one_ct_series(headers, paths)
    headers, paths = _drop_repeated_instances(headers, paths)
    slices = [s for header, path in zip(headers, paths, strict=True) for s in _slices_of(header, path)]
    if len(slices) < 2:
        raise SeriesError(f"a volume needs at least 2 slices, the series has {len(slices)}")
    row_cosine, column_cosine = _common_orientation(slices)
    rows, columns, pixel_spacing = _common_frame(slices)
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([_position(s) for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    slice_spacing = _uniform_slice_spacing(positions, normal, slices, spacing_tolerance_mm)
    _check_no_tilt(slices[0].attributes, positions, normal)
    hu = _read_voxels(slices, rows, columns)
    volume = Volume(
        hu=hu,
        spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=np.column_stack([normal, column_cosine, row_cosine]),
    )
    return CtSeries(
        volume=volume,
        headers=tuple(s.header for s in slices),
        paths=tuple(s.path for s in slices),
        frame_numbers=tuple(s.frame_number for s in slices),
    )


def _candidate_files(source: str | Path | Sequence[str | Path]) -> tuple[list[Path], bool]:
    if isinstance(source, str | Path):
        folder = Path(source)
        if folder.is_dir():
            return sorted(p for p in folder.iterdir() if p.is_file()), False
        if folder.is_file():
            return [folder], True
        raise SeriesError(f"{folder} is neither a folder nor a file")
    return [Path(p) for p in source], True


def _read_headers(source: str | Path | Sequence[str | Path]) -> tuple[list[Dataset], list[Path]]:
    files, explicit = _candidate_files(source)
    headers: list[Dataset] = []
    paths: list[Path] = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError) as error:
            if explicit:
                raise SeriesError(f"{path} is not a readable DICOM file: {error}") from error
            continue
        if "SOPClassUID" not in header:
            if explicit:
                raise SeriesError(f"{path} has no SOP Class UID: not a DICOM image")
            continue
        headers.append(header)
        paths.append(path)
    if not headers:
        raise SeriesError(f"no DICOM files found in {source}")
    return headers, paths


def _check_one_ct_series(headers: list[Dataset], paths: list[Path]) -> None:
    series = sorted({str(h.get("SeriesInstanceUID", "")) for h in headers})
    if len(series) > 1:
        raise SeriesError(f"the files belong to {len(series)} series ({', '.join(series)}); pass one series")
    for header, path in zip(headers, paths, strict=True):
        sop_class = header.SOPClassUID
        if sop_class != CT_IMAGE_STORAGE and sop_class not in MULTI_FRAME_CT:
            raise SeriesError(f"{path.name}: SOP class {sop_class.name or sop_class} is not CT Image Storage")
        if int(header.get("SamplesPerPixel", 1)) != 1 or header.get("PhotometricInterpretation") not in (
            "MONOCHROME2",
            None,
        ):
            raise SeriesError(
                f"{path.name}: photometric interpretation {header.get('PhotometricInterpretation')} "
                "is not a MONOCHROME2 CT image"
            )
    example_of_kind = {h.SOPClassUID in MULTI_FRAME_CT: p.name for h, p in zip(headers, paths, strict=True)}
    if len(example_of_kind) > 1:
        raise SeriesError(
            f"the series mixes single-frame CT images ({example_of_kind[False]}) and multi-frame ones "
            f"({example_of_kind[True]}); pass one kind"
        )


def _drop_repeated_instances(headers: list[Dataset], paths: list[Path]) -> tuple[list[Dataset], list[Path]]:
    """The same SOP instance received twice is one slice, not a duplicate position."""
    seen: dict[str, int] = {}
    for index, header in enumerate(headers):
        seen.setdefault(str(header.SOPInstanceUID), index)
    keep = sorted(seen.values())
    return [headers[i] for i in keep], [paths[i] for i in keep]


def _slices_of(header: Dataset, path: Path) -> list[_Slice]:
    if header.SOPClassUID not in MULTI_FRAME_CT:
        return [_Slice(header=header, path=path, frame_number=1, attributes=header, name=path.name)]
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise SeriesError(f"{path.name}: multi-frame image without a Per-frame Functional Groups Sequence")
    frames = int(header.get("NumberOfFrames", 0) or 0)
    if frames != len(per_frame):
        raise SeriesError(
            f"{path.name}: Number of Frames is {frames} but the Per-frame Functional Groups Sequence "
            f"has {len(per_frame)} items"
        )
    shared = header.get("SharedFunctionalGroupsSequence")
    shared_groups = shared[0] if shared else Dataset()
    return [
        _Slice(
            header=header,
            path=path,
            frame_number=number,
            attributes=_frame_attributes(header, shared_groups, frame_groups),
            name=f"{path.name} frame {number}",
        )
        for number, frame_groups in enumerate(per_frame, start=1)
    ]


def _frame_attributes(header: Dataset, shared_groups: Dataset, frame_groups: Dataset) -> Dataset:
    attributes = Dataset()
    for keyword in _INSTANCE_ATTRIBUTES:
        if keyword in header:
            attributes.add(header[keyword])
    for groups in (shared_groups, frame_groups):  # per-frame groups, added last, override shared ones
        for sequence, keywords in _FUNCTIONAL_GROUP_ATTRIBUTES.items():
            if not groups.get(sequence):
                continue
            macro = groups[sequence][0]
            for keyword in keywords:
                if keyword in macro:
                    attributes.add(macro[keyword])
    return attributes


def _required(s: _Slice, keyword: str) -> list[float]:
    value = s.attributes.get(keyword)
    if value is None or value == "" or (isinstance(value, Sequence) and len(value) == 0):
        raise SeriesError(f"{s.name}: missing geometry: no {keyword}")
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return [float(v) for v in values]


def _common_orientation(slices: list[_Slice]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    orientations = np.array([_required(s, "ImageOrientationPatient") for s in slices])
    if orientations.shape[1] != 6:
        raise SeriesError(
            f"missing geometry: Image Orientation (Patient) has {orientations.shape[1]} values, not 6"
        )
    differs = np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE
    if differs.any():
        other = int(np.argmax(differs))
        raise SeriesError(
            f"mixed orientations: {slices[0].name} has {orientations[0].round(4).tolist()}, "
            f"{slices[other].name} has {orientations[other].round(4).tolist()}"
        )
    row_cosine, column_cosine = orientations[0, :3], orientations[0, 3:]
    if not (
        np.isclose(np.linalg.norm(row_cosine), 1, atol=1e-3)
        and np.isclose(np.linalg.norm(column_cosine), 1, atol=1e-3)
        and abs(row_cosine @ column_cosine) < 1e-3
    ):
        raise SeriesError(
            f"Image Orientation (Patient) {orientations[0].tolist()} is not two orthonormal vectors"
        )
    return row_cosine / np.linalg.norm(row_cosine), column_cosine / np.linalg.norm(column_cosine)


def _common_frame(slices: list[_Slice]) -> tuple[int, int, tuple[float, float]]:
    frames = []
    for s in slices:
        spacing = _required(s, "PixelSpacing")
        if len(spacing) != 2 or min(spacing) <= 0:
            raise SeriesError(f"{s.name}: Pixel Spacing {spacing} is not two positive values")
        frames.append((int(s.attributes.Rows), int(s.attributes.Columns), spacing[0], spacing[1]))
    distinct = sorted({(r, c, round(sr, 4), round(sc, 4)) for r, c, sr, sc in frames})
    if len(distinct) > 1:
        described = "; ".join(f"{r} x {c} at {sr} x {sc} mm" for r, c, sr, sc in distinct)
        raise SeriesError(f"mixed image sizes or pixel spacings in one series: {described}")
    rows, columns, row_spacing, column_spacing = frames[0]
    return rows, columns, (row_spacing, column_spacing)


def _position(s: _Slice) -> list[float]:
    position = _required(s, "ImagePositionPatient")
    if len(position) != 3:
        raise SeriesError(f"{s.name}: missing geometry: Image Position (Patient) has {len(position)} values")
    return position


def _uniform_slice_spacing(
    positions: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    slices: list[_Slice],
    tolerance: float,
) -> float:
    along = positions @ normal
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        k = int(duplicate[0])
        raise SeriesError(
            f"duplicate slice positions: {slices[k].name} and {slices[k + 1].name} both lie at "
            f"{along[k]:.2f} mm along the slice normal ({duplicate.size} such pairs)"
        )
    spacing = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - spacing)))
    if abs(steps[worst] - spacing) > tolerance:
        raise SeriesError(
            f"non-uniform slice spacing: the step between {slices[worst].name} and {slices[worst + 1].name} "
            f"is {steps[worst]:.3f} mm where the series' spacing is {spacing:.3f} mm "
            f"(tolerance {tolerance} mm); slices missing or a mixed series"
        )
    return spacing


def _check_no_tilt(
    attributes: Dataset, positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64]
) -> None:
    tilt = float(attributes.get("GantryDetectorTilt", 0) or 0)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    in_plane = step - (step @ normal) * normal
    shear = float(np.linalg.norm(in_plane))
    if shear > TILT_TOLERANCE_MM:
        angle = float(np.degrees(np.arctan2(shear, step @ normal)))
        raise SeriesError(
            f"gantry tilt: each slice is shifted {shear:.2f} mm in its own plane "
            f"(about {angle:.1f} degrees); "
            "the slices do not stack into a rectilinear volume"
        )
    if abs(tilt) > 0.01:
        raise SeriesError(f"gantry tilt of {tilt} degrees recorded in Gantry/Detector Tilt")


def _read_voxels(slices: list[_Slice], rows: int, columns: int) -> npt.NDArray[np.float32]:
    """Decode each instance once, all its frames together, and place each frame at its slice."""
    hu = np.empty((len(slices), rows, columns), dtype=np.float32)
    slices_of_file: dict[Path, list[int]] = {}
    for k, s in enumerate(slices):
        slices_of_file.setdefault(s.path, []).append(k)

    def read(path: Path) -> None:
        frames = _stored_frames(path)
        for k in slices_of_file[path]:
            s = slices[k]
            if s.frame_number > len(frames):
                raise SeriesError(f"{s.name}: the pixel data holds only {len(frames)} frames")
            hu[k] = _frame_hu(frames[s.frame_number - 1], s.attributes)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(read, slices_of_file))
    return hu


def _stored_frames(path: Path) -> npt.NDArray[np.generic]:
    """The stored values of all the frames of one file, as (frame, row, column)."""
    dataset = pydicom.dcmread(path)
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises several types for undecodable pixel data
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise SeriesError(f"{path.name}: cannot decode pixel data ({syntax}): {error}") from error
    return stored[np.newaxis] if stored.ndim == 2 else stored


def _frame_hu(stored: npt.NDArray[np.generic], attributes: Dataset) -> npt.NDArray[np.float32]:
    slope = float(attributes.get("RescaleSlope", 1) or 1)
    intercept = float(attributes.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = _padding_mask(attributes, stored)
    if padding is not None:
        hu[padding] = AIR_HU
    # Nothing physical lies below air; scanners write -2000 or -3024 outside the reconstruction circle.
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def _padding_mask(dataset: Dataset, stored: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_] | None:
    if "PixelPaddingValue" not in dataset:
        return None
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    bits = int(dataset.get("BitsAllocated", 16))

    def as_stored(value: int) -> int:
        # The tag is often written as US even when pixels are signed: 63536 means -2000.
        value = int(value)
        if signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        return value

    first = as_stored(dataset.PixelPaddingValue)
    last = as_stored(dataset.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in dataset else first
    low, high = min(first, last), max(first, last)
    return (stored >= low) & (stored <= high)
