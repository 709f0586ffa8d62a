"""The findings' masks as a DICOM Segmentation (highdicom): BINARY, one segment per nodule, on the
source series' grid and frame of reference.

Only the slices that hold some nodule are passed to highdicom, each with the position of its source
slice: highdicom matches every SEG frame to its source image (or source frame) by that position and
writes the reference, and the input array stays a few slices deep instead of the whole series.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cad_node.algorithm import AlgorithmIdentity
from models.findings import Finding

SEG_SERIES_DESCRIPTION = "CAD nodules SEG"
SEG_SERIES_NUMBER = 9702
SEG_CONTENT_LABEL = "CAD_NODULES"


# Distinct, saturated colours that stand out on grey CT, one per nodule in turn.
SEGMENT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


# OHIF loads a measurement group into its measurement panel only when the group's tracking identifier
# starts with a Cornerstone tool's name; a closed outline is its PlanarFreehandROI.
OHIF_TOOL_PREFIX = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def nodule_name(number: int) -> str:
    """The name a nodule goes by in every result object: "Nodule N", N from 1."""
    return f"Nodule {number}"


def tracking_id(number: int) -> str:
    """The tracking identifier of nodule N in the SR, the SEG and the GSPS: OHIF's tool prefix, then
    the nodule's name (the tracking UID is what joins the objects)."""
    return f"{OHIF_TOOL_PREFIX}:{nodule_name(number)}"


def build_segmentation(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    tracking_uids: Sequence[str],
    *,
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """Segment n + 1 is `findings[n]`. `source_headers[k]` and `frame_numbers[k]` are slice k of the
    grid the findings' masks are on (as ``models.series_loading.CtSeries`` gives them)."""
    if not findings:
        raise ValueError("a Segmentation needs at least one segment: no findings to encode")
    if len(source_headers) != len(frame_numbers):
        raise ValueError(f"{len(source_headers)} source headers but {len(frame_numbers)} frame numbers")
    if len(tracking_uids) != len(findings):
        raise ValueError(f"{len(findings)} findings but {len(tracking_uids)} tracking UIDs")
    rows, columns = int(source_headers[0].Rows), int(source_headers[0].Columns)
    slices, masks = _stacked_masks(findings, len(source_headers), (rows, columns))
    segmentation = hd.seg.Segmentation(
        source_images=_unique_instances(source_headers),
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(number, uid, algorithm) for number, uid in enumerate(tracking_uids, start=1)
        ],
        **algorithm.new_object(series_number, SEG_SERIES_DESCRIPTION),
        plane_positions=[_plane_position(source_headers[k], frame_numbers[k]) for k in slices],
        content_label=SEG_CONTENT_LABEL,
        content_description="Lung nodules found by CAD (not a diagnosis)",
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    return segmentation


def _stacked_masks(
    findings: Sequence[Finding], n_slices: int, in_plane: tuple[int, int]
) -> tuple[list[int], npt.NDArray[np.bool_]]:
    """The grid slices k that hold any nodule, and the masks on those slices as (slice, row, column,
    segment)."""
    grid = np.array([n_slices, *in_plane])
    for number, finding in enumerate(findings, start=1):
        if finding.mask.voxel_count == 0:
            raise ValueError(f"{nodule_name(number)} has an empty mask")
        low = np.array(finding.mask.offset)
        if np.any(low < 0) or np.any(low + np.array(finding.mask.array.shape) > grid):
            raise ValueError(f"{nodule_name(number)}'s mask does not lie on the source grid {tuple(grid)}")
    slices = sorted({k for f in findings for k in _slices_with_voxels(f)})
    index = {k: n for n, k in enumerate(slices)}
    stacked = np.zeros((len(slices), *in_plane, len(findings)), dtype=bool)
    for segment, finding in enumerate(findings):
        mask = finding.mask
        _, row_range, column_range = mask.slices()
        for local, plane in enumerate(mask.array):
            k = mask.offset[0] + local
            if k in index:
                stacked[index[k], row_range, column_range, segment] = plane
    return slices, stacked


def _slices_with_voxels(finding: Finding) -> list[int]:
    return [finding.mask.offset[0] + int(k) for k in np.flatnonzero(finding.mask.array.any(axis=(1, 2)))]


def _unique_instances(headers: Sequence[Dataset]) -> list[Dataset]:
    """One dataset per SOP instance, in slice order: every slice of a single-frame series, the one
    instance of a multi-frame series."""
    seen: dict[str, Dataset] = {}
    for header in headers:
        seen.setdefault(str(header.SOPInstanceUID), header)
    instances = list(seen.values())
    if len(instances) > 1 and any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in instances):
        raise ValueError("a SEG derives from single-frame images or from one multi-frame image, not both")
    return instances


def _plane_position(header: Dataset, frame_number: int) -> hd.PlanePositionSequence:
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in slice_position(header, frame_number)],
    )


def slice_position(header: Dataset, frame_number: int) -> Sequence[float]:
    """Image Position (Patient) of a single-frame image, or of frame `frame_number` (from 1) of a
    multi-frame one."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return [float(v) for v in header.ImagePositionPatient]
    groups = per_frame[frame_number - 1]
    if "PlanePositionSequence" not in groups:
        groups = header.SharedFunctionalGroupsSequence[0]
    return [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]


def _segment_description(
    number: int, tracking_uid: str, algorithm: AlgorithmIdentity
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=nodule_name(number),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.seg_identification(),
        tracking_uid=tracking_uid,
        tracking_id=tracking_id(number),
        anatomic_regions=[codes.SCT.Lung],
        # Viewers colour a segment without a recommended colour as they like, and some say so in a pop-up.
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]),
    )
