"""The false-positive classifier judged as the pipeline uses it: behind the shipped detector, on whole
validation scans. The detector's candidates (at the shipped detector threshold, on the grids the
classifier is trained behind: `Pipeline.passes_mm`) and their heat are
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

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.datasets import CaseSource, in_processes, make_case, split_sources
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, ScanTruth, build_report, match_scan
from models.evaluation_runs import truth_of
from models.lungs import segment_lungs
from models.networks import FalsePositiveClassifier
from models.pipeline import (
    Pipeline,
    classifier_cubes,
    classifier_probabilities,
    nodule_probability,
    propose,
)
from models.preprocessing import DETECTION_SPACING_MM, resample
from models.training_data import CLASSIFIER_PATCH
from models.volume import Volume

CUBE = (CLASSIFIER_PATCH,) * 3


@dataclass(frozen=True)
class CandidateScan:
    """A validation scan as the classifier meets it: the detector's candidates, fixed for the run."""

    truth: ScanTruth
    centres_mm: list[tuple[float, float, float]]
    heat: npt.NDArray[np.float64]  # the detector's score of each candidate
    cubes: npt.NDArray[np.float32]  # (N, 1, 32, 32, 32), the classifier's input
    detector_weight: float  # the pipeline's, in `nodule_probability`


def candidate_scan(truth: ScanTruth, volume: Volume, pipeline: Pipeline) -> CandidateScan:
    """The scan's candidates under the pipeline's detector, passes and detector threshold, with their
    cubes and the pipeline's detector weight."""
    work = resample(volume, DETECTION_SPACING_MM)
    lungs = segment_lungs(work)
    candidates = propose(
        volume, work, lungs, pipeline.detector, pipeline.passes_mm, pipeline.thresholds.detector
    )
    points = [c.kji for c in candidates]
    return CandidateScan(
        truth,
        [tuple(work.index_to_patient(p)) for p in points],  # type: ignore[misc]
        np.array([c.score for c in candidates], dtype=np.float64),
        classifier_cubes(work.hu, points) if points else np.zeros((0, 1, *CUBE), np.float32),
        pipeline.thresholds.detector_weight,
    )


def candidate_scans(
    split: str,
    weights_dir: Path,
    passes_mm: tuple[float, ...],
    workers: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> list[CandidateScan]:
    """`candidate_scan` of each of the split's cases, behind the detector shipped in `weights_dir` run
    on the grids of `passes_mm`, made in `workers` processes."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    jobs = [(source, weights_dir, passes_mm, threads) for source in split_sources(split)]
    return in_processes(_candidate_scan, jobs, workers, f"{split} candidates for the classifier:", progress)


def _candidate_scan(
    source: CaseSource, weights_dir: Path, passes_mm: tuple[float, ...], threads: int
) -> CandidateScan:
    torch.set_num_threads(threads)
    pipeline = replace(Pipeline.load(weights_dir, device="cpu"), passes_mm=passes_mm)
    case = make_case(source)
    return candidate_scan(truth_of(case, source.name), case.volume, pipeline)


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
                Detection(centre, nodule_probability(float(heat), float(p), scan.detector_weight))
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
    passes_mm: tuple[float, ...] | None = None,
) -> Callable[[nn.Module], float]:
    """`classifier_cpm` behind the detector shipped in `weights_dir` on the grids of `passes_mm` (the
    shipped classifier's, when not given), on the split's cases; only the candidates and their cubes
    are kept between epochs."""
    passes = passes_mm or Pipeline.load(weights_dir, device="cpu").passes_mm
    scans = candidate_scans(split, weights_dir, passes, workers, progress)
    return lambda classifier: classifier_cpm(classifier, scans)
