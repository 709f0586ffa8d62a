"""Detector and segmenter evaluation (models.evaluation): LUNA16 matching, FROC, CPM, breakdowns."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import (
    ALL,
    FROC_FP_RATES,
    Detection,
    MatchRules,
    Outcome,
    ScanTruth,
    Target,
    cpm_difference,
    detection_listing,
    dice,
    evaluate,
    froc_curve,
    match_scan,
    operating_point,
    plot_froc,
)
from models.findings import Finding
from models.ground_truth import IgnoreMark, measure_nodule, write_ground_truth
from models.measurements import BoxMask
from models.volume import Volume

ORIGIN = (0.0, 0.0, 0.0)


def _target(
    label: int,
    centre: tuple[float, float, float] = ORIGIN,
    diameter: float = 10.0,
    nodule_type: str = "solid",
    *,
    volume: float | None = None,
    mask: BoxMask | None = None,
) -> Target:
    return Target(label, centre, diameter, volume, nodule_type, mask)


def _truth(
    targets: Sequence[Target] = (), ignore: Sequence[IgnoreMark] = (), case_id: str = "scan"
) -> ScanTruth:
    return ScanTruth(case_id, tuple(targets), tuple(ignore))


def _at(x: float, probability: float = 0.9, **kwargs: object) -> Detection:
    return Detection((x, 0.0, 0.0), probability, **kwargs)  # type: ignore[arg-type]


def _outcomes(truth: ScanTruth, detections: Sequence[Detection], **rules: float) -> list[Outcome]:
    return [o.outcome for o in match_scan(truth, detections, MatchRules(**rules)).outcomes]


def _cube(offset: tuple[int, int, int], size: int = 4) -> BoxMask:
    return BoxMask(offset, np.ones((size, size, size), dtype=bool))


# ---------------------------------------------------------------------------------------------
# Matching


def test_hit_inside_the_radius_miss_outside() -> None:
    truth = _truth([_target(1, diameter=10.0)])  # radius 5 mm
    assert _outcomes(truth, [_at(4.9)]) == [Outcome.HIT]
    assert _outcomes(truth, [_at(5.1)]) == [Outcome.FALSE_POSITIVE]
    # On the radius: outside, as in LUNA16 (distance < radius).
    assert _outcomes(truth, [Detection((3.0, 4.0, 0.0), 0.9)]) == [Outcome.FALSE_POSITIVE]
    # A floor on the hit radius lets an off-centre detection of a small nodule hit it.
    assert _outcomes(_truth([_target(1, diameter=4.0)]), [_at(2.5)]) == [Outcome.FALSE_POSITIVE]
    assert _outcomes(_truth([_target(1, diameter=4.0)]), [_at(2.5)], min_hit_radius_mm=3.0) == [Outcome.HIT]


def test_target_counts_once_and_duplicates_are_not_false_positives() -> None:
    truth = _truth([_target(1)])
    match = match_scan(truth, [_at(2.0, 0.7), _at(0.5, 0.9), _at(1.0, 0.9), _at(20.0, 0.3)])
    # The most probable detection is the hit; of equal probabilities, the nearest.
    assert [o.outcome for o in match.outcomes] == [
        Outcome.DUPLICATE,
        Outcome.HIT,
        Outcome.DUPLICATE,
        Outcome.FALSE_POSITIVE,
    ]
    (target,) = match.targets
    assert (target.detection_index, target.probability) == (1, 0.9)
    assert match.false_positive_scores().tolist() == [0.3]
    point = operating_point(match.target_scores(), match.false_positive_scores(), 1, threshold=0.1)
    assert (point.tp, point.fp, point.fn) == (1, 1, 0)


def test_detection_in_two_targets_counts_for_both() -> None:
    truth = _truth([_target(1, (0.0, 0.0, 0.0)), _target(2, (6.0, 0.0, 0.0))])
    match = match_scan(truth, [_at(3.0)])
    assert [m.detection_index for m in match.targets] == [0, 0]
    assert match.outcomes[0].target_labels == (1, 2)


def test_detection_on_an_ignore_mark_is_neither_hit_nor_false_positive() -> None:
    point_mark = IgnoreMark((50.0, 0.0, 0.0), "nodule<3mm", 0.0, "reader A")
    outlined = IgnoreMark((100.0, 0.0, 0.0), "nodule>=3mm", 20.0)
    truth = _truth([_target(1)], [point_mark, outlined])
    detections = [_at(54.0), _at(56.0), _at(108.0), _at(111.0), _at(1.0)]
    match = match_scan(truth, detections)
    assert [o.outcome for o in match.outcomes] == [
        Outcome.IGNORED,  # within the 5 mm of a point mark (LUNA16: 10 mm diameter)
        Outcome.FALSE_POSITIVE,
        Outcome.IGNORED,  # within half the 20 mm diameter
        Outcome.FALSE_POSITIVE,
        Outcome.HIT,
    ]
    assert match.outcomes[0].ignore_mark is point_mark
    assert "ignore mark of kind nodule<3mm" in match.outcomes[0].describe()
    assert _outcomes(truth, [_at(56.0)], point_mark_radius_mm=7.0) == [Outcome.IGNORED]
    # A target wins over an ignore mark at the same place.
    overlap = _truth([_target(1)], [IgnoreMark(ORIGIN, "non-nodule", 0.0)])
    assert _outcomes(overlap, [_at(1.0)]) == [Outcome.HIT]


def test_accepts_findings() -> None:
    mask = _cube((2, 2, 2))
    finding = Finding(
        centre_mm=(0.5, 0.0, 0.0),
        probability=0.8,
        long_axis_mm=11.0,
        short_axis_mm=9.0,
        volume_mm3=120.0,
        mean_hu=40.0,
        max_hu=90.0,
        nodule_type="solid",
        solid_part_mm=10.0,
        side="right",
        zone="upper",
        lung_rads="4A",
        axial_slice_index=3,
        long_axis_ends_mm=((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
        short_axis_ends_mm=((0.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        mask=mask,
    )
    truth = _truth([_target(1, diameter=10.0, volume=100.0, mask=mask)])
    segmentation = evaluate([(truth, [finding])], threshold=0.5).group(ALL).segmentation
    assert segmentation.found == 1
    assert segmentation.dice.mean == 1.0
    assert segmentation.relative_volume_error.mean == pytest.approx(0.2)
    assert segmentation.diameter_error_mm.mean == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# FROC and the operating point


def _four_scans() -> list[tuple[ScanTruth, list[Detection]]]:
    """4 targets, 8 false positives (plus a duplicate and an ignored detection that must not count).
    By falling threshold (T = target found, F = false positive):
    F.95 T.9 F.85 F.8 F.7 T.6 F.5 F.4 T.3 F.2 F.1; one target is never found."""
    scan_a = _truth([_target(1, (0.0, 0.0, 0.0)), _target(2, (50.0, 0.0, 0.0))], case_id="a")
    scan_b = _truth([_target(1, (0.0, 0.0, 0.0))], case_id="b")
    scan_c = _truth([], [IgnoreMark((-50.0, 0.0, 0.0), "non-nodule", 0.0)], case_id="c")
    scan_d = _truth([_target(1, (0.0, 0.0, 0.0))], case_id="d")
    return [
        (scan_a, [_at(0.0, 0.9), _at(1.0, 0.5), _at(100.0, 0.8), _at(50.0, 0.3)]),
        (scan_b, [_at(100.0, 0.95), _at(0.0, 0.6), _at(200.0, 0.2)]),
        (scan_c, [_at(x, p) for x, p in ((10, 0.7), (30, 0.5), (60, 0.4), (90, 0.1))] + [_at(-50.0, 0.99)]),
        (scan_d, [_at(100.0, 0.85)]),
    ]


# Highest sensitivity with at most x false positives per scan, read off the sequence above.
EXPECTED_SENSITIVITIES = (0.0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75)


def test_froc_by_hand() -> None:
    report = evaluate(_four_scans())
    froc = report.group(ALL).froc
    assert report.scans == 4
    assert report.group(ALL).targets == 4
    assert froc.sensitivities == pytest.approx(EXPECTED_SENSITIVITIES)
    assert froc.cpm == pytest.approx(sum(EXPECTED_SENSITIVITIES) / 7)
    assert froc.cpm == pytest.approx(3.25 / 7)
    curve = froc.curve
    assert curve.fp_per_scan[0] == 0 and curve.sensitivity[0] == 0 and math.isinf(curve.thresholds[0])
    assert curve.fp_per_scan[-1] == pytest.approx(2.0)  # 8 false positives over 4 scans
    assert curve.sensitivity[-1] == pytest.approx(0.75)
    assert np.all(np.diff(curve.fp_per_scan) >= 0) and np.all(np.diff(curve.sensitivity) >= 0)
    assert froc.sensitivity_ci is None and froc.cpm_ci is None


def test_froc_without_false_positives_keeps_its_last_sensitivity() -> None:
    curve = froc_curve(np.array([0.9, 0.4, -math.inf]), np.zeros(0), n_scans=2)
    assert [curve.sensitivity_at(x) for x in FROC_FP_RATES] == pytest.approx([2 / 3] * 7)


def test_operating_point_and_f1() -> None:
    point = evaluate(_four_scans(), threshold=0.5).group(ALL).operating_point
    # At 0.5: targets found at 0.9 and 0.6; false positives 0.95, 0.85, 0.8, 0.7, 0.5.
    assert (point.tp, point.fp, point.fn) == (2, 5, 2)
    assert point.precision == pytest.approx(2 / 7)
    assert point.recall == pytest.approx(0.5)
    assert point.f1 == pytest.approx(2 * (2 / 7) * 0.5 / (2 / 7 + 0.5))
    assert point.f1 == pytest.approx(4 / 11)
    assert point.fp_per_scan == pytest.approx(1.25)


def test_bootstrap_interval_is_reproducible_and_holds_the_cpm() -> None:
    first = evaluate(_four_scans(), n_bootstrap=200, seed=3).group(ALL).froc
    second = evaluate(_four_scans(), n_bootstrap=200, seed=3).group(ALL).froc
    assert first.cpm_ci == second.cpm_ci
    assert first.cpm_ci is not None and first.sensitivity_ci is not None
    assert first.cpm_ci[0] <= first.cpm <= first.cpm_ci[1]
    assert len(first.sensitivity_ci) == len(FROC_FP_RATES)


def _matched(scans: Sequence[tuple[ScanTruth, list[Detection]]]) -> list:
    return [match_scan(truth, detections) for truth, detections in scans]


def test_a_detector_compared_with_itself_differs_by_nothing() -> None:
    same = cpm_difference(_matched(_four_scans()), _matched(_four_scans()), n_bootstrap=200)
    assert same.a == same.b == pytest.approx(3.25 / 7)
    assert same.difference == 0 and same.ci == (0.0, 0.0) and not same.tells_apart


def _scans_found(found: Sequence[bool]) -> list[tuple[ScanTruth, list[Detection]]]:
    """A scan of one nodule and one look-alike for each item: the nodule found above the look-alike,
    or missed."""
    return [
        (_truth([_target(1)], case_id=f"scan-{i}"), [_at(100.0, 0.5)] + ([_at(0.0, 0.9)] if hit else []))
        for i, hit in enumerate(found)
    ]


def test_paired_scans_tell_a_clear_gain_apart_and_few_scans_do_not() -> None:
    missed = _matched(_scans_found([False] * 30))
    many = cpm_difference(missed, _matched(_scans_found([True] * 30)))
    assert (many.a, many.b, many.difference) == (0.0, 1.0, 1.0)
    assert many.ci == (1.0, 1.0) and many.tells_apart
    # one scan of thirty better: within what the resampled scans give by chance
    small = cpm_difference(missed, _matched(_scans_found([True] + [False] * 29)), n_bootstrap=500)
    assert small.difference == pytest.approx(1 / 30)
    assert small.ci[0] <= 0 < small.ci[1] and not small.tells_apart


def test_a_paired_comparison_needs_the_same_scans() -> None:
    with pytest.raises(ValueError, match="same scans"):
        cpm_difference(_matched(_four_scans()), _matched(_four_scans()[:3]))
    renamed = [(ScanTruth(t.case_id + "x", t.targets, t.ignore), d) for t, d in _four_scans()]
    with pytest.raises(ValueError, match="same scans"):
        cpm_difference(_matched(_four_scans()), _matched(renamed))


# ---------------------------------------------------------------------------------------------
# Segmentation


def test_dice() -> None:
    assert dice(_cube((0, 0, 0)), _cube((0, 0, 0))) == 1.0
    # Same mask held in a larger box.
    padded = np.zeros((6, 6, 6), dtype=bool)
    padded[1:5, 1:5, 1:5] = True
    assert dice(_cube((3, 3, 3)), BoxMask((2, 2, 2), padded)) == 1.0
    # Cubes of 4 voxels a side, 2 voxels apart along i: 32 shared voxels of 64 each.
    assert dice(_cube((0, 0, 0)), _cube((0, 0, 2))) == pytest.approx(0.5)
    # 1 voxel apart on each axis: 27 shared.
    assert dice(_cube((0, 0, 0)), _cube((1, 1, 1))) == pytest.approx(2 * 27 / 128)
    assert dice(_cube((0, 0, 0)), _cube((0, 0, 4))) == 0.0


def test_volume_and_diameter_errors_have_the_sign_of_predicted_minus_true() -> None:
    truth = _truth(
        [
            _target(1, (0.0, 0.0, 0.0), 10.0, volume=100.0, mask=_cube((0, 0, 0))),
            _target(2, (50.0, 0.0, 0.0), 20.0, volume=200.0, mask=_cube((10, 10, 10))),
        ]
    )
    detections = [
        _at(0.0, 0.9, volume_mm3=120.0, mean_diameter_mm=11.0, mask=_cube((0, 0, 2))),
        _at(50.0, 0.8, volume_mm3=150.0, mean_diameter_mm=18.0, mask=_cube((10, 10, 10))),
        _at(51.0, 0.3, volume_mm3=1.0, mean_diameter_mm=1.0),  # a duplicate: not measured
    ]
    segmentation = evaluate([(truth, detections)], threshold=0.5).group(ALL).segmentation
    assert segmentation.found == 2
    assert segmentation.relative_volume_error.n == 2
    assert segmentation.relative_volume_error.mean == pytest.approx((0.2 - 0.25) / 2)
    assert segmentation.diameter_error_mm.mean == pytest.approx((1.0 - 2.0) / 2)
    assert segmentation.relative_diameter_error.median == pytest.approx((0.1 - 0.1) / 2)
    assert segmentation.dice.mean == pytest.approx(0.75)
    assert segmentation.dice.median == pytest.approx(0.75)
    # Above the second detection's probability only the first target is measured: larger than true.
    above = evaluate([(truth, detections)], threshold=0.85).group(ALL).segmentation
    assert above.found == 1
    assert above.relative_volume_error.mean > 0 and above.diameter_error_mm.mean > 0
    smaller = evaluate([(truth, [_at(0.0, 0.9, volume_mm3=80.0)])]).group(ALL).segmentation
    assert smaller.relative_volume_error.mean == pytest.approx(-0.2)
    assert smaller.dice.n == 0 and math.isnan(smaller.dice.mean)


# ---------------------------------------------------------------------------------------------
# Breakdowns and the report


def test_breakdown_by_type_and_size() -> None:
    targets = [
        _target(1, (0.0, 0.0, 0.0), 4.0, "solid"),
        _target(2, (100.0, 0.0, 0.0), 8.0, "solid"),
        _target(3, (200.0, 0.0, 0.0), 15.0, "ground-glass"),
        _target(4, (300.0, 0.0, 0.0), 25.0, "part-solid"),
        _target(5, (400.0, 0.0, 0.0), 5.0, "calcified"),
        _target(6, (500.0, 0.0, 0.0), 6.0, "solid"),  # a bucket boundary: 6-10 mm
    ]
    found = (0, 2, 3, 5)
    detections = [_at(100.0 * i, 0.9) for i in found] + [_at(-500.0, 0.8), _at(-700.0, 0.2)]
    report = evaluate([(_truth(targets), detections)], threshold=0.5)
    names = [g.name for g in report.groups]
    assert names == [
        "all",
        "solid",
        "part-solid",
        "ground-glass",
        "calcified",
        "3-6 mm",
        "6-10 mm",
        "10-20 mm",
        "20-30 mm",
        ">= 6 mm",
    ]
    counts = {g.name: (g.targets, g.operating_point.tp, g.operating_point.fp) for g in report.groups}
    assert counts == {
        "all": (6, 4, 1),
        "solid": (3, 2, 1),
        "part-solid": (1, 1, 1),
        "ground-glass": (1, 1, 1),
        "calcified": (1, 0, 1),
        "3-6 mm": (2, 1, 1),
        "6-10 mm": (2, 1, 1),
        "10-20 mm": (1, 1, 1),
        "20-30 mm": (1, 1, 1),
        ">= 6 mm": (4, 3, 1),
    }
    # Sensitivity of a group over the false positives of all scans (2 false positives, 1 scan).
    assert report.group("calcified").froc.sensitivities == pytest.approx([0.0] * 7)
    assert report.group(">= 6 mm").froc.curve.sensitivity_at(8.0) == pytest.approx(0.75)
    # Outside the reported buckets: a group of its own, so that the buckets add up.
    large = evaluate([(_truth([_target(1, diameter=32.0, nodule_type="unknown")]), [])])
    assert [g.name for g in large.groups] == ["all", "unknown", ">= 6 mm", ">= 30 mm"]


def test_report_json_and_table() -> None:
    report = evaluate(_four_scans(), threshold=0.5, n_bootstrap=20)
    document = report.to_json()
    text = json.dumps(document, allow_nan=False)
    assert json.loads(text)["groups"][0]["froc"]["cpm"] == pytest.approx(3.25 / 7, abs=1e-4)
    assert document["groups"][0]["operating_point"]["tp"] == 2
    table = report.format_table()
    assert "CPM 95% CI" in table and "precision" in table and "Dice" in table
    froc_header = next(line for line in table.splitlines() if line.startswith("group") and "CPM" in line)
    assert froc_header.split()[2:9] == ["1/8", "1/4", "1/2", "1", "2", "4", "8"]
    # Columns line up: each table's separator is as wide as its widest row.
    for block in table.split("\n\n")[1::2]:
        lines = block.splitlines()
        assert max(len(line) for line in lines) == len(lines[1])


def test_plot_froc_writes_a_png(tmp_path: Path) -> None:
    report = evaluate(_mixed_scans())
    path = plot_froc(report, tmp_path / "froc.png", groups=["all", "solid", ">= 6 mm"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def _mixed_scans() -> list[tuple[ScanTruth, list[Detection]]]:
    rng = np.random.default_rng(0)
    types = ("solid", "part-solid", "ground-glass", "calcified")
    scans = []
    for s in range(20):
        targets = [
            _target(i + 1, (100.0 * i, 0.0, 0.0), float(rng.uniform(3, 30)), types[int(rng.integers(4))])
            for i in range(3)
        ]
        detections = [_at(100.0 * i, float(rng.uniform(0.2, 1.0))) for i in range(3) if rng.random() < 0.8]
        detections += [
            _at(-100.0 * (k + 1), float(rng.uniform(0, 0.8))) for k in range(int(rng.integers(0, 8)))
        ]
        scans.append((_truth(targets, case_id=f"s{s}"), detections))
    return scans


def test_detection_listing() -> None:
    scans = _four_scans()
    match = match_scan(*scans[0])
    text = detection_listing(match)
    assert text.splitlines()[0].startswith(
        "a: 2 target(s), 0 ignore mark(s), 4 detection(s): 2 hit, 1 duplicate"
    )
    assert "hit target 1" in text and "duplicate on target 1" in text and "false positive" in text
    listing_d = detection_listing(match_scan(*scans[3]))
    assert "missed: target 1 (solid, 10.0 mm)" in listing_d


# ---------------------------------------------------------------------------------------------
# Truth from files


def test_from_case_dir(tmp_path: Path) -> None:
    hu = np.full((20, 40, 40), -850.0, dtype=np.float32)
    volume = Volume(hu=hu, spacing=(1.0, 0.5, 0.5), origin=(-10.0, -10.0, -50.0))
    k, j, i = np.ogrid[:20, :40, :40]
    sphere = (k - 10) ** 2 + ((j - 12) / 2) ** 2 + ((i - 20) / 2) ** 2 <= 9
    cube = np.zeros_like(sphere)
    cube[4:8, 28:36, 8:16] = True
    hu[sphere | cube] = 30.0
    nodules = [
        measure_nodule(
            label,
            BoxMask.from_full(mask),
            volume,
            nodule_type=kind,
            solid_part=None,
            shape="round",
            location="intraparenchymal",
            side="right",
            lobe=None,
            nominal_diameter_mm=6.0,
        )
        for label, mask, kind in ((1, sphere, "solid"), (2, cube, "ground-glass"))
    ]
    marks = [IgnoreMark((1.0, 2.0, -45.0), "real nodule, 2 readers", 8.0, "r1")]
    write_ground_truth(tmp_path, volume, nodules, case={"seed": 1}, ignore=marks)
    truth = ScanTruth.from_case_dir(tmp_path)
    assert truth.case_id == tmp_path.name
    assert [t.label for t in truth.targets] == [1, 2]
    assert [t.nodule_type for t in truth.targets] == ["solid", "ground-glass"]
    for target, nodule in zip(truth.targets, nodules, strict=True):
        np.testing.assert_allclose(target.centre_mm, nodule.centre_mm, atol=1e-3)
        assert target.mean_diameter_mm == pytest.approx(nodule.mean_diameter_mm, abs=1e-3)
        assert target.volume_mm3 == pytest.approx(nodule.volume_mm3, abs=1e-3)
        assert target.mask is not None
        assert target.mask.offset == nodule.mask.offset
        assert np.array_equal(target.mask.array, nodule.mask.array)
    assert truth.ignore == (IgnoreMark((1.0, 2.0, -45.0), "real nodule, 2 readers", 8.0, "r1"),)
    match = match_scan(truth, [Detection(nodules[0].centre_mm, 0.9, mask=nodules[0].mask)])
    assert match.outcomes[0].outcome is Outcome.HIT


# ---------------------------------------------------------------------------------------------
# LIDC-IDRI


@pytest.fixture(scope="module")
def truth_0001(lidc_series_dir: Callable[[str], Path]) -> ScanTruth:
    from models.lidc import read_lidc_case

    return ScanTruth.from_lidc(read_lidc_case(lidc_series_dir("LIDC-IDRI-0001")))


def test_lidc_0001(truth_0001: ScanTruth) -> None:
    assert truth_0001.case_id == "LIDC-IDRI-0001"
    (target,) = truth_0001.targets
    assert target.nodule_type == "solid"  # texture 5, no calcification
    assert target.mask is not None and target.volume_mm3 == pytest.approx(6709, abs=1)
    assert len(truth_0001.ignore) == 22  # 9 small-nodule and 13 non-nodule point marks
    small = next(m for m in truth_0001.ignore if m.kind == "nodule<3mm")
    detections = [
        Detection((56.4, 86.3, -116.0), 0.95, mask=target.mask),
        Detection(small.centre_mm, 0.6),
        Detection((0.0, 0.0, 0.0), 0.1),
    ]
    match = match_scan(truth_0001, detections)
    assert [o.outcome for o in match.outcomes] == [Outcome.HIT, Outcome.IGNORED, Outcome.FALSE_POSITIVE]
    listing = detection_listing(match)
    assert "hit target 1" in listing and "ignore mark of kind nodule<3mm" in listing
    segmentation = evaluate([(truth_0001, detections)]).group(ALL).segmentation
    assert segmentation.dice.mean == pytest.approx(1.0)


def test_figures_by_background_split_the_operating_point() -> None:
    from models.evaluation_runs import figures_by_background

    synthetic = match_scan(
        _truth([_target(1), _target(2, (50.0, 0.0, 0.0))]), [_at(1.0, 0.9), _at(90.0, 0.8)]
    )
    inserted = [
        match_scan(_truth([_target(1)]), [_at(1.0, 0.4), _at(30.0, 0.95), _at(60.0, 0.2)]),
        match_scan(_truth([_target(1)]), [_at(0.0, 0.99)]),
    ]
    figures = figures_by_background([synthetic, *inserted], ["synthetic", "insertion", "insertion"], 0.5)
    assert list(figures) == ["synthetic", "insertion"]
    synthetic_point, inserted_point = figures["synthetic"].point, figures["insertion"].point
    assert (synthetic_point.tp, synthetic_point.tp + synthetic_point.fn) == (1, 2)
    assert synthetic_point.fp_per_scan == 1.0
    assert (inserted_point.tp, inserted_point.tp + inserted_point.fn) == (1, 2)
    assert inserted_point.fp == 1  # the one at p 0.2 is below the operating point
    assert figures["insertion"].scans == 2
    assert figures["insertion"].to_json()["fp_per_scan"] == 0.5


def test_a_missed_nodule_is_counted_where_the_pipeline_lost_it() -> None:
    from models.evaluation_runs import NO_CANDIDATE, lost_at, missed_by_stage
    from models.pipeline import CandidateRecord, Fate

    def record(x: float, probability: float, fate: Fate) -> CandidateRecord:
        return CandidateRecord((x, 0.0, 0.0), 0.5, probability, fate)

    small, large = _target(1, diameter=4.0), _target(2, (50.0, 0.0, 0.0), diameter=12.0)
    # A small nodule's candidate counts within 3 mm; a large one's within its radius.
    assert lost_at(small, [record(2.5, 0.3, Fate.NO_MASK)]) == str(Fate.NO_MASK)
    assert lost_at(small, [record(3.5, 0.3, Fate.NO_MASK)]) == NO_CANDIDATE
    assert lost_at(large, [record(55.5, 0.3, Fate.NO_MASK)]) == str(Fate.NO_MASK)
    # Of two candidates on it, the more probable tells.
    near = [record(1.0, 0.01, Fate.BELOW_FLOOR), record(-1.0, 0.6, Fate.FINDING)]
    assert lost_at(small, near) == str(Fate.FINDING)

    # The small nodule is found, the large one not: only the large one is counted.
    match = match_scan(_truth([small, large]), [_at(0.5, 0.9)])
    missed = missed_by_stage([match], [[record(0.5, 0.9, Fate.FINDING), record(51.0, 0.4, Fate.NO_MASK)]])
    assert missed["all"] == {str(Fate.NO_MASK): 1}
    assert not missed["3-6 mm"]
    missed = missed_by_stage([match_scan(_truth([small]), [])], [[]])
    assert missed["all"] == missed["3-6 mm"] == {NO_CANDIDATE: 1}


def test_the_cases_fingerprint_names_the_cases_a_report_was_measured_on() -> None:
    from models.evaluation_runs import cases_fingerprint

    scans = [_truth([_target(1, (10.0, 20.0, 30.0), 4.2), _target(2, diameter=12.0)], case_id="a")]
    same = [_truth([_target(2, diameter=12.0), _target(1, (10.0, 20.0, 30.0), 4.2)], case_id="a")]
    assert cases_fingerprint(scans) == cases_fingerprint(same)  # the nodules' order does not matter
    # Below the 0.1 mm it rounds to, last-bit differences of a centre do not change it.
    nudged = [_truth([_target(1, (10.0 + 1e-9, 20.0, 30.0), 4.2), _target(2, diameter=12.0)], case_id="a")]
    assert cases_fingerprint(nudged) == cases_fingerprint(scans)
    moved = [_truth([_target(1, (10.5, 20.0, 30.0), 4.2), _target(2, diameter=12.0)], case_id="a")]
    other_type = [
        _truth([_target(1, (10.0, 20.0, 30.0), 4.2, "part-solid"), _target(2, diameter=12.0)], case_id="a")
    ]
    renamed = [_truth(scans[0].targets, case_id="b")]
    fingerprints = {cases_fingerprint(s) for s in (scans, moved, other_type, renamed)}
    assert len(fingerprints) == 4
    assert all(len(f) == 12 for f in fingerprints)
