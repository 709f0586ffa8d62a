"""Experiment: the shipped detector run at other input spacings (a small nodule looks larger on a finer
grid) and with a left-right flip, alone and merged with the 1 mm pass, judged as `cad-node train`
judges a detector: its candidates' CPM on a split's whole scans (`models.detector_validation`), by
nodule type and size, how many nodules any of its candidates hits, and the seconds each pass took.
With `--classifier`, each variant is judged again as the pipeline ranks its candidates: those at the
shipped detector threshold (at most `MAX_CANDIDATES`, kept apart as the pipeline keeps them) scored
by the shipped classifier on the 1 mm grid, at `nodule_probability`.

    .venv/bin/python benchmarks/detector_scales.py [--split validation] [--spacings 1.0,0.8,0.7] [--cases N]
        [--no-flip] [--classifier]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from inference_variants import flipped_heatmap

from models.datasets import SPLITS, Backgrounds, make_case, split_sources
from models.detector_validation import CANDIDATE_FLOOR, cpm_by_group
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, Target, match_scan
from models.evaluation_runs import truth_of
from models.lungs import segment_lungs
from models.pipeline import (
    MAX_CANDIDATES,
    Pipeline,
    candidate_region,
    classify,
    detect,
    heatmap_peaks,
    nodule_probability,
    spaced_apart,
)
from models.preprocessing import DETECTION_SPACING_MM, normalise, resample
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


def merged(passes: list[Peaks], threshold: float = 0.0) -> Peaks:
    """The passes' peaks at or above `threshold`, highest first, kept apart as the pipeline keeps its
    candidates."""
    ranked = sorted((p for one in passes for p in one if p[0] >= threshold), key=lambda p: -p[0])
    return [ranked[i] for i in spaced_apart([point for _, point in ranked])]


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
        Detection(tuple(point), nodule_probability(heat, p))  # type: ignore[arg-type]
        for (heat, point), p in zip(candidates, scores, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--spacings", default="1.0,0.8,0.7", help="mm, comma-separated; first: the base")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases (0: all)")
    parser.add_argument("--no-flip", action="store_true", help="leave out the flipped 1 mm pass")
    parser.add_argument("--classifier", action="store_true", help="also judge behind the classifier")
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
        base = f"{spacings[0]} mm"
        variants = {name: [one] for name, one in runs.items()}
        variants |= {f"{base} with {s} mm": [runs[base], runs[f"{s} mm"]] for s in spacings[1:]}
        work = resample(case.volume, DETECTION_SPACING_MM) if args.classifier else None
        for name, passes in variants.items():
            matches[name].append(match_scan(truth, as_detections(merged(passes)), CANDIDATE_RULES))
            if work is not None:
                candidates = merged(passes, pipeline.thresholds.detector)
                found = classified(pipeline, work, candidates)
                behind[name].append(match_scan(truth, found, CANDIDATE_RULES))
    print(f"\n{args.split}: {len(sources)} scans; candidates' CPM (hit radius at least 3 mm)")
    for name, found in matches.items():
        print(f"{name:22s} {cpm_by_group(found)}")
    print(f"nodules with a candidate ({MAX_CANDIDATES} a scan, heat {CANDIDATE_FLOOR} up): all; under 6 mm")
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
