"""The three networks of the CAD pipeline, their losses, and the one checkpoint format they share.

All networks take a (B, 1, D, H, W) float tensor of CT resampled to 1 mm and normalised to 0..1
(HU window -1000..400) and return logits; the sigmoid of a logit is a probability.

- ``CandidateDetector``: a cheap fully convolutional encoder-decoder; it slides over the lungs and
  outputs a nodule-centre heatmap at stride 2 (see ``render_heatmap`` for the target convention).
- ``FalsePositiveClassifier``: a VGG-style classifier of a 32 mm cube around each candidate.
- ``NoduleSegmenter``: a small 3D U-Net that outlines an accepted nodule on its patch.

Normalisation is BatchNorm everywhere: in evaluation mode it is a fixed per-channel affine map, so
the detector's output in a sliding window does not depend on what else lies in the window (instance
normalisation would make it), and it costs nothing at inference.

A checkpoint (``save_model``/``load_model``) is one ``torch.save`` file of plain containers and
tensors, so that ``torch.load(..., weights_only=True)`` reads it: the class name, the config, the
state dict (optionally float16) and the caller's metadata (version, training data, metrics).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch idiom)
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CHECKPOINT_FORMAT = 1

ModelT = TypeVar("ModelT", bound=nn.Module)

# Foreground prior of the heatmap head's bias (RetinaNet): the first steps of training then do not
# drown in the loss of millions of confidently-wrong background voxels.
HEATMAP_PRIOR = 0.01


@dataclass(frozen=True)
class DetectorConfig:
    # At strides 2, 4 and 8; (16, 32, 64) up to 0.7.0, twice that since 0.8.0 (docs/pipeline.md).
    channels: tuple[int, int, int] = (32, 64, 128)
    prior: float = HEATMAP_PRIOR
    # Channels of a stem of two convolutions at full resolution whose features join the first
    # stride-2 ones; 0 (every detector up to 0.7.0) leaves it out.
    full_resolution_channels: int = 0


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, ...] = (16, 32, 64)  # one VGG block (2 convs + 2x2x2 max pool) each
    patch_size: int = 32
    fc_units: int = 128
    dropout: float = 0.5


@dataclass(frozen=True)
class SegmenterConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)  # the last is the bottleneck


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu(c_in, c_out), _conv_bn_relu(c_out, c_out))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(c_in, c_out, 2, stride=2, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_spatial(x: Tensor, multiple: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} takes (B, 1, D, H, W), got {tuple(x.shape)}")
    if any(s % multiple for s in x.shape[2:]):
        raise ValueError(f"{name} needs D, H and W multiples of {multiple}, got {tuple(x.shape[2:])}")


class CandidateDetector(nn.Module):
    """Nodule-centre heatmap logits (B, 1, D/2, H/2, W/2) of a (B, 1, D, H, W) CT at 1 mm.

    The first convolution has stride 2, so no layer runs at full resolution unless the config asks
    for a full-resolution stem; the decoder adds (rather than concatenates) its skips, which halves
    the cost of the two costliest layers.

    The stem's last layer (a 2x2x2 convolution of stride 2 onto the first stride-2 features) starts
    at zero, so a detector grown from one without a stem (``grow``) starts with the same outputs.
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        c1, c2, c3 = self.config.channels
        self.enc1 = nn.Sequential(_conv_bn_relu(1, c1, stride=2), _conv_bn_relu(c1, c1))
        self.enc2 = nn.Sequential(_conv_bn_relu(c1, c2, stride=2), _conv_bn_relu(c2, c2))
        self.enc3 = nn.Sequential(_conv_bn_relu(c2, c3, stride=2), _double_conv(c3, c3))
        self.up2, self.dec2 = _up(c3, c2), _conv_bn_relu(c2, c2)
        self.up1, self.dec1 = _up(c2, c1), _conv_bn_relu(c1, c1)
        self.head = nn.Conv3d(c1, 1, 1)
        c0 = self.config.full_resolution_channels
        self.stem = (
            nn.Sequential(_double_conv(1, c0), nn.Conv3d(c0, c1, 2, stride=2, bias=False)) if c0 else None
        )
        _init_weights(self)
        nn.init.normal_(self.head.weight, std=0.01)  # so that the output starts at the prior
        nn.init.constant_(self.head.bias, -math.log((1 - self.config.prior) / self.config.prior))
        if self.stem is not None:
            nn.init.zeros_(self.stem[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_spatial(x, 8, "CandidateDetector")
        s1 = self.enc1(x) if self.stem is None else self.enc1(x) + self.stem(x)
        s2 = self.enc2(s1)
        y = self.enc3(s2)
        y = self.dec2(self.up2(y) + s2)
        y = self.dec1(self.up1(y) + s1)
        return self.head(y)


class FalsePositiveClassifier(nn.Module):
    """Nodule logit (B, 1) of a (B, 1, S, S, S) patch centred on a candidate (S = config.patch_size).

    VGG-style: per block two 3x3x3 conv + BatchNorm + ReLU, then 2x2x2 max pooling; then
    FC-ReLU-dropout-FC. An adaptive max pool before the FC layers is the identity at the design
    patch size and lets other patch sizes through (e.g. for test-time context experiments).
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        cfg = self.config
        pooled = cfg.patch_size // 2 ** len(cfg.channels)
        if pooled < 1:
            raise ValueError(f"patch_size {cfg.patch_size} is too small for {len(cfg.channels)} poolings")
        blocks: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            blocks += [_double_conv(c_in, c), nn.MaxPool3d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveMaxPool3d(pooled))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * pooled**3, cfg.fc_units),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fc_units, 1),
        )
        _init_weights(self)
        nn.init.normal_(self.classifier[-1].weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        _check_spatial(x, 2 ** len(self.config.channels), "FalsePositiveClassifier")
        return self.classifier(self.features(x))

    @torch.inference_mode()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Nodule probabilities (B,), in evaluation mode (the caller's train/eval mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(x)).squeeze(1)
        finally:
            self.train(was_training)


class NoduleSegmenter(nn.Module):
    """Nodule-voxel logits (B, 1, D, H, W) of a (B, 1, D, H, W) patch; sizes multiples of 2**levels.

    A 3D U-Net: two conv-BN-ReLU per level, max pooling down, transposed conv up, skips concatenated.
    """

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        super().__init__()
        self.config = config or SegmenterConfig()
        ch = self.config.channels
        self.encoders = nn.ModuleList(
            _double_conv(c_in, c_out) for c_in, c_out in zip((1, *ch[:-2]), ch[:-1], strict=True)
        )
        self.bottleneck = _double_conv(ch[-2], ch[-1])
        self.ups = nn.ModuleList(_up(ch[i + 1], ch[i]) for i in reversed(range(len(ch) - 1)))
        self.decoders = nn.ModuleList(_double_conv(2 * ch[i], ch[i]) for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv3d(ch[0], 1, 1)
        _init_weights(self)
        # The head keeps PyTorch's default scale: with a near-zero head (as the detector has, for its
        # prior) a nodule of 0.3 % of the patch cannot pull the output up before BCE has pushed it
        # all down, and Dice stays 0 for hundreds of steps (measured).
        self.head.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        _check_spatial(x, 2 ** (len(self.config.channels) - 1), "NoduleSegmenter")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# --------------------------------------------------------------------------------------------------
# Targets and losses


def render_heatmap(
    shape: Sequence[int], centres: npt.ArrayLike, sigma: float = 2.0, stride: int = 2
) -> npt.NDArray[np.float32]:
    """Heatmap target (shape) at ``stride`` of an image, for nodule centres given in image voxels.

    Heatmap voxel ``i`` covers image voxels ``stride*i .. stride*i + stride-1``, so its centre is at
    image coordinate ``stride*i + (stride-1)/2`` (the convention under which flips of the image and of
    the heatmap agree, see ``models.augmentation``). Each centre gets a Gaussian of ``sigma`` image
    voxels (mm at 1 mm) and exactly 1.0 at its nearest heatmap voxel, which ``heatmap_loss`` counts
    as the positive; overlapping Gaussians combine by maximum.
    """
    heatmap = np.zeros(tuple(shape), dtype=np.float32)
    grids = np.meshgrid(*(stride * np.arange(n) + (stride - 1) / 2 for n in shape), indexing="ij")
    for centre in np.asarray(centres, dtype=np.float64).reshape(-1, 3):
        d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
        np.maximum(heatmap, np.exp(-d2 / (2 * sigma**2)).astype(np.float32), out=heatmap)
        peak = np.rint((centre - (stride - 1) / 2) / stride).astype(int)
        if np.all(peak >= 0) and np.all(peak < np.asarray(shape)):
            heatmap[tuple(peak)] = 1.0
    return heatmap


def heatmap_loss(
    logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0, peak: float = 0.999
) -> Tensor:
    """Penalty-reduced focal loss (CornerNet / CenterNet) of centre-heatmap logits and a Gaussian target.

    Why this and not class-balanced BCE: a 96^3 patch holds ~110 k heatmap voxels and one or two
    centres. Balancing by class frequency gives each centre a weight of ~1e5, so a handful of voxels
    drive noisy gradients, while all background counts alike, the ~99 % easy air and parenchyma as
    much as the vessels that make the detector's false positives. The focal factor ``p**alpha``
    silences the easy background and keeps the hard negatives; ``(1 - target)**beta`` stops punishing
    voxels next to a centre, which the Gaussian target says are nearly right. Normalising by the
    number of centres (at least 1) makes the loss independent of patch size and of empty patches.
    Positives are the voxels where target >= ``peak`` (``render_heatmap`` writes exactly 1.0 there).
    """
    logits, target = logits.float(), target.float().reshape(logits.shape)
    prob = torch.sigmoid(logits)
    pos = target >= peak
    pos_loss = (1 - prob) ** alpha * F.logsigmoid(logits)
    neg_loss = (1 - target) ** beta * prob**alpha * F.logsigmoid(-logits)
    n_pos = pos.sum().clamp(min=1)
    return -(torch.where(pos, pos_loss, neg_loss).sum()) / n_pos


def dice_bce_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0, smooth: float = 1.0) -> Tensor:
    """Soft Dice (per sample, averaged) plus voxel-mean BCE, for segmentation masks.

    Dice makes the small nodule count as much as the large background; BCE keeps gradients sane
    early on and on patches where the prediction is far off. ``smooth`` makes an empty prediction
    of an empty mask score Dice 1.
    """
    logits, target = logits.float(), target.float().reshape(logits.shape)
    prob = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (prob * flat).sum(1) + smooth) / (prob.sum(1) + flat.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + dice_weight * (1 - dice.mean())


def bce_loss(logits: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Plain BCE with logits for the classifier; target (B,) or (B, 1) of 0/1 labels."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(
        logits.float(), target.float().reshape(logits.shape), pos_weight=weight
    )


# --------------------------------------------------------------------------------------------------
# Checkpoints


MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "CandidateDetector": (CandidateDetector, DetectorConfig),
    "FalsePositiveClassifier": (FalsePositiveClassifier, ClassifierConfig),
    "NoduleSegmenter": (NoduleSegmenter, SegmenterConfig),
}


def _plain(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain containers, numbers, str, None and tensors (all a weights_only load reads)."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, str | Path):
        return str(value)  # also a str subclass such as torch.__version__, which pickles as its class
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        if not all(isinstance(k, str | int) for k in value):
            raise TypeError(f"{where}: dictionary keys must be str or int")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint")


def _config_from_dict(config_class: type, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {sorted(unknown)}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _to_half(tensor: Tensor) -> Tensor:
    if not tensor.is_floating_point():
        return tensor
    half = tensor.half()
    return half if bool(torch.isfinite(half).all()) else tensor  # out of float16 range: keep float32


def save_model(
    model: nn.Module, path: str | Path, metadata: Mapping[str, Any], *, half: bool = False
) -> Path:
    """Write ``model`` (one of ``MODEL_CLASSES``) with its config and ``metadata`` to ``path``.

    ``metadata`` should hold at least a ``version`` string, a description of the training data and
    the validation metrics; it may hold nested dicts, lists, numbers, str and tensors. ``half``
    stores floating-point weights as float16 (half the file; ``load_model`` restores float32).
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_model stores only {sorted(MODEL_CLASSES)}, got {name}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: _to_half(v) for k, v in state.items()}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "class": name,
        "config": _plain(asdict(model.config), "config"),
        "state_dict": state,
        "metadata": _plain(dict(metadata)),
        "torch_version": str(torch.__version__),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model (float32, evaluation mode, on ``map_location``) and metadata saved at ``path``."""
    checkpoint = torch.load(Path(path), map_location=map_location, weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {checkpoint.get('format')!r}")
    model_class, config_class = MODEL_CLASSES[checkpoint["class"]]
    model = model_class(_config_from_dict(config_class, checkpoint["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(state)
    model.to(map_location).eval()
    return model, checkpoint["metadata"]


def grow(model: ModelT, smaller: nn.Module) -> ModelT:
    """``model`` with the weights of ``smaller``, a network whose every weight ``model`` has in the same
    shape (such as a detector without the full-resolution stem); the layers only ``model`` has keep
    their initialisation."""
    if type(model) is not type(smaller):
        raise TypeError(f"cannot grow a {type(model).__name__} from a {type(smaller).__name__}")
    own = model.state_dict()
    weights = smaller.state_dict()
    if extra := [key for key in weights if key not in own]:
        raise ValueError(f"{type(model).__name__} has no {extra}")
    if reshaped := [key for key in weights if own[key].shape != weights[key].shape]:
        raise ValueError(f"{type(model).__name__} has {reshaped} in other shapes (other channels)")
    model.load_state_dict(weights, strict=False)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Inference


def place(model: ModelT, device: torch.device) -> ModelT:
    """`model` moved to `device`; on the CPU with its convolution weights channels-last, with which
    oneDNN's 3D convolutions take about a third less time in inference and a quarter less in
    training (the same outputs to float rounding; ``benchmarks/bench_training.py``, docs/pipeline.md).
    On CUDA as it is, since that has not been measured there."""
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    return model


def fuse_batchnorm(model: ModelT) -> ModelT:
    """An evaluation-mode copy of ``model`` with each BatchNorm folded into the conv before it.

    Same outputs (to float rounding), 10-25 % faster on CPU; for inference only (its state dict no
    longer matches the checkpoint format).
    """
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv3d | nn.ConvTranspose3d) and isinstance(norm, nn.BatchNorm3d):
                transpose = isinstance(conv, nn.ConvTranspose3d)
                seq[i] = fuse_conv_bn_eval(conv, norm, transpose=transpose)
                seq[i + 1] = nn.Identity()
    return fused


def _window_starts(n: int, window: int, margin: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, keep_to) of each window along an axis of length ``n`` (>= window, even).

    Windows overlap by ``2 * margin``; each keeps its output except ``margin`` voxels at a side that
    borders another window, where zero padding makes it differ from a pass over the whole volume.
    """
    step = window - 2 * margin
    starts = [*range(0, n - window, step), n - window]
    spans = []
    for k, start in enumerate(starts):
        keep_from = start if k == 0 else max(start + margin, spans[-1][2])
        keep_to = n if k == len(starts) - 1 else start + window - margin
        spans.append((start, keep_from, keep_to))
    return spans


@torch.inference_mode()
def predict_heatmap(
    detector: CandidateDetector,
    image: npt.NDArray[np.floating] | Tensor,
    window: int = 128,
    margin: int = 16,
    batch_size: int = 2,
) -> npt.NDArray[np.float32]:
    """Nodule-centre probabilities at stride 2, shape ceil(D/2, H/2, W/2), of a normalised (D, H, W) CT.

    Slides ``window``-sized cubes with ``margin`` voxels of overlap on each side over the volume
    (padded with 0 = air where it is smaller than a window or of odd size). Larger windows waste
    less on overlap: on 2 CPU cores 128^3 windows cover 25 M voxels about 1.5x faster than 96^3 ones.
    Batches of 2 or more windows keep PyTorch on its fast oneDNN convolutions, which it may skip for
    a single small input.
    """
    if window % 8 or margin % 2 or not 0 <= 2 * margin < window:
        raise ValueError("window must be a multiple of 8 and margin even and below window / 2")
    device = next(detector.parameters()).device
    volume = torch.as_tensor(image, dtype=torch.float32)
    shape = volume.shape
    padded = [max(window, n + n % 2) for n in shape]
    volume = F.pad(
        volume, [p for n, m in zip(reversed(shape), reversed(padded), strict=True) for p in (0, m - n)]
    )
    out = torch.zeros([n // 2 for n in padded])
    boxes = list(itertools.product(*(_window_starts(n, window, margin) for n in padded)))
    was_training = detector.training
    detector.eval()
    try:
        for first in range(0, len(boxes), batch_size):
            batch = boxes[first : first + batch_size]
            crops = [volume[tuple(slice(s, s + window) for s, _, _ in box)] for box in batch]
            probs = torch.sigmoid(detector(torch.stack(crops)[:, None].to(device))).cpu()
            for prob, box in zip(probs, batch, strict=True):
                dst = tuple(slice(a // 2, b // 2) for _, a, b in box)
                src = tuple(slice((a - s) // 2, (b - s) // 2) for s, a, b in box)
                out[dst] = prob[0][src]
    finally:
        detector.train(was_training)
    return out[tuple(slice(0, (n + 1) // 2) for n in shape)].numpy()
