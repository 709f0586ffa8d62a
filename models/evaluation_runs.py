"""`cad-node evaluate`: the shipped pipeline on held-out cases (seeds and positions training never
saw) and on the two real LIDC scans, with the report, the FROC plot and overlays of hits, misses and
false positives."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.datasets import (
    LIDC_CASES,
    Backgrounds,
    CaseSource,
    lidc_series_dir,
    make_case,
    split_sources,
)
from models.evaluation import (
    CANDIDATE_RULES,
    EvaluationReport,
    OperatingPoint,
    Outcome,
    ScanMatch,
    ScanTruth,
    Target,
    detection_listing,
    evaluate,
    match_scan,
    operating_point,
    operating_point_json,
    plot_froc,
)
from models.findings import Finding
from models.lidc import read_lidc_case
from models.pipeline import Analysis, CandidateRecord, Pipeline, analyze
from models.preview import PreviewItem, nodule_montage
from models.synthetic.cases import Case
from models.volume import Volume

# The held-out scans keep every candidate the classifier gives at least this probability, so that the
# FROC curve runs past the operating point up to 8 false positives per scan, as LUNA16 scores it.
FROC_MIN_PROBABILITY = 0.02


NO_CANDIDATE = "no candidate from the detector"


@dataclass(frozen=True)
class EvaluationOutput:
    held_out: EvaluationReport
    by_background: dict[str, BackgroundFigures]
    # Nodules the held-out FROC never reaches, counted by where the pipeline lost them (`lost_at`):
    # all, and those of 3 to 6 mm.
    missed: dict[str, Counter[str]]
    lidc_listings: list[str]
    seconds_per_scan: list[float]
    files: list[Path]
    cases_fingerprint: str  # `cases_fingerprint` of the held-out cases


@dataclass(frozen=True)
class BackgroundFigures:
    """The operating point on the held-out scans of one kind of background: synthetic chests, or the
    real LIDC scans that nodules were inserted into (the backgrounds training also saw)."""

    scans: int
    point: OperatingPoint

    def to_json(self) -> dict[str, Any]:
        return {"scans": self.scans, **operating_point_json(self.point)}


def figures_by_background(
    matches: Sequence[ScanMatch], kinds: Sequence[str], threshold: float
) -> dict[str, BackgroundFigures]:
    """`kinds[i]` is the background of `matches[i]`."""
    figures = {}
    for kind in dict.fromkeys(kinds):
        chosen = [m for m, k in zip(matches, kinds, strict=True) if k == kind]
        target_scores = np.concatenate([m.target_scores() for m in chosen])
        fp_scores = np.concatenate([m.false_positive_scores() for m in chosen])
        figures[kind] = BackgroundFigures(
            len(chosen), operating_point(target_scores, fp_scores, len(chosen), threshold)
        )
    return figures


def lost_at(target: Target, candidates: Sequence[CandidateRecord]) -> str:
    """Where the pipeline lost a nodule it did not find: what became of its most probable candidate
    (one within the candidates' hit radius, `CANDIDATE_RULES`), or `NO_CANDIDATE`. A candidate that
    became a finding lost the nodule by the finding's centre, the mask's centroid, lying off it."""
    (best,) = match_scan(ScanTruth("", (target,)), candidates, CANDIDATE_RULES).targets
    return NO_CANDIDATE if best.detection_index is None else str(candidates[best.detection_index].fate)


def missed_by_stage(
    matches: Sequence[ScanMatch], candidates: Sequence[Sequence[CandidateRecord]]
) -> dict[str, Counter[str]]:
    """`lost_at` of every target no detection of its scan hits, counted; "3-6 mm" for the small ones."""
    missed: dict[str, Counter[str]] = {"all": Counter(), "3-6 mm": Counter()}
    for match, records in zip(matches, candidates, strict=True):
        for found in match.targets:
            if found.detection_index is None:
                stage = lost_at(found.target, records)
                missed["all"][stage] += 1
                if 3.0 <= found.target.mean_diameter_mm < 6.0:
                    missed["3-6 mm"][stage] += 1
    return missed


def truth_of(case: Case, case_id: str) -> ScanTruth:
    targets = [
        Target(
            label=n.label,
            centre_mm=n.centre_mm,
            mean_diameter_mm=n.mean_diameter_mm,
            volume_mm3=n.volume_mm3,
            nodule_type=n.nodule_type,
            mask=n.mask,
            long_axis_mm=n.long_axis_mm,
        )
        for n in case.nodules
    ]
    return ScanTruth(case_id=case_id, targets=targets, ignore=list(case.ignore))


def cases_fingerprint(truths: Sequence[ScanTruth]) -> str:
    """Which held-out cases a report was measured on: a digest of each case's nodules (type, centre
    and diameter to 0.1 mm). The data layer now draws the same cases to the bit whatever kernels
    OpenBLAS and numpy pick on an x86-64 CPU (`models.synthetic.portable`), but it drew others before,
    on other CPUs too, and will whenever it changes (docs/pipeline.md, "What limits the CPM",
    item 17). Figures of two reports compare only where their fingerprints agree."""
    digest = hashlib.sha256()
    for truth in truths:
        nodules = sorted(
            (t.nodule_type, *(round(float(v), 1) for v in t.centre_mm), round(t.mean_diameter_mm, 1))
            for t in truth.targets
        )
        digest.update(json.dumps([truth.case_id, nodules]).encode())
    return digest.hexdigest()[:12]


def analysed_cases(
    pipeline: Pipeline,
    sources: Sequence[CaseSource],
    label: str,
    progress: Callable[[str], None] = lambda message: None,
    min_probability: float = FROC_MIN_PROBABILITY,
) -> Iterator[tuple[CaseSource, Case, Analysis]]:
    """Each case of the data layer with the pipeline's findings down to `min_probability`."""
    backgrounds = Backgrounds()
    for index, source in enumerate(sources, start=1):
        progress(f"{label} case {index}/{len(sources)}: {source.name}")
        case = make_case(source, backgrounds)
        yield source, case, analyze(case.volume, pipeline, min_probability=min_probability)


def evaluate_pipeline(
    pipeline: Pipeline,
    out_dir: Path,
    *,
    max_cases: int | None = None,
    threshold: float | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> EvaluationOutput:
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = split_sources("test")
    if max_cases is not None:
        synthetic = [s for s in sources if s.kind == "synthetic"]
        inserted = [s for s in sources if s.kind == "insertion"]
        half = max(1, max_cases // 2)
        sources = synthetic[: max_cases - min(half, len(inserted))] + inserted[:half]
    scans: list[tuple[ScanTruth, list[Finding]]] = []
    candidates: list[list[CandidateRecord]] = []
    seconds = []
    overlays = []
    kinds: list[str] = []
    for source, case, analysis in analysed_cases(pipeline, sources, "held-out", progress):
        seconds.append(sum(analysis.seconds.values()))
        truth = truth_of(case, source.name)
        scans.append((truth, analysis.findings))
        candidates.append(analysis.candidates)
        kinds.append(source.kind)
        if len(overlays) < 4:
            overlays.append(
                _overlay(case.volume, truth, analysis, out_dir / f"overlay-{source.name}.png", pipeline)
            )
    report = evaluate(scans, threshold=pipeline.thresholds.probability if threshold is None else threshold)
    fingerprint = cases_fingerprint([truth for truth, _ in scans])
    by_background = figures_by_background(report.matches, kinds, report.threshold)
    missed = missed_by_stage(report.matches, candidates)
    files = [out_dir / "froc.png", out_dir / "report.json", *overlays]
    plot_froc(report, files[0], groups=["all", ">= 6 mm"])
    listings = []
    for name in LIDC_CASES:
        progress(f"real case {name}")
        lidc = read_lidc_case(lidc_series_dir(name))
        analysis = analyze(lidc.volume, pipeline)
        seconds.append(sum(analysis.seconds.values()))
        truth = ScanTruth.from_lidc(lidc)
        match = match_scan(truth, analysis.findings)
        listings.append(f"{name}\n{detection_listing(match)}")
        files.append(_overlay(lidc.volume, truth, analysis, out_dir / f"overlay-{name}.png", pipeline, match))
    files[1].write_text(
        json.dumps(
            {
                "held_out": report.to_json(),
                "held_out_cases_fingerprint": fingerprint,
                "by_background": {kind: f.to_json() for kind, f in by_background.items()},
                "missed_by_stage": {group: dict(counts) for group, counts in missed.items()},
                "lidc": listings,
                "seconds_per_scan": seconds,
            },
            indent=2,
        )
        + "\n"
    )
    return EvaluationOutput(
        held_out=report,
        by_background=by_background,
        missed=missed,
        lidc_listings=listings,
        seconds_per_scan=seconds,
        files=files,
        cases_fingerprint=fingerprint,
    )


def _overlay(
    volume: Volume,
    truth: ScanTruth,
    analysis: Analysis,
    path: Path,
    pipeline: Pipeline,
    match: ScanMatch | None = None,
) -> Path:
    """Each target (green: found, red: missed) and each false positive (orange) on its axial slice."""
    match = match or match_scan(truth, analysis.findings)
    items = []
    for target, result in zip(truth.targets, match.targets, strict=True):
        found = result.found_at(pipeline.thresholds.probability)
        items.append(
            PreviewItem(
                label=f"target {target.label} {target.nodule_type} {target.mean_diameter_mm:.1f} mm: "
                + ("found" if found else "missed"),
                centre_kji=tuple(volume.patient_to_index(target.centre_mm)),  # type: ignore[arg-type]
                outline=None if target.mask is None else _slice_outline(target, volume),
                colour="lime" if found else "red",
            )
        )
    operating = pipeline.thresholds.probability
    for finding, outcome in zip(analysis.findings, match.outcomes, strict=True):
        if outcome.outcome is Outcome.FALSE_POSITIVE and finding.probability >= operating:
            k = finding.axial_slice_index
            items.append(
                PreviewItem(
                    label=f"false positive p={finding.probability:.2f} {finding.mean_diameter_mm:.1f} mm",
                    centre_kji=(float(k), *volume.patient_to_index(finding.centre_mm)[1:]),
                    outline=finding.mask.axial_slice(k, volume.shape[1:]),
                    colour="orange",
                )
            )
    if not items:
        items.append(
            PreviewItem(label="no targets, no detections", centre_kji=tuple(np.asarray(volume.shape) / 2))
        )  # type: ignore[arg-type]
    return nodule_montage(volume, items[:16], path, title=f"{truth.case_id}: hits, misses, false positives")


def _slice_outline(target: Target, volume: Volume) -> np.ndarray:
    k = int(np.rint(volume.patient_to_index(target.centre_mm)[0]))
    assert target.mask is not None
    return target.mask.axial_slice(k, volume.shape[1:])
