"""Baseline: the classical dot-enhancement filter as a candidate generator, against the shipped detector
on the same scans. Could it supply the nodules the detector misses?

The filter (Li, Sone and Doi, Med. Phys. 2003) is the CAD candidate generator from before networks:
on the 1 mm grid, the Hessian of the image at scales of 1 to 3 mm (scale-normalised), and where all
three eigenvalues are negative (a bright blob, not a tube or a plate) |l3|^2 / |l1|, with |l1| >= |l2| >=
|l3|; the largest over the scales. Its candidates are its local maxima in the detector's search region,
the strongest first, kept 5 mm apart and at most 40 a scan, as the detector's are
(`models.pipeline.spaced_apart`); both are matched by the detector's validation rules
(`models.detector_validation`).

    .venv/bin/python benchmarks/dot_filter.py [--split validation] [--threshold 0.3] [--workers 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.datasets import SPLITS, default_workers
from models.detector_validation import ValidationCase, candidate_matches, validation_cases
from models.evaluation import CANDIDATE_RULES, Detection, ScanMatch, build_report, match_scan
from models.pipeline import Pipeline, spaced_apart
from models.preprocessing import lung_box

SCALES_MM = (1.0, 1.5, 2.0, 3.0)
# (axis, axis) of each second derivative, and the derivative orders that give it
HESSIAN = (((0, 0), (2, 0, 0)), ((1, 1), (0, 2, 0)), ((2, 2), (0, 0, 2)),
           ((0, 1), (1, 1, 0)), ((0, 2), (1, 0, 1)), ((1, 2), (0, 1, 1)))  # fmt: skip
CHUNK = 1_000_000


def dot_response(hu: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """The filter's value at each voxel of `inside` (1 mm grid), 0 elsewhere."""
    best = np.zeros(hu.shape, np.float32)
    where = np.nonzero(inside)
    for sigma in SCALES_MM:
        hessian = np.empty((len(where[0]), 3, 3), np.float32)
        for (a, b), order in HESSIAN:
            values = ndimage.gaussian_filter(hu, sigma, order=order)[where] * sigma**2
            hessian[:, a, b] = hessian[:, b, a] = values
        response = np.empty(len(where[0]), np.float32)
        for start in range(0, len(response), CHUNK):
            # ascending: where all three are negative, eigen[:, 0] has the largest magnitude
            eigen = np.linalg.eigvalsh(hessian[start : start + CHUNK])
            strongest, weakest = eigen[:, 0], eigen[:, 2]
            response[start : start + CHUNK] = np.where(
                weakest < 0, weakest**2 / np.maximum(-strongest, 1e-6), 0.0
            )
        best[where] = np.maximum(best[where], response)
    return best


def dot_candidates(case: ValidationCase) -> list[Detection]:
    """The filter's candidates on `case`, the strongest first."""
    box = lung_box(case.lungs, case.work.spacing)
    hu = case.work.hu[box].astype(np.float32)
    # The search region is on the detector's heatmap cells: cell i covers voxels 2i and 2i + 1.
    inside = case.region.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    response = dot_response(hu, inside)
    peaks = np.argwhere((response == ndimage.maximum_filter(response, size=3)) & (response > 0))
    peaks = peaks[np.argsort(-response[tuple(peaks.T)], kind="stable")]
    offset = np.array([s.start for s in box], dtype=np.float64)
    points = [p.astype(np.float64) + offset for p in peaks]
    return [
        Detection(tuple(case.work.index_to_patient(points[i])), float(response[tuple(peaks[i])]))  # type: ignore[arg-type]
        for i in spaced_apart(points)  # 1 mm grid: indices are mm
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--threshold", type=float, default=0.3, help="the detector's: under it, missed")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    pipeline = Pipeline.load()
    cases = validation_cases(args.split, print, args.workers)
    detector = candidate_matches(pipeline.detector, cases)
    dots: list[ScanMatch] = []
    clock = time.perf_counter()
    for index, case in enumerate(cases, start=1):
        print(f"dot filter on {case.truth.case_id} ({index}/{len(cases)})", flush=True)
        dots.append(match_scan(case.truth, dot_candidates(case), CANDIDATE_RULES))
    seconds = (time.perf_counter() - clock) / len(cases)
    print(f"\n{'candidates (40 a scan at most)':34s} {'CPM':>6s} {'3-6 mm':>7s} {'>= 6 mm':>8s}")
    for name, matches in (("shipped detector", detector), (f"dot filter, {seconds:.0f} s a scan", dots)):
        report = build_report(matches, rules=CANDIDATE_RULES)
        cpm = [report.group(g).froc.cpm for g in ("all", "3-6 mm", ">= 6 mm")]
        print(f"{name:34s} {cpm[0]:6.3f} {cpm[1]:7.3f} {cpm[2]:8.3f}")
    missed = [
        (d.target, f.probability)
        for scan_d, scan_f in zip(detector, dots, strict=True)
        for d, f in zip(scan_d.targets, scan_f.targets, strict=True)
        if d.probability < args.threshold
    ]
    reached = [target for target, score in missed if np.isfinite(score)]
    print(
        f"\nnodules the detector misses (heat under {args.threshold}): {len(missed)}; "
        f"among the dot filter's candidates: {len(reached)}"
    )
    for target in reached:
        print(f"  {target.nodule_type:12s} {target.mean_diameter_mm:5.1f} mm")


if __name__ == "__main__":
    main()
