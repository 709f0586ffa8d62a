"""The synthetic chest: determinism, tissue HU, lobes, vessels, fissures, noise and resolution.

Chests are built on a coarse grid (100 x 256 x 256 at 1.4 mm, 2.5 mm slices) to stay fast; the
full-size timing is in benchmarks/bench_anatomy.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from models.synthetic.acquisition import (
    Acquisition,
    add_noise,
    apply_resolution,
    psf_sigma_mm,
    sample_acquisition,
)
from models.synthetic.anatomy import (
    LEFT_LOWER,
    LEFT_UPPER,
    RIGHT_LOWER,
    RIGHT_MIDDLE,
    RIGHT_UPPER,
    ChestAnatomy,
    build_chest,
    generate_chest,
)

SMALL = Acquisition(
    n_slices=100,
    rows=256,
    columns=256,
    pixel_spacing=1.4,
    slice_thickness=2.5,
    slice_spacing=2.5,
    kernel="soft",
    noise_sd_hu=15.0,
)


@pytest.fixture(scope="module")
def chest() -> ChestAnatomy:
    return build_chest(SMALL, np.random.default_rng(7))


@pytest.fixture(scope="module")
def chest_again() -> ChestAnatomy:
    return build_chest(SMALL, np.random.default_rng(7))


def _x_of_columns(chest: ChestAnatomy) -> np.ndarray:
    v = chest.volume
    return v.origin[0] + v.spacing[2] * np.arange(v.shape[2])


# -- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays(chest: ChestAnatomy, chest_again: ChestAnatomy) -> None:
    assert np.array_equal(chest.volume.hu, chest_again.volume.hu)
    assert np.array_equal(chest.lobes, chest_again.lobes)
    assert np.array_equal(chest.vessel_mask, chest_again.vessel_mask)
    assert np.array_equal(chest.fissure_points_mm, chest_again.fissure_points_mm)
    assert len(chest.vessels) == len(chest_again.vessels)


def test_different_seeds_give_different_patients(chest: ChestAnatomy) -> None:
    other = build_chest(SMALL, np.random.default_rng(8))
    assert not np.array_equal(chest.volume.hu, other.volume.hu)
    lung_a, lung_b = chest.lobes > 0, other.lobes > 0
    overlap = np.sum(lung_a & lung_b) / np.sum(lung_a | lung_b)
    assert overlap < 0.95, "two seeds should give visibly different lungs"


def test_generate_chest_samples_a_matching_acquisition() -> None:
    acq = sample_acquisition(np.random.default_rng(3), n_slices=120)
    assert acq.n_slices == 120
    spacing, origin = acq.geometry()
    assert spacing == (acq.slice_spacing, acq.pixel_spacing, acq.pixel_spacing)
    # Centred in the field of view: the middle of the grid is the isocentre.
    assert origin[0] + spacing[2] * (acq.columns - 1) / 2 == pytest.approx(0.0)
    assert origin[1] + spacing[1] * (acq.rows - 1) / 2 == pytest.approx(0.0)


# -- tissue HU -------------------------------------------------------------------------------


def test_volume_is_float32_on_the_acquisition_grid(chest: ChestAnatomy) -> None:
    v = chest.volume
    assert v.hu.dtype == np.float32
    assert v.shape == SMALL.shape
    assert chest.lobes.shape == v.shape and chest.lobes.dtype == np.uint8
    assert v.spacing == SMALL.geometry()[0] and v.origin == SMALL.geometry()[1]


def test_air_outside_the_body_and_body_fills_most_of_the_field(chest: ChestAnatomy) -> None:
    hu, body = chest.volume.hu, chest.body_mask
    assert np.allclose(hu[:, 0, :], -1000.0) and np.allclose(hu[:, :, 0], -1000.0)
    k = hu.shape[0] // 2
    columns = np.flatnonzero(body[k].any(axis=0))
    width = (columns[-1] - columns[0] + 1) / hu.shape[2]
    assert 0.7 < width < 0.97


def test_lung_parenchyma_hu(chest: ChestAnatomy) -> None:
    parenchyma = (chest.lobes > 0) & ~chest.vessel_mask & ~chest.airway_mask
    assert -900 < np.median(chest.volume.hu[parenchyma]) < -700


def test_dependent_lung_is_denser_than_the_front(chest: ChestAnatomy) -> None:
    hu, lung = chest.volume.hu, (chest.lobes > 0) & ~chest.vessel_mask
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    front, back = rows[: len(rows) // 4], rows[-len(rows) // 8 :]
    assert np.median(hu[:, back][lung[:, back]]) > np.median(hu[:, front][lung[:, front]]) + 30


def _mode(values: np.ndarray, low: float, high: float) -> float:
    counts, edges = np.histogram(values, bins=int(high - low) // 5, range=(low, high))
    return float(edges[np.argmax(counts)] + 2.5)


def test_soft_tissue_and_bone_hu(chest: ChestAnatomy) -> None:
    inside = chest.volume.hu[chest.body_mask & (chest.lobes == 0)]
    assert -120 <= _mode(inside, -200, -20) <= -80, "fat"
    assert 30 <= _mode(inside, 10, 120) <= 70, "muscle"
    assert np.percentile(inside, 99.5) > 300, "bone"
    assert inside.max() > 600, "cortical bone"


# -- lungs and lobes -------------------------------------------------------------------------


def test_all_five_lobes_on_their_side(chest: ChestAnatomy) -> None:
    lobes = chest.lobes
    assert set(np.unique(lobes)) == {0, 1, 2, 3, 4, 5}
    volumes = np.bincount(lobes.ravel(), minlength=6)[1:]
    assert np.all(volumes > 0.04 * volumes.sum())
    x = _x_of_columns(chest)
    for right in (RIGHT_UPPER, RIGHT_MIDDLE, RIGHT_LOWER):
        assert np.mean(x[np.nonzero(lobes == right)[2]]) < -30  # patient right is -x in LPS
    for left in (LEFT_UPPER, LEFT_LOWER):
        assert np.mean(x[np.nonzero(lobes == left)[2]]) > 30


def test_lobes_stack_in_the_right_order(chest: ChestAnatomy) -> None:
    k = np.nonzero(chest.lobes)[0]
    lobes = chest.lobes[chest.lobes > 0]
    mean_k = {lobe: k[lobes == lobe].mean() for lobe in range(1, 6)}
    assert mean_k[RIGHT_UPPER] > mean_k[RIGHT_MIDDLE] > mean_k[RIGHT_LOWER] - 5
    assert mean_k[LEFT_UPPER] > mean_k[LEFT_LOWER]
    # The lower lobes are posterior: larger j (y grows to the back).
    j = np.nonzero(chest.lobes)[1]
    assert j[lobes == RIGHT_LOWER].mean() > j[lobes == RIGHT_MIDDLE].mean()


def test_lung_cross_sections_vary_with_z(chest: ChestAnatomy) -> None:
    area = (chest.lobes > 0).sum(axis=(1, 2))
    present = np.flatnonzero(area)
    assert len(present) > 0.6 * len(area)
    top, widest = area[present[-1] - 2], area.max()
    assert top < 0.25 * widest, "the lungs taper to the apices"


def test_fissure_points_lie_between_lobes(chest: ChestAnatomy) -> None:
    points, normals = chest.fissure_points_mm, chest.fissure_normals
    assert len(points) > 100 and points.shape == normals.shape
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0)
    idx = np.rint(chest.volume.patient_to_index(points)).astype(int)
    labels = chest.lobes[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert np.mean(labels > 0) > 0.95


# -- vessels ---------------------------------------------------------------------------------


def test_vessel_tree_spans_hilum_to_periphery(chest: ChestAnatomy) -> None:
    pulmonary = chest.pulmonary_vessels()
    assert len(pulmonary) > 2000
    radii = np.array([min(s.radius0_mm, s.radius1_mm) for s in pulmonary])
    assert radii.min() <= 0.55
    assert radii.max() > 4.0
    assert np.mean(radii < 1.0) > 0.5, "most branches are small"


def test_many_small_vessel_cross_sections_per_slice(chest: ChestAnatomy) -> None:
    k = int(np.argmax((chest.lobes > 0).sum(axis=(1, 2))))
    lung = chest.lobes[k] > 0
    hu = chest.volume.hu[k]
    # Vessels as an observer sees them: lung voxels well above the parenchyma.
    blobs, n = ndi.label((hu > -600) & lung)
    sizes = np.bincount(blobs.ravel())[1:]
    assert n > 40
    assert np.median(sizes) * SMALL.pixel_spacing**2 < 20.0, "mostly small cross-sections"


def test_vessels_brighter_than_lung(chest: ChestAnatomy) -> None:
    big = chest.vessel_mask & (chest.lobes > 0)
    assert big.any()
    assert np.median(chest.volume.hu[big]) > -500


def test_airways_hold_air(chest: ChestAnatomy) -> None:
    assert chest.airway_mask.any()
    assert np.median(chest.volume.hu[chest.airway_mask]) < -800


# -- acquisition -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_sampled_acquisitions_are_realistic(seed: int) -> None:
    acq = sample_acquisition(np.random.default_rng(seed))
    assert 100 <= acq.n_slices <= 400
    assert 0.6 <= acq.pixel_spacing <= 0.9
    assert 0.625 <= acq.slice_thickness <= 2.5
    assert acq.slice_spacing <= acq.slice_thickness
    assert 250 <= acq.n_slices * acq.slice_spacing <= 420
    low, high = (10, 25) if acq.kernel == "soft" else (40, 90)
    assert low <= acq.noise_sd_hu <= high
    assert acq.convolution_kernel


def _noise(kernel: str, sd: float, thickness: float = 1.25, spacing: float = 1.25) -> np.ndarray:
    acq = Acquisition(
        n_slices=24,
        pixel_spacing=0.7,
        slice_thickness=thickness,
        slice_spacing=spacing,
        kernel=kernel,
        noise_sd_hu=sd,
    )
    hu = np.full(acq.shape, 40.0, dtype=np.float32)
    add_noise(hu, acq, np.random.default_rng(11))
    return hu - 40.0


@pytest.mark.parametrize(("kernel", "sd"), [("soft", 12.0), ("soft", 25.0), ("sharp", 45.0), ("sharp", 90.0)])
def test_noise_std_in_a_flat_region(kernel: str, sd: float) -> None:
    noise = _noise(kernel, sd)
    region = noise[:, 156:356, 156:356]
    assert abs(region.std() / sd - 1.0) < 0.10
    assert abs(region.mean()) < 0.1 * sd
    assert abs(noise[5, 200:260, 200:260].std() / sd - 1.0) < 0.25  # a small ROI on one slice


def _high_frequency_fraction(noise: np.ndarray, pixel_spacing: float = 0.7) -> float:
    power = (np.abs(np.fft.rfft2(noise)) ** 2).mean(axis=0)
    f = np.hypot(
        np.fft.fftfreq(noise.shape[1], pixel_spacing)[:, None],
        np.fft.rfftfreq(noise.shape[2], pixel_spacing)[None, :],
    )
    return float(power[f > 0.4].sum() / power.sum())


def test_sharp_kernel_noise_is_finer_than_soft() -> None:
    soft, sharp = (
        _high_frequency_fraction(_noise("soft", 20.0)),
        _high_frequency_fraction(_noise("sharp", 20.0)),
    )
    assert sharp > soft + 0.2

    # In-plane correlation: soft noise is blobby (neighbours alike), sharp noise is grainy.
    def neighbour_corr(n: np.ndarray) -> float:
        return float(np.corrcoef(n[:, :, :-1].ravel(), n[:, :, 1:].ravel())[0, 1])

    assert neighbour_corr(_noise("soft", 20.0)) > 0.3 > neighbour_corr(_noise("sharp", 20.0))


def test_noise_is_independent_between_slices_unless_they_overlap() -> None:
    def adjacent_corr(n: np.ndarray) -> float:
        return float(np.corrcoef(n[:-1].ravel(), n[1:].ravel())[0, 1])

    assert abs(adjacent_corr(_noise("soft", 20.0))) < 0.05
    overlapping = _noise("soft", 20.0, thickness=2.5, spacing=1.5)
    assert 0.2 < adjacent_corr(overlapping) < 0.6
    assert abs(overlapping.std() / 20.0 - 1.0) < 0.10


def test_noise_is_deterministic() -> None:
    assert np.array_equal(_noise("sharp", 50.0), _noise("sharp", 50.0))


def test_resolution_blurs_by_the_psf() -> None:
    acq = Acquisition(
        n_slices=41,
        rows=64,
        columns=64,
        pixel_spacing=0.5,
        slice_thickness=2.0,
        slice_spacing=1.0,
        kernel="soft",
        noise_sd_hu=10.0,
    )
    impulse = np.zeros(acq.shape, dtype=np.float32)
    impulse[20, 32, 32] = 1.0
    blurred = apply_resolution(impulse, acq)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-3)
    grid = np.indices(acq.shape).astype(float)
    centre = [float((g * blurred).sum()) for g in grid]
    spacing = acq.geometry()[0]
    sigmas = [float(np.sqrt(((grid[a] - centre[a]) ** 2 * blurred).sum())) * spacing[a] for a in range(3)]
    assert sigmas == pytest.approx(psf_sigma_mm(acq), rel=0.1)
    assert psf_sigma_mm(acq)[1] > psf_sigma_mm(dataclasses.replace(acq, kernel="sharp"))[1]


# -- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_case_has_a_realistic_layout() -> None:
    chest, _ = generate_chest(5, n_slices=120)
    hu = chest.volume.hu
    assert hu.shape == (120, 512, 512)
    z = chest.volume.origin[2] + chest.volume.spacing[0] * np.arange(120)
    lung_slices = z[(chest.lobes > 0).any(axis=(1, 2))]
    assert lung_slices.max() - lung_slices.min() > 180
