"""Hard negatives for the false-positive classifier: what a trained detector proposes on the
synthetic training and validation cases, labelled against the cases' truth.

Random lung points and vessels (`models.training_data`) teach the classifier what lung looks like;
the detector's own false candidates are what it has to reject at run time. Candidates on a nodule
are kept too, as positives: they sit where the detector puts them, not where the truth is.

Only synthetic cases are mined. The insertion cases share the two LIDC backgrounds with the held-out
insertions and with the real test scans, so the detector's false candidates there are largely the
test scans' own: mining them would teach the classifier the answers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from models.datasets import Backgrounds, CaseSource, make_case, split_sources
from models.evaluation import LUNA16_RULES, ScanTruth, hit_radius_mm, ignore_radius_mm
from models.evaluation_runs import truth_of
from models.lungs import segment_lungs
from models.networks import CandidateDetector, load_model
from models.pipeline import candidate_points, candidate_region, detect
from models.preprocessing import DETECTION_SPACING_MM, resample
from models.synthetic.cases import Case
from models.training_data import CLASSIFIER_PATCH, Shard, crop

# The lowest detector threshold `cad-node calibrate` tries: every candidate the classifier may meet.
MINING_THRESHOLD = 0.05
# A candidate this far beyond a nodule's edge or nearer is neither: it shows part of the nodule.
EDGE_MARGIN_MM = 5.0


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
    return [source for source in split_sources(split) if source.kind == "synthetic"]


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


def labelled_candidates(
    case: Case, detector: CandidateDetector, threshold: float = MINING_THRESHOLD
) -> Iterator[tuple[npt.NDArray[np.int16], int]]:
    """The classifier patch of each detector candidate, with its label."""
    truth = truth_of(case, "mined")
    work = resample(case.volume, DETECTION_SPACING_MM)
    lungs = segment_lungs(work)
    heatmap, box = detect(work, lungs, detector)
    for candidate in candidate_points(heatmap, box, candidate_region(lungs, box), threshold):
        label = candidate_label(work.index_to_patient(candidate.kji), truth)
        if label is not None:
            yield np.rint(crop(work.hu, candidate.kji, CLASSIFIER_PATCH, -1024.0)).astype(np.int16), label


def mine_shards(
    split: str,
    sources: Sequence[CaseSource],
    detector_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Path]:
    """One classifier-only shard per case, in out_dir/mined/<detector tag>/<split>/; shards already
    there are kept (a cache)."""
    folder = out_dir / "mined" / detector_tag(detector_path) / split
    folder.mkdir(parents=True, exist_ok=True)
    detector: CandidateDetector | None = None
    backgrounds = Backgrounds()
    paths = []
    for index, source in enumerate(sources, start=1):
        path = folder / f"{source.name}.npz"
        if not path.exists():
            if detector is None:
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                detector, _ = load_model(detector_path, device)  # type: ignore[assignment]
            assert detector is not None
            progress(f"mining {split} {index}/{len(sources)}: {source.name}")
            samples = list(labelled_candidates(make_case(source, backgrounds), detector))
            Shard.of_classifier([image for image, _ in samples], [label for _, label in samples]).save(path)
        paths.append(path)
    return paths
