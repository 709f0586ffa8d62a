"""Preprocessing as the field does it: resampling to a fixed spacing (SimpleITK), HU windowing and
normalisation, and the box of the lungs that restricts the search."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from models.volume import Volume

DETECTION_SPACING_MM = 1.0
HU_WINDOW = (-1000.0, 400.0)
AIR_HU = -1024.0


def to_sitk(volume: Volume, voxels: npt.NDArray[np.generic] | None = None) -> sitk.Image:
    """The volume as a SimpleITK image with its geometry; `voxels` (same shape) replace its HU."""
    return _placed(
        sitk.GetImageFromArray(np.ascontiguousarray(volume.hu if voxels is None else voxels)), volume
    )


def _placed(image: sitk.Image, volume: Volume) -> sitk.Image:
    image.SetSpacing(tuple(float(s) for s in reversed(volume.spacing)))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction[:, ::-1].ravel()))
    return image


def resample_grid(volume: Volume, spacing_mm: float) -> Volume:
    """An empty volume on an isotropic grid of `spacing_mm` covering the same physical extent, with
    the same origin and direction."""
    extent = (np.asarray(volume.shape) - 1) * np.asarray(volume.spacing)
    shape = tuple(int(n) for n in np.floor(extent / spacing_mm).astype(int) + 1)
    return Volume(
        hu=np.empty(shape, np.float32),
        spacing=(spacing_mm, spacing_mm, spacing_mm),
        origin=volume.origin,
        direction=volume.direction,
    )


def resample(
    volume: Volume, spacing_mm: float = DETECTION_SPACING_MM, *, linear: bool = True, default: float = AIR_HU
) -> Volume:
    """The volume on an isotropic grid of `spacing_mm` (linear interpolation, or nearest neighbour for
    label maps)."""
    target = resample_grid(volume, spacing_mm)
    return resample_onto(volume, target, linear=linear, default=default)


def resample_onto(volume: Volume, target: Volume, *, linear: bool = True, default: float = AIR_HU) -> Volume:
    """`volume`'s voxels interpolated at the voxel centres of `target`'s grid."""
    source = covering(volume, target)
    if source is None:
        return target.with_hu(np.full(target.shape, default, np.float32))
    # Only the grid counts: a one-byte image, not a float copy of the target's voxels.
    reference = _placed(sitk.Image([int(n) for n in reversed(target.shape)], sitk.sitkUInt8), target)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    result = sitk.Resample(
        to_sitk(source), reference, sitk.Transform(), interpolator, float(default), sitk.sitkFloat32
    )
    return target.with_hu(sitk.GetArrayFromImage(result))


def covering(volume: Volume, target: Volume, margin: int = 1) -> Volume | None:
    """The part of `volume` that `target`'s grid lies in, with every voxel that interpolation reads there
    and `margin` more on each side (against rounding), as a view; None where the grid lies wholly
    outside it.

    Why: a nodule's 36 mm patch needs a few thousand of the series' voxels, and handing SimpleITK the
    whole series for it copied some 300 MB each time."""
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64) * (np.asarray(target.shape) - 1)
    kji = volume.patient_to_index(target.index_to_patient(corners))
    shape = np.asarray(volume.shape)
    low = np.maximum(np.floor(kji.min(axis=0)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + margin + 1, shape)
    if np.any(high <= low):
        return None
    if np.all(low == 0) and np.all(high == shape):
        return volume
    origin = volume.index_to_patient(low)
    return Volume(
        hu=volume.hu[tuple(slice(a, b) for a, b in zip(low, high, strict=True))],
        spacing=volume.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=volume.direction,
    )


def normalise(hu: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """HU windowed to the lung and soft-tissue range and scaled to 0..1."""
    low, high = HU_WINDOW
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def lung_box(
    lungs: npt.NDArray[np.generic], spacing: tuple[float, float, float], margin_mm: float = 10.0
) -> tuple[slice, slice, slice]:
    """The bounding box of the lung mask, widened by `margin_mm` and clipped to the volume."""
    nonzero = [np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(n) == 0 for n in nonzero):
        raise ValueError("the lung mask is empty")
    margin = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    return tuple(  # type: ignore[return-value]
        slice(max(0, int(n[0]) - m), min(size, int(n[-1]) + 1 + m))
        for n, m, size in zip(nonzero, margin, lungs.shape, strict=True)
    )
