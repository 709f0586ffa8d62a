"""The three networks: shapes, checkpoints, losses, heatmap targets and sliding-window inference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.networks import (
    MODEL_CLASSES,
    CandidateDetector,
    ClassifierConfig,
    DetectorConfig,
    FalsePositiveClassifier,
    NoduleSegmenter,
    SegmenterConfig,
    bce_loss,
    count_parameters,
    dice_bce_loss,
    fuse_batchnorm,
    grow,
    heatmap_loss,
    load_model,
    place,
    predict_heatmap,
    render_heatmap,
    save_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "CandidateDetector": DetectorConfig(channels=(4, 8, 8)),
    "FalsePositiveClassifier": ClassifierConfig(channels=(4, 8, 8), patch_size=16, fc_units=8),
    "NoduleSegmenter": SegmenterConfig(channels=(4, 8, 8, 16)),
}


def _tiny(name: str) -> nn.Module:
    model_class, _ = MODEL_CLASSES[name]
    return _randomise_batchnorm(model_class(TINY[name])).eval()


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that checkpoints are tested on more than the defaults."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("shape", [(2, 1, 16, 16, 16), (1, 1, 24, 32, 8)])
def test_detector_output_is_half_resolution(shape: tuple[int, ...]) -> None:
    out = _tiny("CandidateDetector")(torch.rand(shape))
    assert out.shape == (shape[0], 1, *(s // 2 for s in shape[2:]))


@pytest.mark.parametrize("size", [16, 32])
def test_classifier_gives_one_logit_per_patch(size: int) -> None:
    model = _tiny("FalsePositiveClassifier")
    x = torch.rand(3, 1, size, size, size)
    assert model(x).shape == (3, 1)
    proba = model.predict_proba(x)
    assert proba.shape == (3,) and bool(((proba > 0) & (proba < 1)).all())


@pytest.mark.parametrize("shape", [(2, 1, 16, 16, 16), (1, 1, 24, 32, 8)])
def test_segmenter_output_matches_input(shape: tuple[int, ...]) -> None:
    assert _tiny("NoduleSegmenter")(torch.rand(shape)).shape == shape


def test_place_keeps_the_outputs_with_channels_last_weights_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = fuse_batchnorm(CandidateDetector(DetectorConfig((4, 8, 8))))
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.inference_mode():
        expected = model(x)
        placed = place(model, torch.device("cpu"))
        assert placed.enc1[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(placed(x), expected, atol=1e-5, rtol=1e-4)


def test_default_networks_run_at_their_design_sizes() -> None:
    with torch.inference_mode():
        assert CandidateDetector().eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1, 16, 16, 16)
        assert FalsePositiveClassifier().eval()(torch.rand(2, 1, 32, 32, 32)).shape == (2, 1)
        assert NoduleSegmenter().eval()(torch.rand(1, 1, 24, 24, 24)).shape == (1, 1, 24, 24, 24)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (CandidateDetector(DetectorConfig((4, 8, 8))), (1, 1, 12, 16, 16)),
        (NoduleSegmenter(SegmenterConfig((4, 8, 8, 16))), (1, 1, 16, 16, 20)),
        (CandidateDetector(DetectorConfig((4, 8, 8))), (1, 16, 16, 16)),
    ],
)
def test_bad_input_shapes_are_refused(model: nn.Module, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"multiples of|takes"):
        model(torch.rand(shape))


def test_detector_starts_near_its_prior() -> None:
    with torch.inference_mode():
        prob = torch.sigmoid(_tiny("CandidateDetector")(torch.rand(1, 1, 16, 16, 16)))
    assert float(prob.mean()) < 0.1


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    model = _tiny(name)
    x = torch.rand(2, 1, 16, 16, 16)
    metadata = {"version": "0.1.0", "data": "toy", "metrics": {"auc": np.float64(0.9), "n": np.int64(3)}}

    save_model(model, tmp_path / "full.pt", metadata)
    loaded, meta = load_model(tmp_path / "full.pt")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    assert meta == {"version": "0.1.0", "data": "toy", "metrics": {"auc": 0.9, "n": 3}}
    assert type(meta["metrics"]["auc"]) is float
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))

    save_model(model, tmp_path / "half.pt", metadata, half=True)
    half, _ = load_model(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(half(x), model(x), atol=2e-2, rtol=2e-2)
    assert (tmp_path / "half.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size


def test_checkpoint_is_weights_only_safe(tmp_path: Path) -> None:
    save_model(_tiny("NoduleSegmenter"), tmp_path / "m.pt", {"version": "1", "shape": np.array([1, 2])})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["class"] == "NoduleSegmenter" and raw["metadata"]["shape"] == [1, 2]
    assert isinstance(raw["config"]["channels"], list)


def test_metadata_that_a_weights_only_load_cannot_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="weights-only"):
        save_model(_tiny("NoduleSegmenter"), tmp_path / "m.pt", {"when": object()})


def test_only_known_networks_are_saved(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="save_model stores only"):
        save_model(nn.Linear(2, 2), tmp_path / "m.pt", {})


def test_shipped_sizes(tmp_path: Path) -> None:
    """Parameter counts and checkpoint sizes of the default networks (shown with ``pytest -s``)."""
    total_half = 0
    for name, (model_class, _) in MODEL_CLASSES.items():
        model = model_class()
        full = save_model(model, tmp_path / f"{name}.pt", {"version": "test"}).stat().st_size
        half = save_model(model, tmp_path / f"{name}-half.pt", {"version": "test"}, half=True).stat().st_size
        total_half += half
        sizes = f"{full / 1e6:.2f} MB float32, {half / 1e6:.2f} MB float16"
        print(f"{name}: {count_parameters(model):,} parameters, {sizes}")
        assert half < 0.6 * full
    assert total_half < 10e6


def test_fused_batchnorm_gives_the_same_outputs() -> None:
    for name, shape in [
        ("CandidateDetector", (2, 1, 16, 16, 16)),
        ("FalsePositiveClassifier", (3, 1, 16, 16, 16)),
        ("NoduleSegmenter", (1, 1, 16, 16, 16)),
    ]:
        model = _tiny(name)
        fused = fuse_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm3d) for m in fused.modules())
        x = torch.rand(shape)
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)


def test_a_detector_grown_a_full_resolution_stem_starts_where_it_was_and_learns(tmp_path: Path) -> None:
    small = _tiny("CandidateDetector")
    grown = grow(CandidateDetector(replace(TINY["CandidateDetector"], full_resolution_channels=2)), small)
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.equal(grown.eval()(x), small(x))

    target = torch.from_numpy(render_heatmap((8, 8, 8), [[7.5, 7.5, 7.5]]))[None, None].repeat(2, 1, 1, 1, 1)
    before = {name: p.detach().clone() for name, p in grown.stem.named_parameters()}
    optimiser = torch.optim.Adam(grown.train().parameters(), lr=1e-2)
    for _ in range(2):  # the stem's first layers get a gradient once its zero last layer has moved
        optimiser.zero_grad()
        heatmap_loss(grown(x), target).backward()
        optimiser.step()
    assert all(not torch.equal(p, before[name]) for name, p in grown.stem.named_parameters())
    grown.eval()
    loaded, _ = load_model(save_model(grown, tmp_path / "grown.pt", {"version": "test"}))
    with torch.inference_mode():
        assert torch.equal(loaded(x), grown(x))
        torch.testing.assert_close(fuse_batchnorm(grown)(x), grown(x), atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match="stem"):
        grow(_tiny("CandidateDetector"), grown)
    wider = CandidateDetector(replace(TINY["CandidateDetector"], channels=(4, 8, 16)))
    with pytest.raises(ValueError, match="other shapes"):
        grow(_tiny("CandidateDetector"), wider)
    with pytest.raises(TypeError):
        grow(_tiny("NoduleSegmenter"), small)


def test_sliding_window_matches_one_pass_away_from_window_borders() -> None:
    model = _tiny("CandidateDetector")
    image = np.random.default_rng(0).random((40, 37, 24), dtype=np.float32)
    heatmap = predict_heatmap(model, image, window=24, margin=8, batch_size=3)
    assert heatmap.shape == (20, 19, 12) and heatmap.dtype == np.float32

    padded = np.zeros((40, 40, 24), np.float32)
    padded[:, :37] = image
    with torch.inference_mode():
        whole = torch.sigmoid(model(torch.from_numpy(padded)[None, None]))[0, 0].numpy()
    # zero padding at window borders changes the output a little; the margins keep it small
    np.testing.assert_allclose(heatmap, whole[:, :19], atol=0.05)
    assert model.training is False


def test_render_heatmap_puts_one_at_the_nearest_voxel() -> None:
    heatmap = render_heatmap((8, 8, 8), [[5.0, 5.0, 5.0], [1.9, 0.0, 15.0]], sigma=2.0, stride=2)
    assert heatmap.max() == 1.0
    assert sorted(map(tuple, np.argwhere(heatmap == 1.0).tolist())) == [(1, 0, 7), (2, 2, 2)]
    assert 0 < heatmap[3, 3, 3] < 1


def test_heatmap_loss_prefers_the_right_answer() -> None:
    target = torch.from_numpy(render_heatmap((8, 8, 8), [[6.0, 6.0, 6.0]]))[None, None]
    right = torch.where(target >= 0.999, 4.0, -6.0)
    wrong = torch.where(target >= 0.999, -6.0, -6.0).index_fill(2, torch.tensor([0]), 4.0)
    assert heatmap_loss(right, target) < 0.1 < heatmap_loss(wrong, target)
    empty = heatmap_loss(torch.full((1, 1, 4, 4, 4), -5.0), torch.zeros(1, 1, 4, 4, 4))
    assert torch.isfinite(empty) and empty < 0.01


def test_segmentation_and_classifier_losses() -> None:
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[:, :, 2:5, 2:5, 2:5] = 1
    good, bad = mask * 20 - 10, -(mask * 20 - 10)
    assert dice_bce_loss(good, mask) < 0.05 < 1.0 < dice_bce_loss(bad, mask)
    logits, labels = torch.tensor([[3.0], [-3.0]]), torch.tensor([1, 0])
    assert bce_loss(logits, labels) < 0.1 < bce_loss(-logits, labels)
