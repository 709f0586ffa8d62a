"""The pipeline's plumbing, with untrained networks: every stage runs, on the right grids, and what
comes out is measured on the series' own voxels. Detection quality is `cad-node evaluate`'s job."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from models.lungs import segment_lungs
from models.networks import (
    CandidateDetector,
    FalsePositiveClassifier,
    NoduleSegmenter,
    SegmenterConfig,
    load_model,
    save_model,
)
from models.pipeline import (
    WEIGHTS_DIR,
    Fate,
    Pipeline,
    Thresholds,
    analyze,
    candidate_points,
    candidate_region,
    detect,
    nodule_probability,
    passes_of,
    propose,
    segment,
)
from models.preprocessing import resample
from models.synthetic.cases import synthesize_case
from models.training_data import Shard
from models.training_runs import PatchSet, _stride2_peaks, average_precision, mean_dice, roc_auc


@pytest.fixture(scope="module")
def case():
    return synthesize_case(21, 2, n_slices=100)


def untrained(thresholds: Thresholds) -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(
        CandidateDetector().eval(),
        FalsePositiveClassifier().eval(),
        NoduleSegmenter(SegmenterConfig(channels=(8, 16, 32, 64))).eval(),
        "test",
        thresholds,
    )


def test_analyze_runs_every_stage(case) -> None:
    analysis = analyze(case.volume, untrained(Thresholds(detector=0.0, probability=0.0)))
    assert set(analysis.seconds) == {
        "preprocessing",
        "candidate detection",
        "false-positive reduction",
        "segmentation and measurement",
    }
    assert analysis.candidates
    heats = [c.heat for c in analysis.candidates]
    assert heats == sorted(heats, reverse=True)
    assert sum(c.fate is Fate.FINDING for c in analysis.candidates) == len(analysis.findings)
    # every finding is one of the segmented candidates, which also keep the duplicates
    scored = {id(s.finding): s for s in analysis.scored}
    assert all(id(f) in scored for f in analysis.findings)
    assert sum(c.fate in (Fate.FINDING, Fate.DUPLICATE) for c in analysis.candidates) == len(scored)
    assert all(0.0 <= s.detector <= 1.0 and 0.0 <= s.classifier <= 1.0 for s in analysis.scored)
    for finding in analysis.findings:
        assert finding.long_axis_mm >= finding.short_axis_mm > 0
        assert finding.mask.voxel_count > 0
        assert finding.nodule_type in {"solid", "part-solid", "ground-glass", "calcified"}
        assert finding.side in {"left", "right"}
        assert set(finding.to_json()) >= {
            "centre_mm",
            "probability",
            "long_axis_mm",
            "type",
            "lung_rads_suggestion",
        }


def test_nothing_passes_an_impossible_threshold(case) -> None:
    assert analyze(case.volume, untrained(Thresholds(detector=1.01, probability=0.5))).findings == []


def test_min_probability_keeps_the_findings_below_the_operating_point(case) -> None:
    """The evaluation asks for every finding above a low floor (to trace the FROC past the operating
    point); the node gets only those at the operating point."""
    pipeline = untrained(Thresholds(detector=0.0, probability=1.0))
    assert analyze(case.volume, pipeline).findings == []
    floor = analyze(case.volume, pipeline, min_probability=0.0)
    assert floor.findings and all(0.0 <= f.probability < 1.0 for f in floor.findings)


@pytest.mark.parametrize("weight", [0.5, 0.8])
def test_a_finding_reports_both_networks_probabilities(case, weight: float) -> None:
    """A classifier sure of every candidate (p = 1) leaves each finding its detector score to the
    power of the detector's weight as its probability."""
    pipeline = untrained(Thresholds(detector=0.0, probability=0.0, detector_weight=weight))
    with torch.no_grad():
        pipeline.classifier.classifier[-1].weight.zero_()
        pipeline.classifier.classifier[-1].bias.fill_(20.0)
    analysis = analyze(case.volume, pipeline)
    assert analysis.findings
    probabilities = [s.finding.probability for s in analysis.scored]
    assert probabilities == pytest.approx(np.power([s.detector for s in analysis.scored], weight), abs=1e-6)
    assert [s.classifier for s in analysis.scored] == pytest.approx([1.0] * len(analysis.scored))


def test_the_detector_weight_leans_the_probability_to_the_detector() -> None:
    assert nodule_probability(0.25, 1.0, 0.5) == pytest.approx(0.5)
    assert nodule_probability(0.9, 0.2, 0.5) == pytest.approx(np.sqrt(0.18))
    assert nodule_probability(0.9, 0.2, 0.8) == pytest.approx(0.9**0.8 * 0.2**0.2)
    assert nodule_probability(0.9, 0.2, 1.0) == pytest.approx(0.9)


def test_candidate_points_are_peaks_in_the_lungs() -> None:
    heat = np.zeros((20, 20, 20), np.float32)
    heat[5, 5, 5], heat[5, 6, 5], heat[15, 15, 15] = 0.9, 0.8, 0.7
    lungs = np.ones((40, 40, 40), np.uint8)
    box = (slice(0, 40), slice(0, 40), slice(0, 40))
    points = candidate_points(heat, box, candidate_region(lungs, box), threshold=0.5)
    assert len(points) == 2  # the 0.8 beside the 0.9 is no peak
    np.testing.assert_allclose(points[0].kji, [10.5, 10.5, 10.5])
    assert [p.score for p in points] == pytest.approx([0.9, 0.7])
    lungs[:] = 0
    assert candidate_points(heat, box, candidate_region(lungs, box), threshold=0.5) == []


def test_a_finer_pass_merges_its_candidates_with_the_1_mm_ones(case) -> None:
    """The shipped detector on the 1 mm grid alone gives `candidate_points`; with a 0.7 mm pass beside
    it, the peaks of both, the highest first, 5 mm apart, at most 40, some of them the finer pass's."""
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    assert isinstance(detector, CandidateDetector)
    work = resample(case.volume, 1.0)
    lungs = segment_lungs(work)
    heatmap, box = detect(work, lungs, detector)
    coarse = candidate_points(heatmap, box, candidate_region(lungs, box), 0.3)
    alone = propose(case.volume, work, lungs, detector, (1.0,), 0.3)
    assert [(tuple(c.kji), c.score) for c in alone] == [(tuple(c.kji), c.score) for c in coarse]
    merged = propose(case.volume, work, lungs, detector, (1.0, 0.7), 0.3)
    scores = [c.score for c in merged]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.3 and len(merged) <= 40
    points = np.array([c.kji for c in merged])
    gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(len(points)) * 99
    assert gaps.min() >= 5.0
    from_coarse = [any(np.allclose(c.kji, k.kji) for k in coarse) for c in merged]
    assert any(from_coarse) and not all(from_coarse)


def test_the_passes_come_with_the_classifier(tmp_path) -> None:
    """A classifier names the detector's grids it learnt behind; one that names none, the 1 mm grid."""
    assert passes_of({}) == (1.0,)
    assert passes_of({"detection_passes_mm": [1, 0.7]}) == (1.0, 0.7)
    for name in ("detector", "segmenter"):
        (tmp_path / f"{name}.pt").write_bytes((WEIGHTS_DIR / f"{name}.pt").read_bytes())
    classifier, metadata = load_model(WEIGHTS_DIR / "classifier.pt")
    save_model(classifier, tmp_path / "classifier.pt", {**metadata, "detection_passes_mm": [1.0, 0.7]})
    assert Pipeline.load(tmp_path, device="cpu").passes_mm == (1.0, 0.7)


def test_segment_maps_the_patch_back_onto_the_series_grid(case) -> None:
    """A segmenter that answers 'nodule' everywhere gives the whole patch, placed around the centre."""
    pipeline = untrained(Thresholds())
    with torch.no_grad():
        pipeline.segmenter.head.weight.zero_()
        pipeline.segmenter.head.bias.fill_(10.0)
    nodule = case.nodules[0]
    mask = segment(case.volume, np.asarray(nodule.centre_mm), pipeline)
    assert mask is not None
    # 48 voxels of 0.75 mm: 36 mm across, on the series' grid
    extent_mm = np.asarray(mask.array.shape) * np.asarray(case.volume.spacing)
    assert np.all(np.abs(extent_mm - 36.0) <= 2 * np.asarray(case.volume.spacing) + 0.1)
    centre = case.volume.patient_to_index(nodule.centre_mm)
    low = np.asarray(mask.offset)
    high = low + np.asarray(mask.array.shape)
    assert np.all(low <= centre) and np.all(centre <= high)


def test_stride2_peaks_keeps_one_positive_per_nodule() -> None:
    heat = np.zeros((16, 16, 16), np.float32)
    heat[7, 8, 9] = 0.9
    heat[6:9, 7:10, 8:11] = np.maximum(heat[6:9, 7:10, 8:11], 0.6)
    coarse = _stride2_peaks(heat)
    assert coarse.shape == (8, 8, 8)
    assert (coarse == 1.0).sum() == 1


def test_patch_sets_give_network_shaped_tensors() -> None:
    shard = Shard(
        detection_images=np.full((2, 64, 64, 64), -800, np.int16),
        detection_heatmaps=np.zeros((2, 64, 64, 64), np.uint8),
        classifier_images=np.full((3, 32, 32, 32), -800, np.int16),
        classifier_labels=np.array([1, 0, 1], np.uint8),
        segmentation_images=np.full((2, 48, 48, 48), -800, np.int16),
        segmentation_masks=np.zeros((2, 48, 48, 48), bool),
    )
    detector = PatchSet(shard.detection_images, shard.detection_heatmaps, "detector", augmented=True, seed=0)
    image, target = detector[0]
    assert image.shape == (1, 64, 64, 64) and target.shape == (1, 32, 32, 32)
    classifier = PatchSet(
        shard.classifier_images, shard.classifier_labels, "classifier", augmented=True, seed=0
    )
    assert classifier[0][1].tolist() == [1.0]
    segmenter = PatchSet(
        shard.segmentation_images, shard.segmentation_masks, "segmenter", augmented=False, seed=0
    )
    assert segmenter[1][0].shape == segmenter[1][1].shape == (1, 48, 48, 48)


def test_validation_metrics() -> None:
    targets = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0])
    assert average_precision(torch.tensor([0.9, 0.1, 0.2, 0.99, 0.8]), targets) == pytest.approx(1.0)
    assert average_precision(torch.tensor([0.1, 0.9, 0.2, 0.0, 0.8]), targets) == pytest.approx(
        (1 / 2 + 2 / 4) / 2
    )
    assert roc_auc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])) == 1.0
    assert roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0])) == 0.0
    logits = torch.full((2, 1, 4, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0
    masks = torch.zeros((2, 1, 4, 4, 4))
    masks[0, 0, :2] = 1.0
    assert mean_dice(logits, masks) == pytest.approx(1.0)  # the empty second mask does not count


def test_the_cli_does_not_load_torch_until_a_command_needs_it() -> None:
    code = "import sys, cad_node.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
