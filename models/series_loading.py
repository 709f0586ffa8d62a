"""Series to volume: a DICOM CT series (a folder or a list of files) becomes one Volume in HU.

Nothing is guessed: a set of files that cannot become one correct volume raises SeriesError
with the reason. Slices are ordered by their position along the slice normal.
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
AIR_HU = -1024.0
ORIENTATION_TOLERANCE = 1e-3
DUPLICATE_TOLERANCE_MM = 0.01
DEFAULT_SPACING_TOLERANCE_MM = 0.1
TILT_TOLERANCE_MM = 0.05


class SeriesError(ValueError):
    """A set of DICOM files that cannot become one correct CT volume; the message says why."""


@dataclass(frozen=True, eq=False)
class CtSeries:
    volume: Volume
    headers: tuple[Dataset, ...]
    paths: tuple[Path, ...]

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(str(h.SOPInstanceUID) for h in self.headers)

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


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
    if len(headers) < 2:
        raise SeriesError(f"a volume needs at least 2 slices, the series has {len(headers)}")
    row_cosine, column_cosine = _common_orientation(headers, paths)
    rows, columns, pixel_spacing = _common_frame(headers, paths)
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([_position(h, p) for h, p in zip(headers, paths, strict=True)])
    order = np.argsort(positions @ normal, kind="stable")
    headers = tuple(headers[i] for i in order)
    paths = tuple(paths[i] for i in order)
    positions = positions[order]
    slice_spacing = _uniform_slice_spacing(positions, normal, paths, spacing_tolerance_mm)
    _check_no_tilt(headers, positions, normal)
    hu = _read_voxels(paths, rows, columns)
    volume = Volume(
        hu=hu,
        spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=np.column_stack([normal, column_cosine, row_cosine]),
    )
    return CtSeries(volume=volume, headers=headers, paths=paths)


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
        if sop_class == ENHANCED_CT_IMAGE_STORAGE:
            raise SeriesError(f"{path.name}: Enhanced CT (multi-frame) images are not supported yet")
        if sop_class != CT_IMAGE_STORAGE:
            raise SeriesError(f"{path.name}: SOP class {sop_class.name or sop_class} is not CT Image Storage")
        if int(header.get("SamplesPerPixel", 1)) != 1 or header.get("PhotometricInterpretation") not in (
            "MONOCHROME2",
            None,
        ):
            raise SeriesError(
                f"{path.name}: photometric interpretation {header.get('PhotometricInterpretation')} "
                "is not a MONOCHROME2 CT image"
            )


def _drop_repeated_instances(headers: list[Dataset], paths: list[Path]) -> tuple[list[Dataset], list[Path]]:
    """The same SOP instance received twice is one slice, not a duplicate position."""
    seen: dict[str, int] = {}
    for index, header in enumerate(headers):
        seen.setdefault(str(header.SOPInstanceUID), index)
    keep = sorted(seen.values())
    return [headers[i] for i in keep], [paths[i] for i in keep]


def _required(header: Dataset, path: Path, keyword: str) -> list[float]:
    value = header.get(keyword)
    if value is None or value == "" or (isinstance(value, Sequence) and len(value) == 0):
        raise SeriesError(f"{path.name}: missing geometry: no {keyword}")
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return [float(v) for v in values]


def _common_orientation(
    headers: list[Dataset], paths: list[Path]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    orientations = np.array(
        [_required(h, p, "ImageOrientationPatient") for h, p in zip(headers, paths, strict=True)]
    )
    if orientations.shape[1] != 6:
        raise SeriesError(
            f"missing geometry: Image Orientation (Patient) has {orientations.shape[1]} values, not 6"
        )
    differs = np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE
    if differs.any():
        other = int(np.argmax(differs))
        raise SeriesError(
            f"mixed orientations: {paths[0].name} has {orientations[0].round(4).tolist()}, "
            f"{paths[other].name} has {orientations[other].round(4).tolist()}"
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


def _common_frame(headers: list[Dataset], paths: list[Path]) -> tuple[int, int, tuple[float, float]]:
    frames = []
    for header, path in zip(headers, paths, strict=True):
        spacing = _required(header, path, "PixelSpacing")
        if len(spacing) != 2 or min(spacing) <= 0:
            raise SeriesError(f"{path.name}: Pixel Spacing {spacing} is not two positive values")
        frames.append((int(header.Rows), int(header.Columns), spacing[0], spacing[1]))
    distinct = sorted({(r, c, round(sr, 4), round(sc, 4)) for r, c, sr, sc in frames})
    if len(distinct) > 1:
        described = "; ".join(f"{r} x {c} at {sr} x {sc} mm" for r, c, sr, sc in distinct)
        raise SeriesError(f"mixed image sizes or pixel spacings in one series: {described}")
    rows, columns, row_spacing, column_spacing = frames[0]
    return rows, columns, (row_spacing, column_spacing)


def _position(header: Dataset, path: Path) -> list[float]:
    position = _required(header, path, "ImagePositionPatient")
    if len(position) != 3:
        raise SeriesError(
            f"{path.name}: missing geometry: Image Position (Patient) has {len(position)} values"
        )
    return position


def _uniform_slice_spacing(
    positions: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    paths: tuple[Path, ...],
    tolerance: float,
) -> float:
    along = positions @ normal
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        k = int(duplicate[0])
        raise SeriesError(
            f"duplicate slice positions: {paths[k].name} and {paths[k + 1].name} both lie at "
            f"{along[k]:.2f} mm along the slice normal ({duplicate.size} such pairs)"
        )
    spacing = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - spacing)))
    if abs(steps[worst] - spacing) > tolerance:
        raise SeriesError(
            f"non-uniform slice spacing: the step between {paths[worst].name} and {paths[worst + 1].name} "
            f"is {steps[worst]:.3f} mm where the series' spacing is {spacing:.3f} mm "
            f"(tolerance {tolerance} mm); slices missing or a mixed series"
        )
    return spacing


def _check_no_tilt(
    headers: tuple[Dataset, ...], positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64]
) -> None:
    tilt = float(headers[0].get("GantryDetectorTilt", 0) or 0)
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


def _read_voxels(paths: tuple[Path, ...], rows: int, columns: int) -> npt.NDArray[np.float32]:
    hu = np.empty((len(paths), rows, columns), dtype=np.float32)

    def read(k: int) -> None:
        hu[k] = _slice_hu(pydicom.dcmread(paths[k]), paths[k])

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(read, range(len(paths))))
    return hu


def _slice_hu(dataset: Dataset, path: Path) -> npt.NDArray[np.float32]:
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises several types for undecodable pixel data
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise SeriesError(f"{path.name}: cannot decode pixel data ({syntax}): {error}") from error
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = _padding_mask(dataset, stored)
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
