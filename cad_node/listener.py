"""The DICOM listener: C-ECHO and C-STORE over pynetdicom, onto the instance store and the job database.

An instance is on disk and in the database before the sender hears success; if either fails the
sender gets a failure status. Only known callers may associate. CT instances are kept for analysis;
anything else (the node's own SR and SEG coming back, for instance) is acknowledged and dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cad_node.disk_watermark import DiskFullError, DiskWatermark
from cad_node.instance_store import InstanceStore, StoreError, is_uid
from cad_node.job_database import Instance, JobDatabase, Study, StudyStatus, utcnow
from cad_node.settings import Caller, Settings

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


@dataclass(frozen=True)
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    calling_ae: str
    calling_host: str


def caller_allowed(callers: list[Caller], ae_title: str, host: str) -> bool:
    """Empty list: anyone. Otherwise the AE title must be listed, and its host too where one is given."""
    if not callers:
        return True
    return any(c.ae_title == ae_title and c.host in (None, host) for c in callers)


class Listener:
    def __init__(self, settings: Settings, database: JobDatabase) -> None:
        self.settings = settings
        self.database = database
        self.store = InstanceStore(settings.instances_dir)
        self.disk = DiskWatermark.from_settings(settings)
        self.quiet = dt.timedelta(seconds=settings.quiet_period_s)
        self._refused_for_disk: set[str] = set()  # studies whose refusal was logged: once each
        self.callers = settings.callers
        self.sop_classes = set(settings.selection_rules.sop_classes)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> ThreadedAssociationServer:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = 0
        ae.maximum_associations = 32
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if not self.callers:
            log.warning("no allowed callers configured: any AE title may send to this node")
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,  # type: ignore[arg-type]
        )
        log.info(
            "listening as %s on %s:%d; allowed callers: %s",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            ", ".join(str(c) for c in self.callers) or "any",
        )
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        ae_title = str(requestor.primitive.calling_ae_title).strip()  # type: ignore[union-attr]
        host = str(requestor.address)
        if caller_allowed(self.callers, ae_title, host):
            return
        log.warning("association from %s at %s refused: calling AE title not allowed", ae_title, host)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE
        event.assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        request: Any = event.request
        sop_class = UID(str(request.AffectedSOPClassUID))
        requestor = event.assoc.requestor
        caller = (str(requestor.ae_title).strip(), str(requestor.address))
        if sop_class not in self.sop_classes:
            log.info("ignored a %s instance from %s (only CT is analysed)", sop_class.name, caller[0])
            return SUCCESS
        try:
            dataset = event.dataset
            received = Received(
                sop_class_uid=str(sop_class),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                study_uid=str(dataset.StudyInstanceUID),
                series_uid=str(dataset.SeriesInstanceUID),
                modality=str(dataset.get("Modality", "")),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_ae=caller[0],
                calling_host=caller[1],
            )
        except Exception as error:
            log.warning("refused an instance from %s: cannot read its identifiers (%s)", caller[0], error)
            return CANNOT_UNDERSTAND
        if not all(is_uid(u) for u in (received.sop_instance_uid, received.study_uid, received.series_uid)):
            log.warning("refused an instance from %s: malformed UID", caller[0])
            return CANNOT_UNDERSTAND
        try:
            outcome = self.keep(received, event.encoded_dataset(include_meta=True))
        except DiskFullError as refusal:
            self._log_disk_refusal(caller[0], received.study_uid, refusal)
            return OUT_OF_RESOURCES
        except StoreError as error:
            log.error("refused an instance from %s: %s", caller[0], error)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("refused an instance from %s: could not store or record it", caller[0])
            return OUT_OF_RESOURCES
        log.debug("%s %s", outcome, received.sop_instance_uid)
        if self._refused_for_disk:
            self._refused_for_disk.clear()  # room again: the next refusal is news
        return SUCCESS

    def _log_disk_refusal(self, caller: str, study_uid: str, refusal: DiskFullError) -> None:
        if study_uid in self._refused_for_disk:
            log.debug("refused an instance from %s: %s", caller, refusal)
            return
        if len(self._refused_for_disk) > 10_000:
            self._refused_for_disk.clear()
        self._refused_for_disk.add(study_uid)
        log.error("refused an instance from %s (logged once per study): %s", caller, refusal)

    def keep(self, received: Received, data: bytes) -> Outcome:
        """Write the instance and record it, in one transaction; the same SOP instance is kept once.
        On any failure no file of it is left in the store unless the job database records it."""
        path = self.store.path_for(received.study_uid, received.series_uid, received.sop_instance_uid)
        written: list[tuple[int, int]] = []  # the (device, inode) of each file this call wrote
        try:
            for _ in range(3):
                try:
                    return self._keep_once(received, data, path, written)
                except IntegrityError:
                    # Another association recorded this instance, or created its study, meanwhile: look again.
                    continue
            raise StoreError("the job database kept refusing the instance (conflicting inserts)")
        except BaseException:
            if written:
                self._discard_unrecorded(received.sop_instance_uid, path, written)
            raise

    def _discard_unrecorded(self, sop_instance_uid: str, path: Path, written: list[tuple[int, int]]) -> None:
        """The file was written but its transaction failed (a full disk under the database, say): remove
        it, unless another association wrote or recorded the same instance meanwhile."""
        try:
            current = path.stat()
        except OSError:
            return
        if (current.st_dev, current.st_ino) not in written:
            return
        try:
            with self.database.session() as session:
                recorded = session.scalar(
                    select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
                )
        except Exception as error:
            log.warning("an unrecorded instance file may be left in the store (%s)", error)
            return
        if recorded is None:  # else another association kept the same instance: its file stays
            path.unlink(missing_ok=True)

    def _keep_once(
        self, received: Received, data: bytes, path: Path, written: list[tuple[int, int]]
    ) -> Outcome:
        with self.database.session() as session:
            if session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == received.sop_instance_uid)
            ):
                return Outcome.DUPLICATE
            study = session.scalar(select(Study).where(Study.study_uid == received.study_uid))
            refusal = self.disk.refusal(self.store.free_bytes(), len(data), self._in_progress(study))
            if refusal is not None:
                raise DiskFullError(f"{refusal} (store {self.store.root})")
            study = study or self._new_study(session, received)
            written.append(self.store.write(path, data))
            session.add(
                Instance(
                    sop_instance_uid=received.sop_instance_uid,
                    sop_class_uid=received.sop_class_uid,
                    series_uid=received.series_uid,
                    study=study,
                    modality=received.modality,
                    path=str(path),
                    size_bytes=len(data),
                    transfer_syntax=received.transfer_syntax,
                )
            )
            # In SQL, not in Python: concurrent associations adding to one study must not lose counts.
            study.instance_count = Study.instance_count + 1  # type: ignore[assignment]
            study.last_received_at = utcnow()
        return Outcome.STORED

    def _in_progress(self, study: Study | None) -> bool:
        """Being received: not yet complete, or an instance of it arrived within the quiet period."""
        if study is None:
            return False
        return study.status == StudyStatus.RECEIVING or study.last_received_at > utcnow() - self.quiet

    def _new_study(self, session: Session, received: Received) -> Study:
        study = Study(
            study_uid=received.study_uid,
            calling_ae=received.calling_ae,
            calling_host=received.calling_host,
            status=StudyStatus.RECEIVING,
            instance_count=0,
            note="",
        )
        session.add(study)
        session.flush()  # a row to count on (see _keep_once); a concurrent insert fails here
        log.info("receiving a new study from %s", received.calling_ae)
        return study
