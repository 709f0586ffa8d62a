"""C-STORE of DICOM files to a peer: the node's results to its destinations, and `cad-node send`.

Files go as they are on disk (pynetdicom reads them in chunks, without decoding), one association for
all of them, each proposed in its own transfer syntax and, where it is uncompressed, the two others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config

from cad_node.settings import Peer

log = logging.getLogger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class Outgoing:
    path: Path
    sop_class_uid: UID
    transfer_syntax: UID


@dataclass(frozen=True)
class SendReport:
    stored: list[Path]  # those the peer confirmed
    failed: dict[str, str]  # path -> why

    @property
    def sent(self) -> int:
        return len(self.stored)

    @property
    def ok(self) -> bool:
        return not self.failed


def outgoing(paths: Sequence[Path]) -> list[Outgoing]:
    """Each file's SOP class and transfer syntax from its file meta; a clear error for a non-DICOM file."""
    files = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            files.append(Outgoing(path, UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)))
        except Exception as error:
            raise ExportError(f"{path} is not a DICOM file with file meta information ({error})") from error
    return files


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    calling_ae_title: str,
    *,
    timeout_s: float = 60.0,
    progress: Callable[[int], None] = lambda n: None,
) -> SendReport:
    """C-STORE every file to `peer` over one association. Raises ExportError when the peer cannot be
    reached or refuses the association; per-file failures, and the files left when the peer drops the
    association, are in the report."""
    files = outgoing(paths)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    contexts = sorted({(f.sop_class_uid, f.transfer_syntax) for f in files})
    for sop_class in sorted({c for c, _ in contexts}):
        syntaxes = {ts for c, ts in contexts if c == sop_class}
        if syntaxes & set(_UNCOMPRESSED):
            syntaxes |= set(_UNCOMPRESSED)
        for syntax in sorted(syntaxes):
            if len(ae.requested_contexts) >= MAX_CONTEXTS:
                raise ExportError(f"more than {MAX_CONTEXTS} kinds of object in one send; send fewer at once")
            ae.add_requested_context(sop_class, syntax)
    try:
        association = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except OSError as error:  # e.g. a host name that does not resolve: pynetdicom lets it through
        raise ExportError(f"{peer} could not be reached ({error})") from error
    if not association.is_established:
        why = "rejected the association" if association.is_rejected else "could not be reached"
        raise ExportError(f"{peer} {why}")
    failed: dict[str, str] = {}
    stored: list[Path] = []
    try:
        for file in files:
            if not association.is_established:
                failed[str(file.path)] = f"not sent: {peer} dropped the association"
                continue
            try:
                status = association.send_c_store(file.path)
            except ValueError as error:  # no accepted presentation context for this file
                failed[str(file.path)] = str(error)
                continue
            code = int(status.Status) if "Status" in status else -1
            if code in (0x0000, 0xB000, 0xB006, 0xB007):
                stored.append(file.path)
                progress(len(stored))
            else:
                failed[str(file.path)] = "no response" if code == -1 else f"status 0x{code:04X}"
    finally:
        if association.is_established:
            association.release()
    return SendReport(stored=stored, failed=failed)
