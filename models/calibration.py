"""`cad-node calibrate`: the shipped operating point, chosen on the validation cases.

Two thresholds make the operating point: the detector's, on its heatmap (which candidates go on to
the classifier), and the probability's, on `nodule_probability` (which findings are reported). Both
are chosen here on the validation split, never on the held-out cases that `cad-node evaluate` scores:

- the pipeline runs once on every validation case with the lowest detector threshold of the grid
  and keeps every finding down to the FROC floor, with the detector score of each;
- each higher detector threshold is replayed by dropping the findings whose detector score is below
  it (its candidates are the first ones of the lower threshold's list, see `pipeline.propose`);
- the detector threshold is the highest whose validation CPM is within `CPM_TOLERANCE` of the best
  (fewer candidates: fewer look-alikes for the classifier to pass, less time), and the probability
  threshold the lowest (in steps of 0.01 from 0.5) that keeps the validation false positives at or
  under one per scan at that detector threshold.

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
from models.evaluation_runs import analysed_cases, truth_of
from models.networks import load_model, save_model
from models.pipeline import Pipeline, Thresholds

DETECTOR_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
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
    findings: Sequence[DetectionLike]
    detector_scores: Sequence[float]


@dataclass(frozen=True)
class GridPoint:
    """What one detector threshold gives on the validation split, at its probability threshold."""

    detector: float
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
        return Thresholds(detector=self.chosen.detector, probability=self.chosen.probability)

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
            "detector  probability CPM    sens@2FP >=6mm  precision  recall  F1     FP/scan",
        ]
        for c in self.grid:
            mark = "  <- chosen" if c == self.chosen else ""
            lines.append(
                f"{c.detector:<9.2f} {c.probability:<11.2f} {c.cpm:<6.3f} {c.sensitivity_2fp_6mm:<15.3f} "
                f"{c.precision:<10.3f} {c.recall:<7.3f} {c.f1:<6.3f} {c.fp_per_scan:.2f}{mark}"
            )
        return "\n".join(lines)


def validation_scans(
    pipeline: Pipeline, lowest_detector: float, progress: Callable[[str], None] = lambda m: None
) -> list[ValidationScan]:
    low = pipeline.with_detector_threshold(lowest_detector)
    return [
        ValidationScan(truth_of(case, source.name), analysis.findings, analysis.detector_scores)
        for source, case, analysis in analysed_cases(low, split_sources("validation"), "validation", progress)
    ]


def probability_threshold(fp_scores: np.ndarray, n_scans: int) -> float:
    """The lowest threshold of `PROBABILITY_GRID` whose false positives stay within
    `TARGET_FP_PER_SCAN`; the highest of the grid when none does."""
    for threshold in PROBABILITY_GRID:
        if np.count_nonzero(fp_scores >= threshold) / n_scans <= TARGET_FP_PER_SCAN:
            return float(threshold)
    return float(PROBABILITY_GRID[-1])


def replay(scans: Sequence[ValidationScan], detector: float) -> GridPoint:
    """The validation figures with the detector threshold at `detector` and the probability threshold
    chosen for it."""
    kept = [
        (s.truth, [f for f, d in zip(s.findings, s.detector_scores, strict=True) if d >= detector])
        for s in scans
    ]
    matches = [match_scan(truth, detections) for truth, detections in kept]
    fp_scores = np.concatenate([m.false_positive_scores() for m in matches])
    probability = probability_threshold(fp_scores, len(matches))
    report = build_report(matches, threshold=probability)
    overall = report.group("all")
    point = overall.operating_point
    large = [g for g in report.groups if g.name == ">= 6 mm"]
    return GridPoint(
        detector=detector,
        probability=probability,
        cpm=round(overall.froc.cpm, 4),
        sensitivity_2fp_6mm=round(large[0].froc.curve.sensitivity_at(2.0), 4) if large else math.nan,
        precision=round(point.precision, 4),
        recall=round(point.recall, 4),
        f1=round(point.f1, 4),
        fp_per_scan=round(point.fp_per_scan, 3),
    )


def choose(scans: Sequence[ValidationScan], detector_thresholds: Sequence[float]) -> Calibration:
    grid = [replay(scans, t) for t in sorted(detector_thresholds)]
    best = max(c.cpm for c in grid)
    chosen = max((c for c in grid if c.cpm >= best - CPM_TOLERANCE), key=lambda c: c.detector)
    return Calibration(
        chosen=chosen, grid=grid, scans=len(scans), targets=sum(len(s.truth.targets) for s in scans)
    )


def calibrate(
    pipeline: Pipeline,
    detector_thresholds: Sequence[float] = DETECTOR_THRESHOLDS,
    progress: Callable[[str], None] = lambda m: None,
) -> Calibration:
    return choose(validation_scans(pipeline, min(detector_thresholds), progress), detector_thresholds)


def ship_thresholds(calibration: Calibration, weights_dir: Path) -> Path:
    """Write the chosen thresholds, with the validation figures behind them, into the detector's file."""
    path = weights_dir / "detector.pt"
    model, metadata = load_model(path)
    metadata = {
        **metadata,
        "thresholds": dataclasses.asdict(calibration.thresholds),
        "calibration": calibration.to_json(),
    }
    return save_model(model, path, metadata, half=True)
