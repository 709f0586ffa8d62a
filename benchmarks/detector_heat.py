"""Diagnostic: where the shipped detector misses, and whether what it misses stands out of the noise.

For each nodule of a split's cases: its candidate's heat (the best heatmap peak that hits it by the
detector's validation rules, `models.detector_validation`; 0 when no candidate does), whether the
candidates' search region holds its centre, and two detectabilities d'. Each is the mean HU of a ball
of the nodule's diameter (at most 8 mm) at its centre against the same ball at other places of the
lungs nearby, on the 1 mm grid the detector sees: (nodule - mean of places) / standard deviation of
places, the non-prewhitening matched filter of the nodule's size.
- Against the parenchyma (places touching anything above -500 HU left out): the scan's noise and fine
  texture, which an observer who knew every vessel for what it is would still face. Over a lung's
  10^5 or so independent nodule-sized places, a threshold that gives one false positive a scan in
  Gaussian noise lies near d' = 4.3: a nodule under 3 is not one any observer finds at a few false
  positives a scan.
- Against any place, vessels included: how far the nodule's brightness alone sets it apart from the
  vessels around it; a low figure means only its shape in 3D can tell it from them.
Then the nodules under the detector threshold by type, the d' of those found and missed by size, and
a plot of heat against both.

    .venv/bin/python benchmarks/detector_heat.py [--split validation] [--threshold 0.3] [--workers 2]
        [--plot var/eval/detector-heat.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.datasets import SPLITS, default_workers
from models.detector_validation import ValidationCase, candidate_matches, validation_cases
from models.evaluation import Target
from models.pipeline import Pipeline
from models.preprocessing import lung_box

HEATMAP_STRIDE = 2
PLACES = 64
MIN_PLACES = 8
MAX_BALL_RADIUS_MM = 4.0
PARENCHYMA_MAX_HU = -500.0
RELIABLE_D_PRIME = 3.0
SIZE_BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.0))


def detectability(
    case: ValidationCase, target: Target, rng: np.random.Generator, *, parenchyma_only: bool = True
) -> float:
    """d' of `target` in `case` (see the module's text) against places in the parenchyma, or with
    `parenchyma_only` False against any place in the lungs, vessels included; NaN when fewer than
    `MIN_PLACES` places nearby take the ball."""
    hu, lungs = case.work.hu, case.lungs
    # The 1 mm grid: millimetres are voxels. Large nodules are judged by their core, since vessel-free
    # places of their whole size are rare.
    radius = float(np.clip(target.mean_diameter_mm / 2, 1.5, MAX_BALL_RADIUS_MM))
    reach = int(np.ceil(radius))
    offsets = np.argwhere(np.ones((2 * reach + 1,) * 3, bool)) - reach
    ball = offsets[np.linalg.norm(offsets, axis=1) <= radius]
    centre = np.asarray(case.work.patient_to_index(target.centre_mm))
    others = [
        (np.asarray(case.work.patient_to_index(t.centre_mm)), t.mean_diameter_mm / 2)
        for t in case.truth.targets
        if t is not target
    ]

    def values(at: npt.NDArray[np.float64]) -> npt.NDArray[np.float32] | None:
        points = np.rint(at).astype(int) + ball
        if (points < 0).any() or (points >= hu.shape).any():
            return None
        return hu[tuple(points.T)]

    signal = values(centre)
    if signal is None:
        return float("nan")
    background = []
    for _ in range(PLACES * 4):
        direction = rng.normal(size=3)
        # clear of the nodule itself by 2 mm, whatever its size
        away = target.mean_diameter_mm / 2 + radius + 2
        place = centre + direction / np.linalg.norm(direction) * rng.uniform(away, away + 20)
        if any(np.linalg.norm(place - at) < radius + reach_other + 3 for at, reach_other in others):
            continue
        inside = values(place)
        if inside is None or (parenchyma_only and inside.max() > PARENCHYMA_MAX_HU):
            continue
        if not lungs[tuple(np.rint(place).astype(int))]:
            continue
        background.append(float(inside.mean()))
        if len(background) == PLACES:
            break
    if len(background) < MIN_PLACES:
        return float("nan")
    spread = float(np.std(background))
    return (float(signal.mean()) - float(np.mean(background))) / max(spread, 1e-3)


class Row(NamedTuple):
    nodule_type: str
    diameter_mm: float
    heat: float
    noise_d: float  # d' against the parenchyma
    clutter_d: float  # d' against any place in the lungs, vessels included


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--plot", type=Path, default=Path("var/eval/detector-heat.png"))
    args = parser.parse_args()
    pipeline = Pipeline.load()
    cases = validation_cases(args.split, print, args.workers)
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    unsearched = 0
    for case, scan in zip(cases, candidate_matches(pipeline.detector, cases), strict=True):
        box = lung_box(case.lungs, case.work.spacing)
        for match in scan.targets:
            target = match.target
            row = Row(
                target.nodule_type,
                target.mean_diameter_mm,
                max(match.probability, 0.0),
                detectability(case, target, rng),
                detectability(case, target, rng, parenchyma_only=False),
            )
            kji = np.asarray(case.work.patient_to_index(target.centre_mm))
            cell = (kji - np.array([s.start for s in box]) - 0.5) / HEATMAP_STRIDE
            cell = np.clip(np.rint(cell).astype(int), 0, np.array(case.region.shape) - 1)
            searched = bool(case.region[tuple(cell)])
            print(
                f"{case.truth.case_id:34s} {row.nodule_type:12s} {row.diameter_mm:5.1f} mm  "
                f"heat {row.heat:.2f}  d' {row.noise_d:5.1f} (with vessels {row.clutter_d:4.1f})"
                f"{'' if searched else '  not searched'}"
            )
            unsearched += row.heat >= args.threshold and not searched
            rows.append(row)
    _summary(rows, unsearched, args.threshold)
    _plot(rows, args.threshold, args.split, args.plot)


def _summary(rows: list[Row], unsearched: int, threshold: float) -> None:
    missed = [r for r in rows if r.heat < threshold]
    print(
        f"\nheat under {threshold}: {len(missed)} of {len(rows)} nodules; heat {threshold} or more outside "
        f"the search region: {unsearched}"
    )
    for kind in sorted({r.nodule_type for r in rows}):
        of_kind = [r for r in rows if r.nodule_type == kind]
        print(f"  {kind:12s} {sum(r.heat < threshold for r in of_kind)} of {len(of_kind)}")
    print(
        f"\nd' by size, found (heat >= {threshold}) and missed: median against the parenchyma "
        f"(how many under {RELIABLE_D_PRIME:g}), median with vessels"
    )
    for low, high in SIZE_BANDS:
        for label, found in (("found", True), ("missed", False)):
            band = [r for r in rows if low <= r.diameter_mm < high and (r.heat >= threshold) == found]
            if not band:
                continue
            noise = np.array([r.noise_d for r in band], dtype=np.float64)
            clutter = np.array([r.clutter_d for r in band], dtype=np.float64)
            noise, clutter = noise[np.isfinite(noise)], clutter[np.isfinite(clutter)]
            print(
                f"  {low:2.0f}-{high:2.0f} mm {label:6s} {len(band):3d}: {_median(noise)} "
                f"({int((noise < RELIABLE_D_PRIME).sum())}), {_median(clutter)}"
            )
    unknown = sum(not np.isfinite(r.noise_d) for r in rows)
    if unknown:
        print(f"  d' not measured (too few places nearby): {unknown}")


def _median(values: npt.NDArray[np.float64]) -> str:
    return f"{np.median(values):5.1f}" if len(values) else "    -"


def _plot(rows: list[Row], threshold: float, split: str, path: Path) -> None:
    figure = Figure(figsize=(11, 4.8))
    for panel, (field, label) in enumerate(
        (("noise_d", "against the parenchyma"), ("clutter_d", "against any place, vessels included")), start=1
    ):
        axes = figure.add_subplot(1, 2, panel)
        for kind, marker in (("solid", "o"), ("part-solid", "s"), ("ground-glass", "^"), ("calcified", "D")):
            chosen = [r for r in rows if r.nodule_type == kind and np.isfinite(getattr(r, field))]
            axes.scatter(
                [getattr(r, field) for r in chosen],
                [r.heat for r in chosen],
                s=[12 + 3 * r.diameter_mm for r in chosen],
                marker=marker,
                alpha=0.7,
                label=kind,
            )
        axes.axhline(
            threshold, color="grey", linestyle="--", linewidth=1, label=f"detector threshold {threshold}"
        )
        axes.axvline(
            RELIABLE_D_PRIME, color="black", linestyle=":", linewidth=1, label=f"d' = {RELIABLE_D_PRIME:g}"
        )
        axes.set_xscale("symlog", linthresh=1.0)
        axes.set_xlim(left=min(0.0, *(getattr(r, field) for r in rows if np.isfinite(getattr(r, field)))))
        axes.set_xlabel(f"d' {label}")
        axes.set_ylabel("detector heat of its candidate (0: none)")
        axes.legend(loc="center left", fontsize=7)
    figure.suptitle(
        f"Shipped detector on the {split} scans: nodules by detectability (marker size: diameter)"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
