"""Which cases train, validate and test the networks, and building their sample shards.

Seeds never overlap between the splits, so the held-out cases have nodules, positions and (for
synthetic chests) patients that training never saw."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def split_sources(split: str) -> list[CaseSource]:
    first_synthetic, n_synthetic, first_insertion, n_insertion = SPLITS[split]
    sources = [CaseSource("synthetic", first_synthetic + i) for i in range(n_synthetic)]
    sources += [
        CaseSource("insertion", first_insertion + i, LIDC_CASES[i % len(LIDC_CASES)])
        for i in range(n_insertion)
    ]
    return sources


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


def make_case(source: CaseSource, backgrounds: Backgrounds) -> Case:
    if source.kind == "synthetic":
        return synthesize_case(source.seed, NODULES_PER_CASE)
    if source.background is None:
        raise ValueError(f"insertion case {source.seed} names no background")
    volume, marks = backgrounds.get(source.background)
    return insert_into_real(volume, source.seed, NODULES_PER_CASE, ignore=marks)


def build_shards(
    split: str, out_dir: Path, *, progress: Callable[[str], None] = lambda message: None
) -> list[Path]:
    """One shard per case of the split in out_dir/split/; shards already there are kept (a cache)."""
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = Backgrounds()
    paths = []
    sources = split_sources(split)
    for index, source in enumerate(sources, start=1):
        path = folder / f"{source.name}.npz"
        if not path.exists():
            progress(f"{split} {index}/{len(sources)}: {source.name}")
            shard = shard_from_case(make_case(source, backgrounds), np.random.default_rng([source.seed, 7]))
            shard.save(path)
        paths.append(path)
    return paths


def load_shards(paths: list[Path]) -> Shard:
    return Shard.concatenate([Shard.load(p) for p in paths])
