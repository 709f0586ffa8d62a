"""A small, generic training loop for the project's networks.

``train(model, train_data, val_data, loss_fn=..., metric_fn=..., config=..., out_dir=...)`` runs Adam
for ``config.epochs`` epochs, validates after each, keeps the best checkpoint by the validation
metric (higher is better), stops early when it has not improved for ``config.patience`` epochs, and
writes to ``out_dir``:

- ``best.pt`` and ``last.pt``: ``models.networks.save_model`` checkpoints; ``last.pt`` (always
  float32) also holds the optimizer state and history under ``metadata["training_state"]``, from
  which ``resume`` goes on;
- ``log.jsonl``: one line per epoch (epoch, train_loss, val_loss, val_metric, lr, seconds);
- ``curves.png``: losses and the metric per epoch.

Data are torch Datasets of ``(input, target)`` pairs (or DataLoaders yielding such batches, used as
they are). Reproducibility: torch, numpy and random are seeded from ``(seed, epoch)`` at the start of
every epoch, and loader workers from their torch seed, so a resumed run repeats the epochs an
uninterrupted one would have run. A dataset that augments should draw from numpy's global generator
or from one seeded by ``torch.initial_seed()`` in its worker.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.networks import load_model, place, save_model

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]
Data = Dataset | DataLoader


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # cosine: from lr at epoch 1 to lr * min_lr_ratio at the last; a resumed run follows its own epochs
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05
    patience: int | None = 10  # epochs without improvement before stopping; None: never stop early
    min_delta: float = 0.0  # improvement smaller than this does not count
    seed: int = 0
    num_workers: int = 0  # loader processes that augment batches beside the training
    # time.monotonic() after which no epoch starts that would end past it, judged by the longest one so
    # far; the first epoch of a call always runs (so that there is a best checkpoint). The cosine then
    # ends on the last epoch that fits, not on `epochs`, so that a run cut short still anneals.
    deadline: float | None = None
    device: str | None = None  # None: CUDA when available, else CPU
    amp: bool = True  # bfloat16 autocast where the device computes in it natively (native_bfloat16)
    deterministic: bool = True  # cuDNN deterministic algorithms, no autotuning
    progress: bool | None = None  # tqdm bar per epoch; None: only when stderr is a terminal
    resume: bool = False  # go on from out_dir/last.pt when it exists
    half_checkpoints: bool = False  # float16 weights in best.pt
    metadata: dict[str, Any] = field(default_factory=dict)  # version, data description: into checkpoints


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    epochs_run: int  # epochs in the history, those before a resume included
    stopped_early: bool
    best_path: Path
    last_path: Path
    log_path: Path
    curves_path: Path
    history: list[dict[str, float]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed_everything(torch.initial_seed() % 2**32)


def choose_device(requested: str | None = None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loader(data: Data, config: TrainConfig, shuffle: bool, device: torch.device) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(
        data,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        worker_init_fn=_seed_worker,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _lr_at(epoch: int, last_epoch: int, config: TrainConfig) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    progress = (epoch - 1) / max(last_epoch - 1, 1)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def _epochs_that_fit(deadline: float, epoch_seconds: float) -> int:
    """Epochs of `epoch_seconds` that end before `deadline` (a time.monotonic()) if started now."""
    return max(int((deadline - time.monotonic()) // max(epoch_seconds, 1e-9)), 0)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: CUDA, or a CPU with AMX or AVX-512 BF16,
    where oneDNN's bfloat16 convolutions train the detector two to three times as fast as float32
    (``benchmarks/bench_training.py``). Elsewhere a CPU would emulate it, more slowly than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )


def computes_in_bfloat16(device: torch.device, config: TrainConfig) -> bool:
    """Whether training with `config` on `device` runs under bfloat16 autocast."""
    return config.amp and native_bfloat16(device)


def _autocast(device: torch.device, config: TrainConfig) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_in_bfloat16(device, config))


def train_step(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
) -> float:
    """One optimiser step on a batch, on the model's device; the batch's mean loss."""
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    with _autocast(device, config):
        loss = loss_fn(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    bar: tqdm,
) -> float:
    model.train()
    total, count = 0.0, 0
    for inputs, targets in loader:
        total += train_step(model, inputs, targets, loss_fn, optimizer, config) * len(inputs)
        count += len(inputs)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.no_grad()
def _validate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    metric_fn: MetricFn,
    device: torch.device,
    config: TrainConfig,
) -> tuple[float, float]:
    model.eval()
    outputs, targets, total = [], [], 0.0
    for inputs, target in loader:
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with _autocast(device, config):
            output = model(inputs)
        total += loss_fn(output, target).item() * len(inputs)
        outputs.append(output.float().cpu())
        targets.append(target.cpu())
    output_all, target_all = torch.cat(outputs), torch.cat(targets)
    return total / max(len(output_all), 1), float(metric_fn(output_all, target_all))


def validation_metric(
    model: nn.Module, val_data: Data, *, loss_fn: LossFn, metric_fn: MetricFn, config: TrainConfig
) -> float:
    """The validation metric of `model` as it is, as an epoch of `train` would measure it."""
    device = choose_device(config.device)
    place(model, device)
    loader = _loader(val_data, config, shuffle=False, device=device)
    return _validate(model, loader, loss_fn, metric_fn, device, config)[1]


def plot_curves(history: list[dict[str, float]], path: Path, best_epoch: int | None = None) -> Path:
    """Train and validation loss (left) and validation metric (right) per epoch, as a PNG."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    if all(h["train_loss"] > 0 and h["val_loss"] > 0 for h in history):
        ax_loss.set_yscale("log")  # losses fall by orders of magnitude
    ax_loss.legend()
    ax_metric.plot(epochs, [h["val_metric"] for h in history], "o-", color="C2")
    ax_metric.set(xlabel="epoch", ylabel="metric", title="Validation metric (higher is better)")
    if best_epoch is not None:
        for ax in (ax_loss, ax_metric):
            ax.axvline(best_epoch, color="grey", linestyle=":")
    fig.savefig(path, dpi=100)
    return path


def plot_stages(
    stages: list[tuple[str, list[dict[str, float]]]],
    path: Path,
    *,
    metric: str,
    continued: int,
    to_beat: float | None = None,
) -> Path:
    """Each stage's validation metric per epoch on one axis, as a PNG: the first `continued` stages
    follow each other (pretraining, then fine-tuning from its best weights), the rest start afresh.
    `to_beat`: the shipped network's metric, drawn as a line, when training went on from it."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    offset = 0
    for index, (stage, history) in enumerate(stages):
        start = offset if index < continued else 0
        epochs = [start + h["epoch"] for h in history]
        ax.plot(epochs, [h["val_metric"] for h in history], "o-", label=stage)
        if index < continued:
            offset += len(history)
    if to_beat is not None:
        ax.axhline(to_beat, color="grey", linestyle="--", label=f"shipped network ({to_beat:.4f})")
    ax.set(xlabel="epoch", ylabel=metric, title="Validation metric by training stage")
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


def _write_log(path: Path, history: Iterable[dict[str, float]]) -> None:
    path.write_text("".join(json.dumps(h) + "\n" for h in history))


def _best(history: list[dict[str, float]], min_delta: float) -> tuple[int, float, int]:
    """(best epoch, best metric, epochs since it) of a history, as the loop would have counted them."""
    best_epoch, best_metric, stale = 0, -math.inf, 0
    for h in history:
        if h["val_metric"] > best_metric + min_delta:  # NaN never improves
            best_epoch, best_metric, stale = int(h["epoch"]), h["val_metric"], 0
        else:
            stale += 1
    return best_epoch, best_metric, stale


def _resume(
    model: nn.Module, optimizer: torch.optim.Optimizer, last_path: Path, device: torch.device
) -> list[dict[str, float]]:
    saved, metadata = load_model(last_path, map_location=device)
    if type(saved) is not type(model):
        raise TypeError(f"{last_path} holds a {type(saved).__name__}, not a {type(model).__name__}")
    model.load_state_dict(saved.state_dict())
    state = metadata["training_state"]
    optimizer.load_state_dict(state["optimizer"])
    return list(state["history"])


def _epoch_bar(config: TrainConfig, loader: DataLoader, epoch: int) -> tqdm:
    disable = not sys.stderr.isatty() if config.progress is None else not config.progress
    total = len(loader) if isinstance(loader.dataset, Sized) else None
    return tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=disable)


def train(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    *,
    loss_fn: LossFn,
    metric_fn: MetricFn,
    config: TrainConfig,
    out_dir: str | Path,
    model_metric: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Train ``model`` in place and return where its best epoch, checkpoints and logs are.

    ``loss_fn(outputs, targets)`` is minimised; ``metric_fn(outputs, targets)`` gets all validation
    outputs (raw logits, float32, on the CPU) and targets concatenated, and returns higher-is-better.
    ``model_metric(model)``, when given, judges the whole model after each epoch (e.g. on whole
    scans) and is the validation metric instead; the patch metric is logged as ``patch_metric``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("best.pt", "last.pt", "log.jsonl", "curves.png")}
    device = choose_device(config.device)
    if config.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    seed_everything(config.seed)
    place(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_loader = _loader(train_data, config, shuffle=True, device=device)
    val_loader = _loader(val_data, config, shuffle=False, device=device)

    history: list[dict[str, float]] = []
    if config.resume and paths["last.pt"].exists():
        history = _resume(model, optimizer, paths["last.pt"], device)
    _write_log(paths["log.jsonl"], history)
    best_epoch, best_metric, stale = _best(history, config.min_delta)

    def patience_spent() -> bool:
        return config.patience is not None and stale >= config.patience

    longest_epoch, out_of_time, last_epoch = 0.0, False, config.epochs
    for epoch in range(len(history) + 1, config.epochs + 1):
        if patience_spent():
            break
        if (
            longest_epoch
            and config.deadline is not None
            and _epochs_that_fit(config.deadline, longest_epoch) == 0
        ):
            out_of_time = True
            break
        start = time.perf_counter()
        seed_everything(config.seed * 100_003 + epoch)  # also fixes the shuffle and worker seeds
        lr = _lr_at(epoch, last_epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _epoch_bar(config, train_loader, epoch) as bar:
            train_loss = _train_epoch(model, train_loader, loss_fn, optimizer, config, bar)
        val_loss, val_metric = _validate(model, val_loader, loss_fn, metric_fn, device, config)
        patch_metric = {}
        if model_metric is not None:
            patch_metric = {"patch_metric": val_metric}
            val_metric = model_metric(model)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_metric": val_metric,
            **patch_metric,
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 3),
        }
        longest_epoch = max(longest_epoch, record["seconds"])
        if config.deadline is not None:
            last_epoch = min(last_epoch, epoch + _epochs_that_fit(config.deadline, longest_epoch))
            record["planned_epochs"] = last_epoch
        history.append(record)
        with paths["log.jsonl"].open("a") as log:
            log.write(json.dumps(record) + "\n")

        best_epoch, best_metric, stale = _best(history, config.min_delta)
        metadata = {
            **config.metadata,
            "epoch": epoch,
            "val_loss": val_loss,
            "val_metric": val_metric,
            "train_config": {k: v for k, v in asdict(config).items() if k != "metadata"},
        }
        if best_epoch == epoch:
            save_model(model, paths["best.pt"], metadata, half=config.half_checkpoints)
        training_state = {"optimizer": optimizer.state_dict(), "history": history}
        save_model(model, paths["last.pt"], {**metadata, "training_state": training_state})
        plot_curves(history, paths["curves.png"], best_epoch or None)

    return TrainResult(
        best_epoch=best_epoch,
        best_metric=best_metric,
        epochs_run=len(history),
        stopped_early=(patience_spent() or out_of_time) and len(history) < config.epochs,
        best_path=paths["best.pt"],
        last_path=paths["last.pt"],
        log_path=paths["log.jsonl"],
        curves_path=paths["curves.png"],
        history=history,
    )
