"""What a segmented nodule is: its type from the attenuation inside its mask, the size of its solid
part, and where it lies (side and zone of the lung). Rules, not a network: the radiological
definitions are thresholds on HU, and they stay explainable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.measurements import BoxMask, axial_diameters
from models.volume import Volume

SOLID_HU = -300.0  # solid component: denser than ground glass
CALCIFIED_HU = 200.0
CALCIFIED_FRACTION = 0.1
SOLID_FRACTION = 0.5
GROUND_GLASS_FRACTION = 0.05
SMALL_NODULE_MM = 6.0


@dataclass(frozen=True)
class Character:
    nodule_type: str
    solid_part_mm: float


def characterise(mask: BoxMask, volume: Volume, mean_diameter_mm: float) -> Character:
    """Type by the share of voxels denser than ground glass (-300 HU) and than calcium (200 HU). A nodule
    under 6 mm is too averaged by partial volume for shares: it is solid when its densest voxel is."""
    hu = volume.hu[mask.slices()][mask.array]
    if hu.size == 0:
        raise ValueError("an empty mask has no attenuation")
    if float((hu > CALCIFIED_HU).mean()) >= CALCIFIED_FRACTION:
        return Character("calcified", mean_diameter_mm)
    solid_share = float((hu > SOLID_HU).mean())
    if solid_share >= SOLID_FRACTION or (mean_diameter_mm < SMALL_NODULE_MM and float(hu.max()) > -100.0):
        return Character("solid", mean_diameter_mm)
    if solid_share < GROUND_GLASS_FRACTION:
        return Character("ground-glass", 0.0)
    return Character("part-solid", _solid_part_mm(mask, volume))


def _solid_part_mm(mask: BoxMask, volume: Volume) -> float:
    solid = mask.array & (volume.hu[mask.slices()] > SOLID_HU)
    labels, count = ndimage.label(solid)
    if count == 0:
        return 0.0
    largest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return axial_diameters(BoxMask(offset=mask.offset, array=largest), volume.spacing).mean_diameter_mm


def location(centre_mm: npt.ArrayLike, lungs: npt.NDArray[np.uint8], volume: Volume) -> tuple[str, str]:
    """(side, zone): the lung the nodule is in (or nearest to), and the upper, middle or lower third of
    that lung's height."""
    kji = np.clip(np.rint(volume.patient_to_index(centre_mm)).astype(int), 0, np.asarray(volume.shape) - 1)
    label = int(lungs[tuple(kji)])
    if label == 0:
        near = lungs[tuple(slice(max(0, c - 8), c + 9) for c in kji)]
        counts = np.bincount(near.ravel(), minlength=3)[1:]
        label = int(np.argmax(counts)) + 1 if counts.any() else 0
    if label == 0:
        side = "left" if float(np.asarray(centre_mm)[0]) > 0 else "right"
        return side, "unknown"
    side = "right" if label == 1 else "left"
    slices = np.flatnonzero((lungs == label).any(axis=(1, 2)))
    heights = volume.index_to_patient(np.array([[slices[0], 0, 0], [slices[-1], 0, 0]], dtype=float))[:, 2]
    z = float(np.asarray(centre_mm)[2])
    low, high = float(heights.min()), float(heights.max())
    third = (z - low) / max(high - low, 1e-6)
    zone = "lower" if third < 1 / 3 else "middle" if third < 2 / 3 else "upper"
    return side, zone
