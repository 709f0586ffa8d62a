"""On-the-fly 3D augmentation of a training patch and its target, in numpy and scipy.ndimage.

``augment(image, target, rng, config)`` applies, in this order:

1. random flips of each axis;
2. a random multiple of 90 degrees in the axial (H, W) plane (only 0 or 180 where H != W, so that
   the shape is kept);
3. one affine resampling combining small rotations about the three axes and an isotropic scaling,
   about the patch centre, with linear interpolation and edge replication outside the patch;
4. on the image only: intensity scale and shift, then additive Gaussian noise.

Flips and 90-degree rotations are exact array operations (a mask keeps its voxel count). The target
follows every geometric step: a mask (bool or integer array, or ``target_kind="mask"``) is resampled
linearly and thresholded at 0.5, which keeps it aligned with the linearly resampled image; a heatmap
(float array) is resampled linearly. A target may be coarser than the image by an integer factor
per axis (the detector's stride-2 heatmap); it is taken to cover the same extent as the image, voxel
``i`` centred at image coordinate ``f*i + (f-1)/2``, as ``models.networks.render_heatmap`` writes it.

All random numbers are drawn up front, in a fixed order, from the caller's ``numpy.random.Generator``,
so a seed fixes the result whatever the config switches off. Intensities are those of the project's
normalised CT (0..1 for HU -1000..400): a shift of 0.05 is 70 HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5  # per axis
    rot90: bool = True  # random multiple of 90 degrees in the axial plane
    affine_prob: float = 1.0  # probability of the rotation + scaling step (the costly one)
    max_rotation_deg: float = 15.0  # uniform in +-this, about each of the three axes
    scale_range: tuple[float, float] = (0.85, 1.15)  # > 1 enlarges the content
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: tuple[float, float] = (-0.05, 0.05)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.03)
    target_kind: Literal["auto", "mask", "heatmap"] = "auto"  # auto: bool/integer = mask, float = heatmap


@dataclass(frozen=True)
class _Draw:
    flips: tuple[bool, bool, bool]
    quarter_turns: int
    affine: bool
    angles_rad: npt.NDArray[np.float64]
    scale: float
    gain: float
    offset: float
    noise: bool
    noise_std: float
    noise_seed: int


def _draw(rng: np.random.Generator, config: AugmentConfig, square: bool) -> _Draw:
    flips = rng.random(3) < config.flip_prob
    turns = int(rng.integers(4))
    if not config.rot90:
        turns = 0
    elif not square:
        turns = 2 * (turns % 2)  # 0 or 180 degrees: a quarter turn would swap H and W
    affine = rng.random() < config.affine_prob
    angles = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg, 3))
    scale = rng.uniform(*config.scale_range)
    return _Draw(
        flips=(bool(flips[0]), bool(flips[1]), bool(flips[2])),
        quarter_turns=turns,
        affine=bool(affine),
        angles_rad=angles,
        scale=float(scale),
        gain=float(rng.uniform(*config.intensity_scale)),
        offset=float(rng.uniform(*config.intensity_shift)),
        noise=bool(rng.random() < config.noise_prob),
        noise_std=float(rng.uniform(*config.noise_std)),
        noise_seed=int(rng.integers(2**63)),
    )


def _rotation(axis: int, angle: float) -> npt.NDArray[np.float64]:
    """Rotation by ``angle`` in the plane of the two array axes other than ``axis``."""
    a, b = (i for i in range(3) if i != axis)
    r = np.eye(3)
    c, s = np.cos(angle), np.sin(angle)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _affine_matrix(draw: _Draw) -> npt.NDArray[np.float64]:
    """Output-to-input map in image voxel units about the centre (what ndimage.affine_transform takes)."""
    r = _rotation(0, draw.angles_rad[0]) @ _rotation(1, draw.angles_rad[1]) @ _rotation(2, draw.angles_rad[2])
    return r / draw.scale


def _resample(
    array: FloatArray, matrix: npt.NDArray[np.float64], factor: npt.NDArray[np.int64]
) -> FloatArray:
    """``array`` (a grid ``factor`` times coarser than the image) under the image-space ``matrix``."""
    m = matrix * factor[None, :] / factor[:, None]  # F^-1 M F: the same physical map on this grid
    centre = (np.asarray(array.shape) - 1) / 2
    return ndimage.affine_transform(
        array, m, offset=centre - m @ centre, order=1, mode="nearest", prefilter=False
    )


def _geometric(array: np.ndarray, draw: _Draw) -> np.ndarray:
    flipped = np.flip(array, axis=[i for i in range(3) if draw.flips[i]]) if any(draw.flips) else array
    return np.rot90(flipped, k=draw.quarter_turns, axes=(1, 2))


def _target_factor(image_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    if len(target_shape) != 3 or any(t < 1 or i % t for i, t in zip(image_shape, target_shape, strict=True)):
        raise ValueError(f"target {target_shape} must divide image {image_shape} on each axis")
    return np.array([i // t for i, t in zip(image_shape, target_shape, strict=True)])


def _is_mask(target: np.ndarray, kind: str) -> bool:
    if kind == "auto":
        return target.dtype == bool or np.issubdtype(target.dtype, np.integer)
    return kind == "mask"


def augment(
    image: FloatArray,
    target: np.ndarray | None,
    rng: np.random.Generator,
    config: AugmentConfig | None = None,
) -> tuple[npt.NDArray[np.float32], np.ndarray | None]:
    """Randomly augmented (image, target): image float32 (D, H, W), target of its own shape and dtype.

    ``target`` may be None (classifier patches), a binary mask or a heatmap; see the module docstring.
    The inputs are not modified; the outputs are new C-contiguous arrays.
    """
    config = config or AugmentConfig()
    if image.ndim != 3:
        raise ValueError(f"augment works on 3D arrays, got shape {image.shape}")
    factor = None if target is None else _target_factor(image.shape, target.shape)
    square = image.shape[1] == image.shape[2] and (target is None or target.shape[1] == target.shape[2])
    draw = _draw(rng, config, square)

    out = _geometric(np.asarray(image, dtype=np.float32), draw)
    if draw.affine:
        out = _resample(out, _affine_matrix(draw), np.ones(3, dtype=np.int64))
    out = np.ascontiguousarray(out * np.float32(draw.gain) + np.float32(draw.offset), dtype=np.float32)
    if draw.noise and draw.noise_std > 0:
        noise_rng = np.random.default_rng(draw.noise_seed)
        out += noise_rng.standard_normal(out.shape, dtype=np.float32) * np.float32(draw.noise_std)

    if target is None or factor is None:
        return out, None
    mask = _is_mask(target, config.target_kind)
    new_target = _geometric(target, draw)
    if draw.affine:
        resampled = _resample(new_target.astype(np.float32), _affine_matrix(draw), factor)
        new_target = resampled >= 0.5 if mask else resampled
    return out, np.ascontiguousarray(new_target, dtype=target.dtype)
