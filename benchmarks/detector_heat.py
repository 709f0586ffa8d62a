"""Diagnostic: where the shipped detector misses. For each nodule of a split's cases, the detector's
highest heat within the nodule's radius, how far its centre lies outside the lung mask and whether
the candidates' search region (`models.pipeline.candidate_region`) holds it; then the nodules under the
threshold, counted by type and location, and those over it that the search region leaves out.

    .venv/bin/python benchmarks/detector_heat.py [--split validation] [--threshold 0.3]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from scipy import ndimage

from models.datasets import SPLITS, Backgrounds, make_case, split_sources
from models.lungs import segment_lungs
from models.pipeline import Pipeline, candidate_region, detect
from models.preprocessing import DETECTION_SPACING_MM, resample

HEATMAP_STRIDE = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()
    pipeline = Pipeline.load()
    backgrounds = Backgrounds()
    kinds, missed = Counter[str](), Counter[str]()
    small, far, unsearched = 0, 0, 0
    for source in split_sources(args.split):
        case = make_case(source, backgrounds)
        work = resample(case.volume, DETECTION_SPACING_MM)
        lungs = segment_lungs(work)
        heat, box = detect(work, lungs, pipeline.detector)
        outside = ndimage.distance_transform_edt(lungs == 0)
        region = candidate_region(lungs, box)
        for nodule in case.nodules:
            kji = work.patient_to_index(nodule.centre_mm)
            # heatmap voxel i is centred on 1 mm index 2i + 0.5, as in pipeline.candidate_points
            local = (kji - np.array([s.start for s in box]) - 0.5) / HEATMAP_STRIDE
            radius = max(nodule.mean_diameter_mm / 2, 2.0) / HEATMAP_STRIDE
            low = np.maximum(np.floor(local - radius).astype(int), 0)
            high = np.minimum(np.ceil(local + radius).astype(int) + 1, heat.shape)
            window = heat[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
            peak = float(window.max()) if window.size else 0.0
            inside = np.clip(np.rint(kji).astype(int), 0, np.array(lungs.shape) - 1)
            distance = float(outside[tuple(inside)])
            cell = np.clip(np.rint(local).astype(int), 0, np.array(region.shape) - 1)
            searched = bool(region[tuple(cell)])
            kind = f"{nodule.nodule_type}/{nodule.location}"
            kinds[kind] += 1
            print(
                f"{source.name:30s} {kind:28s} {nodule.mean_diameter_mm:5.1f} mm  "
                f"{distance:4.1f} mm outside the lungs{'' if searched else ', not searched'}  heat {peak:.2f}"
            )
            unsearched += peak >= args.threshold and not searched
            if peak < args.threshold:
                missed[kind] += 1
                small += nodule.mean_diameter_mm < 7.0
                far += distance > 4.0
    total = sum(missed.values())
    print(f"\nheat under {args.threshold}: {total} of {sum(kinds.values())} nodules")
    print(f"  under 7 mm: {small}; more than 4 mm outside the lung mask: {far}")
    print(f"heat {args.threshold} or more, outside the search region: {unsearched}")
    for kind in sorted(kinds):
        print(f"  {kind:28s} {missed[kind]} of {kinds[kind]}")


if __name__ == "__main__":
    main()
