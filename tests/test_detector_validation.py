"""The detector's epoch metric: its candidates on whole scans, matched to the nodules, with the shipped
detector on a synthetic case."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.detector_validation import ValidationCase, candidate_cpm, candidate_matches, cpm_by_group
from models.evaluation import ScanTruth
from models.evaluation_runs import truth_of
from models.networks import load_model
from models.pipeline import WEIGHTS_DIR
from models.synthetic.cases import synthesize_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan() -> ValidationCase:
    case = synthesize_case(22, 3, n_slices=100)
    return ValidationCase.of(truth_of(case, "synthetic-22"), case.volume)


def test_the_shipped_detector_finds_nodules_there_and_not_40_mm_away(scan: ValidationCase) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    assert candidate_cpm(detector, [scan]) >= 0.6
    elsewhere = dataclasses.replace(scan, truth=moved_40_mm(scan.truth))
    assert candidate_cpm(detector, [elsewhere]) == 0.0


def moved_40_mm(truth: ScanTruth) -> ScanTruth:
    """The scan's truth with every nodule 40 mm to the side, where no candidate should hit one."""
    moved = [
        dataclasses.replace(t, centre_mm=tuple(np.add(t.centre_mm, (40.0, 0.0, 0.0)))) for t in truth.targets
    ]
    return dataclasses.replace(truth, targets=moved)


def test_only_a_detector_is_judged(scan: ValidationCase) -> None:
    classifier, _ = load_model(WEIGHTS_DIR / "classifier.pt")
    with pytest.raises(TypeError, match="CandidateDetector"):
        candidate_cpm(classifier, [scan])


def test_the_cpm_by_group_names_only_groups_the_scans_hold_with_their_nodules(scan: ValidationCase) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    line = cpm_by_group(candidate_matches(detector, [scan]))
    assert line.startswith(f"all {candidate_cpm(detector, [scan]):.3f} (")
    counts = [int(part.split("(")[1].rstrip(")")) for part in line.split("  ")]
    assert len(counts) >= 3 and all(count >= 1 for count in counts)
    assert counts[0] == max(counts)  # every nodule is in "all"
