"""Choosing the operating point on the validation cases: the detector threshold replayed from one run,
the probability threshold held to one false positive per scan, and the pair written where
`Pipeline.load` reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibration import (
    Calibration,
    ValidationScan,
    choose,
    probability_threshold,
    replay,
    ship_thresholds,
)
from models.evaluation import Detection, ScanTruth, Target
from models.networks import (
    CandidateDetector,
    FalsePositiveClassifier,
    NoduleSegmenter,
    SegmenterConfig,
    save_model,
)
from models.pipeline import Pipeline, Thresholds


def test_probability_threshold_keeps_one_false_positive_per_scan_at_most() -> None:
    # two scans: three false positives, at 0.9, 0.7 and 0.55: at 0.56 or more, one per scan
    assert probability_threshold(np.array([0.9, 0.7, 0.55]), n_scans=2) == 0.56
    assert probability_threshold(np.array([0.9, 0.7, 0.55]), n_scans=3) == 0.5  # never below 0.5
    assert probability_threshold(np.array([0.999, 0.999]), n_scans=1) == 0.99  # none does: the highest
    assert probability_threshold(np.zeros(0), n_scans=1) == 0.5


def _target(label: int, x: float) -> Target:
    return Target(
        label=label, centre_mm=(x, 0.0, 0.0), mean_diameter_mm=8.0, volume_mm3=None, nodule_type="solid"
    )


def _scans() -> list[ValidationScan]:
    """Two scans of two 8 mm nodules each. The second nodule of each scan has a weak detector score
    (0.1): only detector thresholds of 0.1 or less keep it. Each scan has two false positives with
    strong detector scores, at p = 0.6 and 0.8: one per scan from p >= 0.61 on."""
    scans = []
    for case in range(2):
        truth = ScanTruth(case_id=f"case-{case}", targets=(_target(1, 0.0), _target(2, 50.0)))
        findings = [
            Detection(centre_mm=(0.5, 0.0, 0.0), probability=0.95),
            Detection(centre_mm=(50.5, 0.0, 0.0), probability=0.9),
            Detection(centre_mm=(100.0, 0.0, 0.0), probability=0.6),
            Detection(centre_mm=(150.0, 0.0, 0.0), probability=0.8),
        ]
        scans.append(ValidationScan(truth, findings, [0.8, 0.1, 0.7, 0.9]))
    return scans


def test_replay_drops_what_a_higher_detector_threshold_would_not_have_proposed() -> None:
    low, high = replay(_scans(), 0.05), replay(_scans(), 0.2)
    assert low.recall == 1.0 and high.recall == 0.5
    assert low.probability == high.probability == 0.61
    assert low.fp_per_scan == 1.0 and low.precision == pytest.approx(2 / 3, abs=1e-3)
    assert high.cpm < low.cpm


def test_choose_takes_the_higher_threshold_of_the_best_cpm() -> None:
    calibration = choose(_scans(), [0.2, 0.05, 0.1])
    assert [c.detector for c in calibration.grid] == [0.05, 0.1, 0.2]
    assert calibration.chosen.detector == 0.1  # same CPM as 0.05, fewer candidates
    assert calibration.thresholds == Thresholds(detector=0.1, probability=0.61)
    assert (calibration.scans, calibration.targets) == (2, 4)
    assert "<- chosen" in calibration.format_table()


def test_choose_prefers_the_higher_detector_threshold_within_the_cpm_tolerance(monkeypatch) -> None:
    import models.calibration

    monkeypatch.setattr(models.calibration, "CPM_TOLERANCE", 0.6)
    calibration = choose(_scans(), [0.05, 0.1, 0.2])
    assert [c.cpm for c in calibration.grid] == [1.0, 1.0, 0.5]
    assert calibration.chosen.detector == 0.2


def test_shipped_thresholds_are_what_the_pipeline_loads(tmp_path) -> None:
    torch.manual_seed(0)
    save_model(CandidateDetector(), tmp_path / "detector.pt", {"version": "test"}, half=True)
    save_model(FalsePositiveClassifier(), tmp_path / "classifier.pt", {"version": "test"})
    save_model(NoduleSegmenter(SegmenterConfig(channels=(8, 16, 32, 64))), tmp_path / "segmenter.pt", {})
    calibration: Calibration = choose(_scans(), [0.05, 0.1, 0.2])
    ship_thresholds(calibration, tmp_path)
    pipeline = Pipeline.load(tmp_path, device="cpu")
    assert pipeline.thresholds == Thresholds(detector=0.1, probability=0.61)
    assert pipeline.version == "test"
    before = torch.load(tmp_path / "detector.pt", weights_only=True)["metadata"]["calibration"]
    assert before["chosen"]["detector"] == pytest.approx(0.1)


@pytest.mark.parametrize("grid", ["0.1,abc", "0.1,1.5", ""])
def test_calibrate_refuses_a_bad_threshold_grid(grid: str) -> None:
    from click.testing import CliRunner

    from cad_node.cli import main

    result = CliRunner().invoke(main, ["calibrate", "--detector-thresholds", grid, "--no-ship"])
    assert result.exit_code == 2
    assert "--detector-thresholds" in result.output
