"""Evaluation of a nodule detector and segmenter as the field does it: LUNA16 matching and FROC.

Matching, per scan (``match_scan``), by the rules of the LUNA16 evaluation script:

- a detection *hits* a target when its centre lies strictly within the target's hit radius of the
  target's centre. The hit radius is half the target's mean diameter (LUNA16), raised to
  ``MatchRules.min_hit_radius_mm`` when that is larger (default 0: LUNA16 exactly). A floor keeps a
  detector's centre offset of a millimetre or two on a 3 mm nodule from counting as a miss and a
  false positive at once; report it when you use one. A target without a size (mean diameter 0)
  gets the point-mark radius below;
- each target counts once, with the highest-probability detection that hits it (of equal
  probabilities, the nearest). The other detections on a hit target are duplicates: neither hits
  nor false positives. A detection inside two targets counts for both (LUNA16 does the same);
- a detection that hits no target but lies within an ignore mark's radius is *ignored*: neither hit
  nor false positive. The radius of a sized mark is half its diameter, with the same floor as
  targets (a detection that would hit such a target must not become a false positive because the
  readers did not agree that it is one). A point mark (diameter 0: a small nodule or a non-nodule in
  LIDC) gets ``MatchRules.point_mark_radius_mm``, default 5 mm: LUNA16 gives its unsized excluded
  annotations (diameter -1) a diameter of 10 mm;
- every other detection is a false positive.

FROC (``froc_curve``): the probability threshold sweeps every distinct probability; a detection
counts at threshold t when its probability is at least t; a target is found when its best
detection counts. Sensitivity (found targets / all targets) is plotted against false positives
per scan. The sensitivity at an FP rate x is the highest sensitivity of any threshold whose FP rate
is at most x: the lowest such threshold, since sensitivity only grows as the threshold falls. This
is what LUNA16's ``np.interp`` on its step-shaped ROC curve reads off (its curve is flat between
thresholds that add false positives only), and beyond the last threshold it keeps the final
sensitivity, as ``np.interp`` does. The competition performance metric (CPM) is the mean of the
sensitivities at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan.

Groups: every metric is given for all targets, per nodule type and per size bucket of the target's
mean diameter. A false positive belongs to no target, so every group counts the false positives of
all scans; detections on targets outside a group are neither hits nor false positives for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
from scipy import ndimage

from models.ground_truth import LABELS_NAME, IgnoreMark, read_ground_truth, read_labels
from models.measurements import BoxMask

if TYPE_CHECKING:
    from models.lidc import LidcCase, Nodule

Point = tuple[float, float, float]
FloatArray = npt.NDArray[np.float64]

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_FP_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")
NODULE_TYPES = ("solid", "part-solid", "ground-glass", "calcified")
ALL = "all"
# (name, low, high): low <= mean diameter < high. The first four are the reported buckets; the
# last two appear only when a target falls outside them, so that the bucket counts add up.
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("3-6 mm", 3.0, 6.0),
    ("6-10 mm", 6.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    ("20-30 mm", 20.0, 30.0),
    (">= 6 mm", 6.0, math.inf),
    ("< 3 mm", 0.0, 3.0),
    (">= 30 mm", 30.0, math.inf),
)
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------------------------
# Inputs


class DetectionLike(Protocol):
    """What the evaluation needs of a detection (``models.findings.Finding`` is one). Read when
    present: ``mask`` (BoxMask on the scan's grid), ``volume_mm3``, ``mean_diameter_mm`` and
    ``long_axis_mm``, for the segmentation metrics."""

    @property
    def centre_mm(self) -> Sequence[float]: ...

    @property
    def probability(self) -> float: ...


@dataclass(frozen=True, eq=False)
class Detection:
    """A plain detection, for detectors that report no Finding and for tests."""

    centre_mm: Point
    probability: float
    mask: BoxMask | None = field(default=None, repr=False)
    volume_mm3: float | None = None
    mean_diameter_mm: float | None = None
    long_axis_mm: float | None = None


@dataclass(frozen=True, eq=False)
class Target:
    """A nodule the detector must find. ``mask`` is on the scan's grid, when known."""

    label: int
    centre_mm: Point
    mean_diameter_mm: float
    volume_mm3: float | None
    nodule_type: str
    mask: BoxMask | None = field(default=None, repr=False)
    long_axis_mm: float | None = None


@dataclass(frozen=True, eq=False)
class ScanTruth:
    case_id: str
    targets: tuple[Target, ...]
    ignore: tuple[IgnoreMark, ...] = ()

    @classmethod
    def from_case_dir(cls, case_dir: str | Path) -> ScanTruth:
        """A case written by ``models.ground_truth.write_ground_truth``: its nodules are the
        targets (masks from the label map, when there is one), its ignore list the ignore marks."""
        case_dir = Path(case_dir)
        document = read_ground_truth(case_dir)
        labels_file = case_dir / document.get("labels_file", LABELS_NAME)
        labels = read_labels(case_dir) if labels_file.is_file() else None
        boxes = ndimage.find_objects(labels) if labels is not None else []
        targets = tuple(_target_from_record(record, labels, boxes) for record in document["nodules"])
        ignore = tuple(_ignore_mark_from_record(record) for record in document.get("ignore", []))
        return cls(case_id=case_dir.name, targets=targets, ignore=ignore)

    @classmethod
    def from_lidc(cls, case: LidcCase, min_readers: int = 3, case_id: str | None = None) -> ScanTruth:
        """LUNA16 truth of an LIDC scan: nodules of 3 mm or more outlined by ``min_readers`` readers
        are the targets (numbered from 1, with their consensus mask); every other reader mark is
        an ignore mark."""
        targets = tuple(
            _target_from_nodule(label, nodule)
            for label, nodule in enumerate(case.targets(min_readers), start=1)
        )
        return cls(
            case_id=case_id or _lidc_case_id(case),
            targets=targets,
            ignore=tuple(case.ignore_marks(min_readers)),
        )


def _target_from_record(
    record: dict[str, Any],
    labels: npt.NDArray[np.uint8] | None,
    boxes: Sequence[tuple[slice, ...] | None],
) -> Target:
    label = int(record["label"])
    box = boxes[label - 1] if 0 < label <= len(boxes) else None
    mask = None
    if labels is not None and box is not None:
        mask = BoxMask.from_full(labels[box] == label, [int(s.start) for s in box])
    return Target(
        label=label,
        centre_mm=_point(record["centre_mm"]),
        mean_diameter_mm=float(record["mean_diameter_mm"]),
        volume_mm3=float(record["volume_mm3"]),
        nodule_type=str(record["type"]),
        mask=mask,
        long_axis_mm=float(record["long_axis_mm"]),
    )


def _ignore_mark_from_record(record: dict[str, Any]) -> IgnoreMark:
    return IgnoreMark(
        centre_mm=_point(record["centre_mm"]),
        kind=str(record["kind"]),
        diameter_mm=float(record["diameter_mm"]),
        reader_id=record.get("reader_id"),
    )


def _target_from_nodule(label: int, nodule: Nodule) -> Target:
    return Target(
        label=label,
        centre_mm=_point(nodule.centre_xyz),
        mean_diameter_mm=nodule.mean_diameter_mm,
        volume_mm3=nodule.volume_mm3,
        nodule_type=lidc_nodule_type(nodule),
        mask=nodule.consensus if nodule.consensus.voxel_count else None,
        long_axis_mm=nodule.long_axis_mm,
    )


def lidc_nodule_type(nodule: Nodule) -> str:
    """Type from the readers' ratings (median over the outlining readers): calcified when at least
    half rated a calcification pattern (1-5; 6 is absent); else by texture, 1-2 ground-glass,
    3 part-solid, 4-5 solid; "unknown" without ratings."""
    ratings = [m.mark.characteristics for m in nodule.outlines if m.mark.characteristics is not None]
    calcification = [r.calcification for r in ratings if r.calcification is not None]
    texture = [r.texture for r in ratings if r.texture is not None]
    if calcification and np.median(calcification) < 6:
        return "calcified"
    if not texture:
        return "unknown"
    median = float(np.median(texture))
    if median < 2.5:
        return "ground-glass"
    return "part-solid" if median < 3.5 else "solid"


def _lidc_case_id(case: LidcCase) -> str:
    parts = case.xml_path.parts if case.xml_path is not None else ()
    named = [p for p in parts if p.startswith("LIDC-IDRI-")]
    return named[-1] if named else case.annotation.series_instance_uid or "LIDC"


def _point(values: Iterable[float]) -> Point:
    x, y, z = (float(v) for v in values)
    return x, y, z


# ---------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MatchRules:
    """Radii of the matching rules, in mm (see the module docstring). The defaults are LUNA16's."""

    min_hit_radius_mm: float = 0.0
    point_mark_radius_mm: float = 5.0


LUNA16_RULES = MatchRules()
# A candidate is where the classifier and the segmenter look, and the finding's centre is the mask's
# centroid: a candidate within 3 mm of a small nodule's centre finds it (the classifier is trained on
# centres jittered by up to 2 mm), though the nodule's own radius is smaller.
CANDIDATE_RULES = MatchRules(min_hit_radius_mm=3.0)


def hit_radius_mm(target: Target, rules: MatchRules = LUNA16_RULES) -> float:
    if target.mean_diameter_mm <= 0:
        return max(rules.point_mark_radius_mm, rules.min_hit_radius_mm)
    return max(target.mean_diameter_mm / 2, rules.min_hit_radius_mm)


def ignore_radius_mm(mark: IgnoreMark, rules: MatchRules = LUNA16_RULES) -> float:
    if mark.diameter_mm <= 0:
        return rules.point_mark_radius_mm
    return max(mark.diameter_mm / 2, rules.min_hit_radius_mm)


class Outcome(StrEnum):
    HIT = "hit"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    FALSE_POSITIVE = "false positive"


@dataclass(frozen=True, eq=False)
class DetectionOutcome:
    """What one detection counts as. ``target_labels``: for a hit, the targets it is the best
    detection of; for a duplicate, the targets it lies in. ``distance_mm``: to the nearest of them,
    or to ``ignore_mark``."""

    index: int
    centre_mm: Point
    probability: float
    outcome: Outcome
    target_labels: tuple[int, ...] = ()
    ignore_mark: IgnoreMark | None = None
    distance_mm: float | None = None

    def describe(self) -> str:
        targets = ", ".join(str(label) for label in self.target_labels)
        distance = f" ({self.distance_mm:.1f} mm from its centre)" if self.distance_mm is not None else ""
        if self.outcome is Outcome.HIT:
            return f"hit target {targets}{distance}"
        if self.outcome is Outcome.DUPLICATE:
            return f"duplicate on target {targets}: not counted"
        if self.outcome is Outcome.IGNORED and self.ignore_mark is not None:
            reader = f", reader {self.ignore_mark.reader_id}" if self.ignore_mark.reader_id else ""
            return f"ignore mark of kind {self.ignore_mark.kind}{reader}{distance}: not counted"
        return "false positive"


@dataclass(frozen=True, eq=False)
class TargetMatch:
    """A target and its best detection; ``probability`` is -inf for a missed target."""

    target: Target
    detection_index: int | None
    probability: float
    distance_mm: float | None

    def found_at(self, threshold: float) -> bool:
        return self.detection_index is not None and self.probability >= threshold


@dataclass(frozen=True, eq=False)
class ScanMatch:
    truth: ScanTruth
    detections: tuple[DetectionLike, ...]
    targets: tuple[TargetMatch, ...]
    outcomes: tuple[DetectionOutcome, ...]

    def target_scores(self, keep: Callable[[Target], bool] = lambda _: True) -> FloatArray:
        return np.array([m.probability for m in self.targets if keep(m.target)], dtype=np.float64)

    def false_positive_scores(self) -> FloatArray:
        scores = [o.probability for o in self.outcomes if o.outcome is Outcome.FALSE_POSITIVE]
        return np.array(scores, dtype=np.float64)


def _distances(a: FloatArray, b: FloatArray) -> FloatArray:
    return np.linalg.norm(a.reshape(-1, 1, 3) - b.reshape(1, -1, 3), axis=-1).reshape(len(a), len(b))


def match_scan(
    truth: ScanTruth, detections: Iterable[DetectionLike], rules: MatchRules = LUNA16_RULES
) -> ScanMatch:
    """Each detection's outcome and each target's best detection, by the LUNA16 rules."""
    detections = tuple(detections)
    centres = np.array([_point(d.centre_mm) for d in detections], dtype=np.float64).reshape(-1, 3)
    probabilities = np.array([float(d.probability) for d in detections], dtype=np.float64)
    target_centres = np.array([t.centre_mm for t in truth.targets], dtype=np.float64).reshape(-1, 3)
    to_targets = _distances(centres, target_centres)
    inside = to_targets < np.array([hit_radius_mm(t, rules) for t in truth.targets])
    target_matches = tuple(
        _best_detection(target, inside[:, j], probabilities, to_targets[:, j])
        for j, target in enumerate(truth.targets)
    )
    mark_centres = np.array([m.centre_mm for m in truth.ignore], dtype=np.float64).reshape(-1, 3)
    to_marks = _distances(centres, mark_centres)
    in_mark = to_marks < np.array([ignore_radius_mm(m, rules) for m in truth.ignore])
    outcomes = tuple(
        _outcome(i, detections[i], truth, target_matches, inside[i], to_targets[i], in_mark[i], to_marks[i])
        for i in range(len(detections))
    )
    return ScanMatch(truth=truth, detections=detections, targets=target_matches, outcomes=outcomes)


def _best_detection(
    target: Target, hits: npt.NDArray[np.bool_], probabilities: FloatArray, distances: FloatArray
) -> TargetMatch:
    candidates = np.flatnonzero(hits)
    if candidates.size == 0:
        return TargetMatch(target=target, detection_index=None, probability=-math.inf, distance_mm=None)
    order = np.lexsort((distances[candidates], -probabilities[candidates]))
    best = int(candidates[order[0]])
    return TargetMatch(
        target=target,
        detection_index=best,
        probability=float(probabilities[best]),
        distance_mm=float(distances[best]),
    )


def _outcome(
    index: int,
    detection: DetectionLike,
    truth: ScanTruth,
    target_matches: Sequence[TargetMatch],
    inside: npt.NDArray[np.bool_],
    to_targets: FloatArray,
    in_mark: npt.NDArray[np.bool_],
    to_marks: FloatArray,
) -> DetectionOutcome:
    centre, probability = _point(detection.centre_mm), float(detection.probability)
    best_of = [j for j, m in enumerate(target_matches) if m.detection_index == index]
    lies_in = best_of or list(np.flatnonzero(inside))
    if lies_in:
        return DetectionOutcome(
            index,
            centre,
            probability,
            outcome=Outcome.HIT if best_of else Outcome.DUPLICATE,
            target_labels=tuple(truth.targets[j].label for j in lies_in),
            distance_mm=float(min(to_targets[j] for j in lies_in)),
        )
    marks = np.flatnonzero(in_mark)
    if marks.size:
        nearest = int(marks[np.argmin(to_marks[marks])])
        return DetectionOutcome(
            index,
            centre,
            probability,
            outcome=Outcome.IGNORED,
            ignore_mark=truth.ignore[nearest],
            distance_mm=float(to_marks[nearest]),
        )
    return DetectionOutcome(index, centre, probability, Outcome.FALSE_POSITIVE)


# ---------------------------------------------------------------------------------------------
# FROC


@dataclass(frozen=True, eq=False)
class FrocCurve:
    """One point per threshold, thresholds falling (the first is +inf: nothing counts)."""

    thresholds: FloatArray
    fp_per_scan: FloatArray
    sensitivity: FloatArray

    def sensitivity_at(self, fp_per_scan: float) -> float:
        """The highest sensitivity of a threshold with at most ``fp_per_scan`` false positives per
        scan (the module docstring says why)."""
        within = self.fp_per_scan <= fp_per_scan + 1e-9
        return float(self.sensitivity[within].max())


def froc_curve(target_scores: FloatArray, fp_scores: FloatArray, n_scans: int) -> FrocCurve:
    """``target_scores``: each target's best probability (-inf when missed); ``fp_scores``: the
    probabilities of the false positives of ``n_scans`` scans. Sensitivity is NaN without targets."""
    if n_scans <= 0:
        raise ValueError("a FROC needs at least one scan")
    finite = np.concatenate([target_scores[np.isfinite(target_scores)], fp_scores])
    thresholds = np.concatenate([[math.inf], np.unique(finite)[::-1]])
    found = _count_at_least(target_scores, thresholds)
    false_positives = _count_at_least(fp_scores, thresholds)
    sensitivity = found / len(target_scores) if len(target_scores) else np.full(len(thresholds), np.nan)
    return FrocCurve(thresholds, false_positives / n_scans, sensitivity)


def _count_at_least(scores: FloatArray, thresholds: FloatArray) -> FloatArray:
    ascending = np.sort(scores)
    return (len(ascending) - np.searchsorted(ascending, thresholds, side="left")).astype(np.float64)


@dataclass(frozen=True, eq=False)
class FrocResult:
    curve: FrocCurve
    sensitivities: tuple[float, ...]
    cpm: float
    # 95 % bootstrap intervals over scans, when asked for: one (low, high) per FP rate, and the CPM's.
    sensitivity_ci: tuple[tuple[float, float], ...] | None = None
    cpm_ci: tuple[float, float] | None = None


def froc_result(
    target_scores: Sequence[FloatArray],
    fp_scores: Sequence[FloatArray],
    *,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> FrocResult:
    """FROC, the sensitivities at ``FROC_FP_RATES`` and the CPM, from per-scan target and false
    positive scores; with ``n_bootstrap``, percentile intervals from resampling the scans."""
    curve = froc_curve(_concat(target_scores), _concat(fp_scores), len(target_scores))
    sensitivities = tuple(curve.sensitivity_at(x) for x in FROC_FP_RATES)
    result = FrocResult(curve, sensitivities, float(np.mean(sensitivities)))
    if n_bootstrap <= 0:
        return result
    samples = _bootstrap(target_scores, fp_scores, n_bootstrap, seed)
    low, high = (100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2)
    with np.errstate(all="ignore"):
        bounds = np.nanpercentile(samples, [low, high], axis=0) if np.isfinite(samples).any() else None
    if bounds is None:
        return result
    intervals = tuple((float(a), float(b)) for a, b in zip(bounds[0], bounds[1], strict=True))
    return FrocResult(curve, sensitivities, result.cpm, intervals[:-1], intervals[-1])


def _bootstrap(
    target_scores: Sequence[FloatArray], fp_scores: Sequence[FloatArray], n: int, seed: int
) -> FloatArray:
    """(n, 8): the seven sensitivities and the CPM of each resample; NaN for one without targets."""
    rng = np.random.default_rng(seed)
    count = len(target_scores)
    samples = np.full((n, len(FROC_FP_RATES) + 1), np.nan)
    for b in range(n):
        values = _resampled_froc(target_scores, fp_scores, rng.integers(0, count, size=count))
        if values is not None:
            samples[b] = values
    return samples


def _resampled_froc(
    target_scores: Sequence[FloatArray], fp_scores: Sequence[FloatArray], chosen: npt.NDArray[np.int_]
) -> list[float] | None:
    """The seven sensitivities and the CPM of the scans `chosen` (with repeats); None without targets."""
    targets = _concat([target_scores[i] for i in chosen])
    if len(targets) == 0:
        return None
    curve = froc_curve(targets, _concat([fp_scores[i] for i in chosen]), len(chosen))
    values = [curve.sensitivity_at(x) for x in FROC_FP_RATES]
    return [*values, float(np.mean(values))]


@dataclass(frozen=True)
class CpmDifference:
    """CPM of B minus CPM of A on the same scans, with its 95 % paired bootstrap interval."""

    a: float
    b: float
    ci: tuple[float, float]

    @property
    def difference(self) -> float:
        return self.b - self.a

    @property
    def tells_apart(self) -> bool:
        """Whether the interval leaves out 0: these scans can tell the two apart."""
        return self.ci[0] > 0 or self.ci[1] < 0


def cpm_difference(
    a: Sequence[ScanMatch], b: Sequence[ScanMatch], *, n_bootstrap: int = 2000, seed: int = 0
) -> CpmDifference:
    """How much better B's detections are than A's on the same scans, and how sure that is: both are
    resampled with the same scans each time, so what the scans share (their nodules, their look-alikes)
    cancels out of the difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired comparison needs the same scans on both sides ({len(a)} and {len(b)})")
    if [m.truth.case_id for m in a] != [m.truth.case_id for m in b]:
        raise ValueError("a paired comparison needs the same scans, in the same order, on both sides")
    sides = [
        ([m.target_scores() for m in side], [m.false_positive_scores() for m in side]) for side in (a, b)
    ]
    cpm_a, cpm_b = (froc_result(targets, fps).cpm for targets, fps in sides)
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(n_bootstrap):
        chosen = rng.integers(0, len(a), size=len(a))
        first, second = (_resampled_froc(targets, fps, chosen) for targets, fps in sides)
        if first is not None and second is not None:
            differences.append(second[-1] - first[-1])
    low, high = np.percentile(differences, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return CpmDifference(cpm_a, cpm_b, (float(low), float(high)))


def _concat(arrays: Sequence[FloatArray]) -> FloatArray:
    return np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays]) if arrays else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# Operating point and segmentation


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    fp_per_scan: float


def operating_point(
    target_scores: FloatArray, fp_scores: FloatArray, n_scans: int, threshold: float
) -> OperatingPoint:
    """Counts at ``threshold`` (a detection counts when its probability is at least that).
    Duplicates and ignored detections are neither true nor false positives. NaN where undefined."""
    tp = int(np.count_nonzero(target_scores >= threshold))
    fp = int(np.count_nonzero(fp_scores >= threshold))
    fn = len(target_scores) - tp
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / len(target_scores) if len(target_scores) else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return OperatingPoint(threshold, tp, fp, fn, precision, recall, f1, fp / n_scans)


def dice(a: BoxMask, b: BoxMask) -> float:
    """Dice coefficient of two masks on the same grid; NaN when both are empty."""
    total = a.voxel_count + b.voxel_count
    if total == 0:
        return math.nan
    a_low, b_low = np.asarray(a.offset), np.asarray(b.offset)
    low = np.maximum(a_low, b_low)
    high = np.minimum(a_low + a.array.shape, b_low + b.array.shape)
    if np.any(high <= low):
        return 0.0
    a_part = a.array[
        tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(low, high, a_low, strict=True))
    ]
    b_part = b.array[
        tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(low, high, b_low, strict=True))
    ]
    return 2 * int(np.count_nonzero(a_part & b_part)) / total


@dataclass(frozen=True)
class SegmentationRecord:
    """One found target against its best detection; None where either side lacks the quantity.
    Errors are predicted minus true; relative errors divide by the true value."""

    case_id: str
    target_label: int
    detection_index: int
    dice: float | None
    relative_volume_error: float | None
    diameter_error_mm: float | None
    relative_diameter_error: float | None
    long_axis_error_mm: float | None


def segmentation_record(
    case_id: str, target: Target, index: int, detection: DetectionLike
) -> SegmentationRecord:
    mask = getattr(detection, "mask", None)
    volume = _optional_float(getattr(detection, "volume_mm3", None))
    diameter = _optional_float(getattr(detection, "mean_diameter_mm", None))
    long_axis = _optional_float(getattr(detection, "long_axis_mm", None))
    overlap = dice(mask, target.mask) if mask is not None and target.mask is not None else math.nan
    return SegmentationRecord(
        case_id=case_id,
        target_label=target.label,
        detection_index=index,
        dice=None if math.isnan(overlap) else overlap,
        relative_volume_error=_relative(volume, target.volume_mm3),
        diameter_error_mm=None if diameter is None else diameter - target.mean_diameter_mm,
        relative_diameter_error=_relative(diameter, target.mean_diameter_mm),
        long_axis_error_mm=(
            None if long_axis is None or target.long_axis_mm is None else long_axis - target.long_axis_mm
        ),
    )


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _relative(predicted: float | None, true: float | None) -> float | None:
    if predicted is None or true is None or true <= 0:
        return None
    return (predicted - true) / true


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    median: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stats:
        kept = np.array([v for v in values if v is not None], dtype=np.float64)
        if kept.size == 0:
            return cls(0, math.nan, math.nan)
        return cls(int(kept.size), float(kept.mean()), float(np.median(kept)))


@dataclass(frozen=True)
class SegmentationSummary:
    found: int
    dice: Stats
    relative_volume_error: Stats
    diameter_error_mm: Stats
    relative_diameter_error: Stats
    long_axis_error_mm: Stats

    @classmethod
    def of(cls, records: Sequence[SegmentationRecord]) -> SegmentationSummary:
        return cls(
            found=len(records),
            dice=Stats.of(r.dice for r in records),
            relative_volume_error=Stats.of(r.relative_volume_error for r in records),
            diameter_error_mm=Stats.of(r.diameter_error_mm for r in records),
            relative_diameter_error=Stats.of(r.relative_diameter_error for r in records),
            long_axis_error_mm=Stats.of(r.long_axis_error_mm for r in records),
        )


def segmentation_records(
    matches: Iterable[ScanMatch], threshold: float, keep: Callable[[Target], bool] = lambda _: True
) -> list[SegmentationRecord]:
    """A record for every target found at ``threshold``, against its best detection."""
    return [
        segmentation_record(
            match.truth.case_id, m.target, m.detection_index, match.detections[m.detection_index]
        )
        for match in matches
        for m in match.targets
        if keep(m.target) and m.found_at(threshold) and m.detection_index is not None
    ]


# ---------------------------------------------------------------------------------------------
# Groups and the report


def size_buckets(mean_diameter_mm: float) -> tuple[str, ...]:
    return tuple(name for name, low, high in SIZE_BUCKETS if low <= mean_diameter_mm < high)


def target_groups(target: Target) -> tuple[str, ...]:
    return (ALL, target.nodule_type, *size_buckets(target.mean_diameter_mm))


def group_names(targets: Iterable[Target]) -> list[str]:
    """Every group with at least one target, in report order: all, types, size buckets."""
    present = {name for t in targets for name in target_groups(t)}
    types = [t for t in NODULE_TYPES if t in present]
    other_types = sorted(present - set(NODULE_TYPES) - {ALL} - {name for name, _, _ in SIZE_BUCKETS})
    sizes = [name for name, _, _ in SIZE_BUCKETS if name in present]
    return [ALL, *types, *other_types, *sizes]


@dataclass(frozen=True, eq=False)
class GroupReport:
    name: str
    targets: int
    froc: FrocResult
    operating_point: OperatingPoint
    segmentation: SegmentationSummary


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    scans: int
    threshold: float
    rules: MatchRules
    n_bootstrap: int
    groups: tuple[GroupReport, ...]
    matches: tuple[ScanMatch, ...] = field(repr=False, default=())

    def group(self, name: str) -> GroupReport:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no group {name!r}; the report has {[g.name for g in self.groups]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "scans": self.scans,
            "threshold": self.threshold,
            "rules": asdict(self.rules),
            "n_bootstrap": self.n_bootstrap,
            "fp_rates": list(FROC_FP_RATES),
            "groups": [_group_json(g) for g in self.groups],
        }

    def format_table(self) -> str:
        return "\n\n".join(
            [
                f"FROC over {self.scans} scans: sensitivity at false positives per scan",
                _froc_table(self.groups),
                f"Operating point: probability >= {self.threshold:g}",
                _operating_table(self.groups),
                "Segmentation of the targets found: mean / median (errors: predicted - true)",
                _segmentation_table(self.groups),
            ]
        )


def evaluate(
    scans: Iterable[tuple[ScanTruth, Iterable[DetectionLike]]],
    *,
    threshold: float = 0.5,
    rules: MatchRules = LUNA16_RULES,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> EvaluationReport:
    """Match every scan's detections and report every metric per group."""
    matches = tuple(match_scan(truth, detections, rules) for truth, detections in scans)
    return build_report(matches, threshold=threshold, rules=rules, n_bootstrap=n_bootstrap, seed=seed)


def build_report(
    matches: Sequence[ScanMatch],
    *,
    threshold: float = 0.5,
    rules: MatchRules = LUNA16_RULES,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> EvaluationReport:
    """The report of matched scans (``rules`` is recorded: the matching has already used it)."""
    fp_scores = [m.false_positive_scores() for m in matches]
    all_targets = [t.target for m in matches for t in m.targets]
    groups = []
    for name in group_names(all_targets):

        def keep(target: Target, name: str = name) -> bool:
            return name in target_groups(target)

        target_scores = [m.target_scores(keep) for m in matches]
        groups.append(
            GroupReport(
                name=name,
                targets=sum(len(s) for s in target_scores),
                froc=froc_result(target_scores, fp_scores, n_bootstrap=n_bootstrap, seed=seed),
                operating_point=operating_point(
                    _concat(target_scores), _concat(fp_scores), len(matches), threshold
                ),
                segmentation=SegmentationSummary.of(segmentation_records(matches, threshold, keep)),
            )
        )
    return EvaluationReport(len(matches), threshold, rules, n_bootstrap, tuple(groups), tuple(matches))


def _json_number(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _stats_json(stats: Stats) -> dict[str, Any]:
    return {"n": stats.n, "mean": _json_number(stats.mean), "median": _json_number(stats.median)}


def operating_point_json(point: OperatingPoint) -> dict[str, Any]:
    return {
        key: _json_number(value) if isinstance(value, float) else value
        for key, value in asdict(point).items()
    }


def _group_json(group: GroupReport) -> dict[str, Any]:
    froc, point, segmentation = group.froc, group.operating_point, group.segmentation
    curve = froc.curve
    return {
        "name": group.name,
        "targets": group.targets,
        "froc": {
            "sensitivities": [_json_number(s) for s in froc.sensitivities],
            "cpm": _json_number(froc.cpm),
            "sensitivity_ci": (
                [[_json_number(a), _json_number(b)] for a, b in froc.sensitivity_ci]
                if froc.sensitivity_ci
                else None
            ),
            "cpm_ci": [_json_number(v) for v in froc.cpm_ci] if froc.cpm_ci else None,
            "curve": {
                "thresholds": [_json_number(v, 6) for v in curve.thresholds],
                "fp_per_scan": [_json_number(v) for v in curve.fp_per_scan],
                "sensitivity": [_json_number(v) for v in curve.sensitivity],
            },
        },
        "operating_point": operating_point_json(point),
        "segmentation": {
            "found": segmentation.found,
            "dice": _stats_json(segmentation.dice),
            "relative_volume_error": _stats_json(segmentation.relative_volume_error),
            "diameter_error_mm": _stats_json(segmentation.diameter_error_mm),
            "relative_diameter_error": _stats_json(segmentation.relative_diameter_error),
            "long_axis_error_mm": _stats_json(segmentation.long_axis_error_mm),
        },
    }


# ---------------------------------------------------------------------------------------------
# Text


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """Aligned text columns. ``align`` has an "l" (left) or "r" (right) per column; by default the
    first column goes left and the others right."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[c]) for r in table) for c in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def _number(value: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _froc_table(groups: Sequence[GroupReport]) -> str:
    with_ci = any(g.froc.cpm_ci for g in groups)
    headers = ["group", "targets", *FROC_FP_LABELS, "CPM", *(["CPM 95% CI"] if with_ci else [])]
    rows = []
    for g in groups:
        ci = g.froc.cpm_ci
        interval = [f"[{_number(ci[0])}, {_number(ci[1])}]" if ci else "-"] if with_ci else []
        rows.append(
            [
                g.name,
                str(g.targets),
                *(_number(s) for s in g.froc.sensitivities),
                _number(g.froc.cpm),
                *interval,
            ]
        )
    return format_table(headers, rows)


def _operating_table(groups: Sequence[GroupReport]) -> str:
    headers = ["group", "targets", "TP", "FP", "FN", "precision", "recall", "F1", "FP/scan"]
    rows = [
        [
            g.name,
            str(g.targets),
            *(str(v) for v in (g.operating_point.tp, g.operating_point.fp, g.operating_point.fn)),
            *(
                _number(v)
                for v in (g.operating_point.precision, g.operating_point.recall, g.operating_point.f1)
            ),
            _number(g.operating_point.fp_per_scan, 2),
        ]
        for g in groups
    ]
    return format_table(headers, rows)


def _segmentation_table(groups: Sequence[GroupReport]) -> str:
    headers = [
        "group",
        "found",
        "Dice",
        "rel. volume error",
        "diameter error mm",
        "rel. diameter error",
        "long axis error mm",
    ]
    rows = []
    for g in groups:
        s = g.segmentation
        rows.append(
            [
                g.name,
                str(s.found),
                _mean_median(s.dice, 3),
                _mean_median(s.relative_volume_error, 3),
                _mean_median(s.diameter_error_mm, 2),
                _mean_median(s.relative_diameter_error, 3),
                _mean_median(s.long_axis_error_mm, 2),
            ]
        )
    return format_table(headers, rows)


def _mean_median(stats: Stats, digits: int) -> str:
    return "-" if stats.n == 0 else f"{_number(stats.mean, digits)} / {_number(stats.median, digits)}"


def detection_listing(match: ScanMatch) -> str:
    """Every detection of a scan, most probable first, with what it counts as; then the targets
    that no detection hit."""
    truth = match.truth
    counts = {o: sum(1 for d in match.outcomes if d.outcome is o) for o in Outcome}
    header = (
        f"{truth.case_id}: {len(truth.targets)} target(s), {len(truth.ignore)} ignore mark(s), "
        f"{len(match.outcomes)} detection(s): " + ", ".join(f"{n} {o.value}" for o, n in counts.items())
    )
    ordered = sorted(match.outcomes, key=lambda o: (-o.probability, o.index))
    rows = [[str(o.index), f"{o.probability:.3f}", _centre(o.centre_mm), o.describe()] for o in ordered]
    lines = [header, format_table(["#", "probability", "centre (mm)", "outcome"], rows, align="rrll")]
    missed = [m.target for m in match.targets if m.detection_index is None]
    lines += [
        f"missed: target {t.label} ({t.nodule_type}, {t.mean_diameter_mm:.1f} mm) at {_centre(t.centre_mm)}"
        for t in missed
    ]
    return "\n".join(lines)


def _centre(xyz: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in xyz) + ")"


# ---------------------------------------------------------------------------------------------
# Plot


def plot_froc(report: EvaluationReport, path: str | Path, groups: Sequence[str] | None = None) -> Path:
    """The FROC curve (log FP axis) of each named group (default: all targets), its sensitivities at
    the seven FP rates marked, the first group's CPM in the title. Writes a PNG."""
    names = list(groups) if groups else [ALL]
    reports = [report.group(name) for name in names]
    x_low, x_high = 2.0**-3.5, 2.0**3.5
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for group in reports:
        curve = group.froc.curve
        xs = np.append(np.clip(curve.fp_per_scan, x_low, x_high), x_high)
        ys = np.append(curve.sensitivity, curve.sensitivity[-1])
        (line,) = axes.step(
            xs, ys, where="post", label=f"{group.name} (n={group.targets}, CPM {group.froc.cpm:.3f})"
        )
        axes.plot(FROC_FP_RATES, group.froc.sensitivities, "o", color=line.get_color())
    axes.set_xscale("log", base=2)
    axes.set_xlim(x_low, x_high)
    axes.set_ylim(0.0, 1.02)
    axes.xaxis.set_major_locator(FixedLocator(FROC_FP_RATES))
    axes.xaxis.set_major_formatter(FixedFormatter(FROC_FP_LABELS))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("average false positives per scan")
    axes.set_ylabel("sensitivity")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    first = reports[0]
    axes.set_title(f"FROC, {report.scans} scans: CPM {first.froc.cpm:.3f} ({first.name})")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
