"""Augmentation and the training loop, on toy data."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from models.augmentation import AugmentConfig, augment
from models.networks import (
    ClassifierConfig,
    FalsePositiveClassifier,
    bce_loss,
    load_model,
    render_heatmap,
    save_model,
)
from models.training import TrainConfig, _autocast, native_bfloat16, train
from models.training_data import Shard
from models.training_runs import (
    RECIPES,
    Budget,
    Stage,
    scan_judges,
    shipped_start,
    stage_deadline,
    train_network,
)

NO_AFFINE = AugmentConfig(affine_prob=0.0)
GEOMETRY_ONLY = AugmentConfig(intensity_scale=(1, 1), intensity_shift=(0, 0), noise_prob=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cube(shape: tuple[int, int, int] = (32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    image = np.full(shape, 0.1, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[10:20, 12:22, 9:19] = True
    image[mask] = 0.9
    return image, mask


# --------------------------------------------------------------------------------------------------
# Augmentation


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 40, 32)])
def test_augment_keeps_shapes_and_dtypes(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    mask = image > 0.7
    heatmap = rng.random(tuple(s // 2 for s in shape), dtype=np.float32)
    for target in (mask, heatmap, mask.astype(np.uint8)):
        for _ in range(4):
            out, new_target = augment(image, target, rng)
            assert out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
            assert new_target is not None
            assert new_target.shape == target.shape and new_target.dtype == target.dtype
    out, none = augment(image, None, rng)
    assert out.shape == shape and none is None


def test_augment_is_deterministic_per_seed_and_leaves_inputs_alone() -> None:
    image, mask = _cube()
    before = image.copy(), mask.copy()
    first = augment(image, mask, np.random.default_rng(7))
    second = augment(image, mask, np.random.default_rng(7))
    other = augment(image, mask, np.random.default_rng(8))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])
    assert np.array_equal(image, before[0]) and np.array_equal(mask, before[1])


def test_flips_and_quarter_turns_keep_the_mask_exactly() -> None:
    image, mask = _cube()
    seen = set()
    for seed in range(12):
        out, new_mask = augment(image, mask, np.random.default_rng(seed), NO_AFFINE)
        assert new_mask is not None and new_mask.sum() == mask.sum()
        assert np.all(out[new_mask] > 0.6) and np.all(out[~new_mask] < 0.4)
        seen.add(new_mask.tobytes())
    assert len(seen) > 4


def test_small_rotations_roughly_keep_the_mask_volume() -> None:
    image, mask = _cube()
    config = AugmentConfig(scale_range=(1.0, 1.0))
    for seed in range(5):
        _, new_mask = augment(image, mask, np.random.default_rng(seed), config)
        assert new_mask is not None and abs(int(new_mask.sum()) - int(mask.sum())) < 0.1 * mask.sum()


def test_mask_stays_on_its_bright_cube() -> None:
    image, mask = _cube()
    for seed in range(8):
        out, new_mask = augment(image, mask, np.random.default_rng(seed))
        assert new_mask is not None and new_mask.any()
        # 0.9 and 0.1 before intensity jitter; the mask's edge voxels are partial-volume ones
        assert out[new_mask].mean() > 0.65 and out[~new_mask].mean() < 0.2


def test_stride_two_heatmap_follows_its_image() -> None:
    image = np.zeros((32, 32, 32), np.float32)
    image[15:17, 18:20, 11:13] = 1.0  # a blob centred at (15.5, 18.5, 11.5)
    heatmap = render_heatmap((16, 16, 16), [[15.5, 18.5, 11.5]], sigma=1.5)

    def centroid(array: np.ndarray, stride: int) -> np.ndarray:
        grids = np.meshgrid(*(stride * np.arange(n) + (stride - 1) / 2 for n in array.shape), indexing="ij")
        return np.array([(array * g).sum() / array.sum() for g in grids])

    for seed in range(6):
        out, new_heatmap = augment(image, heatmap, np.random.default_rng(seed), GEOMETRY_ONLY)
        assert new_heatmap is not None
        np.testing.assert_allclose(centroid(new_heatmap, 2), centroid(out, 1), atol=0.6)


# --------------------------------------------------------------------------------------------------
# Training loop


def _blobs(n: int, seed: int) -> TensorDataset:
    """16^3 noise patches, half with a bright blob near the centre: label 1."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), axis=-1)
    images = rng.normal(0.2, 0.05, (n, 1, 16, 16, 16)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.float32)
    for i in np.flatnonzero(labels):
        centre = rng.uniform(5, 11, 3)
        images[i, 0] += 0.6 * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * 1.5**2))
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(((logits.reshape(-1) > 0).float() == targets.reshape(-1)).float().mean())


def _toy_model() -> FalsePositiveClassifier:
    torch.manual_seed(0)
    return FalsePositiveClassifier(
        ClassifierConfig(channels=(4, 8, 8), patch_size=16, fc_units=16, dropout=0.1)
    )


def _config(**overrides: object) -> TrainConfig:
    base = {
        "epochs": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "progress": False,
        "device": "cpu",
        "metadata": {"version": "t"},
    }
    return TrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def toy_data() -> tuple[TensorDataset, TensorDataset]:
    return _blobs(128, seed=1), _blobs(64, seed=2)


def test_training_learns_a_toy_task_and_writes_its_records(
    toy_data: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    result = train(
        _toy_model(), *toy_data, loss_fn=bce_loss, metric_fn=_accuracy, config=_config(), out_dir=tmp_path
    )
    assert result.best_metric >= 0.95, result.history
    assert result.best_path.exists() and result.last_path.exists()
    assert result.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, 7)) == [h["epoch"] for h in result.history]
    assert set(lines[0]) == {"epoch", "train_loss", "val_loss", "val_metric", "lr", "seconds"}
    assert lines[-1]["lr"] < lines[0]["lr"]  # cosine schedule

    best, metadata = load_model(result.best_path)
    assert metadata["epoch"] == result.best_epoch and metadata["val_metric"] == result.best_metric
    assert metadata["version"] == "t" and "training_state" not in metadata
    images, labels = toy_data[1].tensors
    assert _accuracy(best(images), labels) == pytest.approx(result.best_metric)


def test_early_stopping_when_the_metric_stops_improving(
    toy_data: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    small = TensorDataset(*(t[:32] for t in toy_data[0].tensors))
    result = train(
        _toy_model(),
        small,
        small,
        loss_fn=bce_loss,
        metric_fn=lambda logits, targets: 0.5,
        config=_config(epochs=20, patience=2),
        out_dir=tmp_path,
    )
    assert result.stopped_early and result.best_epoch == 1 and result.epochs_run == 3


def test_a_model_metric_chooses_the_epoch_and_the_patch_metric_is_logged_beside_it(
    toy_data: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    judged = iter([0.2, 0.7, 0.4])
    result = train(
        _toy_model(),
        *toy_data,
        loss_fn=bce_loss,
        metric_fn=_accuracy,
        config=_config(epochs=3),
        out_dir=tmp_path,
        model_metric=lambda model: next(judged),
    )
    assert result.best_epoch == 2 and result.best_metric == 0.7
    assert [h["val_metric"] for h in result.history] == [0.2, 0.7, 0.4]
    assert all(0.0 <= h["patch_metric"] <= 1.0 for h in result.history)
    _, metadata = load_model(result.best_path)
    assert metadata["epoch"] == 2 and metadata["val_metric"] == 0.7


def test_resume_goes_on_as_if_never_interrupted(
    toy_data: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    data = [
        TensorDataset(*(t[:48] for t in toy_data[0].tensors)),
        TensorDataset(*(t[:32] for t in toy_data[1].tensors)),
    ]
    run = {"loss_fn": bce_loss, "metric_fn": _accuracy}
    straight = _toy_model()
    expected = train(
        straight, *data, **run, config=_config(epochs=4, lr_schedule="constant"), out_dir=tmp_path / "a"
    )

    # stopped after epoch 2, then resumed into a fresh model
    first = train(
        _toy_model(), *data, **run, config=_config(epochs=2, lr_schedule="constant"), out_dir=tmp_path / "b"
    )
    resumed = FalsePositiveClassifier(straight.config)
    config = _config(epochs=4, lr_schedule="constant", resume=True)
    result = train(resumed, *data, **run, config=config, out_dir=tmp_path / "b")

    assert result.history[:2] == first.history
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert len(result.log_path.read_text().splitlines()) == 4

    for got, want in zip(result.history, expected.history, strict=True):
        assert {**got, "seconds": 0} == pytest.approx({**want, "seconds": 0}, rel=1e-5)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class _Clock:
    """Stands in for the `time` module in `models.training`: each epoch takes what the judge says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


def test_a_deadline_ends_the_cosine_on_the_last_epoch_that_fits(
    toy_data: tuple[TensorDataset, TensorDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr("models.training.time", clock)

    def epoch_of_100_s(model: torch.nn.Module) -> float:
        clock.now += 100
        return 0.5

    small = TensorDataset(*(t[:16] for t in toy_data[0].tensors))
    config = _config(epochs=50, deadline=clock.now + 350, patience=None, min_lr_ratio=0.05)
    result = train(
        _toy_model(),
        small,
        small,
        loss_fn=bce_loss,
        metric_fn=_accuracy,
        config=config,
        out_dir=tmp_path,
        model_metric=epoch_of_100_s,
    )
    # Three epochs of 100 s fit in 350: the learning rate runs the whole cosine over them.
    assert result.epochs_run == 3 and result.stopped_early
    assert [h["planned_epochs"] for h in result.history] == [3, 3, 3]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(3e-3) and lrs[1] == pytest.approx(3e-3 * 0.525)
    assert lrs[2] == pytest.approx(3e-3 * 0.05)


def test_stages_share_the_time_left_by_their_work() -> None:
    def stage(epochs: int, cubes: int) -> Stage:
        shard = SimpleNamespace(detection_images=np.zeros((cubes, 1, 1, 1), np.int16))
        return Stage("s", shard, epochs, 1e-3)  # type: ignore[arg-type]

    stages = [stage(3, 10), stage(1, 20)]  # work 30 and 20
    assert stage_deadline(None, stages, "detection_images", 0.0) is None
    assert stage_deadline(200.0, stages, "detection_images", 100.0) == pytest.approx(160.0)
    assert stage_deadline(200.0, stages[1:], "detection_images", 160.0) == pytest.approx(200.0)


def test_train_refuses_a_time_budget_for_more_than_one_network_or_with_the_scratch_comparison(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from cad_node.cli import main

    for extra in (["--networks", "detector,classifier"], ["--networks", "detector", "--compare-scratch"]):
        result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path), "--minutes", "30", *extra])
        assert result.exit_code == 2 and "one network" in result.output, result.output
    for minutes in ("0", "-5", "soon"):
        result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path), "--minutes", minutes])
        assert result.exit_code == 2, result.output
    assert not any(tmp_path.iterdir())  # no shard built


def test_bfloat16_autocast_only_where_the_device_computes_in_it() -> None:
    cpu = torch.device("cpu")
    assert native_bfloat16(torch.device("cuda")) and not native_bfloat16(torch.device("meta"))
    for amp, expected in (
        (True, torch.bfloat16 if native_bfloat16(cpu) else torch.float32),
        (False, torch.float32),
    ):
        with _autocast(cpu, _config(amp=amp)):
            assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == expected


def test_stages_plot_continues_fine_tuning_after_pretraining(tmp_path: Path) -> None:
    from models.training import plot_stages

    def history(metrics: list[float]) -> list[dict[str, float]]:
        return [{"epoch": i, "val_metric": m} for i, m in enumerate(metrics, start=1)]

    path = plot_stages(
        [("synthetic", history([0.2, 0.5])), ("real", history([0.6])), ("real-only", history([0.1, 0.3]))],
        tmp_path / "stages.png",
        metric="ROC AUC",
        continued=2,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the shipped network's metric, when training went on from it, is a line of its own
    stages = [("real", history([0.6, 0.7]))]
    alone, beside = (
        plot_stages(stages, tmp_path / f"{name}.png", metric="AUC", continued=1, to_beat=to_beat)
        for name, to_beat in (("alone", None), ("beside", 0.65))
    )
    assert alone.read_bytes() != beside.read_bytes()


def _classifier_shard(count: int, seed: int) -> Shard:
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = [rng.normal(-700 + 500 * label, 50, (32, 32, 32)).astype(np.int16) for label in labels]
    return Shard.of_mined(images, list(labels))


def test_training_goes_on_from_the_shipped_network_and_measures_it_first(tmp_path: Path) -> None:
    recipe = RECIPES["classifier"]
    torch.manual_seed(1)
    shipped = recipe.make()
    save_model(
        shipped, tmp_path / "weights" / "classifier.pt", {"version": "9.9.9", "stage": "real"}, half=True
    )
    validation = _classifier_shard(8, seed=2)

    start, continued = shipped_start(recipe, tmp_path / "weights", validation)
    assert continued["trained_in"] == "9.9.9" and continued["stage"] == "real"
    assert 0.0 <= continued["validation_metric"] <= 1.0

    # With a learning rate of 0 the convolutions stay as they started: the shipped ones, not a new draw.
    ((stage, result),) = train_network(
        recipe,
        [Stage("real", _classifier_shard(8, seed=3), epochs=1, lr=0.0)],
        validation,
        tmp_path / "runs",
        Budget(batch_size=4),
        start=start,
    )
    trained, _ = load_model(result.best_path)
    shipped_weights, _ = load_model(tmp_path / "weights" / "classifier.pt")
    convolutions = [name for name, _ in trained.named_parameters() if name.endswith("weight")]
    assert stage == "real" and convolutions
    for name in convolutions:
        assert torch.equal(trained.get_parameter(name), shipped_weights.get_parameter(name)), name


def test_train_refuses_a_budget_of_no_epochs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cad_node.cli import main

    result = CliRunner().invoke(
        main, ["train", "--data-dir", str(tmp_path), "--pretrain-epochs", "0", "--finetune-epochs", "0"]
    )
    assert result.exit_code == 2 and "nothing to train" in result.output
    assert not any(tmp_path.iterdir())  # no shard built


def test_a_classifier_for_other_detection_passes_is_measured_against_the_shipped_one_behind_its_own(
    tmp_path: Path,
) -> None:
    asked: list[tuple[float, ...]] = []

    def judge_behind(
        weights_dir: Path, progress: Callable[[str], None], workers: int, passes_mm: tuple[float, ...]
    ) -> Callable[[torch.nn.Module], float]:
        asked.append(passes_mm)
        return lambda model: float(len(passes_mm))

    classifier = dataclasses.replace(RECIPES["classifier"], scan_judge=judge_behind)
    judge, shipped = scan_judges(classifier, tmp_path, (1.0, 0.7), (1.0,), print, 1)
    assert judge is not None and shipped is not None
    assert asked == [(1.0, 0.7), (1.0,)] and (judge(None), shipped(None)) == (2.0, 1.0)  # type: ignore[arg-type]
    asked.clear()
    judge, shipped = scan_judges(classifier, tmp_path, (1.0,), (1.0,), print, 1)
    assert judge is shipped and asked == [(1.0,)]
    detector = dataclasses.replace(RECIPES["detector"], scan_judge=judge_behind)
    judge, shipped = scan_judges(detector, tmp_path, (1.0, 0.7), (1.0,), print, 1)
    assert judge is shipped  # the detector's own judge: its 1 mm candidates
    assert scan_judges(RECIPES["segmenter"], tmp_path, (1.0,), (1.0,), print, 1) == (None, None)


def test_train_refuses_detection_passes_that_do_not_start_at_1_mm(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cad_node.cli import main

    for passes in ("0.7", "1.0,0.3", "1.0,abc", "1.0,1.0"):
        result = CliRunner().invoke(
            main, ["train", "--data-dir", str(tmp_path), "--detection-passes", passes]
        )
        assert result.exit_code == 2 and "--detection-passes" in result.output, passes
    assert not any(tmp_path.iterdir())
