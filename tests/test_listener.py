"""The listener with real parts: pynetdicom associations over loopback, files on disk, SQLite job database.

Each test starts a `Listener` on a free port over a fresh data folder and sends real LIDC CT slices.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from cad_node.job_database import Instance, Study
from cad_node.listener import OUT_OF_RESOURCES, SUCCESS, Listener

SENDER = "PUSHER"
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

NodeFactory = Callable[..., Listener]


@pytest.fixture
def lidc_slices(lidc_series_dir: Callable[[str], Path]) -> list[Path]:
    """LIDC-IDRI-0001's CT slices (133, file names not in slice order)."""
    return sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))


@contextmanager
def association(node: Listener, files: Sequence[Path] = (), calling: str = SENDER) -> Iterator[Association]:
    """An association to the node proposing each file's SOP class in its own transfer syntax and the
    uncompressed ones. Released on exit."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    # One context per syntax: pynetdicom then sends each file as it is, never re-encoded.
    metas = [read_file_meta_info(path) for path in files]
    contexts = {(UID(m.MediaStorageSOPClassUID), UID(m.TransferSyntaxUID)) for m in metas}
    contexts |= {(c, ts) for c, _ in contexts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send(node: Listener, files: Sequence[Path], calling: str = SENDER) -> list[int]:
    """C-STORE each file in one association; the status code of each."""
    with association(node, files, calling) as assoc:
        assert assoc.is_established, f"association refused or failed (rejected: {assoc.is_rejected})"
        return [int(assoc.send_c_store(path).Status) for path in files]


def instance_rows(node: Listener) -> list[Instance]:
    with node.database.session() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def study_rows(node: Listener) -> list[Study]:
    with node.database.session() as session:
        return list(session.scalars(select(Study)))


def stored_files(node: Listener) -> list[Path]:
    root = node.settings.instances_dir
    return sorted(root.rglob("*.dcm")) if root.exists() else []


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: what follows the preamble and the file meta group."""
    data = path.read_bytes()
    meta_group_length = read_file_meta_info(path).FileMetaInformationGroupLength
    return data[128 + 4 + 12 + meta_group_length :]  # preamble, "DICM", the group length element


def rewritten(source: Path, target: Path, change: Callable[[pydicom.Dataset], None]) -> Path:
    dataset = pydicom.dcmread(source)
    change(dataset)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target, enforce_file_format=True)
    return target


def test_each_instance_is_stored_and_recorded_before_success(
    start_node: NodeFactory, lidc_slices: list[Path]
) -> None:
    node = start_node()
    files = lidc_slices[:4]
    with association(node, files) as assoc:
        assert assoc.is_established
        for count, path in enumerate(files, start=1):
            status = assoc.send_c_store(path)
            assert int(status.Status) == SUCCESS
            # No waiting: the file and its row must already be there when the sender hears success.
            original = pydicom.dcmread(path)
            stored = (
                node.settings.instances_dir
                / original.StudyInstanceUID
                / original.SeriesInstanceUID
                / f"{original.SOPInstanceUID}.dcm"
            )
            assert stored.is_file()
            assert dataset_bytes(stored) == dataset_bytes(path)
            assert pydicom.dcmread(stored) == original
            rows = instance_rows(node)
            assert len(rows) == count
            assert rows[-1].sop_instance_uid == original.SOPInstanceUID
            assert rows[-1].path == str(stored)
            assert rows[-1].series_uid == original.SeriesInstanceUID
            assert rows[-1].modality == "CT"
            assert rows[-1].transfer_syntax == ExplicitVRLittleEndian
            assert rows[-1].size_bytes == stored.stat().st_size
    [study] = study_rows(node)
    assert study.study_uid == original.StudyInstanceUID
    assert (study.instance_count, study.calling_ae, study.calling_host) == (4, SENDER, "127.0.0.1")
    assert not list(node.settings.instances_dir.rglob(".incoming-*"))  # no temporary file left


def test_same_instance_twice_is_stored_once(start_node: NodeFactory, lidc_slices: list[Path]) -> None:
    node = start_node()
    assert send(node, lidc_slices[:2]) == [SUCCESS, SUCCESS]
    assert send(node, [lidc_slices[0], lidc_slices[0]]) == [SUCCESS, SUCCESS]
    assert len(instance_rows(node)) == 2
    assert len(stored_files(node)) == 2
    [study] = study_rows(node)
    assert study.instance_count == 2


def test_parallel_associations_into_one_study_count_every_instance(
    start_node: NodeFactory, lidc_slices: list[Path]
) -> None:
    node = start_node()
    files = lidc_slices[:32]
    statuses: dict[int, list[int]] = {}

    def sender(part: int) -> None:
        statuses[part] = send(node, files[part::4])

    threads = [threading.Thread(target=sender, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [0, 1, 2, 3]
    assert all(status == SUCCESS for part in statuses.values() for status in part)
    assert len(instance_rows(node)) == len(stored_files(node)) == 32
    [study] = study_rows(node)
    assert study.instance_count == 32


def test_non_ct_object_is_acknowledged_and_dropped(
    start_node: NodeFactory, lidc_slices: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def to_secondary_capture(dataset: pydicom.Dataset) -> None:
        dataset.SOPClassUID = SECONDARY_CAPTURE
        dataset.SOPInstanceUID = generate_uid()
        dataset.Modality = "OT"

    capture = rewritten(lidc_slices[0], tmp_path / "sc.dcm", to_secondary_capture)
    node = start_node()
    caplog.set_level(logging.INFO, logger="cad_node")
    assert send(node, [capture]) == [SUCCESS]
    assert instance_rows(node) == [] and study_rows(node) == [] and stored_files(node) == []
    assert any("ignored" in r.getMessage() and "Secondary Capture" in r.getMessage() for r in caplog.records)


def test_too_little_free_disk_gives_a700_and_records_nothing(
    start_node: NodeFactory, lidc_slices: list[Path]
) -> None:
    node = start_node(min_free_disk_mb=1 << 40)  # a million terabytes
    assert send(node, lidc_slices[:2]) == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
    assert instance_rows(node) == [] and study_rows(node) == [] and stored_files(node) == []


def test_unwritable_store_gives_failure_and_records_nothing(
    start_node: NodeFactory, lidc_slices: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    study_uid = pydicom.dcmread(lidc_slices[0], stop_before_pixels=True).StudyInstanceUID
    node.settings.instances_dir.mkdir(parents=True)
    # A file where the study's folder should be: the write fails even for root.
    (node.settings.instances_dir / study_uid).write_text("in the way")
    caplog.set_level(logging.INFO, logger="cad_node")
    statuses = send(node, lidc_slices[:2])
    assert all(status != SUCCESS and status >= 0xA000 for status in statuses), [hex(s) for s in statuses]
    assert instance_rows(node) == [] and study_rows(node) == [] and stored_files(node) == []
    assert any(r.levelno >= logging.ERROR and "could not store" in r.getMessage() for r in caplog.records)


def test_unknown_calling_ae_title_is_rejected_and_logged(
    start_node: NodeFactory, lidc_slices: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    caplog.set_level(logging.INFO, logger="cad_node")
    with association(node, lidc_slices[:1], calling="STRANGER") as assoc:
        assert assoc.is_rejected
        assert not assoc.is_established
    assert any(
        "STRANGER" in r.getMessage() and "refused" in r.getMessage() and r.levelno >= logging.WARNING
        for r in caplog.records
    )
    assert instance_rows(node) == []
    with association(node, lidc_slices[:1]) as assoc:  # the allowed caller still gets in
        assert assoc.is_established


def test_allowed_ae_title_from_the_wrong_host_is_rejected(
    start_node: NodeFactory, lidc_slices: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(allowed_callers=[f"{SENDER}@10.9.9.9"])
    caplog.set_level(logging.INFO, logger="cad_node")
    with association(node, lidc_slices[:1]) as assoc:
        assert assoc.is_rejected
    assert any(SENDER in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)
    assert instance_rows(node) == []


def test_callers_default_to_the_destinations(start_node: NodeFactory, lidc_slices: list[Path]) -> None:
    node = start_node(allowed_callers=[], destinations=["PACS@127.0.0.1:104"])
    with association(node, lidc_slices[:1], calling="PACS") as assoc:
        assert assoc.is_established
    with association(node, lidc_slices[:1], calling=SENDER) as assoc:
        assert assoc.is_rejected


def test_jpeg_lossless_instance_is_stored_in_its_transfer_syntax(
    start_node: NodeFactory, lidc_slices: list[Path], tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    source = lidc_slices[0]
    encoded = tmp_path / "jpeg.dcm"
    subprocess.run(
        [require_tool("dcmcjpeg"), "--encode-lossless-sv1", str(source), str(encoded)],
        check=True,
        capture_output=True,
    )
    assert read_file_meta_info(encoded).TransferSyntaxUID == JPEGLosslessSV1
    node = start_node()
    with association(node, [encoded]) as assoc:
        assert JPEGLosslessSV1 in {c.transfer_syntax[0] for c in assoc.accepted_contexts}
        assert int(assoc.send_c_store(encoded).Status) == SUCCESS
    [row] = instance_rows(node)
    assert row.transfer_syntax == JPEGLosslessSV1
    stored = pydicom.dcmread(row.path)
    assert stored.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert dataset_bytes(Path(row.path)) == dataset_bytes(encoded)  # the compressed frames untouched
    assert (stored.pixel_array == pydicom.dcmread(source).pixel_array).all()


def test_no_patient_name_or_id_in_the_log(
    start_node: NodeFactory, lidc_slices: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def identify(dataset: pydicom.Dataset) -> None:
        dataset.PatientName = "DOE^JANE"
        dataset.PatientID = "PID-739251"

    files = [rewritten(path, tmp_path / "named" / path.name, identify) for path in lidc_slices[:3]]
    node = start_node()
    caplog.set_level(logging.INFO)
    assert send(node, files) == [SUCCESS] * 3
    with association(node, files, calling="STRANGER") as assoc:
        assert assoc.is_rejected
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("new study" in m for m in messages)  # the records were captured at all
    for message in messages:
        for secret in ("DOE", "JANE", "739251"):
            assert secret not in message
