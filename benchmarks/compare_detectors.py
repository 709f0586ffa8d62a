"""Two detectors' candidates on the same scans: each one's CPM (as `cad-node train` judges a detector,
`models.detector_validation`), by nodule type and size, and the difference of the two CPMs with its 95 %
paired bootstrap interval, which says whether these scans can tell the two apart at all.

    .venv/bin/python benchmarks/compare_detectors.py A.pt B.pt [--split validation] [--cases N] [--workers N]

A is the baseline (say models/weights/detector.pt), B the candidate (say a run's best.pt).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from models.datasets import SPLITS, default_workers
from models.detector_validation import candidate_matches, cpm_by_group, validation_cases
from models.evaluation import cpm_difference
from models.networks import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases (0: all)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes making the scans")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples of the scans")
    args = parser.parse_args()
    started = time.perf_counter()
    cases = validation_cases(args.split, lambda message: print(message, flush=True), args.workers, args.cases)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    matches = [
        candidate_matches(load_model(path, device)[0], cases) for path in (args.baseline, args.candidate)
    ]
    compared = cpm_difference(*matches, n_bootstrap=args.bootstrap)
    nodules = sum(len(m.targets) for m in matches[0])
    verdict = "tell them apart" if compared.tells_apart else "cannot tell them apart"
    print(
        f"\n{args.split}: {len(cases)} scans, {nodules} nodules; candidates' CPM (hit radius at least 3 mm)"
    )
    print(f"A {args.baseline}: {compared.a:.3f}")
    print(f"B {args.candidate}: {compared.b:.3f}")
    for label, found in zip("AB", matches, strict=True):
        print(f"{label} by group: {cpm_by_group(found)}")
    low, high = compared.ci
    print(
        f"B - A: {compared.difference:+.3f} "
        f"(95 % paired bootstrap interval {low:+.3f} to {high:+.3f}): these scans {verdict}"
    )
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
