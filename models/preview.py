"""PNG montages of nodules on their CT slices, for a person to check inserted or found nodules.

Tiles show slices of constant k (axial for an axial volume) in array orientation: rows down,
columns across, which for the usual axial direction is the radiological view (patient left
on the image right). Pixel aspect follows the row and column spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from models.volume import Volume

LUNG_WINDOW = (-600.0, 1500.0)  # level, width
CROP_MM = 80.0
MAX_COLUMNS = 4
TILE_INCHES = 3.2


@dataclass(frozen=True, eq=False)
class PreviewItem:
    label: str
    centre_kji: tuple[float, float, float]
    outline: npt.NDArray[np.bool_] | None = (
        None  # the mask on the item's axial slice (rows, columns), or None
    )
    colour: str = "red"


@dataclass(frozen=True)
class _Crop:
    k: int
    j0: int
    j1: int
    i0: int
    i1: int


def nodule_montage(volume: Volume, items: list[PreviewItem], out_png: Path, *, title: str) -> Path:
    """One context tile (the whole slice through the first item, boxed) and one cropped tile per item."""
    if not items:
        raise ValueError("a montage needs at least one item")
    for item in items:
        _check_item(volume, item)

    crops = [_crop_around(volume, item.centre_kji) for item in items]
    n_tiles = len(items) + 1
    n_columns = min(MAX_COLUMNS, n_tiles)
    n_rows = math.ceil(n_tiles / n_columns)
    fig = Figure(figsize=(TILE_INCHES * n_columns, TILE_INCHES * n_rows + 0.4), dpi=100)
    axes = fig.subplots(n_rows, n_columns, squeeze=False).ravel()

    _draw_context(axes[0], volume, items[0], crops[0])
    for ax, item, crop in zip(axes[1:], items, crops, strict=False):
        _draw_item(ax, volume, item, crop)
    for ax in axes:
        ax.set_axis_off()

    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, facecolor="white")
    return out_png


def _check_item(volume: Volume, item: PreviewItem) -> None:
    if item.outline is not None and item.outline.shape != volume.shape[1:]:
        raise ValueError(f"outline of {item.label!r} is {item.outline.shape}, a slice {volume.shape[1:]}")
    k, j, i = np.rint(item.centre_kji).astype(int)
    if not all(0 <= a < n for a, n in zip((k, j, i), volume.shape, strict=True)):
        raise ValueError(f"centre of {item.label!r} {item.centre_kji} lies outside the volume {volume.shape}")


def _crop_around(volume: Volume, centre_kji: tuple[float, float, float]) -> _Crop:
    k, j, i = (int(a) for a in np.rint(centre_kji))
    _, rows, columns = volume.shape
    half_j = round(CROP_MM / 2 / volume.spacing[1])
    half_i = round(CROP_MM / 2 / volume.spacing[2])
    return _Crop(
        k, max(0, j - half_j), min(rows, j + half_j + 1), max(0, i - half_i), min(columns, i + half_i + 1)
    )


def _show(ax: Axes, volume: Volume, image: npt.NDArray[np.float32]) -> None:
    level, width = LUNG_WINDOW
    ax.imshow(
        image,
        cmap="gray",
        vmin=level - width / 2,
        vmax=level + width / 2,
        aspect=volume.spacing[1] / volume.spacing[2],
        interpolation="nearest",
    )


def _draw_context(ax: Axes, volume: Volume, item: PreviewItem, crop: _Crop) -> None:
    _show(ax, volume, volume.hu[crop.k])
    box = Rectangle(
        (crop.i0 - 0.5, crop.j0 - 0.5),
        crop.i1 - crop.i0,
        crop.j1 - crop.j0,
        fill=False,
        edgecolor=item.colour,
        linewidth=1.2,
    )
    ax.add_patch(box)
    ax.set_title(f"context: slice k={crop.k}, {item.label}", fontsize=8)


def _draw_item(ax: Axes, volume: Volume, item: PreviewItem, crop: _Crop) -> None:
    _show(ax, volume, volume.hu[crop.k, crop.j0 : crop.j1, crop.i0 : crop.i1])
    mask_slice = None if item.outline is None else item.outline[crop.j0 : crop.j1, crop.i0 : crop.i1]
    if mask_slice is not None and mask_slice.any():
        ax.contour(mask_slice.astype(np.float32), levels=[0.5], colors=[item.colour], linewidths=1.0)
    else:
        _, j, i = item.centre_kji
        ax.plot(i - crop.i0, j - crop.j0, marker="+", markersize=14, color=item.colour)
    ax.set_title(item.label, fontsize=8)
