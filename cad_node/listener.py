"""The DICOM listener: C-ECHO and C-STORE over pynetdicom, onto the instance store and the job database.

An instance is on disk and in the database before the sender hears success; if either fails the
sender gets a failure status. Only known callers may associate. CT instances are kept for analysis;
anything else (the node's own SR and SEG coming back, for instance) is acknowledged and dropped.
"""

from __future__ import annotations

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
        self.store = InstanceStore(settings.instances_dir, settings.min_free_disk_mb * 1024 * 1024)
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
        except StoreError as error:
            log.error("refused an instance from %s: %s", caller[0], error)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("refused an instance from %s: could not store or record it", caller[0])
            return OUT_OF_RESOURCES
        log.debug("%s %s", outcome, received.sop_instance_uid)
        return SUCCESS

    def keep(self, received: Received, data: bytes) -> Outcome:
        """Write the instance and record it, in one transaction; the same SOP instance is kept once."""
        path = self.store.path_for(received.study_uid, received.series_uid, received.sop_instance_uid)
        for _ in range(3):
            try:
                return self._keep_once(received, data, path)
            except IntegrityError:
                # Another association recorded this instance, or created its study, meanwhile: look again.
                continue
        raise StoreError("the job database kept refusing the instance (conflicting inserts)")

    def _keep_once(self, received: Received, data: bytes, path: Path) -> Outcome:
        with self.database.session() as session:
            if session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == received.sop_instance_uid)
            ):
                return Outcome.DUPLICATE
            if not self.store.has_room(len(data)):
                raise StoreError(
                    f"less than {self.settings.min_free_disk_mb} MB would be left free in {self.store.root}"
                )
            study = self._study(session, received)
            self.store.write(path, data)
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

    def _study(self, session: Session, received: Received) -> Study:
        study = session.scalar(select(Study).where(Study.study_uid == received.study_uid))
        if study is None:
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
