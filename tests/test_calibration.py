"""Choosing the operating point on the validation cases: the detector threshold and weight replayed
from one run, the probability threshold held to one false positive per scan, and the three written
where `Pipeline.load` reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibration import (
    Calibration,
    ValidationScan,
    choose,
    findings_at,
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
from models.pipeline import Pipeline, ScoredFinding, Thresholds
from models.training_runs import MODEL_VERSION


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


def _scored(x: float, detector: float, classifier: float) -> ScoredFinding:
    finding = Detection(centre_mm=(x, 0.0, 0.0), probability=-1.0, mean_diameter_mm=8.0)
    return ScoredFinding(finding, detector, classifier)  # type: ignore[arg-type]


def _scans() -> list[ValidationScan]:
    """Two scans of three 8 mm nodules each (at x = 0, 50 and 200 mm), found by
    - A (x 0.5): both networks sure;
    - B (x 50.5): the detector sure, the classifier not (0.2): below the false positive D at weight
      0.5, above it at 0.9;
    - E (x 200.5): a weak detector score (0.1): only detector thresholds of 0.1 or less keep it;
    and two false positives the classifier is sure of: C (x 100, detector 0.1) and D (x 150, 0.3)."""
    scans = []
    for case in range(2):
        truth = ScanTruth(
            case_id=f"case-{case}", targets=(_target(1, 0.0), _target(2, 50.0), _target(3, 200.0))
        )
        scored = [
            _scored(0.5, 0.9, 0.9),
            _scored(50.5, 0.9, 0.2),
            _scored(100.0, 0.1, 0.95),
            _scored(150.0, 0.3, 0.95),
            _scored(200.5, 0.1, 0.99),
        ]
        scans.append(ValidationScan(truth, scored))
    return scans


def test_replay_drops_what_a_higher_detector_threshold_would_not_have_proposed() -> None:
    low, high = replay(_scans(), 0.05, 0.9), replay(_scans(), 0.2, 0.9)
    assert (low.recall, high.recall) == (
        pytest.approx(2 / 3, abs=1e-3),
        pytest.approx(2 / 3, abs=1e-3),
    )  # E is under p 0.5
    assert low.cpm > high.cpm  # E is found at 1 false positive per scan, at 0.05 only
    assert low.probability == high.probability == 0.5
    assert low.fp_per_scan == 0.0 and low.precision == 1.0


def test_replay_ranks_by_the_detector_weight() -> None:
    plain, detector_led = replay(_scans(), 0.05, 0.5), replay(_scans(), 0.05, 0.9)
    # at 0.5, D (p 0.53) outranks B (0.42): B is found only once one false positive per scan is allowed
    assert plain.cpm < detector_led.cpm
    assert plain.fp_per_scan == 1.0 and plain.recall == pytest.approx(1 / 3, abs=1e-3)


def test_findings_at_applies_the_floor_and_resolves_duplicates_under_the_weight() -> None:
    truth = ScanTruth(case_id="dup", targets=(_target(1, 0.0),))
    scan = ValidationScan(
        truth,
        [_scored(0.5, 0.9, 0.9), _scored(1.5, 0.99, 0.5), _scored(100.0, 0.05, 0.001)],
    )
    plain = findings_at(scan, 0.05, 0.5)  # the third: p 0.007, under the FROC floor
    assert [f.centre_mm[0] for f in plain] == [0.5]
    assert plain[0].probability == pytest.approx(0.9)
    detector_led = findings_at(scan, 0.05, 0.9)  # the second now outranks the first it duplicates
    assert [f.centre_mm[0] for f in detector_led] == [1.5, 100.0]
    assert detector_led[0].probability == pytest.approx(0.99**0.9 * 0.5**0.1)


def test_choose_takes_the_best_cpm_and_its_weight() -> None:
    calibration = choose(_scans(), [0.2, 0.05, 0.1], [0.9, 0.5])
    assert [(c.detector, c.detector_weight) for c in calibration.grid] == [
        (0.05, 0.5),
        (0.05, 0.9),
        (0.1, 0.5),
        (0.1, 0.9),
        (0.2, 0.5),
        (0.2, 0.9),
    ]
    assert calibration.chosen.detector == 0.1  # same CPM as 0.05, fewer candidates
    assert calibration.thresholds == Thresholds(detector=0.1, probability=0.5, detector_weight=0.9)
    assert (calibration.scans, calibration.targets) == (2, 6)
    assert "<- chosen" in calibration.format_table()


def test_choose_prefers_the_higher_detector_threshold_within_the_cpm_tolerance(monkeypatch) -> None:
    import models.calibration

    monkeypatch.setattr(models.calibration, "CPM_TOLERANCE", 0.6)
    calibration = choose(_scans(), [0.05, 0.1, 0.2], [0.5, 0.9])
    assert calibration.chosen.detector == 0.2
    assert calibration.chosen.detector_weight == 0.9  # the better CPM at that threshold


def test_shipped_thresholds_are_what_the_pipeline_loads(tmp_path) -> None:
    torch.manual_seed(0)
    save_model(CandidateDetector(), tmp_path / "detector.pt", {"version": "test"}, half=True)
    save_model(FalsePositiveClassifier(), tmp_path / "classifier.pt", {"version": "test"})
    save_model(NoduleSegmenter(SegmenterConfig(channels=(8, 16, 32, 64))), tmp_path / "segmenter.pt", {})
    calibration: Calibration = choose(_scans(), [0.05, 0.1, 0.2], [0.5, 0.9])
    ship_thresholds(calibration, tmp_path)
    pipeline = Pipeline.load(tmp_path, device="cpu")
    assert pipeline.thresholds == Thresholds(detector=0.1, probability=0.5, detector_weight=0.9)
    assert pipeline.version == MODEL_VERSION  # the operating point is part of the version
    before = torch.load(tmp_path / "detector.pt", weights_only=True)["metadata"]["calibration"]
    assert before["chosen"]["detector"] == pytest.approx(0.1)


@pytest.mark.parametrize("option", ["--detector-thresholds", "--detector-weights"])
@pytest.mark.parametrize("grid", ["0.1,abc", "0.1,1.5", ""])
def test_calibrate_refuses_a_bad_grid(option: str, grid: str) -> None:
    from click.testing import CliRunner

    from cad_node.cli import main

    result = CliRunner().invoke(main, ["calibrate", option, grid, "--no-ship"])
    assert result.exit_code == 2
    assert option in result.output
