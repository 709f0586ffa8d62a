"""`analyze(volume) -> findings`: the CAD pipeline.

volume -> 1 mm grid -> lungs -> candidate heatmap (sliding window) -> candidates
       (and, where the classifier was trained for it, the same on a finer grid, merged)
       -> false-positive reduction -> segmentation (0.75 mm patch) -> mask on the series' grid
       -> measurements, type, location, Lung-RADS suggestion
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from models.characterisation import location
from models.findings import Finding, measure_finding
from models.lungs import search_region, segment_lungs
from models.measurements import BoxMask
from models.networks import (
    CandidateDetector,
    FalsePositiveClassifier,
    NoduleSegmenter,
    fuse_batchnorm,
    load_model,
    place,
    predict_heatmap,
)
from models.preprocessing import DETECTION_SPACING_MM, lung_box, normalise, resample, resample_onto
from models.training_data import (
    CLASSIFIER_PATCH,
    SEGMENTATION_PATCH,
    SEGMENTATION_SPACING_MM,
    crop,
    patch_grid,
)
from models.volume import Volume

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_CANDIDATES = 40
CANDIDATE_SEPARATION_MM = 5.0


@dataclass(frozen=True)
class Thresholds:
    detector: float = 0.2  # on the detector's heatmap: which candidates go on to the classifier
    probability: float = 0.5  # on `nodule_probability`: which findings are reported
    # The detector's share of `nodule_probability`, chosen with the two thresholds by `cad-node
    # calibrate`; 0.5, the plain geometric mean, where the weights' metadata names none (up to 0.9.0).
    detector_weight: float = 0.5


@dataclass
class Pipeline:
    detector: CandidateDetector
    classifier: FalsePositiveClassifier
    segmenter: NoduleSegmenter
    version: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The grids the detector runs on, its candidates merged: those whose candidates the classifier
    # learnt from (its metadata's `detection_passes_mm`; the 1 mm grid alone where it names none).
    passes_mm: tuple[float, ...] = (DETECTION_SPACING_MM,)

    @classmethod
    def load(cls, weights_dir: Path = WEIGHTS_DIR, device: str | None = None) -> Pipeline:
        """The shipped networks; on a GPU where there is one."""
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        paths = {name: weights_dir / f"{name}.pt" for name in ("detector", "classifier", "segmenter")}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"model weights missing: {', '.join(missing)} (train them: cad-node train)"
            )
        detector, meta = load_model(paths["detector"], chosen)
        classifier, classifier_meta = load_model(paths["classifier"], chosen)
        segmenter, _ = load_model(paths["segmenter"], chosen)
        thresholds = Thresholds(**meta.get("thresholds", {}))
        # For inference only: each BatchNorm folded into its convolution (the same outputs to float
        # rounding, about 15 % less time in the detector on the CPU).
        return cls(
            place(fuse_batchnorm(detector), chosen),  # type: ignore[arg-type]
            place(fuse_batchnorm(classifier), chosen),  # type: ignore[arg-type]
            place(fuse_batchnorm(segmenter), chosen),  # type: ignore[arg-type]
            str(meta.get("version", "unknown")),
            thresholds,
            chosen,
            passes_of(classifier_meta),
        )

    def with_detector_threshold(self, threshold: float) -> Pipeline:
        """The same networks with another candidate threshold (experiments, calibration)."""
        return replace(self, thresholds=replace(self.thresholds, detector=threshold))


def passes_of(classifier_metadata: dict[str, Any]) -> tuple[float, ...]:
    """The detector's grids that a classifier was trained behind (its metadata's record)."""
    return tuple(float(s) for s in classifier_metadata.get("detection_passes_mm", [DETECTION_SPACING_MM]))


class Fate(StrEnum):
    """What became of a candidate."""

    BELOW_FLOOR = "probability under the floor"
    NO_MASK = "no mask from the segmenter"
    DUPLICATE = "on a more probable finding"
    FINDING = "finding"


@dataclass(frozen=True)
class CandidateRecord:
    centre_mm: tuple[float, float, float]
    heat: float  # the detector's
    probability: float  # `nodule_probability`
    fate: Fate


class ScoredFinding(NamedTuple):
    """A segmented candidate's finding with both networks' scores: what another detector threshold
    or detector weight would have reported (`models.calibration` replays them)."""

    finding: Finding
    detector: float  # the heatmap's value at the candidate
    classifier: float


@dataclass(frozen=True)
class Analysis:
    findings: list[Finding]
    candidates: list[CandidateRecord]  # the detector's highest heat first
    seconds: dict[str, float]
    # Every candidate that reached the floor and got a mask, duplicates included, the detector's
    # highest heat first.
    scored: list[ScoredFinding]


def analyze(
    volume: Volume,
    pipeline: Pipeline,
    *,
    min_probability: float | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> Analysis:
    """The findings whose probability reaches `min_probability` (default: the shipped
    operating point; the evaluation asks for lower ones too, to trace the whole FROC curve)."""
    floor = pipeline.thresholds.probability if min_probability is None else min_probability
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now
        progress(f"{name}: {seconds[name]:.1f} s")

    work = resample(volume, DETECTION_SPACING_MM)
    lungs = segment_lungs(work)
    step("preprocessing")
    candidates = propose(
        volume, work, lungs, pipeline.detector, pipeline.passes_mm, pipeline.thresholds.detector
    )
    step("candidate detection")
    scores = classify(work, [c.kji for c in candidates], pipeline)
    weight = pipeline.thresholds.detector_weight
    probabilities = [nodule_probability(c.score, s, weight) for c, s in zip(candidates, scores, strict=True)]
    step("false-positive reduction")
    centres = [
        (float(x), float(y), float(z)) for x, y, z in (work.index_to_patient(c.kji) for c in candidates)
    ]
    fates = [Fate.BELOW_FLOOR] * len(candidates)
    scored: list[ScoredFinding] = []
    segmented: list[int] = []  # the candidate of each of `scored`
    for index, (centre, probability) in enumerate(zip(centres, probabilities, strict=True)):
        if probability < floor:
            continue
        mask = segment(volume, np.asarray(centre), pipeline)
        if mask is None:
            fates[index] = Fate.NO_MASK
        else:
            fates[index] = Fate.DUPLICATE  # until `without_duplicates` keeps it
            finding = describe(volume, mask, probability, lungs, work)
            scored.append(ScoredFinding(finding, candidates[index].score, scores[index]))
            segmented.append(index)
    step("segmentation and measurement")
    kept = without_duplicates([s.finding for s in scored])
    for k in kept:
        fates[segmented[k]] = Fate.FINDING
    return Analysis(
        findings=[scored[k].finding for k in kept],
        candidates=[
            CandidateRecord(centre, candidate.score, probability, fate)
            for centre, candidate, probability, fate in zip(
                centres, candidates, probabilities, fates, strict=True
            )
        ],
        seconds=seconds,
        scored=scored,
    )


def detect(
    work: Volume, lungs: npt.NDArray[np.uint8], detector: CandidateDetector
) -> tuple[npt.NDArray[np.float32], tuple[slice, slice, slice]]:
    """Nodule-centre probabilities at stride 2 over the lungs' box."""
    box = lung_box(lungs, work.spacing)
    return predict_heatmap(detector, normalise(work.hu[box])), box


class Candidate(NamedTuple):
    kji: npt.NDArray[np.float64]  # index on the 1 mm grid
    score: float  # the detector's heatmap value there


def propose(
    volume: Volume,
    work: Volume,
    lungs: npt.NDArray[np.uint8],
    detector: CandidateDetector,
    passes_mm: Sequence[float],
    threshold: float,
) -> list[Candidate]:
    """`candidate_points` of the detector run on each grid of `passes_mm` (`work`, with its `lungs`,
    is the 1 mm one), merged: every pass's peaks at or above `threshold`, the highest first, kept apart
    as one pass's are, so those of a higher threshold are the first ones of this list. On a finer grid
    a small nodule spans more voxels; the detector reaches more of them there and fewer of the largest
    (docs/pipeline.md, "What limits the CPM", item 13)."""
    peaks: list[Candidate] = []
    for spacing in passes_mm:
        grid, grid_lungs = (work, lungs) if spacing == DETECTION_SPACING_MM else _finer(volume, spacing)
        heatmap, box = detect(grid, grid_lungs, detector)
        region = candidate_region(grid_lungs, box, spacing)
        peaks += [
            Candidate(work.patient_to_index(grid.index_to_patient(p.kji)), p.score)
            for p in heatmap_peaks(heatmap, box, region, threshold)
        ]
    peaks.sort(key=lambda peak: -peak.score)  # stable: one pass's order (and ties) stays as it was
    return [peaks[i] for i in spaced_apart([peak.kji for peak in peaks])]  # 1 mm grid: indices are mm


def _finer(volume: Volume, spacing_mm: float) -> tuple[Volume, npt.NDArray[np.uint8]]:
    grid = resample(volume, spacing_mm)
    return grid, segment_lungs(grid)


def candidate_points(
    heatmap: npt.NDArray[np.float32],
    box: tuple[slice, slice, slice],
    region: npt.NDArray[np.bool_],
    threshold: float,
) -> list[Candidate]:
    """The highest of `heatmap_peaks`, at least `CANDIDATE_SEPARATION_MM` apart, at most
    `MAX_CANDIDATES`. The candidates of a higher threshold are the first ones of this list."""
    peaks = heatmap_peaks(heatmap, box, region, threshold)
    return [peaks[i] for i in spaced_apart([peak.kji for peak in peaks])]  # 1 mm grid: indices are mm


def spaced_apart(
    points_mm: Sequence[npt.NDArray[np.float64]],
    separation_mm: float = CANDIDATE_SEPARATION_MM,
    most: int = MAX_CANDIDATES,
) -> list[int]:
    """Which of `points_mm` (the most probable first) the candidates keep: each point at least
    `separation_mm` from every point kept before it, at most `most` (the pipeline's constants unless
    an experiment asks for others)."""
    kept: list[int] = []
    for index, point in enumerate(points_mm):
        if len(kept) >= most:
            break
        if all(np.linalg.norm(point - points_mm[k]) >= separation_mm for k in kept):
            kept.append(index)
    return kept


def heatmap_peaks(
    heatmap: npt.NDArray[np.float32],
    box: tuple[slice, slice, slice],
    region: npt.NDArray[np.bool_],
    threshold: float,
) -> list[Candidate]:
    """Every local maximum of the heatmap at or above `threshold` in the search region (the heatmap's
    cells that `candidate_region` keeps), the most probable first; `kji` on the grid the heatmap was
    computed on (cell i covers voxels 2i and 2i + 1 of `box`)."""
    offset = np.array([s.start for s in box], dtype=np.float64)
    return [
        Candidate(index * 2 + 0.5 + offset, float(heatmap[tuple(index)]))
        for index in local_maxima(heatmap, region, threshold)
    ]


def local_maxima(
    heatmap: npt.NDArray[np.float32], region: npt.NDArray[np.bool_], threshold: float
) -> npt.NDArray[np.intp]:
    """The cells (N, 3) where the heatmap is the highest of its 3x3x3 neighbours, at or above
    `threshold` and in `region`, the most probable first."""
    peaks = (heatmap == ndimage.maximum_filter(heatmap, size=3)) & (heatmap >= threshold) & region
    indices = np.argwhere(peaks)
    return indices[np.argsort(heatmap[tuple(indices.T)])[::-1]]


def candidate_region(
    lungs: npt.NDArray[np.uint8], box: tuple[slice, slice, slice], spacing_mm: float = DETECTION_SPACING_MM
) -> npt.NDArray[np.bool_]:
    """`search_region` on the cells of the heatmap of `box`: cell i covers voxels 2i and 2i + 1 (of
    `spacing_mm`, the detector's 1 mm unless an experiment runs it on another grid), so the region on
    every second voxel has the heatmap's shape."""
    return search_region(lungs[box][::2, ::2, ::2], 2 * spacing_mm)


def nodule_probability(detector: float, classifier: float, detector_weight: float) -> float:
    """What a finding reports: the weighted geometric mean of the two networks' probabilities,
    detector ** w * classifier ** (1 - w). The detector judges a point from about 75 mm around it, the
    classifier from a 32 mm cube: a look-alike convinces one of them more often than both (see
    docs/pipeline.md for the validation figures). The shipped pipeline's w is in its `Thresholds`."""
    return float(detector**detector_weight * classifier ** (1.0 - detector_weight))


def classify(work: Volume, candidates: list[npt.NDArray[np.float64]], pipeline: Pipeline) -> list[float]:
    if not candidates:
        return []
    return classifier_probabilities(pipeline.classifier, classifier_cubes(work.hu, candidates)).tolist()


@torch.inference_mode()
def classifier_probabilities(
    classifier: torch.nn.Module, cubes: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """The classifier's probability of each of `cubes` (`classifier_cubes`; at most `MAX_CANDIDATES`
    of them, one batch), on the classifier's device."""
    device = next(classifier.parameters()).device
    return torch.sigmoid(classifier(torch.from_numpy(cubes).to(device))).reshape(-1).float().cpu().numpy()


def classifier_cubes(
    hu: npt.NDArray[np.float32], points: list[npt.NDArray[np.float64]]
) -> npt.NDArray[np.float32]:
    """(N, 1, 32, 32, 32): the classifier's normalised input, a cube of the 1 mm grid around each point."""
    return np.stack([normalise(crop(hu, p, CLASSIFIER_PATCH, -1024.0)) for p in points])[:, None]


@torch.inference_mode()
def segment(volume: Volume, centre_mm: npt.NDArray[np.float64], pipeline: Pipeline) -> BoxMask | None:
    """The nodule's mask on the series' own grid: the segmenter's probability on a 0.75 mm patch,
    interpolated back onto the series' voxels and cut at 0.5; the part connected to the centre."""
    grid = patch_grid(volume, centre_mm, SEGMENTATION_PATCH, SEGMENTATION_SPACING_MM)
    image = normalise(resample_onto(volume, grid).hu)
    tensor = torch.from_numpy(image[None, None]).to(pipeline.device)
    probability = torch.sigmoid(pipeline.segmenter(tensor))[0, 0].float().cpu().numpy()
    target = _series_box(volume, centre_mm, SEGMENTATION_PATCH * SEGMENTATION_SPACING_MM / 2)
    on_series = resample_onto(grid.with_hu(probability), target[1], default=0.0).hu >= 0.5
    labels, count = ndimage.label(on_series)
    if count == 0:
        return None
    centre_local = np.clip(
        np.rint(target[1].patient_to_index(centre_mm)).astype(int), 0, np.asarray(on_series.shape) - 1
    )
    label = labels[tuple(centre_local)]
    if label == 0:
        label = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    local = BoxMask.from_full(labels == label)
    offset = tuple(int(a + b) for a, b in zip(local.offset, target[0], strict=True))
    return BoxMask(offset=offset, array=local.array)  # type: ignore[arg-type]


def _series_box(
    volume: Volume, centre_mm: npt.NDArray[np.float64], half_mm: float
) -> tuple[tuple[int, int, int], Volume]:
    """The part of the series' grid within `half_mm` of the centre: its offset and an empty volume on it."""
    centre = volume.patient_to_index(centre_mm)
    half = np.ceil(half_mm / np.asarray(volume.spacing)).astype(int)
    low = np.maximum(np.floor(centre).astype(int) - half, 0)
    high = np.minimum(np.ceil(centre).astype(int) + half + 1, np.asarray(volume.shape))
    origin = volume.index_to_patient(low)
    box = Volume(
        hu=np.empty(tuple(int(n) for n in high - low), np.float32),
        spacing=volume.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=volume.direction,
    )
    return (int(low[0]), int(low[1]), int(low[2])), box


def describe(
    volume: Volume, mask: BoxMask, probability: float, lungs: npt.NDArray[np.uint8], work: Volume
) -> Finding:
    side, zone = location(volume.index_to_patient(mask.centroid_kji()), lungs, work)
    return measure_finding(volume, mask, probability, side, zone)


class Measured(Protocol):
    @property
    def centre_mm(self) -> Sequence[float]: ...

    @property
    def probability(self) -> float: ...

    @property
    def mean_diameter_mm(self) -> float: ...


def without_duplicates(findings: Sequence[Measured]) -> list[int]:
    """Two candidates on one nodule give two overlapping masks: which of `findings` to keep (the more
    probable of each such pair), the most probable first."""
    kept: list[int] = []
    for index in sorted(range(len(findings)), key=lambda i: findings[i].probability, reverse=True):
        finding = findings[index]
        if all(
            np.linalg.norm(np.subtract(finding.centre_mm, findings[k].centre_mm))
            > max(findings[k].mean_diameter_mm / 2, 3.0)
            for k in kept
        ):
            kept.append(index)
    return kept
