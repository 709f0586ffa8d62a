"""Mining the detector's candidates for the classifier: labels by the evaluation's hit rule, patches
as the pipeline crops them, one cached shard per case and detector."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.datasets import CaseSource, split_sources
from models.evaluation_runs import truth_of
from models.ground_truth import IgnoreMark
from models.hard_negatives import (
    EDGE_MARGIN_MM,
    candidate_label,
    detector_tag,
    labelled_candidates,
    mine_shards,
    mining_sources,
)
from models.networks import load_model
from models.pipeline import WEIGHTS_DIR
from models.synthetic.cases import synthesize_case
from models.training_data import CLASSIFIER_PATCH, Shard


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


def test_the_shipped_detector_s_candidates_become_classifier_patches(case) -> None:
    detector, _ = load_model(WEIGHTS_DIR / "detector.pt")
    samples = list(labelled_candidates(case, detector))
    assert samples, "the shipped detector proposes candidates on a synthetic chest"
    assert all(image.shape == (CLASSIFIER_PATCH,) * 3 and image.dtype == np.int16 for image, _ in samples)
    labels = [label for _, label in samples]
    assert set(labels) <= {0, 1}
    assert 1 in labels, "at least one candidate on a nodule"
    assert 0 in labels, "and at least one false candidate to learn from"


def test_mined_shards_are_cached_per_detector(tmp_path) -> None:
    source = CaseSource("synthetic", 3000)
    detector_path = WEIGHTS_DIR / "detector.pt"
    (path,) = mine_shards("validation", [source], detector_path, tmp_path)
    assert path.parent == tmp_path / "mined" / detector_tag(detector_path) / "validation"
    shard = Shard.load(path)
    assert len(shard.classifier_images) == len(shard.classifier_labels) > 0
    assert len(shard.detection_images) == len(shard.segmentation_images) == 0
    written = path.stat().st_mtime_ns
    messages: list[str] = []
    assert mine_shards("validation", [source], detector_path, tmp_path, progress=messages.append) == [path]
    assert path.stat().st_mtime_ns == written and messages == []


def test_classifier_shards_join_full_ones(tmp_path) -> None:
    image = np.zeros((CLASSIFIER_PATCH,) * 3, np.int16)
    mined = Shard.of_classifier([image, image + 1], [0, 1])
    mined.save(tmp_path / "mined.npz")
    assert not list(tmp_path.glob("*.partial.npz"))
    joined = Shard.concatenate([Shard.load(tmp_path / "mined.npz"), mined])
    assert joined.classifier_labels.tolist() == [0, 1, 0, 1]
    assert joined.detection_images.shape == (0, 64, 64, 64)
