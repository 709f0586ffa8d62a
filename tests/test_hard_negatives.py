"""Mining the detector's candidates: labels by the evaluation's hit rule, classifier patches as the
pipeline crops them, detector cubes around the strongest false candidates, one cached shard per case
and detector."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.datasets import CaseSource, split_sources
from models.evaluation_runs import truth_of
from models.ground_truth import IgnoreMark
from models.hard_negatives import (
    DETECTOR_NEGATIVES_PER_SCAN,
    EDGE_MARGIN_MM,
    MINED_LAYOUT,
    MINING_THRESHOLD,
    candidate_label,
    detector_tag,
    mine_shards,
    mined_samples,
    mining_sources,
)
from models.lungs import segment_lungs
from models.networks import CandidateDetector, load_model
from models.pipeline import WEIGHTS_DIR, propose
from models.preprocessing import resample
from models.synthetic.cases import synthesize_case
from models.training_data import CLASSIFIER_PATCH, DETECTION_PATCH, Shard


@pytest.fixture(scope="module")
def case():
    return synthesize_case(21, 2, n_slices=100)


def test_candidates_are_labelled_by_the_hit_rule(case) -> None:
    nodule = case.nodules[0]
    centre, radius = np.asarray(nodule.centre_mm), nodule.mean_diameter_mm / 2
    direction = np.array([0.0, 0.0, 1.0])
    truth = truth_of(case, "test")
    assert candidate_label(centre, truth) == 1
    assert candidate_label(centre + direction * radius * 0.9, truth) == 1
    # just past the edge: part of the nodule is in the patch, so it is neither
    assert candidate_label(centre + direction * (radius + EDGE_MARGIN_MM / 2), truth) is None
    far = centre + direction * 200
    assert candidate_label(far, truth) == 0


def test_reader_marks_keep_their_surroundings_out(case) -> None:
    far = np.asarray(case.nodules[0].centre_mm) + np.array([0.0, 0.0, 200.0])
    mark = IgnoreMark(centre_mm=tuple(far + np.array([0.0, 0.0, 6.0])), kind="nodule < 3 mm", diameter_mm=0.0)
    marked = truth_of(dataclasses.replace(case, ignore=[mark]), "test")
    assert candidate_label(far, marked) is None


def test_only_synthetic_cases_are_mined() -> None:
    for split in ("train", "validation"):
        sources = mining_sources(split)
        assert sources and all(s.kind == "synthetic" for s in sources)
        assert len(sources) < len(split_sources(split))


def test_the_shipped_detector_s_candidates_become_classifier_patches_and_detector_cubes(case) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    mined = mined_samples(case, detector, np.random.default_rng(0))
    assert mined.classifier_images.shape[1:] == (CLASSIFIER_PATCH,) * 3
    assert mined.classifier_images.dtype == np.int16
    labels = mined.classifier_labels.tolist()
    assert set(labels) <= {0, 1}
    assert 1 in labels, "at least one candidate on a nodule"
    assert 0 in labels, "and at least one false candidate to learn from"
    # the detector's own strongest false candidates, as detector cubes with the case's nodule heatmap
    cubes = len(mined.detection_images)
    assert 0 < cubes == min(labels.count(0), DETECTOR_NEGATIVES_PER_SCAN) == len(mined.detection_heatmaps)
    assert mined.detection_images.shape[1:] == (DETECTION_PATCH,) * 3
    assert mined.detection_heatmaps.dtype == np.uint8
    assert len(mined.segmentation_images) == 0
    # the cubes are the same for the same stream, and move with another
    again = mined_samples(case, detector, np.random.default_rng(0))
    assert np.array_equal(again.detection_images, mined.detection_images)
    moved = mined_samples(case, detector, np.random.default_rng(1))
    assert not np.array_equal(moved.detection_images, mined.detection_images)


def test_the_candidates_of_every_detection_pass_are_mined(case) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    assert isinstance(detector, CandidateDetector)
    work = resample(case.volume, 1.0)
    candidates = propose(case.volume, work, segment_lungs(work), detector, (1.0, 0.7), MINING_THRESHOLD)
    truth = truth_of(case, "mined")
    labels = [candidate_label(work.index_to_patient(c.kji), truth) for c in candidates]
    mined = mined_samples(case, detector, np.random.default_rng(0), passes_mm=(1.0, 0.7))
    assert list(mined.classifier_labels) == [label for label in labels if label is not None]


def test_mined_shards_are_cached_per_detector(tmp_path) -> None:
    source = CaseSource("synthetic", 3000)
    detector_path = WEIGHTS_DIR / "detector.pt"
    (path,) = mine_shards("validation", [source], detector_path, tmp_path)
    assert path.parent == tmp_path / "mined" / f"{detector_tag(detector_path)}-{MINED_LAYOUT}" / "validation"
    shard = Shard.load(path)
    assert len(shard.classifier_images) == len(shard.classifier_labels) > 0
    assert len(shard.detection_images) == len(shard.detection_heatmaps) > 0
    assert len(shard.segmentation_images) == 0
    written = path.stat().st_mtime_ns
    messages: list[str] = []
    assert mine_shards("validation", [source], detector_path, tmp_path, progress=messages.append) == [path]
    assert path.stat().st_mtime_ns == written and messages == []


def test_mined_shards_join_full_ones(tmp_path) -> None:
    image = np.zeros((CLASSIFIER_PATCH,) * 3, np.int16)
    cube = (np.full((DETECTION_PATCH,) * 3, -800, np.int16), np.zeros((DETECTION_PATCH,) * 3, np.uint8))
    classifier_only = Shard.of_mined([image, image + 1], [0, 1])
    mined = Shard.of_mined([image], [0], [cube])
    mined.save(tmp_path / "mined.npz")
    assert not list(tmp_path.glob("*.partial.npz"))
    joined = Shard.concatenate([Shard.load(tmp_path / "mined.npz"), classifier_only])
    assert joined.classifier_labels.tolist() == [0, 0, 1]
    assert joined.detection_images.shape == (1, 64, 64, 64)
    assert (joined.detection_images == -800).all() and not joined.detection_heatmaps.any()
