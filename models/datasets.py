"""Which cases train, validate and test the networks, and building their sample shards.

Seeds never overlap between the splits, so the held-out cases have nodules, positions and (for
synthetic chests) patients that training never saw."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from models.ground_truth import IgnoreMark
from models.lidc import build_lidc_case, find_lidc_xml, parse_lidc_xml
from models.series_loading import load_series
from models.synthetic.cases import Case, insert_into_real, synthesize_case
from models.training_data import Shard, shard_from_case
from models.volume import Volume

LIDC_CASES = ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
NODULES_PER_CASE = 6
SPLITS = {
    # split: (first synthetic seed, synthetic cases, first insertion seed, insertion cases)
    "train": (1000, 60, 2000, 30),
    "validation": (3000, 8, 3100, 4),
    "test": (4000, 16, 4100, 8),
}
SHARD_WORKER_GB = 4.0


@dataclass(frozen=True)
class CaseSource:
    kind: str  # "synthetic" or "insertion"
    seed: int
    background: str | None = None  # an LIDC case name, for insertions

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.seed}" + (f"-{self.background}" if self.background else "")


def lidc_root() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc"
    return Path(os.environ.get("CAD_NODE_LIDC_DIR", default))


def lidc_series_dir(case_name: str) -> Path:
    xmls = sorted((lidc_root() / case_name).rglob("*.xml"))
    if not xmls:
        raise FileNotFoundError(f"no LIDC series for {case_name} under {lidc_root()} (set CAD_NODE_LIDC_DIR)")
    return xmls[0].parent


def split_sources(split: str, kind: str | None = None) -> list[CaseSource]:
    """The split's cases, or those of one kind ("synthetic" needs no LIDC background)."""
    first_synthetic, n_synthetic, first_insertion, n_insertion = SPLITS[split]
    sources = [CaseSource("synthetic", first_synthetic + i) for i in range(n_synthetic)]
    sources += [
        CaseSource("insertion", first_insertion + i, LIDC_CASES[i % len(LIDC_CASES)])
        for i in range(n_insertion)
    ]
    return [source for source in sources if kind is None or source.kind == kind]


class Backgrounds:
    """Real series loaded once, with every reader mark (nodules included) as keep-outs."""

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[Volume, list[IgnoreMark]]] = {}

    def get(self, name: str) -> tuple[Volume, list[IgnoreMark]]:
        if name not in self._loaded:
            folder = lidc_series_dir(name)
            series = load_series(folder)
            lidc = build_lidc_case(
                parse_lidc_xml(find_lidc_xml(folder)), series.volume, series.sop_instance_uids
            )
            self._loaded[name] = (series.volume, lidc.every_mark())
        return self._loaded[name]


_process_backgrounds = Backgrounds()


def make_case(source: CaseSource, backgrounds: Backgrounds | None = None) -> Case:
    """The case of `source`; insertions take their background from `backgrounds`, else from the
    process's own (each background loaded once a process)."""
    if source.kind == "synthetic":
        return synthesize_case(source.seed, NODULES_PER_CASE)
    if source.background is None:
        raise ValueError(f"insertion case {source.seed} names no background")
    volume, marks = (backgrounds or _process_backgrounds).get(source.background)
    return insert_into_real(volume, source.seed, NODULES_PER_CASE, ignore=marks)


def build_shards(
    split: str,
    out_dir: Path,
    *,
    kind: str | None = None,
    workers: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Path]:
    """One shard per case of the split (or of its cases of one `kind`) in out_dir/split/; shards
    already there are kept (a cache). `workers` processes build the missing ones side by side (each
    case is built on its own, from its own seed, so the shards are the same whatever the number of
    workers)."""
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    sources = split_sources(split, kind)
    paths = [folder / f"{source.name}.npz" for source in sources]
    missing = [(source, path) for source, path in zip(sources, paths, strict=True) if not path.exists()]
    in_processes(_build_shard, missing, workers, f"{split}: building", progress)
    return paths


Result = TypeVar("Result")


def in_processes(
    function: Callable[..., Result],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    doing: str,
    progress: Callable[[str], None],
) -> list[Result]:
    """`function(*job)` for each job, in `workers` processes side by side (here, for one job or one
    worker), and what each returned, in the jobs' order. A job's first item is its `CaseSource`, which
    the progress messages name."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for done, job in enumerate(jobs, start=1):
            progress(f"{doing} {job[0].name} ({done}/{len(jobs)})")
            results.append(function(*job))
        return results
    progress(f"{doing} {len(jobs)} cases in {workers} processes")
    # Spawned, not forked: a forked child of a process that has run torch can hang in its thread pools.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        finished: dict[int, Result] = {}
        for done, future in enumerate(as_completed(futures), start=1):
            index = futures[future]
            finished[index] = future.result()
            progress(f"{doing} {jobs[index][0].name}: done ({done}/{len(jobs)})")
    return [finished[index] for index in range(len(jobs))]


def default_workers() -> int:
    """Processes for building shards: one a core, as many as the memory holds (a case takes about
    SHARD_WORKER_GB at its peak)."""
    cores = os.cpu_count() or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return 1
    return max(1, min(cores, int(memory_gb // SHARD_WORKER_GB)))


def _build_shard(source: CaseSource, path: Path) -> None:
    case = make_case(source)
    shard_from_case(case, np.random.default_rng([source.seed, 7])).save(path)


def load_shards(paths: list[Path]) -> Shard:
    return Shard.concatenate([Shard.load(p) for p in paths])
