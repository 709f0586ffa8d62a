"""Nodule measurements (models.measurements) and the Lung-RADS category (models.lung_rads): no data."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from models.lung_rads import lung_rads_category
from models.measurements import BoxMask, axial_diameters, volume_mm3

SPACING = (2.0, 0.5, 0.8)  # slice, row, column (mm): rows and columns of different size
PIXEL_DIAGONAL_MM = math.hypot(SPACING[1], SPACING[2])


def _ellipse(
    shape: tuple[int, int, int],
    k: int,
    centre_mm: tuple[float, float],
    semi_axes_mm: tuple[float, float],
    angle_deg: float = 0.0,
) -> npt.NDArray[np.bool_]:
    """Pixels whose centre lies in an ellipse on slice k (first semi-axis at ``angle_deg`` from the
    column direction), in millimetres on the anisotropic grid of SPACING."""
    rows, cols = np.mgrid[0 : shape[1], 0 : shape[2]]
    y, x = rows * SPACING[1] - centre_mm[0], cols * SPACING[2] - centre_mm[1]
    angle = math.radians(angle_deg)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    mask = np.zeros(shape, dtype=bool)
    mask[k] = (u / semi_axes_mm[0]) ** 2 + (v / semi_axes_mm[1]) ** 2 <= 1.0
    return mask


def _mm(point_kji: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    return np.asarray(point_kji) * np.asarray(SPACING)


# ---------------------------------------------------------------------------------------------
# axial_diameters


@pytest.mark.parametrize("diameter_mm", [4.0, 12.0, 25.0])
def test_disc_long_and_short_axis_are_its_diameter(diameter_mm: float) -> None:
    radius = diameter_mm / 2
    mask = BoxMask.from_full(_ellipse((5, 80, 50), 2, (20.3, 19.7), (radius, radius)))
    axial = axial_diameters(mask, SPACING)
    assert axial.slice_index == 2
    # Pixel centres inside the circle, pixel corners counted: every corner lies within half a pixel
    # diagonal of the circle, so each axis is within a pixel diagonal of the diameter.
    assert axial.long_axis_mm == pytest.approx(diameter_mm, abs=PIXEL_DIAGONAL_MM)
    assert axial.short_axis_mm == pytest.approx(diameter_mm, abs=PIXEL_DIAGONAL_MM)
    assert axial.short_axis_mm <= axial.long_axis_mm
    assert axial.mean_diameter_mm == pytest.approx((axial.long_axis_mm + axial.short_axis_mm) / 2)
    long_a, long_b = (_mm(p) for p in axial.long_axis_ends)
    assert np.linalg.norm(long_b - long_a) == pytest.approx(axial.long_axis_mm)


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 45.0, 90.0, 125.0])
def test_two_to_one_ellipse(angle_deg: float) -> None:
    semi_major, semi_minor = 15.0, 7.5
    mask = BoxMask.from_full(_ellipse((3, 120, 80), 1, (30.1, 31.9), (semi_major, semi_minor), angle_deg))
    axial = axial_diameters(mask, SPACING)
    assert axial.slice_index == 1
    assert axial.long_axis_mm == pytest.approx(2 * semi_major, abs=PIXEL_DIAGONAL_MM)
    assert axial.long_axis_mm / axial.short_axis_mm == pytest.approx(2.0, rel=0.1)
    long_a, long_b = (_mm(p) for p in axial.long_axis_ends)
    short_a, short_b = (_mm(p) for p in axial.short_axis_ends)
    long_vector, short_vector = long_b - long_a, short_b - short_a
    assert long_vector[0] == short_vector[0] == 0  # both on the axial slice
    assert np.linalg.norm(long_vector) == pytest.approx(axial.long_axis_mm)
    assert np.linalg.norm(short_vector) == pytest.approx(axial.short_axis_mm)
    # The ends are perpendicular, and the short axis crosses the long one at its middle.
    assert np.dot(long_vector, short_vector) == pytest.approx(0.0, abs=1e-9)
    to_middle = (long_a + long_b) / 2 - short_a
    assert short_vector[1] * to_middle[2] - short_vector[2] * to_middle[1] == pytest.approx(0.0, abs=1e-9)
    # The long axis runs along the major axis, up to a tilt: the pixelised tips are blunt, and the
    # farthest pair of pixel corners may join opposite sides of them.
    direction = long_vector[1:] / axial.long_axis_mm  # (row, column)
    major = np.array([math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))])
    tilt = math.acos(min(1.0, abs(float(direction @ major))))
    assert math.degrees(tilt) < 12
    # The short axis is the ellipse's width across that direction, within a pixel diagonal (each
    # pixel corner lies within half a diagonal of the ellipse).
    width = 2 * math.hypot(semi_major * math.sin(tilt), semi_minor * math.cos(tilt))
    assert axial.short_axis_mm == pytest.approx(width, abs=PIXEL_DIAGONAL_MM)


def test_single_voxel_measures_its_pixel_diagonal() -> None:
    """Pixels count with their full extent: one pixel's long axis is its diagonal, its short axis the
    width of the pixel across that diagonal (twice its area over the diagonal)."""
    full = np.zeros((4, 6, 6), dtype=bool)
    full[2, 3, 1] = True
    axial = axial_diameters(BoxMask.from_full(full), SPACING)
    row_mm, column_mm = SPACING[1:]
    assert axial.slice_index == 2
    assert axial.long_axis_mm == pytest.approx(PIXEL_DIAGONAL_MM)
    assert axial.short_axis_mm == pytest.approx(2 * row_mm * column_mm / PIXEL_DIAGONAL_MM)
    ends = sorted(axial.long_axis_ends)
    assert {tuple(ends[0][1:]), tuple(ends[1][1:])} in (
        {(2.5, 0.5), (3.5, 1.5)},
        {(2.5, 1.5), (3.5, 0.5)},
    )


def test_slice_of_largest_area_is_measured() -> None:
    full = np.zeros((8, 30, 30), dtype=bool)
    full[2, 5:25, 10:12] = True  # longest (10 mm), but a small area (40 pixels)
    full[4, 10:16, 10:16] = True  # 36 pixels
    full[5, 8:18, 9:19] = True  # largest area (100 pixels): 5 mm x 8 mm
    full[6, 12:14, 12:14] = True
    mask = BoxMask.from_full(full)
    axial = axial_diameters(mask, SPACING)
    assert axial.slice_index == 5
    assert all(end[0] == 5 for end in (*axial.long_axis_ends, *axial.short_axis_ends))
    assert axial.long_axis_mm == pytest.approx(math.hypot(5.0, 8.0))
    # Of slices of equal largest area, the first.
    full[7, 8:18, 9:19] = True
    assert axial_diameters(BoxMask.from_full(full), SPACING).slice_index == 5


def test_empty_mask_has_no_diameters() -> None:
    with pytest.raises(ValueError, match="empty"):
        axial_diameters(BoxMask.from_full(np.zeros((3, 4, 4), dtype=bool)), SPACING)


# ---------------------------------------------------------------------------------------------
# volume_mm3 and BoxMask


def test_volume_is_voxel_count_times_voxel_volume() -> None:
    full = np.zeros((6, 10, 10), dtype=bool)
    full[1:4, 2:7, 3:5] = True  # 3 x 5 x 2 voxels
    assert volume_mm3(BoxMask.from_full(full), SPACING) == pytest.approx(30 * 2.0 * 0.5 * 0.8)
    assert volume_mm3(BoxMask.from_full(np.zeros((2, 2, 2), dtype=bool)), SPACING) == 0.0


def test_box_mask_round_trip_and_centroid() -> None:
    full = np.zeros((7, 12, 9), dtype=bool)
    full[2:5, 3:9, 4:6] = True
    full[4, 8, 7] = True
    mask = BoxMask.from_full(full)
    assert mask.offset == (2, 3, 4)
    assert mask.array.shape == (3, 6, 4)
    assert mask.voxel_count == full.sum() == 3 * 6 * 2 + 1
    assert np.array_equal(mask.full(full.shape), full)
    np.testing.assert_allclose(mask.centroid_kji(), np.argwhere(full).mean(axis=0))
    labels = np.zeros(full.shape, dtype=np.uint8)
    mask.paste_into(labels, 3)
    assert np.array_equal(labels == 3, full)
    assert np.array_equal(full[mask.slices()], mask.array)


def test_box_mask_from_a_box_placed_in_the_grid() -> None:
    box = np.zeros((4, 5, 6), dtype=bool)
    box[1:3, 2, 1:4] = True
    mask = BoxMask.from_full(box, offset=(10, 20, 30))
    assert mask.offset == (11, 22, 31)
    assert mask.array.shape == (2, 1, 3)
    full = mask.full((20, 30, 40))
    assert full.sum() == 6
    assert np.array_equal(full[10:14, 20:25, 30:36], box)
    empty = BoxMask.from_full(np.zeros((2, 2, 2), dtype=bool), offset=(1, 2, 3))
    assert (empty.offset, empty.voxel_count) == ((1, 2, 3), 0)
    assert not empty.full((4, 4, 4)).any()


# ---------------------------------------------------------------------------------------------
# Lung-RADS


def _below(limit: float) -> float:
    return math.nextafter(limit, 0.0)


@pytest.mark.parametrize(
    ("mean_diameter_mm", "category"),
    [
        (2.0, "2"),
        (_below(6), "2"),
        (6.0, "3"),
        (_below(8), "3"),
        (8.0, "4A"),
        (_below(15), "4A"),
        (15.0, "4B"),
        (40.0, "4B"),
    ],
)
def test_lung_rads_solid(mean_diameter_mm: float, category: str) -> None:
    assert lung_rads_category("solid", mean_diameter_mm, mean_diameter_mm) == category


@pytest.mark.parametrize(
    ("mean_diameter_mm", "solid_part_mm", "category"),
    [
        (_below(6), 0.0, "2"),  # small in total: 2 whatever the solid part
        (_below(6), 5.0, "2"),
        (6.0, 0.0, "3"),
        (6.0, _below(6), "3"),
        (10.0, 6.0, "4A"),
        (10.0, _below(8), "4A"),
        (10.0, 8.0, "4B"),
        (30.0, 20.0, "4B"),
    ],
)
def test_lung_rads_part_solid(mean_diameter_mm: float, solid_part_mm: float, category: str) -> None:
    assert lung_rads_category("part-solid", mean_diameter_mm, solid_part_mm) == category


@pytest.mark.parametrize(("mean_diameter_mm", "category"), [(5.0, "2"), (_below(30), "2"), (30.0, "3")])
def test_lung_rads_ground_glass(mean_diameter_mm: float, category: str) -> None:
    assert lung_rads_category("ground-glass", mean_diameter_mm, 0.0) == category


@pytest.mark.parametrize("mean_diameter_mm", [3.0, 6.0, 8.0, 15.0, 30.0])
def test_lung_rads_calcified_is_benign(mean_diameter_mm: float) -> None:
    assert lung_rads_category("calcified", mean_diameter_mm, mean_diameter_mm) == "1"


def test_lung_rads_unknown_type() -> None:
    with pytest.raises(ValueError, match="no Lung-RADS rule"):
        lung_rads_category("cavitary", 10.0, 10.0)


def test_box_mask_axial_slice_matches_the_full_mask() -> None:
    full = np.zeros((5, 7, 9), dtype=bool)
    full[2, 1:4, 3:8] = True
    full[3, 2, 4] = True
    mask = BoxMask.from_full(full)
    for k in range(5):
        np.testing.assert_array_equal(mask.axial_slice(k, (7, 9)), full[k])
