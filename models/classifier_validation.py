"""The false-positive classifier judged as the pipeline uses it: behind the shipped detector, on whole
validation scans. The detector's candidates (at the shipped detector threshold) and their heat are
worked out once; after each epoch the classifier scores each candidate's cube, a candidate's
probability is `nodule_probability` of the two, and the CPM of that FROC (candidate centres matched
by the rules of `models.detector_validation`) is the metric that chooses the classifier's epoch.

Why not the ROC AUC of its validation cubes: retrained on 0.8.0's candidates, a classifier passed the
shipped one's AUC by 0.0008 and was shipped, while the pipeline's validation false positives at the
operating point rose from 0.25 to 0.58 a scan at the same CPM (docs/pipeline.md, "What limits the
CPM", item 12). The cubes are drawn once, nodules and look-alikes in fixed shares; a scan's CPM
depends on how its nodules rank among all of its candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.detector_validation import ValidationCase, validation_cases
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, ScanTruth, build_report, match_scan
from models.networks import FalsePositiveClassifier
from models.pipeline import (
    Pipeline,
    candidate_points,
    classifier_cubes,
    classifier_probabilities,
    detect,
    nodule_probability,
)
from models.training_data import CLASSIFIER_PATCH

CUBE = (CLASSIFIER_PATCH,) * 3


@dataclass(frozen=True)
class CandidateScan:
    """A validation scan as the classifier meets it: the detector's candidates, fixed for the run."""

    truth: ScanTruth
    centres_mm: list[tuple[float, float, float]]
    heat: npt.NDArray[np.float64]  # the detector's score of each candidate
    cubes: npt.NDArray[np.float32]  # (N, 1, 32, 32, 32), the classifier's input


def candidate_scans(cases: list[ValidationCase], pipeline: Pipeline) -> list[CandidateScan]:
    """Each case's candidates under the pipeline's detector and detector threshold, with their cubes."""
    scans = []
    for case in cases:
        heatmap, box = detect(case.work, case.lungs, pipeline.detector)
        candidates = candidate_points(heatmap, box, case.region, pipeline.thresholds.detector)
        points = [c.kji for c in candidates]
        scans.append(
            CandidateScan(
                case.truth,
                [tuple(case.work.index_to_patient(p)) for p in points],  # type: ignore[misc]
                np.array([c.score for c in candidates], dtype=np.float64),
                classifier_cubes(case.work.hu, points) if points else np.zeros((0, 1, *CUBE), np.float32),
            )
        )
    return scans


@torch.inference_mode()
def classifier_matches(classifier: nn.Module, scans: list[CandidateScan]) -> list[ScanMatch]:
    """Each scan's candidates, at the probability the pipeline would report, matched to its truth."""
    if not isinstance(classifier, FalsePositiveClassifier):
        raise TypeError(
            f"classifier_matches takes a FalsePositiveClassifier, not a {type(classifier).__name__}"
        )
    was_training = classifier.training
    classifier.eval()
    try:
        matches = []
        for scan in scans:
            probabilities = classifier_probabilities(classifier, scan.cubes) if len(scan.cubes) else []
            detections = [
                Detection(centre, nodule_probability(float(heat), float(p)))
                for centre, heat, p in zip(scan.centres_mm, scan.heat, probabilities, strict=True)
            ]
            matches.append(match_scan(scan.truth, detections, CANDIDATE_RULES))
    finally:
        classifier.train(was_training)
    return matches


def classifier_cpm(classifier: nn.Module, scans: list[CandidateScan]) -> float:
    """The CPM (mean sensitivity at 1/8 to 8 false positives per scan) behind the fixed candidates."""
    matches = classifier_matches(classifier, scans)
    return float(build_report(matches, rules=CANDIDATE_RULES).group("all").froc.cpm)


def classifier_judge(
    weights_dir: Path,
    split: str = "validation",
    progress: Callable[[str], None] = lambda message: None,
    workers: int = 1,
) -> Callable[[nn.Module], float]:
    """`classifier_cpm` behind the detector shipped in `weights_dir`, on the split's cases (made in
    `workers` processes); only the candidates and their cubes are kept between epochs."""
    pipeline = Pipeline.load(weights_dir, device="cpu")
    cases = validation_cases(split, progress, workers)
    progress(f"the shipped detector's candidates on {len(cases)} {split} scans, for the classifier's metric")
    scans = candidate_scans(cases, pipeline)
    return lambda classifier: classifier_cpm(classifier, scans)
