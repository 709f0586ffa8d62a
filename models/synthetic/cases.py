"""One case with known nodules: a synthetic chest, or synthetic nodules inserted into a real CT.

Nodules go onto the noiseless synthetic chest before the acquisition noise; in a real scan they go
onto a smoothed copy of the background and only their attenuation change is added back, so the
scan's own noise runs through the nodule as it does through the lung around it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.ground_truth import IgnoreMark, NoduleTruth, measure_nodule
from models.lungs import segment_lungs
from models.measurements import BoxMask
from models.synthetic.acquisition import Acquisition, add_noise, psf_sigma_mm
from models.synthetic.anatomy import generate_chest
from models.synthetic.nodules import (
    LOCATIONS,
    NODULE_TYPES,
    NoduleSpec,
    RenderedNodule,
    compose,
    render,
    sample_spec,
)
from models.synthetic.placement import Keepout, PlacementContext, PlacementError, place
from models.volume import Volume

LOBE_NAMES = {
    1: "right upper lobe",
    2: "right middle lobe",
    3: "right lower lobe",
    4: "left upper lobe",
    5: "left lower lobe",
}
REAL_CT_BLUR_MM = 0.5
REAL_NOISE_SMOOTHING_MM = 1.0
REAL_LOCATIONS = ("isolated", "juxtapleural", "juxtavascular")


@dataclass(frozen=True, eq=False)
class Case:
    volume: Volume
    nodules: list[NoduleTruth]
    acquisition: Acquisition | None
    ignore: list[IgnoreMark]


def nodule_specs(
    rng: np.random.Generator, count: int, locations: Sequence[str] = LOCATIONS
) -> list[NoduleSpec]:
    """`count` nodules covering the types and locations in turn before repeating any, in a random order."""
    types = [NODULE_TYPES[i % len(NODULE_TYPES)] for i in rng.permutation(max(count, len(NODULE_TYPES)))][
        :count
    ]
    places = [locations[i % len(locations)] for i in rng.permutation(max(count, len(locations)))][:count]
    return [sample_spec(rng, nodule_type=t, location=p) for t, p in zip(types, places, strict=True)]


def synthesize_case(seed: int, n_nodules: int, *, n_slices: int | None = None) -> Case:
    """A synthetic chest CT with `n_nodules` nodules, the same for the same arguments."""
    anatomy, acquisition = generate_chest(seed, n_slices=n_slices)
    rng = np.random.default_rng([seed, 1])
    hu = anatomy.volume.hu
    context = PlacementContext(
        volume=anatomy.volume,
        lungs=anatomy.lobes,
        fissure_points_mm=anatomy.fissure_points_mm,
        fissure_normals=anatomy.fissure_normals,
    )
    blur_mm = psf_sigma_mm(acquisition)[1]
    inserted = []
    for spec in nodule_specs(rng, n_nodules):
        rendered, spec = _place_and_render(spec, context, rng, blur_mm)
        box = rendered.slices()
        hu[box] += compose(hu[box], rendered)
        inserted.append((spec, rendered))
    add_noise(hu, acquisition, rng)
    nodules = [
        _truth(label, spec, rendered, anatomy.volume, anatomy.lobes, lobe_names=True)
        for label, (spec, rendered) in enumerate(inserted, start=1)
    ]
    return Case(volume=anatomy.volume, nodules=nodules, acquisition=acquisition, ignore=[])


def insert_into_real(
    background: Volume,
    seed: int,
    n_nodules: int,
    *,
    ignore: Sequence[IgnoreMark] = (),
    specs: Sequence[NoduleSpec] | None = None,
) -> Case:
    """Synthetic nodules in the lungs of a real CT, away from the real nodules listed in `ignore`:
    `n_nodules` random ones, or the given `specs`."""
    rng = np.random.default_rng([seed, 2])
    lungs = segment_lungs(background)
    keepouts = [Keepout(mark.centre_mm, max(mark.diameter_mm / 2, 5.0) + 5.0) for mark in ignore]
    context = PlacementContext(volume=background, lungs=lungs, keepouts=list(keepouts))
    hu = background.hu.copy()
    inserted = []
    for spec in nodule_specs(rng, n_nodules, REAL_LOCATIONS) if specs is None else specs:
        rendered, spec = _place_and_render(spec, context, rng, REAL_CT_BLUR_MM)
        box = rendered.slices()
        smooth = ndimage.gaussian_filter(hu[box], REAL_NOISE_SMOOTHING_MM / np.asarray(background.spacing))
        hu[box] += compose(smooth, rendered)
        inserted.append((spec, rendered))
    volume = background.with_hu(hu)
    nodules = [
        _truth(label, spec, rendered, volume, lungs, lobe_names=False)
        for label, (spec, rendered) in enumerate(inserted, start=1)
    ]
    return Case(volume=volume, nodules=nodules, acquisition=None, ignore=list(ignore))


def _place_and_render(
    spec: NoduleSpec, context: PlacementContext, rng: np.random.Generator, blur_mm: float
) -> tuple[RenderedNodule, NoduleSpec]:
    """Place and draw the nodule. Where a large one finds no room, a smaller one of its kind goes in;
    a spot where nothing of the nodule stays inside the lung is given up for another."""
    for _ in range(8):
        try:
            placement = place(spec, context, rng)
        except PlacementError:
            if spec.diameter_mm <= 6:
                raise
            spec = dataclasses.replace(spec, diameter_mm=spec.diameter_mm * 0.7, spicules=())
            continue
        if placement.rotation is not None:
            spec = dataclasses.replace(spec, rotation=tuple(placement.rotation.ravel().tolist()))
        rendered = render(spec, placement.centre_mm, context.volume, rng, in_plane_blur_mm=blur_mm)
        rendered = _within_lungs(rendered, context.lungs)
        if rendered.body_mask.any():
            return rendered, spec
    raise PlacementError(f"no room for a {spec.location} nodule in these lungs")


def _within_lungs(rendered: RenderedNodule, lungs: npt.NDArray[np.uint8]) -> RenderedNodule:
    """A nodule grows in the lung and stops at the pleura: what would reach into the chest wall or the
    mediastinum is cut off, with a soft edge one voxel wide."""
    lung = ndimage.binary_dilation(lungs[rendered.slices()] > 0, iterations=1)
    weight = ndimage.gaussian_filter(lung.astype(np.float32), 0.5)
    return dataclasses.replace(
        rendered,
        body=rendered.body * weight,
        core=None if rendered.core is None else rendered.core * weight,
        body_mask=rendered.body_mask & lung,
        core_mask=None if rendered.core_mask is None else rendered.core_mask & lung,
    )


def _truth(
    label: int,
    spec: NoduleSpec,
    rendered: RenderedNodule,
    volume: Volume,
    lungs: npt.NDArray[np.uint8],
    *,
    lobe_names: bool,
) -> NoduleTruth:
    """The mask is the part of the nodule that fills at least half a voxel, inside the lung: a pleural
    nodule's outline stops at the chest wall, as a reader would draw it."""
    box = rendered.slices()
    lung = lungs[box] > 0
    body = _largest_component(rendered.body_mask)
    mask = BoxMask.from_full(body, rendered.offset)
    core = (
        None if rendered.core_mask is None else BoxMask.from_full(rendered.core_mask & body, rendered.offset)
    )
    lung_label = (
        int(np.bincount(lungs[box][body].ravel(), minlength=6)[1:].argmax()) + 1 if lung[body].any() else 0
    )
    if lobe_names:
        side = "right" if lung_label in (1, 2, 3) else "left"
        lobe = LOBE_NAMES.get(lung_label)
    else:
        side = "right" if lung_label == 1 else "left"
        lobe = None
    return measure_nodule(
        label,
        mask,
        volume,
        nodule_type=spec.nodule_type,
        solid_part=core if core is not None and core.voxel_count else None,
        shape=spec.shape,
        location=spec.location,
        side=side,
        lobe=lobe,
        nominal_diameter_mm=spec.diameter_mm,
    )


def _largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1
