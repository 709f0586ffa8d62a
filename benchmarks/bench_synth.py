"""Benchmark: one 300-slice synthetic case, written as DICOM with its ground truth (the issue's goal:
at most 30 s on the 2-core machine), and one insertion into LIDC-IDRI-0001 when the data are there.

    .venv/bin/python benchmarks/bench_synth.py [--slices 300] [--nodules 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from models.datasets import lidc_series_dir
from models.synthetic.case_writing import synthesize

GOAL_S = 30.0


def timed(label: str, **kwargs: object) -> float:
    steps: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        synthesize(
            Path(folder) / "case",
            progress=lambda m: steps.append((time.perf_counter() - started, m)),
            **kwargs,
        )  # type: ignore[arg-type]
        total = time.perf_counter() - started
    marks = [t for t, _ in steps] + [total]
    for (t, message), end in zip(steps, marks[1:], strict=True):
        print(f"  {end - t:6.2f} s  {message}")
    print(f"{label}: {total:.2f} s")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--nodules", type=int, default=5)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}")
    total = timed(
        f"synthetic case, {args.slices} slices, {args.nodules} nodules",
        seed=300,
        n_nodules=args.nodules,
        n_slices=args.slices,
    )
    verdict = "meets" if total <= GOAL_S else "MISSES"
    print(f"goal: at most {GOAL_S:.0f} s for 300 slices: {verdict} it ({total / GOAL_S:.2f} of the budget)")
    try:
        background = lidc_series_dir("LIDC-IDRI-0001")
    except FileNotFoundError as missing:
        print(f"insertion not measured: {missing}")
    else:
        timed(
            f"insertion into LIDC-IDRI-0001, {args.nodules} nodules",
            seed=301,
            n_nodules=args.nodules,
            background=background,
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
