"""Conformance of the node's real outputs: the shipped pipeline's findings on a synthetic chest with
several nodules, on LIDC-IDRI-0001 re-encoded as JPEG Lossless, on the same scan as one Legacy Converted
Enhanced CT image, and a report without findings. Every object passes dciodvfy (dicom3tools) with zero
errors, every SR PixelMed's TID 1500 validation (DicomSRValidator, Debian pixelmed-apps) with none."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from cad_node.result_encoding import EXTRA_OUTPUTS, encode_results, write_results
from models.findings import Finding
from models.pipeline import Pipeline, analyze
from models.series_loading import CtSeries, load_series
from models.synthetic.case_writing import synthesize
from tests.conftest import _require_tool
from tests.test_result_encoding import ALGORITHM

SYNTHETIC_SEED = 2  # the shipped model finds 6 nodules there, of all four types
# PixelMed's XPath expressions exceed the JDK's default XPath limits.
PIXELMED_JAVA_OPTIONS = (
    "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"
)


@dataclasses.dataclass(frozen=True)
class Case:
    series: CtSeries
    findings: list[Finding]


@dataclasses.dataclass(frozen=True)
class Written:
    name: str
    findings: int
    paths: list[Path]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield Pipeline.load(device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("synthetic")
    synthesize(folder, seed=SYNTHETIC_SEED, n_nodules=6, n_slices=120)
    series = load_series(folder)
    findings = analyze(series.volume, pipeline).findings
    assert len(findings) >= 3, "the case must have several findings"
    return Case(series, findings)


@pytest.fixture(scope="module")
def lidc_jpeg(
    lidc_series_dir: Callable[[str], Path], pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> Case:
    """LIDC-IDRI-0001 re-encoded with dcmtk as JPEG Lossless (first-order prediction), analysed."""
    dcmcjpeg = _require_tool("dcmcjpeg")
    target = tmp_path_factory.mktemp("jpeg")

    def encode(source: Path) -> None:
        subprocess.run(
            [dcmcjpeg, "--encode-lossless-sv1", str(source), str(target / source.name)],
            check=True,
            capture_output=True,
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(encode, sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))))
    series = load_series(target)
    assert series.headers[0].file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    findings = analyze(series.volume, pipeline).findings
    assert findings, "the shipped model finds LIDC-IDRI-0001's nodule"
    return Case(series, findings)


@pytest.fixture(scope="module")
def lidc_multi_frame(
    lidc_series_dir: Callable[[str], Path], lidc_jpeg: Case, tmp_path_factory: pytest.TempPathFactory
) -> Case:
    """The whole of LIDC-IDRI-0001 as one Legacy Converted Enhanced CT image: the same voxels, so the
    pipeline's findings on the JPEG series are its findings here."""
    source = load_series(lidc_series_dir("LIDC-IDRI-0001"))
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in source.paths],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = tmp_path_factory.mktemp("multi") / "enhanced.dcm"
    converted.save_as(path)
    series = load_series(path)
    np.testing.assert_array_equal(series.volume.hu, lidc_jpeg.series.volume.hu)
    np.testing.assert_allclose(series.volume.origin, lidc_jpeg.series.volume.origin)
    return Case(series, lidc_jpeg.findings)


@pytest.fixture(scope="module")
def written(
    synthetic: Case, lidc_jpeg: Case, lidc_multi_frame: Case, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Written]:
    cases = {
        "several nodules": synthetic,
        "JPEG Lossless source": lidc_jpeg,
        "Legacy Converted Enhanced CT source": lidc_multi_frame,
        "no findings": Case(synthetic.series, []),
        "one nodule": Case(lidc_jpeg.series, lidc_jpeg.findings[:1]),
    }
    result = {}
    for name, case in cases.items():
        results = encode_results(
            case.series.headers,
            case.series.frame_numbers,
            case.findings,
            ALGORITHM,
            extras=EXTRA_OUTPUTS,
            volume=case.series.volume,
        )
        paths = write_results(results, tmp_path_factory.mktemp(re.sub(r"\W+", "_", name)))
        result[name] = Written(name, len(case.findings), paths)
    return result


def _dciodvfy_errors(dciodvfy: str, path: Path) -> list[str]:
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def pixelmed_sr_errors(validator: str, paths: Sequence[Path]) -> dict[Path, list[str]]:
    """DicomSRValidator's errors per SR file (its IOD and template checks); one JVM per file, run side
    by side, since each spends most of its time compiling the same stylesheets."""
    environment = {**os.environ, "JAVA_TOOL_OPTIONS": PIXELMED_JAVA_OPTIONS}

    def validate(path: Path) -> list[str]:
        run = subprocess.run(
            [validator, str(path)], capture_output=True, text=True, check=False, env=environment
        )
        lines = (run.stdout + run.stderr).splitlines()
        assert run.returncode == 0 and any("IOD validation complete" in line for line in lines), lines
        return [line for line in lines if line.startswith("Error")]

    with ThreadPoolExecutor(len(paths) or 1) as pool:
        return dict(zip(paths, pool.map(validate, paths), strict=True))


@pytest.fixture(scope="module")
def pixelmed_errors(written: dict[str, Written]) -> dict[Path, list[str]]:
    validator = _require_tool("DicomSRValidator")
    return pixelmed_sr_errors(validator, [w.paths[0] for w in written.values()])


CASES = [
    "several nodules",
    "one nodule",
    "JPEG Lossless source",
    "Legacy Converted Enhanced CT source",
    "no findings",
]


@pytest.mark.parametrize("case", CASES)
def test_every_object_passes_dciodvfy(
    written: dict[str, Written], case: str, require_tool: Callable[[str], str]
) -> None:
    dciodvfy = require_tool("dciodvfy")
    outputs = written[case]
    expected = (
        ["sr.dcm", "seg.dcm", "gsps.dcm", "kos.dcm", "summary.dcm"]
        if outputs.findings
        else ["sr.dcm", "summary.dcm"]
    )
    assert sorted(p.name for p in outputs.paths) == sorted(expected)
    for path in outputs.paths:
        assert _dciodvfy_errors(dciodvfy, path) == [], f"{case}, {path.name}"


@pytest.mark.parametrize("case", CASES)
def test_every_sr_passes_pixelmed_tid_1500_validation(
    written: dict[str, Written], pixelmed_errors: dict[Path, list[str]], case: str
) -> None:
    assert pixelmed_errors[written[case].paths[0]] == [], case


@pytest.mark.parametrize("case", CASES)
def test_every_object_reads_back_with_highdicom(written: dict[str, Written], case: str) -> None:
    outputs = written[case]
    sr = hd.sr.srread(outputs.paths[0])
    assert len(sr.content.get_planar_roi_measurement_groups()) == outputs.findings
    if outputs.findings:
        seg = hd.seg.segread(outputs.paths[1])
        assert len(seg.SegmentSequence) == outputs.findings
    for path in outputs.paths[2:]:
        pydicom.dcmread(path)
