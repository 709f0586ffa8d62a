"""Training samples from the data layer's cases: patches for the candidate detector, the false-positive
classifier and the segmenter, written as one compressed shard per case.

A case is a synthetic chest or nodules inserted into a real background. Real reader marks in a
background (the LIDC nodules among them) are kept out of every sample: they are the real test, and
unlabelled for training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.ground_truth import NoduleTruth
from models.lungs import segment_lungs
from models.measurements import BoxMask
from models.preprocessing import DETECTION_SPACING_MM, resample, resample_onto
from models.synthetic.cases import Case
from models.volume import Volume

DETECTION_PATCH = 64
CLASSIFIER_PATCH = 32
SEGMENTATION_PATCH = 48
SEGMENTATION_SPACING_MM = 0.75
VESSEL_HU = -400.0
# The nodules the detector finds least (validation, model 0.5.0: of the 14 of 72 it gave a heat under
# 0.3, 12 were under 7 mm and 11 part-solid or ground-glass) get this many more cubes each.
HARD_NODULE_EXTRA_CUBES = 2
HARD_NODULE_DIAMETER_MM = 7.0
SUBSOLID_TYPES = ("part-solid", "ground-glass")


@dataclass(frozen=True)
class Shard:
    detection_images: npt.NDArray[np.int16]  # (N, 64, 64, 64) HU at 1 mm
    detection_heatmaps: npt.NDArray[np.uint8]  # (N, 64, 64, 64) nodule-centre heatmap, 255 = 1
    classifier_images: npt.NDArray[np.int16]  # (M, 32, 32, 32) HU at 1 mm
    classifier_labels: npt.NDArray[np.uint8]  # (M,) 1 nodule, 0 not
    segmentation_images: npt.NDArray[np.int16]  # (P, 48, 48, 48) HU at 0.75 mm
    segmentation_masks: npt.NDArray[np.bool_]  # (P, 48, 48, 48)

    def save(self, path: Path) -> None:
        """Written under a temporary name first: an interrupted run leaves no shard that looks whole."""
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, **{name: getattr(self, name) for name in self.__dataclass_fields__})
        partial.rename(path)

    @classmethod
    def of_mined(
        cls,
        images: Sequence[npt.NDArray[np.int16]],
        labels: Sequence[int],
        detection: Sequence[tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]] = (),
    ) -> Shard:
        """Samples from a detector's candidates (`models.hard_negatives`): classifier cubes, and
        detector cubes (image, heatmap) around its false ones."""
        return cls(
            detection_images=_stack([image for image, _ in detection], DETECTION_PATCH, np.int16),
            detection_heatmaps=_stack([heat for _, heat in detection], DETECTION_PATCH, np.uint8),
            classifier_images=_stack(images, CLASSIFIER_PATCH, np.int16),
            classifier_labels=np.asarray(labels, dtype=np.uint8),
            segmentation_images=_stack([], SEGMENTATION_PATCH, np.int16),
            segmentation_masks=_stack([], SEGMENTATION_PATCH, np.bool_),
        )

    @classmethod
    def load(cls, path: Path) -> Shard:
        with np.load(path) as data:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    @classmethod
    def concatenate(cls, shards: Sequence[Shard]) -> Shard:
        return cls(
            **{name: np.concatenate([getattr(s, name) for s in shards]) for name in cls.__dataclass_fields__}
        )


def heatmap_sigma_mm(mean_diameter_mm: float) -> float:
    """Width of a nodule's peak in the detector's target: wider for larger nodules, within 1.5 to 5 mm."""
    return float(np.clip(mean_diameter_mm / 4, 1.5, 5.0))


def crop(
    array: npt.NDArray[np.generic], centre: npt.ArrayLike, size: int, fill: float
) -> npt.NDArray[np.generic]:
    """A cube of `size` voxels centred on `centre` (array indices), padded with `fill` beyond the edges."""
    low = np.rint(np.asarray(centre, dtype=np.float64)).astype(int) - size // 2
    out = np.full((size, size, size), fill, dtype=array.dtype)
    source = tuple(slice(max(0, lo), min(n, lo + size)) for lo, n in zip(low, array.shape, strict=True))
    target = tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(source, low, strict=True))
    if all(s.stop > s.start for s in source):
        out[target] = array[source]
    return out


def patch_grid(volume: Volume, centre_mm: npt.ArrayLike, size: int, spacing_mm: float) -> Volume:
    """An empty cube of `size` voxels at `spacing_mm` centred on `centre_mm`, aligned with the volume."""
    half = (size - 1) / 2 * spacing_mm
    origin = np.asarray(centre_mm, dtype=np.float64) - volume.direction @ np.full(3, half)
    return Volume(
        hu=np.empty((size, size, size), np.float32),
        spacing=(spacing_mm, spacing_mm, spacing_mm),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=volume.direction,
    )


def mask_volume(mask: BoxMask, volume: Volume) -> Volume:
    """A box mask as a small volume of 0/1 values in its place on the volume's grid."""
    origin = volume.index_to_patient(mask.offset)
    return Volume(
        hu=mask.array.astype(np.float32),
        spacing=volume.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=volume.direction,
    )


def segmentation_sample(
    volume: Volume, mask: BoxMask, centre_mm: npt.ArrayLike
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
    grid = patch_grid(volume, centre_mm, SEGMENTATION_PATCH, SEGMENTATION_SPACING_MM)
    image = resample_onto(volume, grid).hu
    target = resample_onto(mask_volume(mask, volume), grid, default=0.0).hu >= 0.5
    return np.rint(image).astype(np.int16), target


def shard_from_case(case: Case, rng: np.random.Generator, *, negatives_per_nodule: int = 6) -> Shard:
    work = resample(case.volume, DETECTION_SPACING_MM)
    lungs = segment_lungs(work)
    centres = [work.patient_to_index(n.centre_mm) for n in case.nodules]
    marks = [(work.patient_to_index(m.centre_mm), max(m.diameter_mm / 2, 3.0)) for m in case.ignore]
    detection = list(_detection_samples(work, lungs, case.nodules, centres, marks, rng, negatives_per_nodule))
    classifier = list(_classifier_samples(work, lungs, centres, marks, rng, negatives_per_nodule))
    segmentation = [
        segmentation_sample(case.volume, n.mask, np.asarray(n.centre_mm) + rng.uniform(-3, 3, 3))
        for n in case.nodules
        for _ in range(2)
    ]
    return Shard(
        detection_images=_stack([image for image, _ in detection], DETECTION_PATCH, np.int16),
        detection_heatmaps=_stack([heat for _, heat in detection], DETECTION_PATCH, np.uint8),
        classifier_images=_stack([image for image, _ in classifier], CLASSIFIER_PATCH, np.int16),
        classifier_labels=np.array([label for _, label in classifier], dtype=np.uint8),
        segmentation_images=_stack([image for image, _ in segmentation], SEGMENTATION_PATCH, np.int16),
        segmentation_masks=_stack([mask for _, mask in segmentation], SEGMENTATION_PATCH, np.bool_),
    )


def _stack(items: Sequence[npt.NDArray[np.generic]], size: int, dtype: type) -> npt.NDArray[np.generic]:
    if not items:
        return np.zeros((0, size, size, size), dtype=dtype)
    return np.stack(items).astype(dtype)


def _clear_of_marks(
    centre: npt.NDArray[np.float64], half_mm: float, marks: Sequence[tuple[npt.NDArray[np.float64], float]]
) -> bool:
    """No real reader mark within the cube of half-width `half_mm` (1 mm grid) around `centre`."""
    return all(np.max(np.abs(centre - mark)) > half_mm + radius for mark, radius in marks)


def _random_lung_point(lungs: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    for _ in range(1000):
        point = rng.integers(0, lungs.shape)
        if lungs[tuple(point)]:
            return point.astype(np.float64)
    raise ValueError("no lung voxel found")


def _heatmap(
    shape: tuple[int, ...],
    low: npt.NDArray[np.int_],
    nodules: Sequence[tuple[npt.NDArray[np.float64], float]],
) -> npt.NDArray[np.uint8]:
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    heat = np.zeros(shape, np.float32)
    for centre, sigma in nodules:
        local = centre - low
        squared = sum((g - c) ** 2 for g, c in zip(grids, local, strict=True))
        np.maximum(heat, np.exp(-squared / (2 * sigma**2)), out=heat)
    return np.rint(heat * 255).astype(np.uint8)


def is_hard_nodule(nodule: NoduleTruth) -> bool:
    return nodule.mean_diameter_mm < HARD_NODULE_DIAMETER_MM or nodule.nodule_type in SUBSOLID_TYPES


def _detection_samples(
    work: Volume,
    lungs: npt.NDArray[np.uint8],
    nodules: Sequence[NoduleTruth],
    centres: Sequence[npt.NDArray[np.float64]],
    marks: Sequence[tuple[npt.NDArray[np.float64], float]],
    rng: np.random.Generator,
    negatives_per_nodule: int,
) -> Iterator[tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]]:
    """Cubes holding a nodule somewhere inside (more of the small and subsolid ones), and cubes anywhere
    in the lungs."""
    half = DETECTION_PATCH // 2
    # The extra cubes' positions come from a stream of their own: every other sample of the case stays
    # what it was before they were added.
    extra = rng.spawn(1)[0]
    wanted = [c + rng.uniform(-half * 0.6, half * 0.6, 3) for c in centres]
    wanted += [
        _random_lung_point(lungs, rng) for _ in range(max(2, negatives_per_nodule * len(centres) // 3))
    ]
    wanted += [
        c + extra.uniform(-half * 0.6, half * 0.6, 3)
        for c, n in zip(centres, nodules, strict=True)
        if is_hard_nodule(n)
        for _ in range(HARD_NODULE_EXTRA_CUBES)
    ]
    for centre in wanted:
        if _clear_of_marks(centre, half, marks):
            yield detection_target(work, nodules, centre)


def detection_target(
    work: Volume, nodules: Sequence[NoduleTruth], centre: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """The detector cube around `centre` (indices of the 1 mm grid `work`) and its nodule-centre heatmap."""
    peaks = [(work.patient_to_index(n.centre_mm), heatmap_sigma_mm(n.mean_diameter_mm)) for n in nodules]
    low = np.rint(centre).astype(int) - DETECTION_PATCH // 2
    return (
        np.rint(crop(work.hu, centre, DETECTION_PATCH, -1024.0)).astype(np.int16),
        _heatmap((DETECTION_PATCH,) * 3, low, peaks),
    )


def _classifier_samples(
    work: Volume,
    lungs: npt.NDArray[np.uint8],
    centres: Sequence[npt.NDArray[np.float64]],
    marks: Sequence[tuple[npt.NDArray[np.float64], float]],
    rng: np.random.Generator,
    negatives_per_nodule: int,
) -> Iterator[tuple[npt.NDArray[np.int16], int]]:
    """Nodules (centre jittered by up to 2 mm, as candidates are), and what a detector confuses with
    them: vessels most of all, then any lung point."""
    for centre in centres:
        for _ in range(3):
            point = centre + rng.uniform(-2, 2, 3)
            yield np.rint(crop(work.hu, point, CLASSIFIER_PATCH, -1024.0)).astype(np.int16), 1
    half = CLASSIFIER_PATCH // 2
    wanted = max(4, negatives_per_nodule * len(centres))
    found = 0
    for _ in range(wanted * 20):
        if found >= wanted:
            break
        point = _random_lung_point(lungs, rng)
        if found % 3 != 2:
            point = _nearby_vessel(work, lungs, point, rng)
            if point is None:
                continue
        too_close = any(np.linalg.norm(point - c) < 8.0 for c in centres)
        if too_close or not _clear_of_marks(point, half, marks):
            continue
        found += 1
        yield np.rint(crop(work.hu, point, CLASSIFIER_PATCH, -1024.0)).astype(np.int16), 0


def _nearby_vessel(
    work: Volume, lungs: npt.NDArray[np.uint8], point: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.float64] | None:
    box = crop(work.hu, point, 16, -1024.0)
    inside = crop(lungs, point, 16, 0) > 0
    candidates = np.argwhere((box > VESSEL_HU) & inside)
    if candidates.size == 0:
        return None
    pick = candidates[rng.integers(len(candidates))]
    return np.rint(point).astype(int) - 8 + pick.astype(np.float64)
