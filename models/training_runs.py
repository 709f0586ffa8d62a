"""`cad-node train`: the three networks trained from the data layer's shards, with synthetic
pretraining then fine-tuning on insertions into real CT (the transfer-learning step), and the
comparison that says whether pretraining helps.

Stages, each a `models.training.train` run with its own folder of checkpoints, log and curves:
    detector:   synthetic -> synthetic + insertions   (metric: its candidates' CPM on the validation
                scans, `models.detector_validation`)
    classifier: synthetic -> insertions      (metric: the CPM behind the shipped detector on the
                validation scans, `models.classifier_validation`), both stages and the validation
                cubes with the shipped detector's own candidates on the synthetic cases
                (`models.hard_negatives`)
    segmenter:  synthetic -> insertions      (metric: mean Dice)
    and, for the comparison, each network trained on insertions alone from scratch.

With `from_shipped`, the first stage starts from the shipped network instead of from scratch (training
continued), and the shipped network's own validation metric is the one to beat: it stays shipped
unless a stage does better. With `start_from`, it starts from a checkpoint of another run (such as a
detector pretrained on a GPU, `models.pretraining`), and the shipped network is still the one to beat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import Dataset, get_worker_info

from models.augmentation import AugmentConfig, augment
from models.networks import (
    CandidateDetector,
    FalsePositiveClassifier,
    NoduleSegmenter,
    SegmenterConfig,
    bce_loss,
    dice_bce_loss,
    grow,
    heatmap_loss,
    load_model,
    save_model,
)
from models.preprocessing import normalise
from models.training import TrainConfig, TrainResult, plot_stages, train, validation_metric
from models.training_data import Shard

MODEL_VERSION = "0.10.0"


class PatchSet(Dataset[tuple[Tensor, Tensor]]):
    """Patches and their targets, normalised, augmented on the fly when `augmented`."""

    def __init__(
        self,
        images: npt.NDArray[np.int16],
        targets: npt.NDArray[np.generic],
        kind: str,
        *,
        augmented: bool,
        seed: int,
    ) -> None:
        self.images, self.targets, self.kind, self.augmented = images, targets, kind, augmented
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker_seed: int | None = None
        self.config = AugmentConfig(target_kind="heatmap" if kind == "detector" else "mask")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = normalise(self.images[index])
        if self.kind == "classifier":
            target: npt.NDArray[np.float32] = np.asarray([self.targets[index]], np.float32)
            if self.augmented:
                image, _ = augment(image, None, self._random(), self.config)
        else:
            dense = self.targets[index]
            dense = dense.astype(np.float32) / 255 if self.kind == "detector" else dense.astype(bool)
            if self.augmented:
                image, dense = augment(image, dense, self._random(), self.config)
            target = (
                _stride2_peaks(dense.astype(np.float32))
                if self.kind == "detector"
                else dense.astype(np.float32)
            )
            target = target[None]
        return torch.from_numpy(np.ascontiguousarray(image[None], np.float32)), torch.from_numpy(
            np.ascontiguousarray(target, np.float32)
        )

    def _random(self) -> np.random.Generator:
        """The augmentation's random stream. A loader process gets a copy of this set as it was, so it
        draws a stream of its own from the seed PyTorch gives it (another each process and epoch):
        else every process would repeat the same augmentations, epoch after epoch."""
        worker = get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self.rng = np.random.default_rng([self.seed, worker.seed])
            self._worker_seed = worker.seed
        return self.rng


def _stride2_peaks(heatmap: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The full-resolution heatmap at the detector's stride 2 (maximum of each 2x2x2 block), with each
    nodule's peak set to exactly 1: the positive voxel of the focal loss."""
    shape = np.asarray(heatmap.shape) // 2
    blocks = heatmap[: shape[0] * 2, : shape[1] * 2, : shape[2] * 2].reshape(
        shape[0], 2, shape[1], 2, shape[2], 2
    )
    coarse = blocks.max(axis=(1, 3, 5))
    peaks = (coarse == ndimage.maximum_filter(coarse, size=3)) & (coarse >= 0.5)
    coarse[peaks] = 1.0
    return coarse


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Average precision of the detector's centre voxels: positives are the peaks (target 1), and the
    voxels next to a peak (0.3 < target < 1) are left out: near a centre is nearly right."""
    score = scores.flatten().float().numpy()
    target = targets.flatten().float().numpy()
    keep = (target >= 0.999) | (target <= 0.3)
    score, positive = score[keep], target[keep] >= 0.999
    if positive.sum() == 0:
        return 0.0
    order = np.argsort(-score, kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positive.sum())


def roc_auc(logits: Tensor, targets: Tensor) -> float:
    score, label = logits.flatten().numpy(), targets.flatten().numpy() > 0.5
    positives, negatives = score[label], score[~label]
    if len(positives) == 0 or len(negatives) == 0:
        return 0.0
    ranks = np.argsort(np.argsort(np.concatenate([positives, negatives]), kind="stable"), kind="stable") + 1
    return float(
        (ranks[: len(positives)].sum() - len(positives) * (len(positives) + 1) / 2)
        / (len(positives) * len(negatives))
    )


def mean_dice(logits: Tensor, targets: Tensor) -> float:
    predicted = (logits > 0).flatten(1).float()
    truth = (targets > 0.5).flatten(1).float()
    present = truth.sum(1) > 0
    dice = 2 * (predicted * truth).sum(1) / (predicted.sum(1) + truth.sum(1)).clamp(min=1)
    return float(dice[present].mean()) if present.any() else 0.0


@dataclass(frozen=True)
class NetworkRecipe:
    name: str
    make: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], float]
    metric_name: str
    images: str
    targets: str
    kind: str
    lr_scale: float = 1.0  # times the budget's learning rates
    # Fine-tunes on the synthetic cases and the insertions together: its validation set is 2/3
    # synthetic cases, and fine-tuning on the insertions alone lowered its metric (measured, 0.3.0).
    finetune_with_synthetic: bool = False
    # Trains on the shipped detector's candidates too, mined from the synthetic cases
    # (`models.hard_negatives`: classifier cubes of each, detector cubes of the strongest false ones),
    # in both stages and in validation (not in the from-scratch comparison).
    mined_candidates: bool = False
    # Its epochs are chosen on the whole validation scans, as the pipeline uses it, rather than by
    # `metric`, which is logged beside it: a function of the shipped weights' folder, the progress
    # callback, the number of processes and the detector's grids (`Pipeline.passes_mm`) that returns
    # the judge of a network.
    scan_judge: (
        Callable[[Path, Callable[[str], None], int, tuple[float, ...]], Callable[[nn.Module], float]] | None
    ) = None


def _candidates_judge(
    weights_dir: Path, progress: Callable[[str], None], workers: int, passes_mm: tuple[float, ...]
) -> Callable[[nn.Module], float]:
    """The detector's candidates' CPM (`models.detector_validation`), on its 1 mm grid."""
    from models.detector_validation import candidate_judge

    return candidate_judge("validation", progress, workers)


def _behind_detector_judge(
    weights_dir: Path, progress: Callable[[str], None], workers: int, passes_mm: tuple[float, ...]
) -> Callable[[nn.Module], float]:
    """The CPM of the shipped detector's candidates on the grids of `passes_mm`, scored as the pipeline
    scores them (`models.classifier_validation`)."""
    from models.classifier_validation import classifier_judge

    return classifier_judge(weights_dir, "validation", progress, workers, passes_mm)


RECIPES = {
    "detector": NetworkRecipe(
        "detector",
        CandidateDetector,
        heatmap_loss,
        lambda o, t: average_precision(torch.sigmoid(o), t),
        "candidates' CPM on the validation scans",
        "detection_images",
        "detection_heatmaps",
        "detector",
        finetune_with_synthetic=True,
        # Not on its own mined candidates: going on from the shipped 0.6.0 detector with them for 5
        # epochs gave validation candidates' CPM 0.776-0.802 against its 0.8075 (docs/pipeline.md).
        mined_candidates=False,
        scan_judge=_candidates_judge,
    ),
    "classifier": NetworkRecipe(
        "classifier",
        FalsePositiveClassifier,
        bce_loss,
        roc_auc,
        "CPM behind the detector, validation scans",
        "classifier_images",
        "classifier_labels",
        "classifier",
        mined_candidates=True,
        # Its cubes' ROC AUC passed the shipped classifier's by 0.0008 while the pipeline's validation
        # false positives doubled at the same CPM (docs/pipeline.md, item 12).
        scan_judge=_behind_detector_judge,
    ),
    "segmenter": NetworkRecipe(
        "segmenter",
        lambda: NoduleSegmenter(SegmenterConfig(channels=(8, 16, 32, 64))),
        dice_bce_loss,
        mean_dice,
        "mean Dice",
        "segmentation_images",
        "segmentation_masks",
        "segmenter",
        lr_scale=3.0,
    ),
}


@dataclass(frozen=True)
class Budget:
    """Epochs of each stage (0: the stage is left out), at most: with a `deadline`, as many as fit. The
    default epochs take a few hours of a 2-core CPU that computes in bfloat16 (AMX), several times that
    in float32 (docs/pipeline.md, "Training"); `cad-node train --minutes` fits a run to a time."""

    pretrain_epochs: int = 12
    finetune_epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    patience: int = 4
    loader_workers: int = 0  # processes that augment batches beside the training (a GPU wants many)
    # time.monotonic() by which the stages end, shared among them (`stage_deadline`); see
    # `TrainConfig.deadline`
    deadline: float | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    shard: Shard
    epochs: int
    lr: float  # before the recipe's scale


def _sets(
    recipe: NetworkRecipe, train_shard: Shard, val_shard: Shard, seed: int
) -> tuple[PatchSet, PatchSet]:
    def patches(shard: Shard, augmented: bool) -> PatchSet:
        images, targets = getattr(shard, recipe.images), getattr(shard, recipe.targets)
        return PatchSet(images, targets, recipe.kind, augmented=augmented, seed=seed)

    return patches(train_shard, True), patches(val_shard, False)


def train_network(
    recipe: NetworkRecipe,
    stages: list[Stage],
    validation: Shard,
    out_dir: Path,
    budget: Budget,
    *,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    start: nn.Module | None = None,
    model_metric: Callable[[nn.Module], float] | None = None,
) -> list[tuple[str, TrainResult]]:
    """Train through `stages` in order (e.g. synthetic then insertions), from `start` (else from
    scratch), each stage from the best weights of the one before; returns each stage's result.
    `model_metric`: see `models.training.train`."""
    model = start if start is not None else recipe.make()
    results = []
    for index, stage in enumerate(stages):
        train_set, val_set = _sets(recipe, stage.shard, validation, seed + index)
        deadline = stage_deadline(budget.deadline, stages[index:], recipe.images, time.monotonic())
        config = TrainConfig(
            epochs=stage.epochs,
            batch_size=budget.batch_size,
            lr=stage.lr * recipe.lr_scale,
            patience=budget.patience,
            seed=seed + index,
            num_workers=budget.loader_workers,
            deadline=deadline,
            metadata={"stage": stage.name, **(metadata or {})},
        )
        result = train(
            model,
            train_set,
            val_set,
            loss_fn=recipe.loss,
            metric_fn=recipe.metric,
            config=config,
            out_dir=out_dir / f"{recipe.name}-{stage.name}",
            model_metric=model_metric,
        )
        model, _ = load_model(result.best_path)
        results.append((stage.name, result))
    return results


def stage_deadline(deadline: float | None, stages: list[Stage], images: str, now: float) -> float | None:
    """The first of `stages`' share of the time left until `deadline`: in proportion to its epochs
    times its training cubes (`images`, the recipe's), which is what an epoch's time scales with for
    one network; a stage that ends early leaves its time to the next."""
    if deadline is None:
        return None
    work = [stage.epochs * len(getattr(stage.shard, images)) for stage in stages]
    return now + (deadline - now) * work[0] / max(sum(work), 1)


def checkpoint_start(recipe: NetworkRecipe, checkpoint: Path) -> nn.Module:
    """The network saved at `checkpoint`, to go on from: grown into the recipe's network where that has
    more layers, else as it was saved (a detector pretrained with a stem or with channels that the
    recipe's lacks keeps them)."""
    saved, _ = load_model(checkpoint)
    try:
        return grow(recipe.make(), saved)  # a TypeError where `saved` is another kind of network
    except ValueError:  # the checkpoint has layers or channels that the recipe's network lacks
        return saved


def shipped_start(
    recipe: NetworkRecipe,
    weights_dir: Path,
    validation: Shard,
    model_metric: Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped network to continue training from, grown into the recipe's network where that has
    more layers (`models.networks.grow`), with what it was and its validation metric
    (`model_metric`'s when given, else the recipe's on `validation`)."""
    shipped, metadata = load_model(weights_dir / f"{recipe.name}.pt")
    model = grow(recipe.make(), shipped)
    if model_metric is not None:
        metric = model_metric(model)
    else:
        _, val_set = _sets(recipe, validation, validation, seed=0)
        metric = validation_metric(
            model, val_set, loss_fn=recipe.loss, metric_fn=recipe.metric, config=TrainConfig(batch_size=8)
        )
    continued = {
        "trained_in": metadata.get("trained_in", metadata.get("version")),
        "stage": metadata.get("stage"),
        "continued_from": metadata.get("continued_from"),
        "validation_metric": round(metric, 4),
    }
    return model.train(), continued


def ship(model_path: Path, weights_dir: Path, name: str, metadata: dict[str, Any]) -> Path:
    """The trained network as shipped: float16 weights in the package, with its metadata."""
    model, saved = load_model(model_path)
    shipped = save_model(model, weights_dir / f"{name}.pt", {**saved, **metadata}, half=True)
    stamp_version(weights_dir, metadata["version"])
    return shipped


def stamp_version(weights_dir: Path, version: str) -> None:
    """The version names the set of networks (the DICOM outputs' algorithm version), so a network
    shipped alone makes the others part of the new version; each keeps the version it was trained in."""
    for path in sorted(weights_dir.glob("*.pt")):
        model, metadata = load_model(path)
        if metadata.get("version") != version:
            trained_in = metadata.get("trained_in", metadata.get("version"))
            save_model(model, path, {**metadata, "version": version, "trained_in": trained_in}, half=True)


def data_record(kind: str | None = None) -> dict[str, Any]:
    """What a run learns from, for its weights' metadata: the cases of the training and validation
    splits (of one `kind` only, when given: see `models.datasets.split_sources`) and each split's
    first seeds."""
    from models.datasets import SPLITS, split_sources

    train = split_sources("train", kind)
    kinds = ("synthetic", "insertion") if kind is None else (kind,)
    first_seed = {"synthetic": 0, "insertion": 2}  # where each kind's first seed sits in a SPLITS entry
    return {
        "synthetic_cases": sum(source.kind == "synthetic" for source in train),
        "insertion_cases": sum(source.kind == "insertion" for source in train),
        "validation_cases": len(split_sources("validation", kind)),
        "seeds": {
            split: {f"{k}_from": entry[first_seed[k]] for k in kinds} for split, entry in SPLITS.items()
        },
    }


Judge = Callable[[nn.Module], float]


def scan_judges(
    recipe: NetworkRecipe,
    weights_dir: Path,
    passes_mm: tuple[float, ...],
    shipped_passes_mm: tuple[float, ...],
    progress: Callable[[str], None],
    workers: int,
) -> tuple[Judge | None, Judge | None]:
    """The recipe's scan judge of the networks trained (behind the detector's `passes_mm`) and of the
    shipped one to beat: a classifier is judged behind the passes it was trained for, so where those
    differ the shipped classifier gets a judge of its own."""
    if recipe.scan_judge is None:
        return None, None
    judge = recipe.scan_judge(weights_dir, progress, workers, passes_mm)
    if recipe.name != "classifier" or passes_mm == shipped_passes_mm:
        return judge, judge
    return judge, recipe.scan_judge(weights_dir, progress, workers, shipped_passes_mm)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _mined(
    weights_dir: Path,
    shard_dir: Path,
    passes_mm: tuple[float, ...],
    workers: int,
    progress: Callable[[str], None],
) -> tuple[tuple[Shard, Shard], dict[str, Any]]:
    """The shipped detector's candidates (on the grids of `passes_mm`) on the synthetic training and
    validation cases, and what they hold."""
    from models.datasets import load_shards
    from models.hard_negatives import detector_tag, mine_shards, mining_sources

    detector_path = weights_dir / "detector.pt"
    grids = " and ".join(f"{s:g} mm" for s in passes_mm)
    progress(f"mining the candidates of {detector_path} on the synthetic cases, on its {grids} grids")
    train, validation = (
        load_shards(
            mine_shards(
                split,
                mining_sources(split),
                detector_path,
                shard_dir,
                passes_mm=passes_mm,
                workers=workers,
                progress=progress,
            )
        )
        for split in ("train", "validation")
    )
    counts = {
        split: {
            "positives": int(shard.classifier_labels.sum()),
            "negatives": int((shard.classifier_labels == 0).sum()),
            "detector_cubes": len(shard.detection_images),
        }
        for split, shard in (("train", train), ("validation", validation))
    }
    return (train, validation), {
        "detector": detector_tag(detector_path),
        "passes_mm": list(passes_mm),
        **counts,
    }


def train_all(
    data_dir: Path,
    networks: list[str],
    budget: Budget,
    *,
    compare_scratch: bool,
    ship_weights: bool,
    from_shipped: bool = False,
    start_from: Path | None = None,
    weights_dir: Path | None = None,
    passes_mm: tuple[float, ...] | None = None,
    workers: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Build (or reuse) the shards in `workers` processes, train each network, and ship the best
    weights with their metadata. `passes_mm`: the detector's grids that a classifier is trained and
    judged behind, and that its metadata names for the pipeline (default: the shipped classifier's)."""
    from models.datasets import build_shards, load_shards
    from models.pipeline import WEIGHTS_DIR, passes_of
    from models.preprocessing import DETECTION_SPACING_MM

    unknown = sorted(set(networks) - set(RECIPES))
    if unknown:
        raise ValueError(f"unknown networks {unknown}; choose from {sorted(RECIPES)}")
    # The classifier mines the shipped detector's candidates: a detector trained in this run goes first.
    networks = [name for name in RECIPES if name in networks]
    weights = weights_dir or WEIGHTS_DIR
    shipped_classifier = weights / "classifier.pt"
    shipped_passes = (
        passes_of(load_model(shipped_classifier)[1])
        if shipped_classifier.exists()
        else (DETECTION_SPACING_MM,)
    )
    passes = passes_mm or shipped_passes
    shard_dir = data_dir / "shards"
    train_paths = build_shards("train", shard_dir, workers=workers, progress=progress)
    validation = load_shards(build_shards("validation", shard_dir, workers=workers, progress=progress))
    synthetic = load_shards([p for p in train_paths if p.name.startswith("synthetic")])
    real = load_shards([p for p in train_paths if p.name.startswith("insertion")])
    data = data_record()
    summary: dict[str, Any] = {
        "version": MODEL_VERSION,
        "budget": budget.__dict__,
        "data": data,
        "networks": {},
    }
    for name in networks:
        recipe = RECIPES[name]
        entry: dict[str, Any] = {}
        sets = {"synthetic": synthetic, "real": real, "validation": validation}
        if recipe.mined_candidates:
            (mined_train, mined_validation), entry["mined"] = _mined(
                weights, shard_dir, passes, workers, progress
            )
            sets = {
                "synthetic": Shard.concatenate([synthetic, mined_train]),
                "real": Shard.concatenate([real, mined_train]),
                "validation": Shard.concatenate([validation, mined_validation]),
            }
        finetune = (
            Stage(
                "synthetic+real",
                Shard.concatenate([sets["synthetic"], real]),
                budget.finetune_epochs,
                budget.finetune_lr,
            )
            if recipe.finetune_with_synthetic
            else Stage("real", sets["real"], budget.finetune_epochs, budget.finetune_lr)
        )
        stages = [
            stage
            for stage in (Stage("synthetic", sets["synthetic"], budget.pretrain_epochs, budget.lr), finetune)
            if stage.epochs > 0
        ]
        judge, shipped_judge = None, None  # the previous network's let go of their scans first
        judge, shipped_judge = scan_judges(recipe, weights, passes, shipped_passes, progress, workers)
        if name == "classifier":
            entry["detection_passes_mm"] = list(passes)
        start, to_beat = None, None
        if from_shipped or start_from is not None:
            start, measured = shipped_start(recipe, weights, sets["validation"], shipped_judge)
            to_beat = measured["validation_metric"]
            entry["continued_from"] = measured
            if start_from is not None:
                start = checkpoint_start(recipe, start_from)
                entry["continued_from"] = {"checkpoint": str(start_from), "shipped": measured}
            progress(
                f"{name}: going on from {entry['continued_from']}; the shipped network's {to_beat} to beat"
            )
        progress(f"{name}: " + ", then ".join(f"{s.epochs} epochs on {s.name}" for s in stages))
        runs = train_network(
            recipe,
            stages,
            sets["validation"],
            data_dir / "runs",
            budget,
            metadata={"version": MODEL_VERSION, "data": data, **entry},
            start=start,
            model_metric=judge,
        )
        continued = len(runs)
        if compare_scratch:
            progress(f"{name}: the same network on insertions alone, from scratch")
            # Insertions alone, without the mined candidates (synthetic cases), on the same validation set.
            runs += train_network(
                recipe,
                [Stage("real-only", real, budget.pretrain_epochs or budget.finetune_epochs, budget.lr)],
                sets["validation"],
                data_dir / "runs",
                budget,
                model_metric=judge,
            )
        entry.update({stage: round(result.best_metric, 4) for stage, result in runs})
        entry["curves"] = str(
            plot_stages(
                [(stage, result.history) for stage, result in runs],
                data_dir / "runs" / f"{name}-stages.png",
                metric=recipe.metric_name,
                continued=continued,
                to_beat=to_beat,
            )
        )
        if compare_scratch:
            best_continued = max(entry[stage] for stage, _ in runs[:continued])
            entry["pretraining_helps"] = best_continued > entry["real-only"]
        # Every stage's best checkpoint competes on the validation metric: fine-tuning on insertions
        # alone can lower it (measured for the detector, whose validation set is 2/3 synthetic cases).
        best_stage, chosen = max(runs, key=lambda run: run[1].best_metric)
        entry["best_stage"] = best_stage
        entry["best_metric"] = round(chosen.best_metric, 4)
        if to_beat is not None and entry["best_metric"] <= to_beat:
            progress(f"{name}: no stage beat the shipped network on validation; it stays shipped")
        elif ship_weights:
            shipped = ship(
                chosen.best_path,
                weights,
                name,
                {
                    "version": MODEL_VERSION,
                    "data": data,
                    "stage": best_stage,
                    "validation_metric": chosen.best_metric,
                    "continued_from": entry.get("continued_from"),
                },
            )
            entry["weights"] = str(shipped)
        summary["networks"][name] = entry
        write_summary(data_dir / "summary.json", summary)
    return summary
