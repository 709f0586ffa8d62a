"""The detector's pretraining stage on its own, from scratch: trained on the synthetic training cases
and judged, epoch after epoch, by its candidates' CPM on the synthetic validation scans.

It needs no LIDC background, only the code, so a lent GPU machine (which gets the repository and
nothing beside it) can run it: `bash benchmarks/device_check.sh pretrain`. Fine-tuning with the
insertions into the LIDC scans then goes on where the data is. Why a detector from scratch, of the
shipped layout (twice 0.7.0's channels), trained longer: docs/pipeline.md, "What changed in 0.8.0".

    python -m models.pretraining --minutes 6 --out var/pretraining
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from models.datasets import build_shards, default_workers, load_shards
from models.detector_validation import candidate_judge
from models.networks import CandidateDetector, DetectorConfig
from models.training import TrainResult
from models.training_runs import MODEL_VERSION, RECIPES, Budget, Stage, data_record, train_network


def pretrain_detector(
    data_dir: Path,
    budget: Budget,
    *,
    stem_channels: int,
    channels: tuple[int, int, int],
    workers: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> TrainResult:
    """`budget.pretrain_epochs` epochs (fewer when `budget.deadline` comes first) of a detector with a
    full-resolution stem of `stem_channels` and `channels` at strides 2, 4 and 8 (0 and
    `DetectorConfig.channels`: the shipped layout); its run under data_dir/runs."""
    shard_dir = data_dir / "shards"
    train_paths = build_shards("train", shard_dir, kind="synthetic", workers=workers, progress=progress)
    validation_paths = build_shards(
        "validation", shard_dir, kind="synthetic", workers=workers, progress=progress
    )
    judge = candidate_judge("validation", progress, workers, kind="synthetic")
    config = DetectorConfig(channels=channels, full_resolution_channels=stem_channels)
    recipe = replace(RECIPES["detector"], make=lambda: CandidateDetector(config))
    stage = Stage("synthetic", load_shards(train_paths), budget.pretrain_epochs, budget.lr)
    progress(
        f"detector of channels {channels} with a stem of {stem_channels}: "
        f"{stage.epochs} epochs on the synthetic cases"
    )
    [(_, result)] = train_network(
        recipe,
        [stage],
        load_shards(validation_paths),
        data_dir / "runs",
        budget,
        metadata={"version": MODEL_VERSION, "data": data_record("synthetic"), "pretraining_only": True},
        model_metric=judge,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("var/pretraining"), help="shards and the run")
    parser.add_argument("--stem-channels", type=int, default=0, help="0: no full-resolution stem")
    parser.add_argument(
        "--channels",
        type=int,
        nargs=3,
        default=list(DetectorConfig().channels),
        metavar=("S2", "S4", "S8"),
        help="the detector's channels at strides 2, 4 and 8 (default: the shipped layout; 0.7.0: 16 32 64)",
    )
    parser.add_argument("--epochs", type=int, default=100, help="at most this many")
    parser.add_argument("--minutes", type=float, default=None, help="start no epoch that would end later")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=Budget.lr)
    parser.add_argument("--patience", type=int, default=Budget.patience)
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes building cases")
    parser.add_argument(
        "--loader-workers", type=int, default=0, help="processes augmenting batches while it trains"
    )
    args = parser.parse_args()
    if (
        args.stem_channels < 0
        or min(args.channels) < 1
        or args.epochs < 1
        or args.batch < 1
        or args.workers < 1
        or args.loader_workers < 0
    ):
        parser.error(
            "--stem-channels and --loader-workers must be at least 0; --channels, --epochs, --batch "
            "and --workers at least 1"
        )
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {message}", flush=True)

    budget = Budget(
        pretrain_epochs=args.epochs,
        finetune_epochs=0,
        batch_size=args.batch,
        lr=args.lr,
        patience=args.patience,
        loader_workers=args.loader_workers,
        # The clock starts now: building the cases counts against the minutes too.
        deadline=None if args.minutes is None else started + 60 * args.minutes,
    )
    result = pretrain_detector(
        args.out,
        budget,
        stem_channels=args.stem_channels,
        channels=tuple(args.channels),
        workers=args.workers,
        progress=progress,
    )
    summary = {
        "best_epoch": result.best_epoch,
        "best_candidates_cpm": round(result.best_metric, 4),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "best": str(result.best_path),
        "log": str(result.log_path),
        "curves": str(result.curves_path),
        "seconds": round(time.monotonic() - started, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
