"""`cad-node calibrate`: the shipped operating point, chosen on the validation cases.

Three numbers make the operating point: the detector's threshold, on its heatmap (which candidates go
on to the classifier); the detector's weight in `nodule_probability` (how the two networks' scores
make a finding's probability, and so its rank); and the probability's threshold (which findings are
reported). All three are chosen here on the validation split, never on the held-out cases that
`cad-node evaluate` scores:

- the pipeline runs once on every validation case with the lowest detector threshold of the grid
  and segments every candidate, keeping each one's finding with both networks' scores;
- each (detector threshold, detector weight) pair is replayed from that run: the findings whose
  detector score is below the threshold are dropped (its candidates are the first ones of the lower
  threshold's list, see `pipeline.propose`), the others get the weight's probability, those under
  the FROC floor are dropped and duplicates resolved as `pipeline.analyze` would;
- the detector threshold is the highest whose validation CPM (with its best weight) is within
  `CPM_TOLERANCE` of the best (fewer candidates: fewer look-alikes for the classifier to pass, less
  time), the weight the one of best CPM at that threshold, and the probability threshold the lowest
  (in steps of 0.01 from 0.5) that keeps the validation false positives at or under one per scan.

Why not the probability threshold of best F1: the classifier is surer of the synthetic validation
nodules than of real ones. For model 0.2.0 the F1 optimum was p >= 0.98 (0.17 false positives per
validation scan), which would have dropped the real LIDC-IDRI-0001 nodule (p = 0.87).

The chosen pair is written into the shipped detector's metadata, where `Pipeline.load` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.datasets import split_sources
from models.evaluation import DetectionLike, ScanTruth, build_report, match_scan
from models.evaluation_runs import FROC_MIN_PROBABILITY, analysed_cases, truth_of
from models.networks import load_model, save_model
from models.pipeline import Pipeline, ScoredFinding, Thresholds, nodule_probability, without_duplicates
from models.training_runs import MODEL_VERSION, stamp_version

DETECTOR_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
# The detector's weight in the finding's probability: 0.5 is the plain geometric mean (up to 0.9.0);
# 1.0 would be the detector alone.
DETECTOR_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9)
# A reader accepts about one false mark per scan from a CAD system; more sensitivity than that costs
# reading time. Below 0.5 the two networks together lean to "not a nodule", so the grid starts there.
TARGET_FP_PER_SCAN = 1.0
PROBABILITY_GRID = np.round(np.arange(0.5, 1.0, 0.01), 2)
# CPMs closer than this are not told apart by 72 validation nodules (one nodule is 0.014 of
# sensitivity); among them the highest detector threshold wins: fewer look-alikes reach the classifier.
CPM_TOLERANCE = 0.02


@dataclass(frozen=True)
class ValidationScan:
    truth: ScanTruth
    scored: Sequence[ScoredFinding]  # every segmented candidate's, duplicates included


@dataclass(frozen=True)
class GridPoint:
    """What one detector threshold and weight give on the validation split, at the probability
    threshold chosen for them."""

    detector: float
    detector_weight: float
    probability: float
    cpm: float
    sensitivity_2fp_6mm: float
    precision: float
    recall: float
    f1: float
    fp_per_scan: float


@dataclass(frozen=True)
class Calibration:
    chosen: GridPoint
    grid: list[GridPoint]
    scans: int
    targets: int

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            detector=self.chosen.detector,
            probability=self.chosen.probability,
            detector_weight=self.chosen.detector_weight,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "split": "validation",
            "scans": self.scans,
            "targets": self.targets,
            "chosen": dataclasses.asdict(self.chosen),
            "grid": [dataclasses.asdict(c) for c in self.grid],
        }

    def format_table(self) -> str:
        lines = [
            f"validation: {self.scans} scans, {self.targets} nodules",
            "detector  weight  probability CPM    sens@2FP >=6mm  precision  recall  F1     FP/scan",
        ]
        for c in self.grid:
            mark = "  <- chosen" if c == self.chosen else ""
            lines.append(
                f"{c.detector:<9.2f} {c.detector_weight:<7.2f} {c.probability:<11.2f} {c.cpm:<6.3f} "
                f"{c.sensitivity_2fp_6mm:<15.3f} "
                f"{c.precision:<10.3f} {c.recall:<7.3f} {c.f1:<6.3f} {c.fp_per_scan:.2f}{mark}"
            )
        return "\n".join(lines)


def validation_scans(
    pipeline: Pipeline, lowest_detector: float, progress: Callable[[str], None] = lambda m: None
) -> list[ValidationScan]:
    low = pipeline.with_detector_threshold(lowest_detector)
    cases = analysed_cases(low, split_sources("validation"), "validation", progress, min_probability=0.0)
    return [ValidationScan(truth_of(case, source.name), analysis.scored) for source, case, analysis in cases]


def probability_threshold(fp_scores: np.ndarray, n_scans: int) -> float:
    """The lowest threshold of `PROBABILITY_GRID` whose false positives stay within
    `TARGET_FP_PER_SCAN`; the highest of the grid when none does."""
    for threshold in PROBABILITY_GRID:
        if np.count_nonzero(fp_scores >= threshold) / n_scans <= TARGET_FP_PER_SCAN:
            return float(threshold)
    return float(PROBABILITY_GRID[-1])


def findings_at(scan: ValidationScan, detector: float, detector_weight: float) -> list[DetectionLike]:
    """What the pipeline would have reported on `scan` with that detector threshold and weight, down
    to the FROC floor."""
    rescored = [
        dataclasses.replace(s.finding, probability=p)
        for s in scan.scored
        if s.detector >= detector
        and (p := nodule_probability(s.detector, s.classifier, detector_weight)) >= FROC_MIN_PROBABILITY
    ]
    return [rescored[i] for i in without_duplicates(rescored)]


def replay(scans: Sequence[ValidationScan], detector: float, detector_weight: float) -> GridPoint:
    """The validation figures with the detector threshold at `detector`, the detector's weight at
    `detector_weight` and the probability threshold chosen for them."""
    matches = [match_scan(s.truth, findings_at(s, detector, detector_weight)) for s in scans]
    fp_scores = np.concatenate([m.false_positive_scores() for m in matches])
    probability = probability_threshold(fp_scores, len(matches))
    report = build_report(matches, threshold=probability)
    overall = report.group("all")
    point = overall.operating_point
    large = [g for g in report.groups if g.name == ">= 6 mm"]
    return GridPoint(
        detector=detector,
        detector_weight=detector_weight,
        probability=probability,
        cpm=round(overall.froc.cpm, 4),
        sensitivity_2fp_6mm=round(large[0].froc.curve.sensitivity_at(2.0), 4) if large else math.nan,
        precision=round(point.precision, 4),
        recall=round(point.recall, 4),
        f1=round(point.f1, 4),
        fp_per_scan=round(point.fp_per_scan, 3),
    )


def choose(
    scans: Sequence[ValidationScan],
    detector_thresholds: Sequence[float],
    detector_weights: Sequence[float] = DETECTOR_WEIGHTS,
) -> Calibration:
    grid = [replay(scans, t, w) for t in sorted(detector_thresholds) for w in sorted(detector_weights)]
    best = max(c.cpm for c in grid)
    # Of equal CPMs the lower weight: the plainer mean of the two networks.
    chosen = max(
        (c for c in grid if c.cpm >= best - CPM_TOLERANCE),
        key=lambda c: (c.detector, c.cpm, -c.detector_weight),
    )
    return Calibration(
        chosen=chosen, grid=grid, scans=len(scans), targets=sum(len(s.truth.targets) for s in scans)
    )


def calibrate(
    pipeline: Pipeline,
    detector_thresholds: Sequence[float] = DETECTOR_THRESHOLDS,
    detector_weights: Sequence[float] = DETECTOR_WEIGHTS,
    progress: Callable[[str], None] = lambda m: None,
) -> Calibration:
    scans = validation_scans(pipeline, min(detector_thresholds), progress)
    return choose(scans, detector_thresholds, detector_weights)


def ship_thresholds(calibration: Calibration, weights_dir: Path) -> Path:
    """Write the chosen operating point, with the validation figures behind it, into the detector's
    file; the networks take `MODEL_VERSION`, since the operating point is part of what it names."""
    path = weights_dir / "detector.pt"
    model, metadata = load_model(path)
    metadata = {
        **metadata,
        "thresholds": dataclasses.asdict(calibration.thresholds),
        "calibration": calibration.to_json(),
    }
    shipped = save_model(model, path, metadata, half=True)
    stamp_version(weights_dir, MODEL_VERSION)
    return shipped
