"""Synthetic lung nodules: what a nodule is (type, shape, size, attenuation) and how it looks on a
voxel grid (fractional occupancy with partial volume and the scanner's blur).

A nodule is a body (the whole lesion) and, for part-solid and calcified nodules, a core (the solid
part, or the calcification). Its shape is a radius per direction: an ellipsoid, with lobes bulging
out for lobulated nodules, and with tapering spicules for spiculated ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial.transform import Rotation

from models.synthetic.portable import dot, matmul, norm
from models.volume import Volume

NODULE_TYPES = ("solid", "part-solid", "ground-glass", "calcified")
SHAPES = ("round", "lobulated", "spiculated")
LOCATIONS = ("isolated", "juxtapleural", "juxtavascular", "perifissural")
MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0
SUBSAMPLE_MM = 0.35
# Internal heterogeneity of a nodule: coarser than the scanner noise, which runs through it unchanged.
TEXTURE_GRAIN_MM = 2.5


@dataclass(frozen=True)
class Lobe:
    direction: tuple[float, float, float]
    amplitude: float


@dataclass(frozen=True)
class Spicule:
    direction: tuple[float, float, float]
    length_mm: float
    width_mm: float


@dataclass(frozen=True)
class NoduleSpec:
    nodule_type: str
    shape: str
    location: str
    diameter_mm: float
    axis_ratios: tuple[float, float, float]
    rotation: tuple[float, ...]
    body_hu: float
    texture_hu: float
    core_fraction: float
    core_offset: tuple[float, float, float]
    core_hu: float
    lobes: tuple[Lobe, ...]
    spicules: tuple[Spicule, ...]

    def __post_init__(self) -> None:
        if self.nodule_type not in NODULE_TYPES:
            raise ValueError(f"nodule type {self.nodule_type!r} is not one of {NODULE_TYPES}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.location not in LOCATIONS:
            raise ValueError(f"location {self.location!r} is not one of {LOCATIONS}")
        if not MIN_DIAMETER_MM <= self.diameter_mm <= MAX_DIAMETER_MM:
            raise ValueError(
                f"diameter {self.diameter_mm} mm is outside {MIN_DIAMETER_MM} to {MAX_DIAMETER_MM} mm"
            )

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2

    @property
    def extent_mm(self) -> float:
        """Radius of a sphere that holds the whole nodule, spicules included."""
        bulge = 1 + sum(lobe.amplitude for lobe in self.lobes)
        reach = max((s.length_mm for s in self.spicules), default=0.0)
        return self.radius_mm * max(self.axis_ratios) * bulge + reach

    @property
    def rotation_matrix(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)


def sample_spec(
    rng: np.random.Generator,
    *,
    nodule_type: str | None = None,
    shape: str | None = None,
    location: str | None = None,
    diameter_mm: float | None = None,
) -> NoduleSpec:
    """A random nodule; anything given is kept. Sizes are log-uniform: small nodules are the common ones."""
    location = location or str(rng.choice(LOCATIONS, p=[0.4, 0.25, 0.2, 0.15]))
    nodule_type = nodule_type or str(rng.choice(NODULE_TYPES, p=[0.5, 0.17, 0.18, 0.15]))
    if diameter_mm is None:
        high = {"perifissural": 10.0, "calcified": 12.0}.get(location, 30.0)
        high = min(high, 12.0) if nodule_type == "calcified" else high
        diameter_mm = math.exp(rng.uniform(math.log(MIN_DIAMETER_MM), math.log(high)))
    if shape is None:
        shapes = ("round", "lobulated") if diameter_mm < 6 or nodule_type == "calcified" else SHAPES
        shape = str(rng.choice(shapes))
    ratios = (1.0, float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.7, 1.0)))
    if location == "perifissural":
        ratios = (1.0, float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.35, 0.55)))
    body_hu, texture_hu, core_fraction, core_hu = _attenuation(rng, nodule_type)
    core_offset = tuple(float(v) for v in rng.uniform(-1, 1, 3) * (1 - core_fraction) * 0.4)
    return NoduleSpec(
        nodule_type=nodule_type,
        shape=shape,
        location=location,
        diameter_mm=diameter_mm,
        axis_ratios=ratios,
        rotation=tuple(Rotation.random(random_state=rng).as_matrix().ravel().tolist()),
        body_hu=body_hu,
        texture_hu=texture_hu,
        core_fraction=core_fraction,
        core_offset=core_offset,  # type: ignore[arg-type]
        core_hu=core_hu,
        lobes=_lobes(rng, shape),
        spicules=_spicules(rng, shape, diameter_mm),
    )


def _attenuation(rng: np.random.Generator, nodule_type: str) -> tuple[float, float, float, float]:
    """(body HU, texture amplitude HU, core diameter fraction, core HU) by nodule type."""
    if nodule_type == "solid":
        return float(rng.uniform(0, 60)), 12.0, 0.0, 0.0
    if nodule_type == "ground-glass":
        return float(rng.uniform(-720, -450)), 25.0, 0.0, 0.0
    if nodule_type == "part-solid":
        return float(rng.uniform(-680, -450)), 25.0, float(rng.uniform(0.3, 0.7)), float(rng.uniform(0, 60))
    return float(rng.uniform(20, 60)), 12.0, float(rng.uniform(0.5, 1.0)), float(rng.uniform(300, 1000))


def _random_directions(rng: np.random.Generator, count: int) -> npt.NDArray[np.float64]:
    vectors = rng.normal(size=(count, 3))
    return vectors / norm(vectors)[:, None]


def _lobes(rng: np.random.Generator, shape: str) -> tuple[Lobe, ...]:
    count, amplitude = {"round": (3, (0.0, 0.05)), "lobulated": (int(rng.integers(3, 7)), (0.12, 0.3))}.get(
        shape, (int(rng.integers(2, 5)), (0.05, 0.15))
    )
    return tuple(
        Lobe(direction=tuple(d.tolist()), amplitude=float(rng.uniform(*amplitude)))  # type: ignore[arg-type]
        for d in _random_directions(rng, count)
    )


def _spicules(rng: np.random.Generator, shape: str, diameter_mm: float) -> tuple[Spicule, ...]:
    if shape != "spiculated":
        return ()
    count = int(rng.integers(6, 16))
    return tuple(
        Spicule(
            direction=tuple(d.tolist()),  # type: ignore[arg-type]
            length_mm=float(rng.uniform(0.35, 0.9) * diameter_mm / 2 + rng.uniform(1, 4)),
            width_mm=float(rng.uniform(0.6, 1.4)),
        )
        for d in _random_directions(rng, count)
    )


@dataclass(frozen=True, eq=False)
class RenderedNodule:
    """A nodule on a box of the volume grid: the occupancy (0 to 1) of its body and core as the scanner
    shows them (partial volume, then blur), the true extent of each (voxels at least half inside, before
    the blur: the ground-truth masks), and the attenuation each has where it fills a voxel."""

    offset: tuple[int, int, int]
    body: npt.NDArray[np.float32]
    core: npt.NDArray[np.float32] | None
    body_mask: npt.NDArray[np.bool_]
    core_mask: npt.NDArray[np.bool_] | None
    body_hu: npt.NDArray[np.float32]
    core_hu: float

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(  # type: ignore[return-value]
            slice(o, o + n) for o, n in zip(self.offset, self.body.shape, strict=True)
        )


def render(
    spec: NoduleSpec,
    centre_mm: npt.ArrayLike,
    grid: Volume,
    rng: np.random.Generator,
    *,
    in_plane_blur_mm: float,
) -> RenderedNodule:
    """The nodule centred at `centre_mm` on the voxel grid of `grid`: each voxel is sampled at points
    about SUBSAMPLE_MM apart (partial volume), then blurred in-plane by the scanner's point spread."""
    centre_mm = np.asarray(centre_mm, dtype=np.float64)
    margin = spec.extent_mm + 3 * in_plane_blur_mm + 2 * max(grid.spacing)
    centre_kji = grid.patient_to_index(centre_mm)
    half = np.ceil(margin / np.asarray(grid.spacing))
    low = np.maximum(np.floor(centre_kji - half).astype(int), 0)
    high = np.minimum(np.ceil(centre_kji + half).astype(int) + 1, np.asarray(grid.shape))
    if np.any(high <= low):
        raise ValueError(f"nodule centre {centre_mm.tolist()} mm lies outside the volume")
    steps = np.maximum(np.ceil(np.asarray(grid.spacing) / SUBSAMPLE_MM).astype(int), 1)
    axes = [(np.arange(lo * s, hi * s) + 0.5) / s - 0.5 for lo, hi, s in zip(low, high, steps, strict=True)]
    fine_kji = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    offsets = (grid.index_to_patient(fine_kji) - centre_mm).astype(np.float32)
    del fine_kji
    local = matmul(offsets, spec.rotation_matrix.astype(np.float32))
    del offsets  # the grid is millions of points for a large nodule: keep one copy at a time
    body = _box_average(
        _inside_shape(local, spec.radius_mm, spec.axis_ratios, spec.lobes, spec.spicules), steps
    )
    core = None
    if spec.core_fraction > 0:
        core_local = local - np.asarray(spec.core_offset, dtype=np.float32) * spec.radius_mm
        core_radius = spec.radius_mm * spec.core_fraction
        core = _box_average(
            _inside_shape(core_local, core_radius, spec.axis_ratios, spec.lobes[:3], ()), steps
        )
    sigma = [0.0, in_plane_blur_mm / grid.spacing[1], in_plane_blur_mm / grid.spacing[2]]
    texture = ndimage.gaussian_filter(
        rng.normal(size=body.shape).astype(np.float32), TEXTURE_GRAIN_MM / np.asarray(grid.spacing)
    )
    texture *= spec.texture_hu / max(float(texture.std()), 1e-6)
    return RenderedNodule(
        offset=(int(low[0]), int(low[1]), int(low[2])),
        body=ndimage.gaussian_filter(body, sigma),
        core=None if core is None else ndimage.gaussian_filter(core, sigma),
        body_mask=_extent(body),
        core_mask=None if core is None else _extent(core),
        body_hu=(spec.body_hu + texture).astype(np.float32),
        core_hu=spec.core_hu,
    )


def _extent(occupancy: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """The voxels a shape fills at least half of; for a shape smaller than a voxel, which may fill
    no voxel half, the voxels it fills at least half as much as its fullest one."""
    return occupancy >= min(0.5, 0.5 * float(occupancy.max()))


def _box_average(fine: npt.NDArray[np.bool_], steps: npt.NDArray[np.int_]) -> npt.NDArray[np.float32]:
    shape = [n // s for n, s in zip(fine.shape, steps, strict=True)]
    blocks = fine.reshape(shape[0], steps[0], shape[1], steps[1], shape[2], steps[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _inside_shape(
    local: npt.NDArray[np.float32],
    radius_mm: float,
    ratios: tuple[float, float, float],
    lobes: tuple[Lobe, ...],
    spicules: tuple[Spicule, ...],
) -> npt.NDArray[np.bool_]:
    squared = dot(local, local)
    distance = np.sqrt(squared)
    unit = local / np.maximum(distance, 1e-6)[..., None]
    stretched = unit / np.asarray(ratios, dtype=np.float32)
    ellipsoid_radius = radius_mm / np.sqrt(np.maximum(dot(stretched, stretched), 1e-12))
    del stretched
    bulge = np.ones_like(distance)
    for lobe in lobes:
        bulge += lobe.amplitude * _sixth_power(
            np.clip(dot(unit, np.asarray(lobe.direction, dtype=np.float32)), 0, None)
        )
    inside = distance <= ellipsoid_radius * bulge
    for spicule in spicules:
        inside |= _inside_spicule(radius_mm, spicule, local, squared)
    return inside


def _sixth_power(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Not `x ** 6`: numpy's power rounds by CPU (models/synthetic/portable.py)."""
    cubed = x * x * x
    return cubed * cubed


def _inside_spicule(
    radius_mm: float, spicule: Spicule, local: npt.NDArray[np.float32], squared: npt.NDArray[np.float32]
) -> npt.NDArray[np.bool_]:
    """A thin cone from half the radius out past the surface, tapering from its base width to a point.
    `squared` is the squared distance of each point from the centre."""
    start = 0.5 * radius_mm
    length = radius_mm * 0.5 + spicule.length_mm
    along = dot(local, np.asarray(spicule.direction, dtype=np.float32))
    half_width = (spicule.width_mm / 2) * (1 - np.clip((along - start) / length, 0, 1))
    return (along >= start) & (along <= start + length) & (squared - along * along <= half_width * half_width)


def compose(background: npt.NDArray[np.float32], nodule: RenderedNodule) -> npt.NDArray[np.float32]:
    """Attenuation change that adds the nodule to a noiseless background box: a nodule only raises
    attenuation, so that vessels running through a ground-glass nodule and the chest wall next to a
    pleural nodule stay as they were."""
    with_body = background + nodule.body * np.maximum(nodule.body_hu - background, 0)
    if nodule.core is not None:
        with_body = with_body + nodule.core * np.maximum(nodule.core_hu - with_body, 0)
    return (with_body - background).astype(np.float32)
