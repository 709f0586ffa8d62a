"""The detectability d' that benchmarks/detector_heat.py reports beside the detector's heat: a ball
that stands out of the noise scores high, an empty place about nothing, and vessels count only when
asked for."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from models.detector_validation import ValidationCase
from models.evaluation import ScanTruth, Target
from models.volume import Volume
from tests.benchmark_scripts import load_benchmark

SHAPE = (64, 64, 64)
NODULE_KJI = (32, 32, 32)
EMPTY_KJI = (32, 32, 12)


@pytest.fixture(scope="module")
def detector_heat() -> ModuleType:
    return load_benchmark("detector_heat")


def _lung(contrast_hu: float, vessel_hu: float = 0.0) -> tuple[ValidationCase, dict[str, Target]]:
    """A 1 mm block of parenchyma (-850 HU, noise of 30 HU) holding a 5 mm ball of `contrast_hu` and,
    when `vessel_hu` is set, rods 2 mm thick of that contrast every 4 mm."""
    rng = np.random.default_rng(1)
    hu = rng.normal(-850.0, 30.0, SHAPE).astype(np.float32)
    k, j, i = np.indices(SHAPE)
    hu[(k - 32) ** 2 + (j - 32) ** 2 + (i - 32) ** 2 <= 2.5**2] += contrast_hu
    if vessel_hu:
        hu[(j % 4 < 2) & (i % 4 < 2)] += vessel_hu
    work = Volume(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    targets = {
        name: Target(label, tuple(work.index_to_patient(np.array(kji, float))), 5.0, None, "solid")
        for label, (name, kji) in enumerate((("nodule", NODULE_KJI), ("empty", EMPTY_KJI)), start=1)
    }
    case = ValidationCase(
        truth=ScanTruth("block", (targets["nodule"],)),
        work=work,
        lungs=np.ones(SHAPE, np.uint8),
        region=np.ones(tuple(n // 2 for n in SHAPE), bool),
    )
    return case, targets


def test_a_ball_above_the_noise_scores_high_an_empty_place_about_nothing(detector_heat: ModuleType) -> None:
    case, targets = _lung(contrast_hu=300.0)
    rng = np.random.default_rng(0)
    assert detector_heat.detectability(case, targets["nodule"], rng) > 10
    assert abs(detector_heat.detectability(case, targets["empty"], rng)) < 4


def test_a_ball_under_the_noise_scores_low(detector_heat: ModuleType) -> None:
    case, targets = _lung(contrast_hu=5.0)
    assert detector_heat.detectability(case, targets["nodule"], np.random.default_rng(0)) < 3


def test_vessels_are_left_out_of_the_parenchyma_and_counted_with_them(detector_heat: ModuleType) -> None:
    rng = np.random.default_rng(0)
    clear, targets = _lung(contrast_hu=300.0)
    alone = detector_heat.detectability(clear, targets["nodule"], rng, parenchyma_only=False)
    crowded, targets = _lung(contrast_hu=300.0, vessel_hu=700.0)
    # Every nodule-sized place touches a rod: no parenchyma is left to compare with.
    assert np.isnan(detector_heat.detectability(crowded, targets["nodule"], rng))
    among_vessels = detector_heat.detectability(crowded, targets["nodule"], rng, parenchyma_only=False)
    assert np.isfinite(among_vessels) and among_vessels < alone / 3
