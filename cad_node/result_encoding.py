"""The pipeline's findings as DICOM results: a Comprehensive 3D SR (TID 1500) and, when there are
findings, a Segmentation, both new series in the analysed study; and, as chosen, extra objects for
viewers without SR support: a presentation state (GSPS), key images (KOS) and a summary page (PDF)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import highdicom as hd
from pydicom.dataset import Dataset

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_gsps import build_presentation_state
from cad_node.result_kos import build_key_object_selection
from cad_node.result_seg import build_segmentation
from cad_node.result_sr import build_report
from cad_node.result_summary import build_summary_document
from models.findings import Finding
from models.volume import Volume

SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"
RESULT_FILE_MODE = 0o644
ExtraOutput = Literal["gsps", "kos", "summary"]
EXTRA_OUTPUTS: tuple[ExtraOutput, ...] = get_args(ExtraOutput)
EXTRA_FILES: dict[ExtraOutput, str] = {"gsps": "gsps.dcm", "kos": "kos.dcm", "summary": "summary.dcm"}


@dataclass(frozen=True, eq=False)
class EncodedResults:
    sr: Dataset
    seg: Dataset | None  # None without findings: a SEG with no segment is not valid
    # The extras, where chosen; a GSPS or KOS only with findings (there is nothing to outline or select)
    gsps: Dataset | None = None
    kos: Dataset | None = None
    summary: Dataset | None = None  # Encapsulated PDF

    def extras(self) -> dict[ExtraOutput, Dataset | None]:
        return {"gsps": self.gsps, "kos": self.kos, "summary": self.summary}

    def by_file(self) -> dict[str, Dataset | None]:
        """Each object under the name of its file in the results folder; None where there is none."""
        return {
            SR_FILE: self.sr,
            SEG_FILE: self.seg,
            **{EXTRA_FILES[name]: dataset for name, dataset in self.extras().items()},
        }


def encode_results(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    *,
    extras: Collection[str] = (),
    volume: Volume | None = None,
) -> EncodedResults:
    """`source_headers[k]` and `frame_numbers[k]` are slice k of the series the findings were found in
    (``CtSeries.headers`` and ``CtSeries.frame_numbers``); headers without pixel data suffice.
    `extras` are among EXTRA_OUTPUTS; the summary's thumbnails need the series' `volume`."""
    unknown = sorted(set(extras) - set(EXTRA_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown extra outputs {unknown}: choose among {list(EXTRA_OUTPUTS)}")
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
    gsps = (
        build_presentation_state(source_headers, frame_numbers, findings, algorithm, tracking_uids)
        if findings and "gsps" in extras
        else None
    )
    kos = (
        build_key_object_selection(source_headers, frame_numbers, findings, algorithm, gsps)
        if findings and "kos" in extras
        else None
    )
    summary = (
        build_summary_document(source_headers, findings, algorithm, volume) if "summary" in extras else None
    )
    return EncodedResults(sr=sr, seg=seg, gsps=gsps, kos=kos, summary=summary)


def write_results(results: EncodedResults, out_dir: Path) -> list[Path]:
    """Write DIR/sr.dcm and, when there are, DIR/seg.dcm and the extras (EXTRA_FILES); each appears
    whole or not at all. A file left from an earlier run is removed when these results have no such
    object, so the folder always holds one run's results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dataset in results.by_file().items():
        if dataset is not None:
            written.append(_write_atomically(dataset, out_dir / name))
        else:
            (out_dir / name).unlink(missing_ok=True)
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
