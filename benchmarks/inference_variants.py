"""Experiment: ways of using the shipped networks, compared on a split's cases without retraining.

For each case the detector runs once per flip of the volume and the classifier once per flip of its
cube; each variant then scores the candidates (centres of heatmap peaks in the search region, no
segmentation) and is matched by the LUNA16 rules:

- detector: one pass, or the mean heatmap of four (none, and a flip along each axis);
- classifier: one pass, or the mean probability of eight (every combination of axis flips);
- probability: the classifier's alone, or `nodule_probability` (with the detector's heat, at the
  shipped detector weight).

    .venv/bin/python benchmarks/inference_variants.py [--split validation]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import numpy.typing as npt
import torch

from models.datasets import SPLITS, Backgrounds, make_case, split_sources
from models.evaluation import Detection, ScanMatch, ScanTruth, build_report, match_scan
from models.evaluation_runs import FROC_MIN_PROBABILITY, truth_of
from models.lungs import segment_lungs
from models.networks import predict_heatmap
from models.pipeline import Pipeline, candidate_points, candidate_region, classifier_cubes, nodule_probability
from models.preprocessing import DETECTION_SPACING_MM, lung_box, normalise, resample

DETECTOR_FLIPS: list[tuple[int, ...]] = [(), (0,), (1,), (2,)]
CLASSIFIER_FLIPS = [f for r in range(4) for f in itertools.combinations((0, 1, 2), r)]
DETECTOR_THRESHOLDS = (0.1, 0.2, 0.3)


# One case under one detector variant: truth, candidate centres (mm), detector scores, classifier passes.
Scored = tuple[ScanTruth, list[tuple[float, float, float]], np.ndarray, np.ndarray]


def flipped_heatmap(pipeline: Pipeline, image: npt.NDArray[np.float32], axes: tuple[int, ...]) -> np.ndarray:
    """The heatmap of the volume flipped along `axes`, flipped back. Padded to even sizes first, so
    that the stride-2 cells of the flipped volume cover the same voxel pairs."""
    even = np.pad(image, [(0, n % 2) for n in image.shape])
    heat = np.flip(predict_heatmap(pipeline.detector, np.flip(even, axes).copy()), axes)
    return heat[tuple(slice(0, (n + 1) // 2) for n in image.shape)]


@torch.inference_mode()
def classifier_passes(pipeline: Pipeline, hu: np.ndarray, points: list[np.ndarray]) -> np.ndarray:
    """(candidates, flips): the classifier's probability of each candidate's cube under each flip."""
    if not points:
        return np.zeros((0, len(CLASSIFIER_FLIPS)))
    cubes = classifier_cubes(hu, points)
    return np.stack(
        [
            torch.sigmoid(pipeline.classifier(torch.from_numpy(np.flip(cubes, [a + 2 for a in f]).copy())))
            .reshape(-1)
            .numpy()
            for f in CLASSIFIER_FLIPS
        ],
        axis=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    args = parser.parse_args()
    pipeline = Pipeline.load()
    weight = pipeline.thresholds.detector_weight
    backgrounds = Backgrounds()
    scans: dict[str, list[Scored]] = {"detector x1": [], "detector x4": []}
    sources = split_sources(args.split)
    for index, source in enumerate(sources, start=1):
        print(f"case {index}/{len(sources)}: {source.name}", flush=True)
        case = make_case(source, backgrounds)
        work = resample(case.volume, DETECTION_SPACING_MM)
        lungs = segment_lungs(work)
        box = lung_box(lungs, work.spacing)
        image = normalise(work.hu[box])
        heats = [flipped_heatmap(pipeline, image, axes) for axes in DETECTOR_FLIPS]
        region = candidate_region(lungs, box)
        for name, heat in (("detector x1", heats[0]), ("detector x4", np.mean(heats, axis=0))):
            candidates = candidate_points(heat, box, region, min(DETECTOR_THRESHOLDS))
            points = [c.kji for c in candidates]
            scans[name].append(
                (
                    truth_of(case, source.name),
                    [tuple(work.index_to_patient(p)) for p in points],
                    np.array([c.score for c in candidates]),
                    classifier_passes(pipeline, work.hu, points),
                )
            )
    print(f"\n{args.split}: {len(sources)} scans")
    print(f"{'detector':12} {'classifier':11} {'probability':12} threshold  CPM    CPM >=6mm  sens@2FP >=6mm")
    for name, cases in scans.items():
        for passes, probability in itertools.product(("x1", "x8"), ("classifier", "both")):
            for threshold in DETECTOR_THRESHOLDS:
                matches = [
                    _matched(truth, centres, detector, classifier, passes, probability, threshold, weight)
                    for truth, centres, detector, classifier in cases
                ]
                report = build_report(matches)
                every, large = report.group("all"), report.group(">= 6 mm")
                sensitivity = large.froc.curve.sensitivity_at(2.0)
                print(
                    f"{name.split()[1]:12} {passes:11} {probability:12} {threshold:<10} "
                    f"{every.froc.cpm:.3f}  {large.froc.cpm:.3f}      {sensitivity:.3f}"
                )


def _matched(
    truth: ScanTruth,
    centres: list[tuple[float, float, float]],
    detector: np.ndarray,
    classifier: np.ndarray,
    passes: str,
    probability: str,
    threshold: float,
    detector_weight: float,
) -> ScanMatch:
    scores = classifier[:, 0] if passes == "x1" else classifier.mean(axis=1)
    if probability == "both":
        pairs = zip(detector, scores, strict=True)
        scores = np.array([nodule_probability(d, c, detector_weight) for d, c in pairs])
    kept = [
        Detection(centre, float(p))
        for centre, d, p in zip(centres, detector, scores, strict=True)
        if d >= threshold and p >= FROC_MIN_PROBABILITY
    ]
    return match_scan(truth, kept)


if __name__ == "__main__":
    main()
