"""LIDC annotation reading: the rasteriser, a synthetic case, and the two real LIDC-IDRI cases."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from models.lidc import (
    LidcCase,
    LidcError,
    MarkKind,
    build_lidc_case,
    parse_lidc_xml,
    rasterise_contour,
    read_lidc_case,
)
from models.measurements import BoxMask
from models.volume import Volume


def _slice_indices(mask: BoxMask) -> tuple[int, ...]:
    """The grid slices (k) on which a mask has voxels."""
    return tuple(int(k) + mask.offset[0] for k in np.flatnonzero(mask.array.any(axis=(1, 2))))


# ---------------------------------------------------------------------------------------------
# Rasteriser


def test_rasterise_square_leaves_out_the_drawn_border_by_default() -> None:
    corners = [(10, 20), (15, 20), (15, 25), (10, 25)]  # x = column, y = row; a 6 x 6 pixel outline
    inside = rasterise_contour(corners, (40, 40))
    assert inside.sum() == 4 * 4
    rows, cols = np.nonzero(inside)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (21, 24, 11, 14)
    assert rasterise_contour(corners, (40, 40), include_edge=True).sum() == 6 * 6


def test_rasterise_pixel_chain_equals_corner_polygon() -> None:
    chain = (
        [(x, 5) for x in range(5, 12)]
        + [(11, y) for y in range(6, 12)]
        + [(x, 11) for x in range(10, 4, -1)]
        + [(5, y) for y in range(10, 5, -1)]
    )
    corners = [(5, 5), (11, 5), (11, 11), (5, 11)]
    assert np.array_equal(rasterise_contour(chain, (20, 20)), rasterise_contour(corners, (20, 20)))
    assert rasterise_contour(chain, (20, 20)).sum() == 5 * 5


def test_rasterise_rejects_contour_outside_image() -> None:
    with pytest.raises(LidcError, match="outside"):
        rasterise_contour([(0, 0), (50, 0), (50, 50)], (40, 40))


# ---------------------------------------------------------------------------------------------
# A synthetic case: two readers on a small axial volume


def _roi(z: float, uid: str, corners: list[tuple[int, int]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in corners)
    return (
        f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{uid}</imageSOP_UID>"
        f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
    )


def _square(x0: int, y0: int, size: int) -> list[tuple[int, int]]:
    return [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]


SYNTHETIC_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="http://www.nih.gov">
<ResponseHeader><SeriesInstanceUid>1.2.3</SeriesInstanceUid></ResponseHeader>
<readingSession>
  <servicingRadiologistID>A</servicingRadiologistID>
  <unblindedReadNodule><noduleID>a1</noduleID>
    <characteristics><malignancy>4</malignancy><texture>5</texture></characteristics>
    {_roi(2.0, "uid1", _square(10, 10, 10))}{_roi(4.0, "uid2", _square(10, 10, 10))}
    {_roi(4.0, "uid2", _square(13, 13, 4), inclusion=False)}
  </unblindedReadNodule>
  <nonNodule><nonNoduleID>a2</nonNoduleID><imageZposition>6.0</imageZposition>
    <imageSOP_UID>not-in-series</imageSOP_UID><locus><xCoord>3</xCoord><yCoord>4</yCoord></locus>
  </nonNodule>
</readingSession>
<readingSession>
  <unblindedReadNodule><noduleID>b1</noduleID>
    {_roi(2.0, "uid1", _square(12, 10, 10))}{_roi(4.0, "uid2", _square(12, 10, 10))}
  </unblindedReadNodule>
  <unblindedReadNodule><noduleID>b2</noduleID>{_roi(6.0, "uid3", [(30, 30)])}</unblindedReadNodule>
</readingSession>
</LidcReadMessage>
"""


@pytest.fixture
def synthetic_case(tmp_path: Path) -> LidcCase:
    xml = tmp_path / "001.xml"
    xml.write_text(SYNTHETIC_XML)
    volume = Volume(hu=np.zeros((4, 40, 40), np.float32), spacing=(2.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0))
    return build_lidc_case(parse_lidc_xml(xml), volume, ("uid0", "uid1", "uid2", "uid3"))


def test_synthetic_parsing(synthetic_case: LidcCase) -> None:
    first, second = synthetic_case.annotation.sessions
    assert (first.reader_id, second.reader_id) == ("A", "1")  # no radiologist id: the session index
    outline = first.of_kind(MarkKind.OUTLINED)[0]
    assert [roi.inclusion for roi in outline.rois] == [True, True, False]
    assert outline.characteristics is not None
    assert (outline.characteristics.malignancy, outline.characteristics.subtlety) == (4, None)
    assert [m.kind for m in second.marks] == [MarkKind.OUTLINED, MarkKind.SMALL]


def test_synthetic_masks_consensus_and_fallback(synthetic_case: LidcCase) -> None:
    (nodule,) = synthetic_case.nodules
    mask_a, mask_b = (nodule.reader_masks[r] for r in ("A", "1"))
    assert _slice_indices(mask_a) == _slice_indices(mask_b) == (1, 2)
    # 9 x 9 inside each square; on slice 2 reader A's exclusion removes the 3 x 3 inside of its hole.
    assert mask_a.voxel_count == 81 + 81 - 9
    assert mask_b.voxel_count == 2 * 81
    # Two readers: "at least half" is the union (B's square covers A's hole).
    assert nodule.consensus.voxel_count == 2 * (9 * 11)
    assert nodule.volume_mm3 == pytest.approx(nodule.consensus.voxel_count * 2.0 * 0.25)
    # The consensus is 9 rows x 11 columns of 0.5 mm pixels on both slices (4.5 x 5.5 mm, corners
    # counted): the long axis is the diagonal, the short axis the rectangle's width across it.
    diagonal = np.hypot(4.5, 5.5)
    assert nodule.long_axis_mm == pytest.approx(diagonal)
    assert nodule.short_axis_mm == pytest.approx(2 * 4.5 * 5.5 / diagonal)
    np.testing.assert_allclose(synthetic_case.reader_mask("A").sum(), mask_a.voxel_count)
    # The non-nodule's UID is not in the series: placed by its z position on slice 3.
    non_nodule = next(m for m in synthetic_case.marks if m.kind is MarkKind.NON_NODULE)
    np.testing.assert_allclose(non_nodule.centre_xyz, (1.5, 2.0, 6.0))


def test_synthetic_slice_outside_series_is_an_error(tmp_path: Path) -> None:
    xml = tmp_path / "001.xml"
    xml.write_text(SYNTHETIC_XML.replace("<imageZposition>6.0<", "<imageZposition>7.5<"))
    volume = Volume(hu=np.zeros((4, 40, 40), np.float32), spacing=(2.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0))
    with pytest.raises(LidcError, match="half a slice spacing"):
        build_lidc_case(parse_lidc_xml(xml), volume, ("uid0", "uid1", "uid2", "uid3"))


# ---------------------------------------------------------------------------------------------
# The real LIDC-IDRI cases


@pytest.fixture(scope="module")
def case_0001(lidc_series_dir: Callable[[str], Path]) -> LidcCase:
    return read_lidc_case(lidc_series_dir("LIDC-IDRI-0001"))


@pytest.fixture(scope="module")
def case_0002(lidc_series_dir: Callable[[str], Path]) -> LidcCase:
    return read_lidc_case(lidc_series_dir("LIDC-IDRI-0002"))


# reader id: (outlined nodules, small nodules, non-nodules), as in 069.xml and 071.xml
MARKS_PER_READER = {
    "case_0001": {
        "540461523": (1, 3, 4),
        "1428348137": (1, 0, 1),
        "-750896469": (1, 3, 8),
        "2103845659": (1, 3, 0),
    },
    "case_0002": {
        "-360930790": (0, 7, 8),
        "-628702345": (0, 1, 3),
        "307281171": (1, 11, 12),
        "-101455218": (1, 7, 2),
    },
}
KINDS = (MarkKind.OUTLINED, MarkKind.SMALL, MarkKind.NON_NODULE)


@pytest.mark.parametrize("case_name", sorted(MARKS_PER_READER))
def test_marks_per_reader(case_name: str, request: pytest.FixtureRequest) -> None:
    case: LidcCase = request.getfixturevalue(case_name)
    counts = {s.reader_id: tuple(len(s.of_kind(k)) for k in KINDS) for s in case.annotation.sessions}
    assert counts == MARKS_PER_READER[case_name]
    assert len(case.marks) == sum(sum(c) for c in counts.values())


def test_roi_contents_0001(case_0001: LidcCase) -> None:
    session = case_0001.annotation.sessions[0]
    (outline,) = session.of_kind(MarkKind.OUTLINED)
    assert len(outline.rois) == 8
    assert all(roi.inclusion for roi in outline.rois)
    assert [roi.z_position for roi in outline.rois] == [-125.0 + 2.5 * k for k in range(8)]
    assert outline.rois[0].sop_uid == "1.3.6.1.4.1.14519.5.2.1.6279.6001.110383487652933113465768208719"
    assert outline.rois[0].points[0].tolist() == [312, 355]
    assert outline.characteristics is not None
    chars = outline.characteristics
    assert (chars.subtlety, chars.calcification, chars.texture, chars.malignancy) == (5, 6, 5, 5)
    assert all(m.characteristics is None for m in session.of_kind(MarkKind.SMALL))


def test_exclusion_rois_0002(case_0002: LidcCase) -> None:
    session = next(s for s in case_0002.annotation.sessions if s.reader_id == "307281171")
    (outline,) = session.of_kind(MarkKind.OUTLINED)
    assert len(outline.rois) == 30
    assert sorted(roi.z_position for roi in outline.rois if not roi.inclusion) == [-107.0, -102.0]


def _group_count(case: LidcCase, kind: MarkKind) -> int:
    return sum(1 for g in case.groups if kind in g.kinds)


def test_grouping_0001(case_0001: LidcCase) -> None:
    (nodule,) = case_0001.nodules
    assert nodule.reader_count == 4
    assert set(nodule.group.kinds) == {MarkKind.OUTLINED}
    np.testing.assert_allclose(nodule.centre_xyz, (56.2, 86.2, -115.9), atol=2.0)
    assert sorted(nodule.malignancy) == [4, 5, 5, 5]
    assert 0 < nodule.hu_at_centre < 200  # solid: about 90 HU
    assert nodule.hu_at_centre == pytest.approx(90, abs=60)
    # Sizes as models.measurements defines them (axial slice of largest area, pixel corners counted):
    # long 32.1 mm, short 25.9 mm, 6709 mm3. The equivalent-sphere diameter (23.4 mm) that used to be
    # checked below the largest in-plane diameter (31.8 mm, any slice) is no longer computed.
    assert 15 < nodule.short_axis_mm < nodule.mean_diameter_mm < nodule.long_axis_mm < 40
    assert nodule.volume_mm3 == pytest.approx(6709, abs=1)
    # The three point marks: three small nodules, each marked by the same three readers.
    small = [g for g in case_0001.groups if MarkKind.SMALL in g.kinds]
    assert len(small) == 3
    assert all(set(g.kinds) == {MarkKind.SMALL} and len(g.marks) == 3 for g in small)
    assert _group_count(case_0001, MarkKind.NON_NODULE) == 8
    assert len(case_0001.groups) == 12


def test_grouping_0002(case_0002: LidcCase) -> None:
    (nodule,) = case_0002.nodules
    assert set(nodule.reader_ids) == {"307281171", "-101455218"}
    # The other two readers marked the same place as a non-nodule.
    assert Counter(nodule.group.kinds) == {MarkKind.OUTLINED: 2, MarkKind.NON_NODULE: 2}
    # The README's centre lies between this union (2 readers) and their intersection.
    np.testing.assert_allclose(nodule.centre_xyz, (59.8, 71.7, -103.2), atol=2.0)
    assert sorted(nodule.malignancy) == [4, 5]
    assert nodule.hu_at_centre == pytest.approx(-670, abs=100)  # subsolid
    assert _group_count(case_0002, MarkKind.SMALL) == 11
    assert all(len(set(g.reader_ids)) == len(g.marks) for g in case_0002.groups)


@pytest.mark.parametrize("case_name", ["case_0001", "case_0002"])
def test_consensus_lies_on_the_outlined_slices(case_name: str, request: pytest.FixtureRequest) -> None:
    case: LidcCase = request.getfixturevalue(case_name)
    (nodule,) = case.nodules
    assert nodule.consensus.voxel_count > 0
    # From the XML alone: slices where at least half of the outlining readers drew an inclusion.
    readers_at_z = Counter(
        z
        for outline in nodule.outlines
        for z in {roi.z_position for roi in outline.mark.rois if roi.inclusion}
    )
    expected_z = sorted(z for z, n in readers_at_z.items() if 2 * n >= nodule.reader_count)
    k = np.array(_slice_indices(nodule.consensus), dtype=float)
    consensus_z = case.volume.index_to_patient(np.column_stack([k, 0 * k, 0 * k]))[:, 2]
    np.testing.assert_allclose(consensus_z, expected_z)
    reader_masks = [m.full(case.volume.shape) for m in nodule.reader_masks.values()]
    consensus = nodule.consensus.full(case.volume.shape)
    assert not np.any(consensus & ~np.logical_or.reduce(reader_masks))
    assert not np.any(np.logical_and.reduce(reader_masks) & ~consensus)
    assert consensus[case.volume.nearest_index(nodule.centre_xyz)]


@pytest.mark.parametrize("case_name", ["case_0001", "case_0002"])
def test_reader_masks_differ_but_agree(case_name: str, request: pytest.FixtureRequest) -> None:
    case: LidcCase = request.getfixturevalue(case_name)
    (nodule,) = case.nodules
    masks = {r: case.reader_mask(r) for r in nodule.reader_ids}
    for (_, a), (_, b) in combinations(masks.items(), 2):
        assert not np.array_equal(a, b)
        dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert 0.6 < dice < 0.99


def test_targets_and_ignore_marks_0001(case_0001: LidcCase) -> None:
    (target,) = case_0001.targets()
    assert target is case_0001.nodules[0]
    ignore = case_0001.ignore_marks()
    assert Counter(m.kind for m in ignore) == {MarkKind.SMALL: 9, MarkKind.NON_NODULE: 13}
    assert all(np.linalg.norm(np.subtract(m.centre_mm, target.centre_xyz)) > 10 for m in ignore)
    assert all(m.diameter_mm == 0 for m in ignore)  # point marks: no size
    assert case_0001.targets(min_readers=5) == ()
    assert len(case_0001.ignore_marks(min_readers=5)) == len(case_0001.marks)


def test_targets_and_ignore_marks_0002(case_0002: LidcCase) -> None:
    assert case_0002.targets() == ()  # outlined by 2 readers only
    ignore = case_0002.ignore_marks()
    kinds = Counter(m.kind for m in ignore)
    assert kinds == {MarkKind.OUTLINED: 2, MarkKind.SMALL: 26, MarkKind.NON_NODULE: 25}
    outlined = [m for m in ignore if m.kind is MarkKind.OUTLINED]
    # Long axes on the slice of largest area: 27.0 and 25.0 mm (the old largest diameter on any slice
    # was 29.3 and 30.9 mm).
    assert all(m.diameter_mm > 20 for m in outlined)
    assert {m.reader_id for m in outlined} == {"307281171", "-101455218"}
    (target,) = case_0002.targets(min_readers=2)
    assert len(case_0002.ignore_marks(min_readers=2)) == len(case_0002.marks) - len(target.group.marks)
