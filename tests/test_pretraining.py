"""The detector's pretraining on the synthetic cases alone (what a lent GPU machine runs): a detector
with the stem and channels it asks for, judged on whole synthetic scans, stopped by its deadline; and loader
processes that each augment differently."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from models import datasets
from models.networks import (
    CandidateDetector,
    DetectorConfig,
    FalsePositiveClassifier,
    load_model,
    save_model,
)
from models.pretraining import pretrain_detector
from models.training_runs import RECIPES, Budget, PatchSet, checkpoint_start, data_record


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests' shards are built once."""
    return tmp_path_factory.mktemp("shards")


@pytest.fixture
def data_dir(tmp_path: Path, shards: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # One synthetic case to train on and one to judge by; the insertions' counts stay, and must be left out.
    monkeypatch.setitem(datasets.SPLITS, "train", (1000, 1, 2000, 30))
    monkeypatch.setitem(datasets.SPLITS, "validation", (3000, 1, 3100, 4))
    (tmp_path / "shards").symlink_to(shards)
    return tmp_path


def test_pretraining_trains_the_detector_it_is_asked_for_on_synthetic_cases_only(data_dir: Path) -> None:
    budget = Budget(pretrain_epochs=2, finetune_epochs=0, batch_size=4, loader_workers=1)
    result = pretrain_detector(data_dir, budget, stem_channels=4, channels=(8, 16, 32))
    assert sorted(p.name for p in (data_dir / "shards" / "train").iterdir()) == ["synthetic-1000.npz"]
    assert sorted(p.name for p in (data_dir / "shards" / "validation").iterdir()) == ["synthetic-3000.npz"]
    model, metadata = load_model(result.best_path)
    assert isinstance(model, CandidateDetector) and model.config.full_resolution_channels == 4
    assert model.config.channels == (8, 16, 32)
    assert metadata["pretraining_only"] and metadata["data"]["insertion_cases"] == 0
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert len(log) == result.epochs_run == 2
    # The epoch's metric is the candidates' CPM on the whole scan; the patch metric is logged beside it.
    assert all(0.0 <= record["val_metric"] <= 1.0 and "patch_metric" in record for record in log)

    # Fine-tuning (`cad-node train --start-from`) goes on from it with its stem and channels, which the
    # recipe's detector lacks.
    start = checkpoint_start(RECIPES["detector"], result.best_path)
    assert isinstance(start, CandidateDetector) and start.config == model.config
    started, saved = start.state_dict(), model.state_dict()
    assert started.keys() == saved.keys() and all(torch.equal(started[k], saved[k]) for k in saved)
    classifier = save_model(FalsePositiveClassifier(), data_dir / "classifier.pt", {"version": "test"})
    with pytest.raises(TypeError, match="FalsePositiveClassifier"):
        checkpoint_start(RECIPES["detector"], classifier)


def test_the_weights_record_the_cases_their_run_learnt_from(data_dir: Path) -> None:
    # `cad-node train` learns from both kinds of case; the pretraining from the synthetic ones alone.
    assert data_record() == {
        "synthetic_cases": 1,
        "insertion_cases": 30,
        "validation_cases": 5,
        "seeds": {
            "train": {"synthetic_from": 1000, "insertion_from": 2000},
            "validation": {"synthetic_from": 3000, "insertion_from": 3100},
            "test": {"synthetic_from": 4000, "insertion_from": 4100},
        },
    }
    assert data_record("synthetic") == {
        "synthetic_cases": 1,
        "insertion_cases": 0,
        "validation_cases": 1,
        "seeds": {
            "train": {"synthetic_from": 1000},
            "validation": {"synthetic_from": 3000},
            "test": {"synthetic_from": 4000},
        },
    }


def test_pretraining_starts_no_epoch_past_its_deadline(data_dir: Path) -> None:
    budget = Budget(pretrain_epochs=5, finetune_epochs=0, batch_size=4, deadline=time.monotonic())
    result = pretrain_detector(data_dir, budget, stem_channels=0, channels=DetectorConfig.channels)
    # The first epoch runs (so that there is a best checkpoint), and no other.
    assert result.epochs_run == 1 and result.stopped_early and result.best_path.exists()


def test_loader_processes_augment_differently_each_process_and_epoch() -> None:
    images = np.zeros((4, 16, 16, 16), np.int16)
    images[:, 4:12, 6:10, 5:11] = 200  # asymmetric: flips and rotations show
    patches = PatchSet(images, np.zeros(4, np.uint8), "classifier", augmented=True, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(patches, batch_size=2, num_workers=2)
    epochs = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    first, second = epochs
    # Batch 0 came from one process and batch 1 from the other: the same image, augmented apart.
    assert not torch.equal(first[:2], first[2:])
    assert not torch.equal(first, second)
