"""Benchmark: what training the candidate detector costs on this machine, to plan a run before it
starts (docs/pipeline.md, "What limits the CPM": the detector's capacity and how long it trains).

It prints, for the detector layout of 0.7.0 (16 32 64 channels), the same with a full-resolution stem
of 8 and 16 channels, and the shipped one of 0.8.0 (32 64 128, what `models.pretraining` trains by
default):
the seconds of one training step (forward, backward and Adam, on a batch of 64^3 cubes) in float32
and, where the device computes in bfloat16 natively (CUDA, or a CPU with AMX or AVX-512 BF16), with
the bfloat16 autocast that training then uses; the cubes a second that makes, and an epoch's minutes
for the recipe's number of cubes; and how many cubes a second one loader process augments, which says
how many processes keep the GPU fed. The cubes are a real shard of a synthetic case.

    .venv/bin/python benchmarks/bench_training.py [--device cuda] [--batch 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.networks import CandidateDetector, DetectorConfig, count_parameters, heatmap_loss, place
from models.synthetic.cases import synthesize_case
from models.training import (
    TrainConfig,
    choose_device,
    computes_in_bfloat16,
    native_bfloat16,
    seed_everything,
    train_step,
)
from models.training_data import Shard, shard_from_case
from models.training_runs import PatchSet

# The detector's training cubes in the shipped recipe: the shards of the 60 synthetic training cases
# and the 30 insertions hold 1,622 and 551 (counted 2026-12-06; docs/pipeline.md).
RECIPE_CUBES = 2173
NARROW = (16, 32, 64)  # the detector's channels up to 0.7.0, with and without a full-resolution stem
LAYOUTS = {
    "channels 16 32 64": DetectorConfig(channels=NARROW),
    "stem of 8": DetectorConfig(channels=NARROW, full_resolution_channels=8),
    "stem of 16": DetectorConfig(channels=NARROW, full_resolution_channels=16),
    "channels 32 64 128": DetectorConfig(),  # shipped since 0.8.0
}


@dataclass(frozen=True)
class StepTiming:
    layout: str
    precision: str
    parameters: int
    seconds_per_step: float
    batch: int
    peak_gpu_mb: float | None

    @property
    def cubes_per_second(self) -> float:
        return self.batch / self.seconds_per_step

    def epoch_minutes(self, cubes: int = RECIPE_CUBES) -> float:
        return cubes / self.cubes_per_second / 60


def sample_shard(seed: int = 7) -> Shard:
    return shard_from_case(synthesize_case(seed, 3, n_slices=120), np.random.default_rng(seed))


def augmented_cubes_per_second(patches: PatchSet, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        patches[index % len(patches)]
    return count / (time.perf_counter() - started)


def time_steps(
    patches: PatchSet,
    layout: str,
    device: torch.device,
    batch: int,
    steps: int,
    *,
    amp: bool,
    warmup: int = 3,
) -> StepTiming:
    """Seconds per training step of a fresh detector of `LAYOUTS[layout]` on one fixed batch (the
    loader left out), with training's bfloat16 autocast or in float32."""
    seed_everything(0)
    model = place(CandidateDetector(LAYOUTS[layout]), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    items = [patches[i % len(patches)] for i in range(batch)]
    inputs, targets = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
    config = TrainConfig(amp=amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step(model, inputs, targets, heatmap_loss, optimizer, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, inputs, targets, heatmap_loss, optimizer, config)  # .item() synchronises
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    precision = "bfloat16" if computes_in_bfloat16(device, config) else "float32"
    return StepTiming(layout, precision, count_parameters(model), seconds, batch, peak)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")
    device = choose_device(args.device)
    if device.type == "cuda":
        # As `models.training.train` runs by default.
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"detector training on {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    shard = sample_shard()
    patches = PatchSet(shard.detection_images, shard.detection_heatmaps, "detector", augmented=True, seed=0)
    rate = augmented_cubes_per_second(patches, count=2 * len(patches))
    print(f"augmentation: {rate:.1f} cubes/s in one loader process ({len(patches)} cubes of a case)")
    print(f"batches of {args.batch}; an epoch is {RECIPE_CUBES:,} cubes")
    precisions = (False, True) if native_bfloat16(device) else (False,)
    print(
        f"{'layout':<20}  {'precision':<9}  parameters  s/step  cubes/s  min/epoch"
        "  loader processes to keep up  peak GPU MB"
    )
    for layout in LAYOUTS:
        for amp in precisions:
            print_timing(time_steps(patches, layout, device, args.batch, args.steps, amp=amp), rate)


def print_timing(timing: StepTiming, rate: float) -> None:
    memory = f"{timing.peak_gpu_mb:.0f}" if timing.peak_gpu_mb is not None else "-"
    print(
        f"{timing.layout:<20}  {timing.precision:<9}  {timing.parameters:>10,}"
        f"  {timing.seconds_per_step:6.3f}  {timing.cubes_per_second:7.1f}  {timing.epoch_minutes():9.1f}"
        f"  {timing.cubes_per_second / rate:27.1f}  {memory:>11}"
    )


if __name__ == "__main__":
    main()
