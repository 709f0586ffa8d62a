"""Lung segmentation by attenuation: the two lungs of a chest CT as a filled mask.

Air-like voxels (below -400 HU) that do not reach the edge of the slice are lung or airway;
vessels inside the lungs are holes in that set and are filled slice by slice.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.preprocessing import lung_box
from models.volume import Volume

AIR_THRESHOLD_HU = -400.0
MIN_LUNG_VOLUME_ML = 50.0
# A dense nodule on the pleura is a dent in the air mask: closing the mask with a ball of this radius
# takes in nodules up to 30 mm across (Lung-RADS' largest size class).
SEARCH_CLOSING_MM = 15.0
# Beyond the closed mask, as far as the stride-2 heatmap's cells reach.
SEARCH_MARGIN_MM = 4.0


class LungSegmentationError(ValueError):
    """No lungs were found: not a chest CT, or a field of view that cuts the lungs off."""


def segment_lungs(volume: Volume) -> npt.NDArray[np.uint8]:
    """Label map on the volume's grid: 0 outside, 1 right lung, 2 left lung (the patient's sides).
    Computed on every second row and column, which is ample for a lung outline, and four times faster."""
    coarse = volume.hu[:, ::2, ::2]
    lungs = _air_inside_body(coarse < AIR_THRESHOLD_HU)
    labels, count = ndimage.label(lungs)
    if count == 0:
        raise LungSegmentationError("no air-filled region inside the body: not a chest CT?")
    sizes = np.bincount(labels.ravel())[1:]
    coarse_voxel_mm3 = volume.voxel_volume_mm3 * 4
    large = np.flatnonzero(sizes * coarse_voxel_mm3 >= MIN_LUNG_VOLUME_ML * 1000) + 1
    if large.size == 0:
        raise LungSegmentationError(
            f"the largest air-filled region in the body is {sizes.max() * coarse_voxel_mm3 / 1000:.0f} ml,"
            f" less than a lung ({MIN_LUNG_VOLUME_ML:.0f} ml)"
        )
    keep = np.zeros(count + 1, dtype=bool)
    keep[large] = True
    lungs = keep[labels]
    # The rest works on the lungs' box: everything outside it is background.
    box = lung_box(lungs, (1.0, 1.0, 1.0), margin_mm=0.0)
    sides = np.zeros(lungs.shape, dtype=np.uint8)
    sides[box] = _split_sides(lungs[box], volume, np.array([s.start for s in box]))
    within = sides[box]
    for side in (1, 2):
        filled = ndimage.binary_fill_holes(within == side, structure=_in_plane(np.ones((3, 3), bool)))
        within[filled & (within == 0)] = side
    full = np.repeat(np.repeat(sides, 2, axis=1), 2, axis=2)
    return np.ascontiguousarray(full[:, : volume.shape[1], : volume.shape[2]])


def search_region(lungs: npt.NDArray[np.generic], spacing_mm: float) -> npt.NDArray[np.bool_]:
    """Where a nodule may be, on an isotropic grid of `spacing_mm`: the lungs closed by a ball of
    `SEARCH_CLOSING_MM` (juxtapleural nodules, which the air mask leaves out) and widened by
    `SEARCH_MARGIN_MM`. Computed with distance transforms, whose cost does not grow with the radius."""
    inside = np.asarray(lungs) > 0
    if not inside.any():
        return inside
    sampling = (spacing_mm,) * 3
    # Padded, so that the array's edge erodes the dilated mask as open space would.
    pad = int(np.ceil(SEARCH_CLOSING_MM / spacing_mm)) + 1
    padded = np.pad(inside, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=sampling) <= SEARCH_CLOSING_MM
    closed = ndimage.distance_transform_edt(dilated, sampling=sampling) > SEARCH_CLOSING_MM
    closed = closed[tuple(slice(pad, pad + n) for n in inside.shape)] | inside
    return ndimage.distance_transform_edt(~closed, sampling=sampling) <= SEARCH_MARGIN_MM


def _air_inside_body(air: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Air connected to the in-plane border of its slice is outside the patient."""
    labels, count = ndimage.label(air, structure=_in_plane(ndimage.generate_binary_structure(2, 1)))
    border = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    inside = air & ~outside[labels]
    opened = np.zeros_like(inside)
    if inside.any():
        box = lung_box(inside, (1.0, 1.0, 1.0), margin_mm=0.0)
        opened[box] = ndimage.binary_opening(
            inside[box], structure=_in_plane(ndimage.generate_binary_structure(2, 1))
        )
    return opened


def _split_sides(
    lungs: npt.NDArray[np.bool_], volume: Volume, offset: npt.NDArray[np.int_]
) -> npt.NDArray[np.uint8]:
    """The lungs often touch through the airways or the anterior junction: erode until two lungs separate,
    then give every lung voxel the side of the nearest separated core. `lungs` is a box of the coarse
    mask (every second row and column) that starts at `offset`."""
    core = lungs
    total = lungs.sum()
    midline = _midline_x(volume)
    for _ in range(8):
        labels, count = ndimage.label(core)
        sizes = np.bincount(labels.ravel())[1:]
        big = np.argsort(sizes)[::-1][:2]
        if count >= 2 and sizes[big[1]] >= 0.1 * total:
            seeds = np.zeros(lungs.shape, dtype=np.uint8)
            for label in big + 1:
                centroid = (np.argwhere(labels == label).mean(axis=0) + offset) * np.array([1, 2, 2])
                seeds[labels == label] = 2 if volume.index_to_patient(centroid)[0] > midline else 1
            nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
            sides = seeds[tuple(nearest)]
            sides[~lungs] = 0
            return sides
        core = ndimage.binary_erosion(core, structure=_in_plane(ndimage.generate_binary_structure(2, 1)))
    # No separation found: split at the body's midline.
    coarse_i = (np.arange(lungs.shape[2]) + offset[2]) * 2
    x = volume.index_to_patient(
        np.stack([np.zeros_like(coarse_i), np.zeros_like(coarse_i), coarse_i], axis=1)
    )[:, 0]
    sides = np.where(x > midline, 2, 1).astype(np.uint8)[None, None, :] * lungs
    return sides.astype(np.uint8)


def _midline_x(volume: Volume) -> float:
    middle = volume.shape[0] // 2
    columns = np.argwhere(volume.hu[middle, ::4, ::4] > AIR_THRESHOLD_HU)[:, 1] * 4
    centre_i = float(columns.mean()) if columns.size else volume.shape[2] / 2
    return float(volume.index_to_patient((middle, volume.shape[1] / 2, centre_i))[0])


def _in_plane(structure2d: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """A 2D structuring element as 3D, so that operations act on each axial slice alone."""
    structure = np.zeros((3, *structure2d.shape), dtype=bool)
    structure[1] = structure2d
    return structure
