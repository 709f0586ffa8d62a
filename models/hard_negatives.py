"""Hard negatives: what a trained detector proposes on the synthetic training and validation cases,
labelled against the cases' truth.

Random lung points and vessels (`models.training_data`) teach the classifier what lung looks like;
the detector's own false candidates are what it has to reject at run time. Candidates on a nodule
are kept too, as positives: they sit where the detector puts them, not where the truth is.

Detector cubes around its strongest false candidates are mined as well, for a detector recipe that
asks for them (`NetworkRecipe.mined_candidates`). A scan's CPM is decided by how a nodule ranks
against them, and random lung cubes rarely hold them: on 12 of its own training scans the shipped
detector's candidates' CPM is 0.692 (ground-glass nodules 0.274), below its 0.808 on the validation
scans, so it does not overfit its cubes; it ranks the scans' look-alikes above nodules. Going on from
it with these cubes did not beat it, though (docs/pipeline.md), and the shipped recipe leaves them out.

Only synthetic cases are mined. The insertion cases share the two LIDC backgrounds with the held-out
insertions and with the real test scans, so the detector's false candidates there are largely the
test scans' own: mining them would teach the classifier the answers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from models.datasets import CaseSource, in_processes, make_case, split_sources
from models.evaluation import LUNA16_RULES, ScanTruth, hit_radius_mm, ignore_radius_mm
from models.evaluation_runs import truth_of
from models.lungs import segment_lungs
from models.networks import CandidateDetector, load_model
from models.pipeline import propose
from models.preprocessing import DETECTION_SPACING_MM, resample
from models.synthetic.cases import Case
from models.training_data import (
    CLASSIFIER_PATCH,
    DETECTION_PATCH,
    Shard,
    crop,
    detection_target,
)

# The lowest detector threshold `cad-node calibrate` tries: every candidate the classifier may meet.
MINING_THRESHOLD = 0.05
# A candidate this far beyond a nodule's edge or nearer is neither: it shows part of the nodule.
EDGE_MARGIN_MM = 5.0
# The strongest false candidates of a scan that become detector cubes: the FROC's CPM reaches 8 false
# positives a scan.
DETECTOR_NEGATIVES_PER_SCAN = 8
# Mined shards of an older layout (classifier cubes only) live under another name.
MINED_LAYOUT = "v2"


def detector_tag(detector_path: Path) -> str:
    """Mined samples belong to one detector: its weights' digest names their folder (not the file's:
    calibrating or versioning rewrites the metadata, not the weights)."""
    model, _ = load_model(detector_path)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def mining_sources(split: str) -> list[CaseSource]:
    return split_sources(split, "synthetic")


def candidate_label(point_mm: npt.ArrayLike, truth: ScanTruth) -> int | None:
    """1 for a candidate that hits a nodule by the evaluation's rule, 0 for one clear of every nodule
    and reader mark by `EDGE_MARGIN_MM`, None for one near an edge (neither). A mark keeps out at
    least the point-mark radius, whatever its size."""
    point = np.asarray(point_mm, dtype=np.float64)
    to_nodules = [np.linalg.norm(point - t.centre_mm) - hit_radius_mm(t) for t in truth.targets]
    to_marks = [
        np.linalg.norm(point - m.centre_mm) - max(ignore_radius_mm(m), LUNA16_RULES.point_mark_radius_mm)
        for m in truth.ignore
    ]
    if any(gap < 0 for gap in to_nodules):
        return 1
    if any(gap < EDGE_MARGIN_MM for gap in to_nodules + to_marks):
        return None
    return 0


def mined_samples(
    case: Case,
    detector: CandidateDetector,
    rng: np.random.Generator,
    threshold: float = MINING_THRESHOLD,
    passes_mm: Sequence[float] = (DETECTION_SPACING_MM,),
) -> Shard:
    """The classifier patch of each labelled detector candidate (of the detector run on each grid of
    `passes_mm`, merged as the pipeline merges them), and a detector cube around each of the
    `DETECTOR_NEGATIVES_PER_SCAN` strongest false ones (shifted as the nodule cubes are, with the
    case's nodule heatmap as its target)."""
    truth = truth_of(case, "mined")
    work = resample(case.volume, DETECTION_SPACING_MM)
    lungs = segment_lungs(work)
    patches, labels, false_points = [], [], []
    for candidate in propose(case.volume, work, lungs, detector, passes_mm, threshold):
        label = candidate_label(work.index_to_patient(candidate.kji), truth)
        if label is None:
            continue
        patches.append(np.rint(crop(work.hu, candidate.kji, CLASSIFIER_PATCH, -1024.0)).astype(np.int16))
        labels.append(label)
        if label == 0:
            false_points.append(np.asarray(candidate.kji, dtype=np.float64))
    half = DETECTION_PATCH // 2
    cubes = [
        detection_target(work, case.nodules, point + rng.uniform(-half * 0.6, half * 0.6, 3))
        for point in false_points[:DETECTOR_NEGATIVES_PER_SCAN]
    ]
    return Shard.of_mined(patches, labels, cubes)


def mine_shards(
    split: str,
    sources: Sequence[CaseSource],
    detector_path: Path,
    out_dir: Path,
    *,
    passes_mm: Sequence[float] = (DETECTION_SPACING_MM,),
    workers: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Path]:
    """One shard of mined samples per case (the candidates of the detector's `passes_mm`), in
    out_dir/mined/<detector tag>[-<passes>]-<layout>/<split>/, built in `workers` processes; shards
    already there are kept (a cache)."""
    passes = (
        "" if tuple(passes_mm) == (DETECTION_SPACING_MM,) else "-" + "+".join(f"{s:g}" for s in passes_mm)
    )
    folder = out_dir / "mined" / f"{detector_tag(detector_path)}{passes}-{MINED_LAYOUT}" / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{source.name}.npz" for source in sources]
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    missing = [
        (source, path, detector_path, tuple(passes_mm), threads)
        for source, path in zip(sources, paths, strict=True)
        if not path.exists()
    ]
    in_processes(_mine_shard, missing, workers, f"mining {split}:", progress)
    return paths


def _mine_shard(
    source: CaseSource, path: Path, detector_path: Path, passes_mm: tuple[float, ...], threads: int
) -> None:
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector, _ = load_model(detector_path, device)
    if not isinstance(detector, CandidateDetector):
        raise TypeError(f"{detector_path} holds a {type(detector).__name__}, not a CandidateDetector")
    rng = np.random.default_rng([source.seed, 11])
    mined_samples(make_case(source), detector, rng, passes_mm=passes_mm).save(path)
