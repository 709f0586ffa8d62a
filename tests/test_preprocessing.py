"""Resampling keeps patient positions; normalisation windows HU; patches land where they should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.characterisation import characterise, location
from models.lungs import search_region, segment_lungs
from models.measurements import BoxMask
from models.preprocessing import AIR_HU, covering, lung_box, normalise, resample, resample_onto
from models.training_data import crop, heatmap_sigma_mm, patch_grid, segmentation_sample
from models.volume import Volume


def ball_volume(radius_mm: float = 5.0, hu: float = 40.0) -> tuple[Volume, BoxMask]:
    spacing = (2.5, 0.7, 0.7)
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in (30, 80, 80)], indexing="ij"), axis=-1)
    centre = np.array([15, 40, 40])
    inside = np.linalg.norm((kji - centre) * np.asarray(spacing), axis=-1) <= radius_mm
    image = np.full((30, 80, 80), -850.0, np.float32)
    image[inside] = hu
    return Volume(hu=image, spacing=spacing, origin=(-20.0, 10.0, -100.0)), BoxMask.from_full(inside)


def test_resample_keeps_positions_and_extent() -> None:
    volume, _ = ball_volume()
    work = resample(volume, 1.0)
    assert work.spacing == (1.0, 1.0, 1.0)
    assert work.shape == (73, 56, 56)
    np.testing.assert_allclose(work.origin, volume.origin)
    centre_mm = volume.index_to_patient((15, 40, 40))
    assert work.hu[work.nearest_index(centre_mm)] == pytest.approx(40.0)
    back = resample_onto(work, volume)
    assert back.hu[15, 40, 40] == pytest.approx(40.0)


def test_resample_onto_a_patch_interpolates_the_whole_volume() -> None:
    """A small grid half outside an oblique volume: each point inside is the trilinear interpolation of
    the volume there (as if SimpleITK had been handed the whole volume, not the part that `covering`
    cuts out), each point more than half a voxel outside is air."""
    rng = np.random.default_rng(3)
    angle = np.deg2rad(20)
    direction = np.array([[1.0, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    volume = Volume(
        hu=rng.normal(-500, 300, (30, 40, 50)).astype(np.float32),
        spacing=(2.5, 0.8, 0.7),
        origin=(5.0, -10.0, 20.0),
        direction=direction,
    )
    grid = patch_grid(volume, volume.index_to_patient((15, 20, 46)), 16, 0.75)
    assert covering(volume, grid) is not None and covering(volume, grid).shape < volume.shape
    result = resample_onto(volume, grid).hu
    kji = volume.patient_to_index(grid.index_to_patient(np.argwhere(np.ones(grid.shape, bool))))
    upper = np.asarray(volume.shape) - 1
    inside = np.all((kji >= 0) & (kji <= upper), axis=1)
    outside = np.any((kji < -0.5) | (kji > upper + 0.5), axis=1)
    assert inside.sum() > 500 and outside.sum() > 500
    expected = ndimage.map_coordinates(volume.hu.astype(np.float64), kji[inside].T, order=1)
    np.testing.assert_allclose(result.reshape(-1)[inside], expected, atol=1e-2)
    np.testing.assert_array_equal(result.reshape(-1)[outside], AIR_HU)


def test_resample_onto_a_grid_wholly_outside_is_air() -> None:
    volume, _ = ball_volume()
    far = patch_grid(volume, volume.index_to_patient((15, 40, 40)) + 500.0, 8, 1.0)
    assert covering(volume, far) is None
    np.testing.assert_array_equal(resample_onto(volume, far).hu, AIR_HU)
    np.testing.assert_array_equal(resample_onto(volume, far, default=0.0).hu, 0.0)


def test_segment_lungs_gives_each_lung_its_side_in_a_body_off_centre() -> None:
    """Two lungs joined by an airway, in a body well off the image's centre (so that the box the
    segmentation works in starts far from the array's corner): each lung gets its patient side, the
    vessel inside one is filled, and nothing outside the lungs is labelled."""
    hu = np.full((40, 160, 220), -1000.0, np.float32)
    hu[:, 20:150, 80:216] = 20.0  # the body, 136 mm wide, its centre at column 148
    right, left = (
        (slice(4, 36), slice(50, 120), slice(96, 140)),
        (slice(4, 36), slice(50, 120), slice(156, 200)),
    )
    hu[right] = hu[left] = -850.0
    hu[4:36, 80:84, 140:156] = -900.0  # an airway joining them
    hu[15:25, 80:90, 110:120] = 40.0  # a vessel in the right lung
    volume = Volume(hu=hu, spacing=(2.5, 1.0, 1.0), origin=(-150.0, -100.0, -300.0))
    sides = segment_lungs(volume)
    # LPS: x grows towards the patient's left, and x is the column here.
    assert (sides[right] == 1).mean() > 0.99 and (sides[left] == 2).mean() > 0.99
    assert (sides[15:25, 80:90, 110:120] == 1).all()
    assert not sides[:, :, :80].any() and not sides[:, :20].any() and not sides[:, 150:].any()


def test_resample_nearest_for_labels() -> None:
    volume, mask = ball_volume()
    labels = volume.with_hu(mask.full(volume.shape).astype(np.float32) * 3)
    work = resample(labels, 1.0, linear=False, default=0.0)
    assert set(np.unique(work.hu)) == {0.0, 3.0}


def test_normalise_window() -> None:
    assert normalise(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])).tolist() == pytest.approx(
        [0.0, 0.0, 0.5, 1.0, 1.0]
    )


def test_lung_box_with_margin() -> None:
    lungs = np.zeros((20, 30, 30), np.uint8)
    lungs[5:10, 10:12, 3:4] = 1
    box = lung_box(lungs, (1.0, 1.0, 1.0), margin_mm=2.0)
    assert box == (slice(3, 12), slice(8, 14), slice(1, 6))


def test_crop_pads_beyond_the_edge() -> None:
    array = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    patch = crop(array, (0, 0, 0), 4, -1)
    assert patch.shape == (4, 4, 4)
    assert patch[2, 2, 2] == 0 and patch[0, 0, 0] == -1 and patch[3, 3, 3] == array[1, 1, 1]


def test_segmentation_sample_is_centred_on_the_nodule() -> None:
    volume, mask = ball_volume(radius_mm=6.0)
    centre = volume.index_to_patient((15, 40, 40))
    image, target = segmentation_sample(volume, mask, centre)
    assert image.shape == target.shape == (48, 48, 48)
    assert target[24, 24, 24] and not target[0, 0, 0]
    grid = patch_grid(volume, centre, 48, 0.75)
    np.testing.assert_allclose(grid.index_to_patient((23.5, 23.5, 23.5)), centre, atol=1e-6)
    # the resampled ball keeps its volume within 15 %
    assert target.sum() * 0.75**3 == pytest.approx(4 / 3 * np.pi * 6.0**3, rel=0.15)
    assert image[24, 24, 24] == 40


def test_heatmap_sigma_grows_with_size_within_bounds() -> None:
    assert heatmap_sigma_mm(3) == 1.5 and heatmap_sigma_mm(12) == 3.0 and heatmap_sigma_mm(40) == 5.0


@pytest.mark.parametrize(
    ("hu", "expected"), [(40.0, "solid"), (-600.0, "ground-glass"), (600.0, "calcified")]
)
def test_characterise_uniform_nodules(hu: float, expected: str) -> None:
    volume, mask = ball_volume(radius_mm=6.0, hu=hu)
    assert characterise(mask, volume, 12.0).nodule_type == expected


def test_characterise_part_solid_measures_the_solid_part() -> None:
    volume, mask = ball_volume(radius_mm=8.0, hu=-600.0)
    core, _ = ball_volume(radius_mm=3.0, hu=30.0)
    image = volume.hu.copy()
    image[core.hu > 0] = 30.0
    character = characterise(mask, volume.with_hu(image), 16.0)
    assert character.nodule_type == "part-solid"
    assert character.solid_part_mm == pytest.approx(6.0, abs=1.5)


def test_location_side_and_zone() -> None:
    volume = Volume(
        hu=np.zeros((30, 20, 20), np.float32), spacing=(10.0, 10.0, 10.0), origin=(-100.0, -100.0, -300.0)
    )
    lungs = np.zeros(volume.shape, np.uint8)
    lungs[:, 5:15, 2:8] = 1  # x < 0: patient's right
    lungs[:, 5:15, 12:18] = 2
    assert location((-50.0, 0.0, -280.0), lungs, volume) == ("right", "lower")
    assert location((60.0, 0.0, -20.0), lungs, volume) == ("left", "upper")


def test_search_region_takes_in_a_nodule_on_the_pleura() -> None:
    """A 20 mm dense nodule on the lung's outer surface is a dent in the air mask, its centre 10 mm
    from the nearest lung voxel: the search region takes it in, and nothing 20 mm outside the lung."""
    grid = np.stack(np.meshgrid(*[np.arange(60)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    lung = np.linalg.norm(grid - 30, axis=-1) <= 20  # 2 mm voxels: an 80 mm lung
    nodule_centre = np.array([30.0, 30.0, 48.0])  # on the surface, at x = 96 mm
    lung &= np.linalg.norm(grid - nodule_centre, axis=-1) > 5
    region = search_region(lung.astype(np.uint8), 2.0)
    assert region[30, 30, 45] and region[30, 30, 48]  # inside the dent, and the nodule's centre
    # 12 mm past the surface, and at the array's edge 16 mm past it: outside
    assert not region[30, 30, 56] and not region[30, 30, 59] and not region[2, 2, 2]
    assert region[lung].all()
    assert not search_region(np.zeros((8, 8, 8), np.uint8), 2.0).any()


def test_small_and_subsolid_nodules_get_more_detector_cubes_and_nothing_else_changes(monkeypatch) -> None:
    from models import training_data
    from models.synthetic.cases import synthesize_case

    case = synthesize_case(22, 3, n_slices=100)
    hard = sum(training_data.is_hard_nodule(n) for n in case.nodules)
    assert hard > 0
    shard = training_data.shard_from_case(case, np.random.default_rng(5))
    extra_cubes = training_data.HARD_NODULE_EXTRA_CUBES
    monkeypatch.setattr(training_data, "HARD_NODULE_EXTRA_CUBES", 0)
    plain = training_data.shard_from_case(case, np.random.default_rng(5))

    before = len(plain.detection_images)
    assert len(shard.detection_images) == before + extra_cubes * hard
    np.testing.assert_array_equal(shard.detection_images[:before], plain.detection_images)
    for name in ("classifier_images", "classifier_labels", "segmentation_images", "segmentation_masks"):
        np.testing.assert_array_equal(getattr(shard, name), getattr(plain, name))
    extra = shard.detection_heatmaps[before:]
    assert all(heat.max() >= 128 for heat in extra)  # each holds a nodule's peak
