"""benchmarks/bench_training.py, the figures that plan a detector's training on a GPU: its timing runs
real training steps of each detector layout and says what they cost."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from models.networks import CandidateDetector, count_parameters, render_heatmap
from models.training import native_bfloat16
from models.training_runs import PatchSet
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_training")


@pytest.fixture(scope="module")
def patches() -> PatchSet:
    rng = np.random.default_rng(0)
    images = rng.integers(-1000, 100, (2, 64, 64, 64)).astype(np.int16)
    heat = render_heatmap((64, 64, 64), [(32.0, 30.0, 33.0)], sigma=2.0, stride=1)
    heatmaps = np.stack([np.rint(heat * 255).astype(np.uint8)] * 2)
    return PatchSet(images, heatmaps, "detector", augmented=True, seed=0)


def test_step_timing_trains_the_layout_it_names(bench: ModuleType, patches: PatchSet) -> None:
    torch.manual_seed(0)
    plain, stem, wider = (
        bench.time_steps(patches, layout, torch.device("cpu"), batch=2, steps=1, amp=False, warmup=1)
        for layout in ("channels 16 32 64", "stem of 8", "channels 32 64 128")
    )
    assert wider.parameters == count_parameters(CandidateDetector())  # the shipped layout
    assert plain.parameters < stem.parameters < wider.parameters  # the stem, then the channels, are there
    assert stem.layout == "stem of 8" and stem.batch == 2 and stem.peak_gpu_mb is None
    assert stem.seconds_per_step > 0
    assert stem.epoch_minutes(120) == pytest.approx(120 / stem.cubes_per_second / 60)
    assert plain.precision == "float32"


def test_step_timing_names_the_precision_it_trained_in(bench: ModuleType, patches: PatchSet) -> None:
    cpu = torch.device("cpu")
    timing = bench.time_steps(patches, "channels 16 32 64", cpu, batch=2, steps=1, amp=True, warmup=1)
    assert timing.precision == ("bfloat16" if native_bfloat16(cpu) else "float32")


def test_augmentation_rate_counts_cubes(bench: ModuleType, patches: PatchSet) -> None:
    assert bench.augmented_cubes_per_second(patches, count=3) > 0
