"""Nodule measurements from a mask, as radiologists take them (Lung-RADS, Fleischner):
long axis and perpendicular short axis on the axial slice of largest area, volume, centroid.

The same functions measure ground truth and the pipeline's segmentations, so the two compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.spatial import ConvexHull, QhullError

Point = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class BoxMask:
    """A boolean mask kept as its bounding box: `array` placed at `offset` (k, j, i) of a volume grid."""

    offset: tuple[int, int, int]
    array: npt.NDArray[np.bool_]

    @classmethod
    def from_full(cls, mask: npt.NDArray[np.bool_], offset: Sequence[int] = (0, 0, 0)) -> BoxMask:
        """`mask` cut to its bounding box. `mask` covers the grid from `offset` on (by default, the
        whole grid); an empty mask gives an empty box at `offset`."""
        origin = np.asarray(offset, dtype=np.int64)
        nonzero = np.argwhere(mask)
        if nonzero.size == 0:
            return cls(offset=_kji(origin), array=np.zeros((0, 0, 0), dtype=bool))
        low, high = nonzero.min(axis=0), nonzero.max(axis=0) + 1
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        return cls(offset=_kji(origin + low), array=np.asarray(mask[box], dtype=bool).copy())

    @property
    def voxel_count(self) -> int:
        return int(self.array.sum())

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(  # type: ignore[return-value]
            slice(o, o + n) for o, n in zip(self.offset, self.array.shape, strict=True)
        )

    def paste_into(self, target: npt.NDArray[np.generic], value: object = True) -> None:
        target[self.slices()][self.array] = value

    def full(self, shape: Sequence[int]) -> npt.NDArray[np.bool_]:
        """The mask on a whole grid of `shape`."""
        mask = np.zeros(shape, dtype=bool)
        self.paste_into(mask)
        return mask

    def axial_slice(self, k: int, in_plane: tuple[int, int]) -> npt.NDArray[np.bool_]:
        """The mask on slice k of a grid whose slices are `in_plane` (rows, columns)."""
        plane = np.zeros(in_plane, dtype=bool)
        local = k - self.offset[0]
        if 0 <= local < self.array.shape[0]:
            rows, columns = self.slices()[1:]
            plane[rows, columns] = self.array[local]
        return plane

    def centroid_kji(self) -> npt.NDArray[np.float64]:
        """Mean (k, j, i) grid index of the mask's voxels."""
        return np.argwhere(self.array).mean(axis=0) + np.asarray(self.offset)


def _kji(values: npt.NDArray[np.int64]) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


@dataclass(frozen=True)
class AxialDiameters:
    """Long and short axis on one axial slice; end points are (k, j, i) array coordinates."""

    slice_index: int
    long_axis_mm: float
    short_axis_mm: float
    long_axis_ends: tuple[Point, Point]
    short_axis_ends: tuple[Point, Point]

    @property
    def mean_diameter_mm(self) -> float:
        return (self.long_axis_mm + self.short_axis_mm) / 2


def volume_mm3(mask: BoxMask, spacing: tuple[float, float, float]) -> float:
    return mask.voxel_count * float(np.prod(spacing))


def axial_diameters(mask: BoxMask, spacing: tuple[float, float, float]) -> AxialDiameters:
    """Long axis: the largest distance across the outline on the slice of largest area. Short axis: the
    width of the outline perpendicular to it. Pixels count with their full extent (corners), so a
    single pixel's long axis is its diagonal. Of several slices of equal largest area, the first."""
    if mask.voxel_count == 0:
        raise ValueError("an empty mask has no diameters")
    areas = mask.array.sum(axis=(1, 2))
    local_k = int(np.argmax(areas))
    row_mm, column_mm = spacing[1], spacing[2]
    pixels = np.argwhere(mask.array[local_k]).astype(np.float64)
    corners = (pixels[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(
        -1, 2
    )
    points = np.unique(corners, axis=0) * np.array([row_mm, column_mm])
    hull = _hull_points(points)
    distances = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    a, b = np.unravel_index(int(np.argmax(distances)), distances.shape)
    long_axis = float(distances[a, b])
    along = (hull[b] - hull[a]) / long_axis
    across = np.array([-along[1], along[0]])
    projection = hull @ across
    low, high = int(np.argmin(projection)), int(np.argmax(projection))
    # The caliper width across can exceed the diagonal by rounding, for a square.
    short_axis = min(float(projection[high] - projection[low]), long_axis)
    # The short axis is drawn through the middle of the long axis, across the full width.
    middle = (hull[a] + hull[b]) / 2
    middle_offset = middle @ across
    short_ends = (
        middle + (projection[low] - middle_offset) * across,
        middle + (projection[high] - middle_offset) * across,
    )
    k = local_k + mask.offset[0]

    def to_kji(point_mm: npt.NDArray[np.float64]) -> Point:
        return (
            float(k),
            float(point_mm[0] / row_mm + mask.offset[1]),
            float(point_mm[1] / column_mm + mask.offset[2]),
        )

    return AxialDiameters(
        slice_index=k,
        long_axis_mm=long_axis,
        short_axis_mm=short_axis,
        long_axis_ends=(to_kji(hull[a]), to_kji(hull[b])),
        short_axis_ends=(to_kji(short_ends[0]), to_kji(short_ends[1])),
    )


def _hull_points(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # collinear points: a one-pixel-wide line
        return points
