"""Experiment: the shipped detector run at other input spacings (a small nodule looks larger on a finer
grid) and with a left-right flip, alone and merged with the 1 mm pass, judged as `cad-node train`
judges a detector: its candidates' CPM on a split's whole scans (`models.detector_validation`), by
nodule type and size, how many nodules any of its candidates hits, and the seconds each pass took.
With `--classifier`, each variant is judged again as the pipeline ranks its candidates: those at the
shipped detector threshold (at most `MAX_CANDIDATES`, kept apart as the pipeline keeps them) scored
by the shipped classifier on the 1 mm grid, at `nodule_probability`. With `--shifts`, the 1 mm pass
also on grids shifted by one voxel (the detector's first convolution has stride 2, so it sees two
sampling phases of each axis): all eight phases' heatmaps interleaved into one of every voxel, and the
phase shifted along all three axes alone and merged with the unshifted one. With `--closer MM`, each
variant also with its peaks MM apart instead of 5 mm, twice as many a scan.

    .venv/bin/python benchmarks/detector_scales.py [--split validation] [--spacings 1.0,0.8,0.7] [--cases N]
        [--no-flip] [--classifier] [--shifts] [--closer MM]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from inference_variants import flipped_heatmap

from models.datasets import SPLITS, Backgrounds, make_case, split_sources
from models.detector_validation import CANDIDATE_FLOOR, cpm_by_group
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, Target, match_scan
from models.evaluation_runs import truth_of
from models.lungs import search_region, segment_lungs
from models.networks import CandidateDetector, predict_heatmap
from models.pipeline import (
    MAX_CANDIDATES,
    Pipeline,
    candidate_region,
    classify,
    detect,
    heatmap_peaks,
    local_maxima,
    nodule_probability,
    spaced_apart,
)
from models.preprocessing import DETECTION_SPACING_MM, lung_box, normalise, resample
from models.volume import Volume

# (score, centre in patient mm) of every heatmap peak down to the floor
Peaks = list[tuple[float, npt.NDArray[np.float64]]]


def peaks(pipeline: Pipeline, volume: Volume, spacing_mm: float, flip: bool = False) -> Peaks:
    """The local maxima of the detector's heatmap on a `spacing_mm` grid, in the search region."""
    work = resample(volume, spacing_mm)
    lungs = segment_lungs(work)
    heat, box = detect(work, lungs, pipeline.detector)
    if flip:
        heat = (heat + flipped_heatmap(pipeline, normalise(work.hu[box]), (2,))) / 2
    region = candidate_region(lungs, box, spacing_mm)
    return [
        (peak.score, np.asarray(work.index_to_patient(peak.kji), dtype=np.float64))
        for peak in heatmap_peaks(heat, box, region, CANDIDATE_FLOOR)
    ]


Phases = dict[tuple[int, ...], tuple[npt.NDArray[np.float32], tuple[slice, ...]]]


def phase_heatmaps(
    detector: CandidateDetector, hu: npt.NDArray[np.float32], box: tuple[slice, ...]
) -> Phases:
    """The detector's stride-2 heatmap of `box` shifted by 0 or 1 voxel along each axis (8 phases),
    each with the box it covers."""
    phases: Phases = {}
    for offset in itertools.product((0, 1), repeat=3):
        moved = tuple(
            slice(s.start + o, min(s.stop + o, n)) for s, o, n in zip(box, offset, hu.shape, strict=True)
        )
        phases[offset] = predict_heatmap(detector, normalise(hu[moved])), moved
    return phases


def stitch(phases: Phases, size: Sequence[int]) -> npt.NDArray[np.float32]:
    """The phases' heatmaps interleaved into one of every voxel of a box of `size`: voxel j of it is
    cell j // 2 of the phase j % 2 (shift and stitch), centred at j + 0.5 as every cell is."""
    stitched = np.zeros(tuple(size), np.float32)
    for offset, (heat, _) in phases.items():
        cells = stitched[tuple(slice(o, n, 2) for o, n in zip(offset, size, strict=True))]
        common = tuple(slice(0, min(a, b)) for a, b in zip(cells.shape, heat.shape, strict=True))
        cells[common] = heat[common]
    return stitched


def shifted_peaks(pipeline: Pipeline, work: Volume, lungs: npt.NDArray[np.uint8]) -> dict[str, Peaks]:
    """The pass on the 1 mm grid `work` (with its `lungs`) on the 8 sampling phases: their heatmaps
    stitched into one of every voxel ("stitched", its local maxima within 3 mm), and the phase shifted
    by one voxel along all three axes alone ("shift 1,1,1"), to merge with the unshifted one."""
    box = lung_box(lungs, work.spacing)
    phases = phase_heatmaps(pipeline.detector, work.hu, box)
    stitched = stitch(phases, [s.stop - s.start for s in box])
    region = search_region(lungs[box], DETECTION_SPACING_MM)
    start = np.array([s.start for s in box], dtype=np.float64)
    corner, moved = phases[(1, 1, 1)]
    return {
        "1.0 mm stitched": [
            (float(stitched[tuple(i)]), np.asarray(work.index_to_patient(i + 0.5 + start), dtype=np.float64))
            for i in local_maxima(stitched, region, CANDIDATE_FLOOR)
        ],
        "1.0 mm shift 1,1,1": [
            (peak.score, np.asarray(work.index_to_patient(peak.kji), dtype=np.float64))
            for peak in heatmap_peaks(corner, moved, candidate_region(lungs, moved), CANDIDATE_FLOOR)  # type: ignore[arg-type]
        ],
    }


def merged(passes: list[Peaks], threshold: float = 0.0, separation_mm: float | None = None) -> Peaks:
    """The passes' peaks at or above `threshold`, highest first, kept apart as the pipeline keeps its
    candidates (or `separation_mm` apart, with twice as many candidates a scan)."""
    ranked = sorted((p for one in passes for p in one if p[0] >= threshold), key=lambda p: -p[0])
    points = [point for _, point in ranked]
    if separation_mm is None:
        return [ranked[i] for i in spaced_apart(points)]
    return [ranked[i] for i in spaced_apart(points, separation_mm, 2 * MAX_CANDIDATES)]


def reached(matches: list[ScanMatch], keep: Callable[[Target], bool] = lambda _: True) -> str:
    """How many of the nodules (that `keep` keeps) any candidate hits, at whatever heat."""
    targets = [t for m in matches for t in m.targets if keep(t.target)]
    return f"{sum(t.detection_index is not None for t in targets)} of {len(targets)}"


def as_detections(peaks: Peaks) -> list[Detection]:
    return [Detection(tuple(point), score) for score, point in peaks]  # type: ignore[arg-type]


def classified(pipeline: Pipeline, work: Volume, candidates: Peaks) -> list[Detection]:
    """`candidates` at the probability the pipeline reports, the classifier's cubes cut from `work`."""
    if not candidates:
        return []
    points = [np.asarray(work.patient_to_index(point), dtype=np.float64) for _, point in candidates]
    scores = classify(work, points, pipeline)
    return [
        Detection(tuple(point), nodule_probability(heat, p, pipeline.thresholds.detector_weight))  # type: ignore[arg-type]
        for (heat, point), p in zip(candidates, scores, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--spacings", default="1.0,0.8,0.7", help="mm, comma-separated; first: the base")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases (0: all)")
    parser.add_argument("--no-flip", action="store_true", help="leave out the flipped 1 mm pass")
    parser.add_argument("--classifier", action="store_true", help="also judge behind the classifier")
    parser.add_argument("--shifts", action="store_true", help="also the 1 mm pass on shifted grids")
    parser.add_argument(
        "--closer", type=float, default=0.0, help="also each variant's peaks this many mm apart (80 a scan)"
    )
    args = parser.parse_args()
    spacings = [float(s) for s in args.spacings.split(",")]
    pipeline = Pipeline.load()
    backgrounds = Backgrounds()
    sources = split_sources(args.split)[: args.cases or None]
    matches: dict[str, list[ScanMatch]] = defaultdict(list)
    behind: dict[str, list[ScanMatch]] = defaultdict(list)
    seconds: dict[str, float] = defaultdict(float)
    for index, source in enumerate(sources, start=1):
        print(f"case {index}/{len(sources)}: {source.name}", flush=True)
        case = make_case(source, backgrounds)
        truth = truth_of(case, source.name)
        runs: dict[str, Peaks] = {}
        flipped = [] if args.no_flip else [(f"{spacings[0]} mm + flip", spacings[0], True)]
        for name, spacing, flip in [(f"{s} mm", s, False) for s in spacings] + flipped:
            clock = time.perf_counter()
            runs[name] = peaks(pipeline, case.volume, spacing, flip)
            seconds[name] += time.perf_counter() - clock
        work = resample(case.volume, DETECTION_SPACING_MM) if args.classifier or args.shifts else None
        if args.shifts and work is not None:
            clock = time.perf_counter()
            runs |= shifted_peaks(pipeline, work, segment_lungs(work))
            seconds["8 shifts"] += time.perf_counter() - clock
        base = f"{spacings[0]} mm"
        variants = {name: [one] for name, one in runs.items()}
        variants |= {f"{base} with {s} mm": [runs[base], runs[f"{s} mm"]] for s in spacings[1:]}
        if args.shifts:
            variants["1.0 mm with shift 1,1,1"] = [runs["1.0 mm"], runs["1.0 mm shift 1,1,1"]]
        for apart in [None, args.closer] if args.closer else [None]:
            for variant, passes in variants.items():
                name = variant if apart is None else f"{variant}, {apart} mm apart"
                found = as_detections(merged(passes, 0.0, apart))
                matches[name].append(match_scan(truth, found, CANDIDATE_RULES))
                if args.classifier and work is not None:
                    candidates = merged(passes, pipeline.thresholds.detector, apart)
                    found = classified(pipeline, work, candidates)
                    behind[name].append(match_scan(truth, found, CANDIDATE_RULES))
    print(f"\n{args.split}: {len(sources)} scans; candidates' CPM (hit radius at least 3 mm)")
    for name, found in matches.items():
        print(f"{name:22s} {cpm_by_group(found)}")
    print(
        f"nodules with a candidate ({MAX_CANDIDATES} a scan, {2 * MAX_CANDIDATES} where closer apart; "
        f"heat {CANDIDATE_FLOOR} up): all; under 6 mm"
    )
    for name, found in matches.items():
        print(f"{name:22s} {reached(found)}; {reached(found, lambda t: t.mean_diameter_mm < 6.0)}")
    if behind:
        print(f"behind the classifier, candidates at heat {pipeline.thresholds.detector} or more")
        for name, found in behind.items():
            print(f"{name:22s} {cpm_by_group(found)}")
    print(
        "seconds a scan, resampling and lungs included: "
        + ", ".join(f"{name} {spent / len(sources):.1f}" for name, spent in seconds.items())
    )


if __name__ == "__main__":
    main()
