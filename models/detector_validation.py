"""The candidate detector judged as the pipeline uses it: on whole validation scans, its candidates
(`models.pipeline.candidate_points`, down to `CANDIDATE_FLOOR`) ranked by heat and matched to the
nodules by the LUNA16 rules; the CPM of that FROC is the metric that chooses the detector's epoch.

Why not the patch-level average precision of centre voxels: in 0.4.0's time it rose from 0.664 to
0.676 over 12 more epochs while the whole pipeline's validation CPM fell from 0.762 to 0.728
(docs/pipeline.md). Random patches hold few of the look-alikes of a whole scan, and a nodule's rank
among a scan's candidates is what the pipeline's sensitivity at a few false positives depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from torch import nn

from models.datasets import CaseSource, in_processes, make_case, split_sources
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, ScanTruth, build_report, match_scan
from models.evaluation_runs import truth_of
from models.lungs import segment_lungs
from models.networks import CandidateDetector
from models.pipeline import candidate_points, candidate_region, detect
from models.preprocessing import DETECTION_SPACING_MM, lung_box, resample
from models.volume import Volume

CANDIDATE_FLOOR = 0.01


@dataclass(frozen=True)
class ValidationCase:
    """A scan as the detector sees it, with what stays the same from epoch to epoch worked out once."""

    truth: ScanTruth
    work: Volume  # on the detector's 1 mm grid
    lungs: npt.NDArray[np.uint8]
    region: npt.NDArray[np.bool_]  # the candidates' search region on the heatmap's cells

    @classmethod
    def of(cls, truth: ScanTruth, volume: Volume) -> ValidationCase:
        work = resample(volume, DETECTION_SPACING_MM)
        lungs = segment_lungs(work)
        return cls(truth, work, lungs, candidate_region(lungs, lung_box(lungs, work.spacing)))


def validation_cases(
    split: str = "validation",
    progress: Callable[[str], None] = lambda message: None,
    workers: int = 1,
    limit: int = 0,
    kind: str | None = None,
) -> list[ValidationCase]:
    """The split's cases (of one `kind`, and the first `limit`, when given), resampled and with their
    lungs, ready for `candidate_cpm` epoch after epoch; made in `workers` processes."""
    jobs = [(source,) for source in split_sources(split, kind)[: limit or None]]
    doing = f"{split} scans for the scan-level metric:"
    return in_processes(_validation_case, jobs, workers, doing, progress)


def _validation_case(source: CaseSource) -> ValidationCase:
    case = make_case(source)
    return ValidationCase.of(truth_of(case, source.name), case.volume)


def candidate_matches(detector: nn.Module, cases: list[ValidationCase]) -> list[ScanMatch]:
    """Each case's detector candidates (heatmap peaks down to `CANDIDATE_FLOOR`), matched to its truth."""
    if not isinstance(detector, CandidateDetector):
        raise TypeError(f"candidate_matches takes a CandidateDetector, not a {type(detector).__name__}")
    matches = []
    for case in cases:
        heatmap, box = detect(case.work, case.lungs, detector)
        candidates = [
            Detection(tuple(case.work.index_to_patient(c.kji)), c.score)  # type: ignore[arg-type]
            for c in candidate_points(heatmap, box, case.region, CANDIDATE_FLOOR)
        ]
        matches.append(match_scan(case.truth, candidates, CANDIDATE_RULES))
    return matches


def candidate_cpm(detector: nn.Module, cases: list[ValidationCase]) -> float:
    """The CPM (mean sensitivity at 1/8 to 8 false positives per scan) of the detector's candidates."""
    matches = candidate_matches(detector, cases)
    return float(build_report(matches, rules=CANDIDATE_RULES).group("all").froc.cpm)


def cpm_by_group(matches: list[ScanMatch]) -> str:
    """The candidates' CPM of each nodule type and size that the scans hold, with its number of nodules."""
    groups = [g for g in build_report(matches, rules=CANDIDATE_RULES).groups if g.targets]
    return "  ".join(f"{g.name} {g.froc.cpm:.3f} ({g.targets})" for g in groups)


def candidate_judge(
    split: str = "validation",
    progress: Callable[[str], None] = lambda message: None,
    workers: int = 1,
    kind: str | None = None,
) -> Callable[[nn.Module], float]:
    """`candidate_cpm` on the split's cases (of one `kind`, when given), loaded once (in `workers`
    processes)."""
    cases = validation_cases(split, progress, workers, kind=kind)
    return lambda detector: candidate_cpm(detector, cases)
