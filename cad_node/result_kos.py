"""The findings' key images as a Key Object Selection document (TID 2010, highdicom): each nodule's
key slice, the axial slice on which it is largest, as viewers without SR support show "key images".

Document title DCM 113000 "Of Interest" (CID 7010), the title of IHE Key Image Notes; the Key Object
Description says which nodule each image shows. Where there is a presentation state of the findings,
each image reference carries it, so that a viewer opens the key images with the outlines drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_gsps import nodule_label
from models.findings import Finding

KOS_SERIES_DESCRIPTION = "CAD key images"
KOS_SERIES_NUMBER = 9704
KOS_TITLE = codes.cid7010.OfInterest  # DCM 113000


def key_slices(findings: Sequence[Finding]) -> list[int]:
    """The grid slices k that are some nodule's key slice, in slice order."""
    return sorted({f.axial_slice_index for f in findings})


def key_image_description(findings: Sequence[Finding], source_headers: Sequence[Dataset]) -> str:
    lines = [
        "Key images of the lung nodule CAD: for each nodule it found, the axial slice on which the "
        "nodule is largest. CAD suggestions, not verified by a radiologist."
    ]
    for number, finding in enumerate(findings, start=1):
        header = source_headers[finding.axial_slice_index]
        image = f"image {header.InstanceNumber}" if "InstanceNumber" in header else "its key image"
        lines.append(f"{nodule_label(number, finding)}, {finding.side} {finding.zone} zone, on {image}.")
    return "\n".join(lines)


def build_key_object_selection(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    presentation_state: Dataset | None = None,
    *,
    series_number: int = KOS_SERIES_NUMBER,
) -> hd.ko.KeyObjectSelectionDocument:
    """`source_headers[k]` and `frame_numbers[k]` are slice k of the findings' grid."""
    if not findings:
        raise ValueError("a key object selection of the findings needs at least one finding")
    frames_of: dict[str, list[int]] = {}
    images: dict[str, Dataset] = {}
    for k in key_slices(findings):
        uid = str(source_headers[k].SOPInstanceUID)
        images.setdefault(uid, source_headers[k])
        frames_of.setdefault(uid, []).append(frame_numbers[k])
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLE,
        referenced_objects=list(images.values()),
        observer_device_context=algorithm.observer_context(),
        description=key_image_description(findings, source_headers),
    )
    for item in content[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        reference = item.ReferencedSOPSequence[0]
        if "PerFrameFunctionalGroupsSequence" in images[reference.ReferencedSOPInstanceUID]:
            reference.ReferencedFrameNumber = frames_of[reference.ReferencedSOPInstanceUID]
        if presentation_state is not None:
            reference.ReferencedSOPSequence = DicomSequence([_reference(presentation_state)])
    evidence = [*images.values(), *([presentation_state] if presentation_state is not None else [])]
    return hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        **algorithm.new_object(series_number, KOS_SERIES_DESCRIPTION),
        contributing_equipment=[algorithm.contributing_equipment()],
    )


def _reference(dataset: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    return item
