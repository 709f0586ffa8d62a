"""The shipped weights, as `cad-node analyze` uses them: small, loaded from the package, and finding
the real nodule of LIDC-IDRI-0001."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cad_node.cli import main
from models.networks import load_model
from models.pipeline import WEIGHTS_DIR, Pipeline
from models.training_runs import MODEL_VERSION, stamp_version

CONSENSUS_0001 = np.array([56.4, 86.3, -116.0])


def test_weights_are_small_and_load_from_the_package() -> None:
    files = sorted(WEIGHTS_DIR.glob("*.pt"))
    assert [f.stem for f in files] == ["classifier", "detector", "segmenter"]
    assert sum(f.stat().st_size for f in files) < 50 * 2**20
    pipeline = Pipeline.load(device="cpu")
    assert pipeline.version == MODEL_VERSION


def test_analyze_finds_the_lidc_0001_nodule(lidc_series_dir: Callable[[str], Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["analyze", str(lidc_series_dir("LIDC-IDRI-0001")), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "findings.json").read_text())
    assert document["model_version"] == MODEL_VERSION
    distances = [np.linalg.norm(np.subtract(f["centre_mm"], CONSENSUS_0001)) for f in document["findings"]]
    assert min(distances) < 10.0
    nodule = document["findings"][int(np.argmin(distances))]
    assert nodule["type"] == "solid"
    assert nodule["long_axis_mm"] == pytest.approx(32.1, abs=8.0)  # the readers' consensus: 32.1 x 25.9 mm


def test_every_shipped_network_names_the_model_version() -> None:
    for path in sorted(WEIGHTS_DIR.glob("*.pt")):
        _, metadata = load_model(path)
        assert metadata["version"] == MODEL_VERSION, path.name


def test_shipping_one_network_makes_the_others_part_of_its_version(tmp_path: Path) -> None:
    for path in WEIGHTS_DIR.glob("*.pt"):
        shutil.copy(path, tmp_path / path.name)
    stamp_version(tmp_path, "9.9.9")
    for path in sorted(tmp_path.glob("*.pt")):
        model, metadata = load_model(path)
        original, before = load_model(WEIGHTS_DIR / path.name)
        assert metadata["version"] == "9.9.9"
        assert metadata["trained_in"] == before.get("trained_in", before["version"])
        assert all(
            torch.equal(tensor, original.state_dict()[name]) for name, tensor in model.state_dict().items()
        )
    assert Pipeline.load(tmp_path, device="cpu").version == "9.9.9"


def test_evaluate_reports_on_a_few_held_out_cases(lidc_dir: Path, tmp_path: Path) -> None:
    """`cad-node evaluate` end to end on 2 held-out cases and the two real LIDC scans (the figures of
    all 24 cases are the docs'): the report, the FROC plot and where missed nodules were lost. The
    insertions and the LIDC scans need the LIDC data (`lidc_dir` skips without it)."""
    result = CliRunner().invoke(main, ["evaluate", "--cases", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"model {MODEL_VERSION}" in result.output
    assert "Nodules never found" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["seconds_per_scan"]) == 4  # 2 held-out cases, 2 LIDC scans
    fingerprint = report["held_out_cases_fingerprint"]
    assert f"held-out cases: 2, fingerprint {fingerprint}" in result.output
    assert set(report["missed_by_stage"]) == {"all", "3-6 mm"}
    assert [listing.splitlines()[0] for listing in report["lidc"]] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    assert (tmp_path / "froc.png").stat().st_size > 0
