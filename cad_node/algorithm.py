"""Who made the results: the algorithm's identity as the DICOM result objects carry it (IHE AI Results).

The device UID is derived from the bytes of the shipped weights, so it changes exactly when the model
is retrained, and a result can be traced back to the weights that produced it.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

ALGORITHM_NAME = "cad-node lung nodule CAD"
MANUFACTURER = "cad-node project"
PACKAGE = "cad-node"
WEIGHT_PATTERN = "*.pt"


@dataclass(frozen=True)
class AlgorithmIdentity:
    name: str
    version: str
    software_version: str
    manufacturer: str
    device_uid: str

    @classmethod
    def for_weights(
        cls, version: str, weights_dir: Path, *, name: str = ALGORITHM_NAME, manufacturer: str = MANUFACTURER
    ) -> AlgorithmIdentity:
        """The identity of model `version` whose weights are the `*.pt` files in `weights_dir`."""
        return cls(
            name=name,
            version=version,
            software_version=cad_node_version(),
            manufacturer=manufacturer,
            device_uid=uid_from_digest(weights_digest(weights_dir)),
        )

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020): the package, then the model."""
        return [f"{PACKAGE} {self.software_version}", f"model {self.version}"]

    def new_object(self, series_number: int, series_description: str) -> dict[str, Any]:
        """The keyword arguments of highdicom's constructors that every result object shares: a new
        series and instance in the source study, made by this algorithm."""
        return {
            "series_instance_uid": hd.UID(),
            "series_number": series_number,
            "series_description": series_description,
            "sop_instance_uid": hd.UID(),
            "instance_number": 1,
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.name,
            "software_versions": self.software_versions,
            "device_serial_number": self.device_uid,
        }

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification, for SR measurement groups."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)

    def observer_context(self) -> hd.sr.ObserverContext:
        """The algorithm as the device observer (TID 1004), for the SR and the KOS."""
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid,
                name=self.name,
                manufacturer_name=self.manufacturer,
                model_name=self.name,
            ),
        )

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence, for SEG segments."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.version,
            source=self.manufacturer,
        )

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The Contributing Equipment Sequence item that IHE AI Results asks for: the algorithm as
        processing equipment, with its Device UID."""
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            # DCM 109102 "Processing Equipment" (CID 7005): DCM 109103 is "Modifying Equipment".
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.software_versions,
            contribution_datetime=datetime.datetime.now(datetime.UTC),
            contribution_description="Lung nodule detection, segmentation and measurement (CAD)",
        )
        item.DeviceUID = self.device_uid
        return item


def cad_node_version() -> str:
    try:
        return package_version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def weights_digest(weights_dir: Path) -> str:
    """SHA-256 over the names and bytes of the weight files, in name order."""
    files = sorted(Path(weights_dir).glob(WEIGHT_PATTERN))
    if not files:
        raise FileNotFoundError(f"no {WEIGHT_PATTERN} weight files in {weights_dir}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def uid_from_digest(hex_digest: str) -> str:
    """A 2.25 UID (the UUID form of PS3.5 B.2) from the first 128 bits of a digest."""
    return f"2.25.{int(hex_digest[:32], 16)}"
