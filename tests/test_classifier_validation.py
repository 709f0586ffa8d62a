"""The classifier's epoch metric: the shipped detector's candidates on whole scans, scored as the
pipeline scores them, with the shipped networks on a synthetic case."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.classifier_validation import CandidateScan, candidate_scan, classifier_cpm
from models.evaluation_runs import truth_of
from models.networks import FalsePositiveClassifier, load_model
from models.pipeline import WEIGHTS_DIR, Pipeline
from models.synthetic.cases import synthesize_case
from models.training_runs import RECIPES
from tests.test_detector_validation import moved_40_mm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan() -> CandidateScan:
    case = synthesize_case(22, 3, n_slices=100)
    return candidate_scan(truth_of(case, "synthetic-22"), case.volume, Pipeline.load(device="cpu"))


def shipped_classifier() -> FalsePositiveClassifier:
    classifier, _ = load_model(WEIGHTS_DIR / "classifier.pt")
    assert isinstance(classifier, FalsePositiveClassifier)
    return classifier


def test_the_candidates_are_the_shipped_detectors_at_its_threshold(scan: CandidateScan) -> None:
    pipeline = Pipeline.load(device="cpu")
    assert 1 <= len(scan.centres_mm) <= 40
    assert len(scan.heat) == len(scan.cubes) == len(scan.centres_mm)
    assert scan.heat.min() >= pipeline.thresholds.detector
    assert scan.detector_weight == pipeline.thresholds.detector_weight
    assert scan.cubes.shape[1:] == (1, 32, 32, 32)


def test_the_shipped_classifier_finds_the_nodules_and_not_40_mm_away(scan: CandidateScan) -> None:
    classifier = shipped_classifier()
    assert classifier_cpm(classifier, [scan]) >= 0.6
    elsewhere = dataclasses.replace(scan, truth=moved_40_mm(scan.truth))
    assert classifier_cpm(classifier, [elsewhere]) == 0.0


def test_the_metric_follows_the_classifier(scan: CandidateScan) -> None:
    """The classifier's output reorders the candidates: turned around, it ranks look-alikes first."""
    classifier = shipped_classifier()
    inverted = shipped_classifier()
    final = [m for m in inverted.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        final.weight.neg_()
        final.bias.neg_()
    assert classifier_cpm(inverted, [scan]) < classifier_cpm(classifier, [scan])


def test_the_classifier_comes_back_in_the_mode_it_was_in(scan: CandidateScan) -> None:
    classifier = shipped_classifier().train()
    classifier_cpm(classifier, [scan])
    assert classifier.training


def test_only_a_classifier_is_judged(scan: CandidateScan) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    with pytest.raises(TypeError, match="FalsePositiveClassifier"):
        classifier_cpm(detector, [scan])


def test_the_classifier_and_the_detector_are_judged_on_whole_scans() -> None:
    assert RECIPES["classifier"].scan_judge is not None
    assert RECIPES["detector"].scan_judge is not None
    assert RECIPES["segmenter"].scan_judge is None
