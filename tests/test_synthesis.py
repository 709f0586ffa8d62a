"""`cad-node synth`: a synthetic case and an insertion into LIDC-IDRI-0001, each a valid DICOM CT series
that loads back, with ground-truth centres on nodule voxels of the expected attenuation."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from cad_node.cli import main
from models.ground_truth import read_labels
from models.series_loading import load_series
from models.synthetic.cases import insert_into_real
from models.synthetic.nodules import sample_spec
from models.volume import Volume

# Attenuation at a nodule's centre by type, for nodules large enough not to be averaged away by
# partial volume (at least 5 mm): (lowest, highest) HU.
EXPECTED_CENTRE_HU = {
    "solid": (-250.0, 200.0),
    "calcified": (150.0, 3000.0),
    "part-solid": (-750.0, 200.0),
    "ground-glass": (-850.0, -250.0),
}


def run_synth(*arguments: str) -> None:
    result = CliRunner().invoke(main, ["synth", *arguments])
    assert result.exit_code == 0, result.output
    assert "ground truth:" in result.output


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "case"
    run_synth("--out", str(out), "--seed", "7", "--nodules", "8", "--slices", "120", "--preview")
    return out


@pytest.fixture(scope="module")
def inserted_case(tmp_path_factory: pytest.TempPathFactory, lidc_series_dir: Callable[[str], Path]) -> Path:
    out = tmp_path_factory.mktemp("inserted") / "case"
    run_synth(
        "--out",
        str(out),
        "--seed",
        "11",
        "--nodules",
        "6",
        "--background",
        str(lidc_series_dir("LIDC-IDRI-0001")),
        "--preview",
    )
    return out


def check_case(case_dir: Path, expected_nodules: int) -> tuple[Volume, dict]:
    truth = json.loads((case_dir / "ground_truth.json").read_text())
    volume = load_series(case_dir).volume
    labels = read_labels(case_dir)
    assert labels.shape == volume.shape
    assert len(truth["nodules"]) == expected_nodules
    for nodule in truth["nodules"]:
        kji = volume.nearest_index(nodule["centre_mm"])
        assert labels[kji] == nodule["label"], f"centre of nodule {nodule['label']} is not on its mask"
        assert np.count_nonzero(labels == nodule["label"]) == nodule["mask_voxels"]
        if nodule["mean_diameter_mm"] >= 5.0:
            k, j, i = kji
            centre_hu = float(np.median(volume.hu[k, j - 1 : j + 2, i - 1 : i + 2]))
            low, high = EXPECTED_CENTRE_HU[nodule["type"]]
            assert low <= centre_hu <= high, (
                f"nodule {nodule['label']} ({nodule['type']}): {centre_hu:.0f} HU"
            )
        assert nodule["long_axis_mm"] >= nodule["short_axis_mm"] > 0
    assert (case_dir / "preview.png").stat().st_size > 20_000
    return volume, truth


def dciodvfy_errors(files: list[Path], dciodvfy: str) -> list[str]:
    errors = []
    for path in files:
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True).stderr
        errors += [f"{path.name}: {line}" for line in report.splitlines() if line.startswith("Error")]
    return errors


def test_synthetic_case(synthetic_case: Path) -> None:
    volume, truth = check_case(synthetic_case, 8)
    assert volume.shape == (120, 512, 512)
    assert {n["type"] for n in truth["nodules"]} == {"solid", "part-solid", "ground-glass", "calcified"}
    assert {n["location"] for n in truth["nodules"]} == {
        "isolated",
        "juxtapleural",
        "juxtavascular",
        "perifissural",
    }
    assert all(n["lobe"] for n in truth["nodules"])


def test_inserted_case_keeps_the_background(
    inserted_case: Path, lidc_series_dir: Callable[[str], Path]
) -> None:
    volume, truth = check_case(inserted_case, 6)
    background = load_series(lidc_series_dir("LIDC-IDRI-0001")).volume
    assert volume.shape == background.shape
    np.testing.assert_allclose(volume.origin, background.origin)
    np.testing.assert_allclose(volume.spacing, background.spacing)
    labels = read_labels(inserted_case)
    # Away from the inserted nodules not one voxel changed (spicules reach past the masks: 15 mm).
    changed = volume.hu != background.hu
    assert changed.any()
    distance = ndimage.distance_transform_edt(labels == 0, sampling=volume.spacing)
    assert float(distance[changed].max()) < 15.0
    # The real nodule is a keep-out and an ignore mark; no synthetic nodule lands within 15 mm of it.
    real = np.array([56.2, 86.2, -115.9])
    assert any(np.linalg.norm(np.subtract(m["centre_mm"], real)) < 3 for m in truth["ignore"])
    assert all(np.linalg.norm(np.subtract(n["centre_mm"], real)) > 15 for n in truth["nodules"])


@pytest.mark.parametrize("nodule_type", ["solid", "ground-glass"])
def test_inserted_noise_matches_the_background(
    lidc_series_dir: Callable[[str], Path], nodule_type: str
) -> None:
    """The scan's own noise runs through an inserted nodule: inside it, the fine-grained (high-pass) part
    of the image is as strong as the background's at the same voxels, neither smoothed away nor doubled."""
    background = load_series(lidc_series_dir("LIDC-IDRI-0001")).volume
    spec = sample_spec(
        np.random.default_rng(3), nodule_type=nodule_type, shape="round", location="isolated", diameter_mm=20
    )
    case = insert_into_real(background, seed=5, n_nodules=1, specs=[spec])
    # At least 4 high-pass widths in from the edge, so that the nodule's own edge does not count as noise.
    interior = ndimage.binary_erosion(
        case.nodules[0].mask.full(background.shape), structure=np.ones((1, 9, 9), bool)
    )
    assert interior.sum() > 100

    def fine(hu: np.ndarray) -> np.ndarray:
        return hu - ndimage.gaussian_filter(hu, (0, 1.0, 1.0))

    ratio = float(fine(case.volume.hu)[interior].std() / fine(background.hu)[interior].std())
    assert 0.75 < ratio < 1.25, f"noise inside the nodule is {ratio:.2f} times the background's"


def test_same_seed_same_case(synthetic_case: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_synth("--out", str(again), "--seed", "7", "--nodules", "8", "--slices", "120")
    first = json.loads((synthetic_case / "ground_truth.json").read_text())
    second = json.loads((again / "ground_truth.json").read_text())
    assert first == second
    files = sorted(synthetic_case.glob("*.dcm"))
    assert [f.read_bytes() for f in files[:3]] == [f.read_bytes() for f in sorted(again.glob("*.dcm"))[:3]]


@pytest.mark.parametrize("which", ["synthetic_case", "inserted_case"])
def test_slices_pass_dciodvfy(
    which: str, request: pytest.FixtureRequest, require_tool: Callable[[str], str]
) -> None:
    case_dir: Path = request.getfixturevalue(which)
    assert dciodvfy_errors(sorted(case_dir.glob("*.dcm")), require_tool("dciodvfy")) == []


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--seed", "1"])
    assert result.exit_code == 2
    assert "is not empty" in result.output


def test_background_that_is_not_a_series(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        main, ["synth", "--out", str(tmp_path / "o"), "--seed", "1", "--background", str(empty)]
    )
    assert result.exit_code == 2
    assert "no DICOM files found" in result.output
