"""The findings as a Comprehensive 3D SR measurement report (TID 1500, highdicom).

Per nodule, a planar group (TID 1410) whose image region is the closed outline of the nodule on its
largest axial slice, a 2D SCOORD POLYLINE on that source image (what viewers such as OHIF display),
with the measurements and qualitative evaluations. What OHIF needs to list the nodule in its measurement
panel is in the same group: the tracking identifier starts with OHIF's tool name, the first measurement
(the area inside the outline) holds the outline as INFERRED FROM, and the caption is the group's
comment (OHIF's label). The SEG's segment of the same nodule carries the same
tracking identifier and UID, which is how a reader joins the two; the SEG is listed in the SR's evidence.
(A volumetric TID 1411 group per segment would say it again, and PixelMed's validator misreads a report
holding one planar and one volumetric group.) A study without findings gets a report whose
qualitative evaluations say that the algorithm ran and found nothing.

Codes: from pydicom's code dictionary (DICOM PS3.16) wherever one fits: finding SCT 27925004 Nodule,
finding sites from CID 6171 Zone of Lung with CID 244 laterality, SCT long axis / short axis / volume,
DCM 112031 Attenuation Coefficient with SCT Mean / Maximum derivation, ground-glass DCM 112120 (CID
6102/6104), calcified SCT 18115005, units in UCUM (mm, mm3, [hnsf'U]). pydicom 3.0's dictionary has no
code for a solid or a part-solid nodule, nor for Lung-RADS or its categories, so those, and the concept
names "Nodule type" and "Lung-RADS v2022 category (CAD suggestion)", use the local coding scheme
99CADNODE, declared in the Coding Scheme Identification Sequence.

Measurements are rounded to what the mask can support: diameters to 0.1 mm, the volume to 1 mm3,
attenuation to 1 HU (findings.json keeps two decimals).
"""

from __future__ import annotations

from collections.abc import Sequence

import contourpy
import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr.templates import DEFAULT_LANGUAGE, LanguageOfContentItemAndDescendants
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_seg import nodule_name, tracking_id
from models.findings import Finding

SR_SERIES_DESCRIPTION = "CAD nodules SR"
SR_SERIES_NUMBER = 9701

LOCAL_SCHEME = "99CADNODE"
NODULE_TYPE = Code("NODULETYPE", LOCAL_SCHEME, "Nodule type")
LUNG_RADS_SUGGESTION = Code("LRSUGGESTION", LOCAL_SCHEME, "Lung-RADS v2022 category (CAD suggestion)")
# TID 1500 row 10; not in pydicom's dictionary by this meaning.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

NODULE_TYPES: dict[str, Code] = {
    "solid": Code("SOLID", LOCAL_SCHEME, "Solid"),
    "part-solid": Code("PARTSOLID", LOCAL_SCHEME, "Part-solid"),
    "ground-glass": codes.DCM.GroundGlassOpacity,  # DCM 112120, CID 6104
    "calcified": codes.SCT.PathologicCalcification,  # SCT 18115005
}
LUNG_ZONES: dict[str, Code] = {  # CID 6171 Zone of Lung
    "upper": codes.SCT.UpperZoneOfLung,
    "middle": codes.SCT.MiddleZoneOfLung,
    "lower": codes.SCT.LowerZoneOfLung,
}
SIDES: dict[str, Code] = {"right": codes.SCT.Right, "left": codes.SCT.Left}  # CID 244 Laterality
DIAMETER_DECIMALS = 1  # mm
AREA_DECIMALS = 1  # mm2
VOLUME_DECIMALS = 0  # mm3
ATTENUATION_DECIMALS = 0  # HU


def lung_rads_code(category: str) -> Code:
    return Code(f"LR{category}", LOCAL_SCHEME, f"Lung-RADS {category} (suggestion)")


def local_coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name="cad-node local codes",
        responsible_organization="cad-node project",
    )


def build_report(
    source_headers: Sequence[Dataset],
    frame_numbers: Sequence[int],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    tracking_uids: Sequence[str],
    segmentation: Dataset | None = None,
    *,
    series_number: int = SR_SERIES_NUMBER,
) -> hd.sr.Comprehensive3DSR:
    """Nodule n + 1 is `findings[n]`, tracked by `tracking_uids[n]`, segment n + 1 of `segmentation`.
    `source_headers[k]` and `frame_numbers[k]` are slice k of the findings' grid."""
    if len(tracking_uids) != len(findings):
        raise ValueError(f"{len(findings)} findings but {len(tracking_uids)} tracking UIDs")
    if findings:
        groups = [
            _planar_group(
                number,
                uid,
                finding,
                source_headers[finding.axial_slice_index],
                frame_numbers[finding.axial_slice_index],
                algorithm,
            )
            for number, (finding, uid) in enumerate(zip(findings, tracking_uids, strict=True), start=1)
        ]
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(algorithm),
            procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
            imaging_measurements=groups,
        )
        root = report[0]
    else:
        root = _report_without_measurements(algorithm)
    root.ContentSequence.append(_summary(bool(findings)))
    evidence = _unique_instances(source_headers) + ([segmentation] if segmentation is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        **algorithm.new_object(series_number, SR_SERIES_DESCRIPTION),
        is_complete=True,
        is_final=False,  # PRELIMINARY: a radiologist has not verified it
        is_verified=False,
        coding_schemes=[local_coding_scheme()] if findings else None,
        contributing_equipment=[algorithm.contributing_equipment()],
    )


def _unique_instances(headers: Sequence[Dataset]) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    for header in headers:
        seen.setdefault(str(header.SOPInstanceUID), header)
    return list(seen.values())


def _observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=algorithm.observer_context())


def _report_without_measurements(algorithm: AlgorithmIdentity) -> hd.sr.ContainerContentItem:
    """The TID 1500 root without Imaging Measurements (highdicom's MeasurementReport wants at least one
    group): language, observation context, procedure reported; the summary follows."""
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    root.ContentSequence.extend(_observation_context(algorithm))
    root.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=codes.cid100.CTUnspecifiedBodyRegion,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    return root


def _summary(with_findings: bool) -> hd.sr.ContainerContentItem:
    """TID 1500 Qualitative Evaluations: CAD Processing and Findings Summary (DCM 111017, CID 6047)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence()
    container.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.CADProcessingAndFindingsSummary,
            value=(
                codes.DCM.AllAlgorithmsSucceededWithFindings
                if with_findings
                else codes.DCM.AllAlgorithmsSucceededWithoutFindings
            ),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return container


def _is_multi_frame(header: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in header


def _source_image(header: Dataset, frame_number: int) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        referenced_frame_numbers=[frame_number] if _is_multi_frame(header) else None,
    )


def _finding_site(finding: Finding) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(
        anatomic_location=LUNG_ZONES.get(finding.zone, codes.SCT.Lung),
        laterality=SIDES.get(finding.side),
    )


def _planar_group(
    number: int,
    tracking_uid: str,
    finding: Finding,
    header: Dataset,
    frame_number: int,
    algorithm: AlgorithmIdentity,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source = _source_image(header, frame_number)
    outline = nodule_outline(finding)
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Area,
            value=round(_outline_area_mm2(outline, header, frame_number), AREA_DECIMALS),
            unit=codes.UCUM.SquareMillimeter,
        ),
        hd.sr.Measurement(
            name=codes.SCT.LongAxis,
            value=round(finding.long_axis_mm, DIAMETER_DECIMALS),
            unit=codes.UCUM.Millimeter,
        ),
        hd.sr.Measurement(
            name=codes.SCT.ShortAxis,
            value=round(finding.short_axis_mm, DIAMETER_DECIMALS),
            unit=codes.UCUM.Millimeter,
        ),
        *_volume_measurements(finding),
    ]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_id(number)),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=source
        ),
        finding_type=codes.SCT.Nodule,
        algorithm_id=algorithm.sr_identification(),
        finding_sites=[_finding_site(finding)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=NODULE_TYPE, value=NODULE_TYPES[finding.nodule_type]),
            hd.sr.QualitativeEvaluation(name=LUNG_RADS_SUGGESTION, value=lung_rads_code(finding.lung_rads)),
        ],
    )
    _for_ohif(group, outline, source, nodule_caption(number, finding))
    return group


def _for_ohif(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
    outline: npt.NDArray[np.float64],
    source: hd.sr.SourceImageForRegion,
    caption: str,
) -> None:
    """What OHIF needs to load the group into its measurement panel as a freehand ROI: the outline again,
    INFERRED FROM under the first NUM (the area it bounds, TID 300 style), and the caption as a comment,
    which becomes the measurement's label. highdicom's constructor refuses coordinates under a planar
    group's measurements, so they are added here; PixelMed's TID 1500 validation accepts both (the
    comment with a "not in template" warning)."""
    items = group[0].ContentSequence
    first_num = next(item for item in items if item.ValueType == "NUM")
    if "ContentSequence" not in first_num:
        first_num.ContentSequence = hd.sr.ContentSequence()
    first_num.ContentSequence.append(
        hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=source
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=caption, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )


def nodule_caption(number: int, finding: Finding) -> str:
    """ "Nodule 1: solid, Lung-RADS 4B (suggestion)": OHIF's label of the measurement."""
    return f"{nodule_name(number)}: {finding.nodule_type}, Lung-RADS {finding.lung_rads} (suggestion)"


def _outline_area_mm2(outline: npt.NDArray[np.float64], header: Dataset, frame_number: int) -> float:
    """The area inside a closed outline of image coordinates, in patient space (the image's own
    geometry, single- or multi-frame, as highdicom reads it)."""
    to_patient = hd.spatial.ImageToReferenceTransformer.for_image(
        header, frame_number=frame_number if _is_multi_frame(header) else None
    )
    points = to_patient(outline)
    return float(np.linalg.norm(np.cross(points, np.roll(points, -1, axis=0)).sum(axis=0))) / 2


def _volume_measurements(finding: Finding) -> list[hd.sr.Measurement]:
    """Measurements of the whole 3D mask: volume, mean and maximum attenuation."""
    hu = codes.UCUM.HounsfieldUnit
    return [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=round(finding.volume_mm3, VOLUME_DECIMALS),
            unit=codes.UCUM.CubicMillimeter,
        ),
        hd.sr.Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=round(finding.mean_hu, ATTENUATION_DECIMALS),
            unit=hu,
            derivation=codes.SCT.Mean,
        ),
        hd.sr.Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=round(finding.max_hu, ATTENUATION_DECIMALS),
            unit=hu,
            derivation=codes.SCT.Maximum,
        ),
    ]


def nodule_outline(finding: Finding) -> npt.NDArray[np.float64]:
    """The closed outline of the nodule's mask on its axial slice, as (column, row) image coordinates
    ((0, 0) is the top left corner of the top left pixel): the marching-squares contour between the
    mask's pixel centres and their neighbours', around its largest connected part."""
    mask = finding.mask
    local = finding.axial_slice_index - mask.offset[0]
    if not 0 <= local < mask.array.shape[0] or not mask.array[local].any():
        raise ValueError(f"the mask has no voxels on its axial slice {finding.axial_slice_index}")
    plane = np.pad(mask.array[local], 1).astype(np.float64)
    lines = contourpy.contour_generator(z=plane).lines(0.5)
    outline = max(lines, key=_enclosed_area)  # type: ignore[arg-type]
    if not np.array_equal(outline[0], outline[-1]):
        outline = np.vstack([outline, outline[:1]])
    # contour x, y are column, row indices of the padded box; pixel centres lie at index + 0.5
    return outline + np.array([mask.offset[2] - 1 + 0.5, mask.offset[1] - 1 + 0.5])


def _enclosed_area(line: npt.NDArray[np.float64]) -> float:
    x, y = line[:, 0], line[:, 1]
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2
