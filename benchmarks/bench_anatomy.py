"""Time the synthetic chest: ``generate_chest(seed, n_slices=300)`` then ``add_noise``.

    python benchmarks/bench_anatomy.py [--slices 300] [--seeds 0 1 2]

Prints the seconds of each stage and the peak memory (resident set of the process, and the peak
of numpy allocations traced by tracemalloc when ``--trace`` is given: tracing slows numpy down).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.synthetic.acquisition import add_noise
from models.synthetic.anatomy import generate_chest


def run(seed: int, n_slices: int) -> float:
    start = time.perf_counter()
    anatomy, acq = generate_chest(seed, n_slices=n_slices)
    built = time.perf_counter()
    add_noise(anatomy.volume.hu, acq, np.random.default_rng(seed + 1))
    done = time.perf_counter()
    stages = ", ".join(f"{name} {t:.2f}" for name, t in anatomy.timings_s.items())
    print(
        f"seed {seed}: {acq.n_slices} x {acq.rows} x {acq.columns}, {acq.kernel}, "
        f"{len(anatomy.vessels)} vessel segments\n"
        f"  generate_chest {built - start:.2f} s ({stages})\n"
        f"  add_noise      {done - built:.2f} s\n"
        f"  total          {done - start:.2f} s"
    )
    return done - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trace", action="store_true", help="also measure numpy's peak with tracemalloc")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start()
    totals = [run(seed, args.slices) for seed in args.seeds]
    print(f"worst {max(totals):.2f} s, mean {np.mean(totals):.2f} s over {len(totals)} seeds")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak_rss_mb:.0f} MB")
    if args.trace:
        _, peak = tracemalloc.get_traced_memory()
        print(f"peak traced allocations {peak / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
