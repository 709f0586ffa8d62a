"""Where a nodule goes: a centre in the lungs that fits its location kind (isolated, against the
pleura, against a vessel, on a fissure), clear of the airways, the other nodules and any real
nodule already in the scan. It works the same on a synthetic chest and on a real CT."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.synthetic.nodules import NoduleSpec
from models.synthetic.portable import dot, matmul, norm
from models.volume import Volume

VESSEL_HU = -350.0
AIRWAY_HU = -960.0
CLEARANCE_MM = 5.0
MAX_TRIES = 400


class PlacementError(RuntimeError):
    """No place in these lungs fits the nodule."""


@dataclass(frozen=True)
class Keepout:
    centre_mm: tuple[float, float, float]
    radius_mm: float


@dataclass
class PlacementContext:
    volume: Volume
    lungs: npt.NDArray[np.uint8]
    fissure_points_mm: npt.NDArray[np.float64] | None = None
    fissure_normals: npt.NDArray[np.float64] | None = None
    keepouts: list[Keepout] = field(default_factory=list)

    def __post_init__(self) -> None:
        in_plane = self.lungs.any(axis=0)
        if not in_plane.any():
            raise PlacementError("the volume has no lungs to place nodules in")
        rows, columns = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
        slices = np.flatnonzero(self.lungs.any(axis=(1, 2)))
        self.lung_box_low = np.array([slices[0], rows[0], columns[0]])
        self.lung_box_high = np.array([slices[-1], rows[-1], columns[-1]]) + 1


@dataclass(frozen=True)
class Placement:
    centre_mm: tuple[float, float, float]
    rotation: npt.NDArray[np.float64] | None = None


def place(spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator) -> Placement:
    """A centre for `spec`; the chosen spot is added to the context's keep-outs."""
    propose = {
        "isolated": _propose_isolated,
        "juxtapleural": _propose_juxtapleural,
        "juxtavascular": _propose_juxtavascular,
        "perifissural": _propose_perifissural,
    }[spec.location]
    for _ in range(MAX_TRIES):
        placement = propose(spec, context, rng)
        if placement is not None and _clear_of_keepouts(placement.centre_mm, spec, context):
            context.keepouts.append(Keepout(placement.centre_mm, spec.extent_mm))
            return placement
    raise PlacementError(
        f"no place found for a {spec.diameter_mm:.1f} mm {spec.location} nodule after {MAX_TRIES} tries"
    )


def _random_lung_index(context: PlacementContext, rng: np.random.Generator) -> npt.NDArray[np.int_] | None:
    for _ in range(50):
        kji = rng.integers(context.lung_box_low, context.lung_box_high)
        if context.lungs[tuple(kji)]:
            return kji
    return None


def _ball(
    context: PlacementContext, centre_mm: npt.ArrayLike, radius_mm: float
) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_]] | None:
    """The box around a ball and the ball's voxels in it; None where the ball leaves the volume."""
    volume = context.volume
    centre = volume.patient_to_index(centre_mm)
    half = radius_mm / np.asarray(volume.spacing)
    low = np.floor(centre - half).astype(int)
    high = np.ceil(centre + half).astype(int) + 1
    if np.any(low < 0) or np.any(high > np.asarray(volume.shape)):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij")
    offsets = (np.stack(grids, axis=-1) - centre) * np.asarray(volume.spacing)
    return box, norm(offsets) <= radius_mm  # type: ignore[return-value]


def _lung_fraction_and_hu(
    context: PlacementContext, centre_mm: npt.ArrayLike, radius_mm: float
) -> tuple[float, npt.NDArray[np.float32]] | None:
    ball = _ball(context, centre_mm, radius_mm)
    if ball is None:
        return None
    box, inside = ball
    lung = context.lungs[box][inside] > 0
    return float(lung.mean()), context.volume.hu[box][inside]


def _inside_parenchyma(context: PlacementContext, centre_mm: npt.ArrayLike, radius_mm: float) -> bool:
    """Wholly in the lung, and not in an airway."""
    found = _lung_fraction_and_hu(context, centre_mm, radius_mm)
    if found is None:
        return False
    fraction, hu = found
    return fraction == 1.0 and float((hu < AIRWAY_HU).mean()) < 0.3


def _propose_isolated(
    spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator
) -> Placement | None:
    kji = _random_lung_index(context, rng)
    if kji is None:
        return None
    centre = context.volume.index_to_patient(kji)
    if not _inside_parenchyma(context, centre, spec.extent_mm + CLEARANCE_MM):
        return None
    found = _lung_fraction_and_hu(context, centre, spec.extent_mm + 1.0)
    if found is None or float((found[1] > VESSEL_HU).mean()) > 0.02:
        return None
    return Placement(_as_tuple(centre))


def _propose_juxtapleural(
    spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator
) -> Placement | None:
    """Walk from a lung point in a random in-plane direction to the pleura, then come back in so that
    about a quarter of the nodule's diameter lies in the chest wall, where it is cut off."""
    kji = _random_lung_index(context, rng)
    if kji is None:
        return None
    volume = context.volume
    angle = rng.uniform(0, 2 * np.pi)
    step_kji = np.array([0.0, np.sin(angle), np.cos(angle)])
    point = kji.astype(np.float64)
    while True:
        ahead = point + step_kji
        index = np.rint(ahead).astype(int)
        if np.any(index < 0) or np.any(index >= np.asarray(volume.shape)) or not context.lungs[tuple(index)]:
            break
        point = ahead
    pleura_mm = volume.index_to_patient(point)
    inward = -matmul(step_kji * np.asarray(volume.spacing), volume.direction.T)
    inward /= norm(inward)
    centre = pleura_mm + inward * spec.radius_mm * 0.5
    found = _lung_fraction_and_hu(context, centre, spec.radius_mm)
    if found is None or not 0.45 <= found[0] <= 0.9:
        return None
    inner = centre + inward * spec.radius_mm
    if not _inside_parenchyma(context, inner, spec.radius_mm * 0.5):
        return None
    return Placement(_as_tuple(centre))


def _propose_juxtavascular(
    spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator
) -> Placement | None:
    """Next to a vessel of at least 1.5 mm: the nodule's surface touches the vessel's wall."""
    kji = _random_lung_index(context, rng)
    if kji is None:
        return None
    volume = context.volume
    ball = _ball(context, volume.index_to_patient(kji), 8.0)
    if ball is None:
        return None
    box, inside = ball
    vessel = inside & (volume.hu[box] > VESSEL_HU) & (context.lungs[box] > 0)
    vessel = ndimage.binary_erosion(vessel, iterations=1) if min(volume.spacing) < 1.0 else vessel
    candidates = np.argwhere(vessel)
    if candidates.size == 0:
        return None
    vessel_kji = candidates[rng.integers(len(candidates))] + np.array([s.start for s in box])
    direction = rng.normal(size=3)
    direction /= norm(direction)
    centre = volume.index_to_patient(vessel_kji) + direction * (spec.radius_mm + 1.5)
    if not _inside_parenchyma(context, centre, spec.extent_mm + 2.0):
        return None
    return Placement(_as_tuple(centre))


def _propose_perifissural(
    spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator
) -> Placement | None:
    """On a fissure, flattened along it: the nodule's shortest axis along the fissure's normal."""
    if (
        context.fissure_points_mm is None
        or context.fissure_normals is None
        or len(context.fissure_points_mm) == 0
    ):
        raise PlacementError("perifissural nodules need the fissures, which only synthetic chests provide")
    pick = int(rng.integers(len(context.fissure_points_mm)))
    normal = context.fissure_normals[pick] / norm(context.fissure_normals[pick])
    centre = context.fissure_points_mm[pick] + normal * rng.uniform(-0.2, 0.2) * spec.radius_mm
    if not _inside_parenchyma(context, centre, spec.extent_mm + 1.0):
        return None
    return Placement(_as_tuple(centre), rotation=_frame_with_third_axis(normal, rng))


def _frame_with_third_axis(
    axis: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """A rotation whose third column is `axis`: the nodule's third (shortest) axis points along it."""
    helper = rng.normal(size=3)
    first = helper - dot(helper, axis) * axis
    first /= norm(first)
    return np.column_stack([first, np.cross(axis, first), axis])


def _clear_of_keepouts(
    centre_mm: tuple[float, float, float], spec: NoduleSpec, context: PlacementContext
) -> bool:
    return all(
        norm(np.subtract(centre_mm, k.centre_mm)) >= spec.extent_mm + k.radius_mm + CLEARANCE_MM
        for k in context.keepouts
    )


def _as_tuple(point: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return float(point[0]), float(point[1]), float(point[2])
