"""The pipeline's findings as DICOM results: a Comprehensive 3D SR (TID 1500) and, when there are
findings, a Segmentation, both new series in the analysed study."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_seg import build_segmentation
from cad_node.result_sr import build_report
from models.findings import Finding

SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"
RESULT_FILE_MODE = 0o644


@dataclass(frozen=True, eq=False)
class EncodedResults:
    sr: Dataset
    seg: Dataset | None  # None without findings: a SEG with no segment is not valid


def encode_results(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
) -> EncodedResults:
    """`source_headers[k]` and `frame_numbers[k]` are slice k of the series the findings were found in
    (``CtSeries.headers`` and ``CtSeries.frame_numbers``); headers without pixel data suffice."""
    if not source_headers or len(source_headers) != len(frame_numbers):
        raise ValueError(
            f"{len(source_headers)} source headers and {len(frame_numbers)} frame numbers: "
            "give one of each per slice"
        )
    tracking_uids = [str(hd.UID()) for _ in findings]
    seg = (
        build_segmentation(source_headers, frame_numbers, findings, algorithm, tracking_uids)
        if findings
        else None
    )
    sr = build_report(source_headers, frame_numbers, findings, algorithm, tracking_uids, seg)
    return EncodedResults(sr=sr, seg=seg)


def write_results(results: EncodedResults, out_dir: Path) -> list[Path]:
    """Write DIR/sr.dcm and, when there is one, DIR/seg.dcm; each appears whole or not at all. A seg.dcm
    left from an earlier run is removed when these results have none, so the two always match."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write_atomically(results.sr, out_dir / SR_FILE)]
    if results.seg is not None:
        written.append(_write_atomically(results.seg, out_dir / SEG_FILE))
    else:
        (out_dir / SEG_FILE).unlink(missing_ok=True)
    return written


def _write_atomically(dataset: Dataset, path: Path) -> Path:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            dataset.save_as(stream, enforce_file_format=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, RESULT_FILE_MODE)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
