"""The findings as a Grayscale Softcopy Presentation State, for viewers without SR support: each nodule
outlined (POLYLINE) and labelled (TEXT) on its key slice, the axial slice on which it is largest, with
a lung window, over all images of the source series.

The graphic objects carry the nodule's tracking identifier and UID, the same as in the SR and SEG.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_seg import nodule_name, tracking_id
from cad_node.result_sr import nodule_outline
from models.findings import Finding

GSPS_SERIES_DESCRIPTION = "CAD nodules GSPS"
GSPS_SERIES_NUMBER = 9703
GSPS_CONTENT_LABEL = "CAD_NODULES"
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
LAYER = "CAD"
BODY_PART = "CHEST"
YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)  # sRGB (255, 255, 0)
# The label's box, in pixels of a 512-pixel image (scaled with the image): viewers fit the text into it.
LABEL_HEIGHT_512 = 14.0
LABEL_CHARACTER_WIDTH_512 = 6.5
LABEL_GAP = 4.0


def nodule_label(number: int, finding: Finding) -> str:
    """ "Nodule 1: 12 x 9 mm, solid, Lung-RADS 4A (CAD suggestion)"."""
    return (
        f"{nodule_name(number)}: {finding.long_axis_mm:.0f} x {finding.short_axis_mm:.0f} mm, "
        f"{finding.nodule_type}, Lung-RADS {finding.lung_rads} (CAD suggestion)"
    )


def build_presentation_state(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    tracking_uids: Sequence[str],
    *,
    series_number: int = GSPS_SERIES_NUMBER,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Nodule n + 1 is `findings[n]`, tracked by `tracking_uids[n]`. `source_headers[k]` and
    `frame_numbers[k]` are slice k of the findings' grid."""
    if not findings:
        raise ValueError("a presentation state of the findings needs at least one finding")
    if len(tracking_uids) != len(findings):
        raise ValueError(f"{len(findings)} findings but {len(tracking_uids)} tracking UIDs")
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="Lung nodules found by CAD", display_color=YELLOW
    )
    annotations = [
        _annotation(number, uid, finding, source_headers, frame_numbers, layer)
        for number, (finding, uid) in enumerate(zip(findings, tracking_uids, strict=True), start=1)
    ]
    images = _unique_instances(source_headers)
    window_centre, window_width = LUNG_WINDOW
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        **algorithm.new_object(series_number, GSPS_SERIES_DESCRIPTION),
        content_label=GSPS_CONTENT_LABEL,
        content_description="Lung nodules found by CAD (not a diagnosis)",
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=[
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=window_centre, window_width=window_width, window_explanation="LUNG"
            )
        ],
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    # Not paired, so General Series needs no Laterality: dciodvfy asks for one when no body part is given.
    state.BodyPartExamined = BODY_PART
    return state


def _annotation(
    number: int,
    tracking_uid: str,
    finding: Finding,
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    layer: hd.pr.GraphicLayer,
) -> hd.pr.GraphicAnnotation:
    k = finding.axial_slice_index
    header = source_headers[k]
    outline = nodule_outline(finding)
    label = nodule_label(number, finding)
    anchor, box = label_placement(outline, label, (int(header.Rows), int(header.Columns)))
    multi_frame = "PerFrameFunctionalGroupsSequence" in header
    return hd.pr.GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        referenced_frame_number=frame_numbers[k] if multi_frame else None,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=tracking_id(number),
                tracking_uid=tracking_uid,
            )
        ],
        text_objects=[
            hd.pr.TextObject(
                text_value=label,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=box,
                anchor_point=anchor,
                anchor_point_visible=True,
                text_justification=hd.pr.TextJustificationValues.LEFT,
                tracking_id=tracking_id(number),
                tracking_uid=tracking_uid,
            )
        ],
    )


def label_placement(
    outline: npt.NDArray[np.float64], label: str, shape: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float, float, float]]:
    """An anchor point on the outline and the label's bounding box (left, top, right, bottom) beside
    it, inside the image: centred above the nodule, or below it where there is no room above, and
    shifted sideways where the image ends."""
    rows, columns = shape
    scale = max(rows, columns) / 512
    height = LABEL_HEIGHT_512 * scale
    width = min(len(label) * LABEL_CHARACTER_WIDTH_512 * scale, columns - 1.0)
    top_point = outline[int(np.argmin(outline[:, 1]))]
    bottom_point = outline[int(np.argmax(outline[:, 1]))]
    if top_point[1] - LABEL_GAP - height >= 0:
        anchor, top = top_point, top_point[1] - LABEL_GAP - height
    else:
        anchor, top = bottom_point, min(bottom_point[1] + LABEL_GAP, rows - 1.0 - height)
    left = float(np.clip(anchor[0] - width / 2, 0.0, columns - 1.0 - width))
    return (float(anchor[0]), float(anchor[1])), (left, float(top), left + width, float(top) + height)


def _unique_instances(headers: Sequence[Dataset]) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    for header in headers:
        seen.setdefault(str(header.SOPInstanceUID), header)
    return list(seen.values())
