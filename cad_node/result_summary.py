"""A one-page summary of the findings that a radiologist reads in seconds, as an Encapsulated PDF in the
study: patient and study, a table of the nodules with a lung-window thumbnail of each on its key slice,
the algorithm's name and version, and the statement that it is a decision aid.

The page is drawn with matplotlib's object API: no pyplot, so no global figure state in the worker.
Patient identification is on the page, as on any report page; it is never logged.
"""

from __future__ import annotations

import datetime
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EncapsulatedPDFStorage
from pydicom.valuerep import PersonName

from cad_node.algorithm import AlgorithmIdentity
from cad_node.result_gsps import LUNG_WINDOW
from cad_node.result_seg import nodule_name
from cad_node.result_sr import nodule_outline
from models.findings import Finding
from models.volume import Volume

SUMMARY_SERIES_DESCRIPTION = "CAD nodules summary"
SUMMARY_SERIES_NUMBER = 9705
DOCUMENT_TITLE = "Lung nodule CAD summary"
NO_FINDINGS = "No nodules found by the CAD algorithm"
DECISION_AID = (
    "Decision aid only: suggestions of a computer-aided detection algorithm, not a diagnosis. "
    "Every finding must be checked on the images by a radiologist; nodules may be missed. "
    "Lung-RADS categories are suggested from size and type alone."
)
COLUMNS = ("Nodule", "Location", "Type", "Size mm", "Volume mm³", "Lung-RADS*", "Prob.", "Image")
MARGIN = 0.6  # inches
THUMBNAIL = 1.05  # inches, square, at most: smaller where there are many rows
COLUMN_X = (0.0, 0.66, 1.8, 2.6, 3.22, 4.15, 5.05, 5.5)  # inches, from the thumbnails' right edge
BOTTOM_RESERVE = 2.5  # inches below the table: notes, statement, algorithm
LUNG_RADS_NOTE = (
    "* Lung-RADS v2022 category suggested by the CAD from size and type: the radiologist decides."
)
MAX_ROWS = 8  # what fits on the page with thumbnails; the SR has them all
PAGE_INCHES = (8.27, 11.69)  # A4 portrait
THUMBNAIL_MIN_HALF_MM = 15.0
AIR_HU = -1000.0


@dataclass(frozen=True)
class SummaryPage:
    """What the page says, before it is drawn: the tests read it back from the rendered PDF."""

    title: str
    patient: str
    study: str
    headline: str
    rows: list[tuple[str, ...]]
    overflow: str
    statement: str
    algorithm: str


def summary_page(
    source_header: Dataset,
    findings: Sequence[Finding],
    key_headers: Sequence[Dataset],
    algorithm: AlgorithmIdentity,
) -> SummaryPage:
    """`key_headers[n]` is the header of `findings[n]`'s key slice."""
    count = len(findings)
    shown = min(count, MAX_ROWS)
    return SummaryPage(
        title=DOCUMENT_TITLE,
        patient=f"Patient: {_person(source_header.get('PatientName'))}    "
        f"ID: {source_header.get('PatientID') or '-'}    "
        f"Born: {_date(source_header.get('PatientBirthDate'))}",
        study=f"Study date: {_date(source_header.get('StudyDate'))}    "
        f"Accession: {source_header.get('AccessionNumber') or '-'}    "
        f"Series: {_series(source_header)}",
        headline=f"{count} nodule{'s' if count != 1 else ''} found by the CAD algorithm"
        if count
        else NO_FINDINGS,
        rows=[_row(n, f, h) for n, (f, h) in enumerate(zip(findings[:shown], key_headers, strict=False), 1)],
        overflow=f'{count - shown} more nodules are listed in the CAD SR (series "CAD nodules SR").'
        if count > shown
        else "",
        statement=DECISION_AID,
        algorithm=f"Algorithm: {algorithm.name}, model {algorithm.version} "
        f"(cad-node {algorithm.software_version})\nDevice UID {algorithm.device_uid}. "
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
    )


def _row(number: int, finding: Finding, key_header: Dataset) -> tuple[str, ...]:
    image = str(key_header.InstanceNumber) if key_header.get("InstanceNumber") is not None else "-"
    return (
        nodule_name(number),
        f"{finding.side} {finding.zone} zone".capitalize(),
        finding.nodule_type,
        f"{finding.long_axis_mm:.0f} x {finding.short_axis_mm:.0f}",
        f"{finding.volume_mm3:,.0f}",
        finding.lung_rads,
        f"{finding.probability:.2f}",
        image,
    )


def _person(name: object) -> str:
    if not name:
        return "-"
    person = PersonName(str(name))
    family, given = person.family_name, person.given_name
    return f"{family}, {given}" if family and given else str(name).replace("^", " ").strip() or "-"


def _date(value: object) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text or "-"


def _series(header: Dataset) -> str:
    number, description = header.get("SeriesNumber"), header.get("SeriesDescription")
    return " ".join(str(v) for v in (number, description) if v not in (None, "")) or "-"


def render_summary(
    page: SummaryPage, findings: Sequence[Finding], volume: Volume | None, *, dpi: int = 150
) -> Figure:
    """The page as a matplotlib figure; thumbnails need the volume (in HU) the findings are on."""
    figure = Figure(figsize=PAGE_INCHES, dpi=dpi)
    width, height = PAGE_INCHES

    def text(left: float, top: float, value: str, *, line_height: float = 0.0, **style: object) -> None:
        """`value` at `left`, `top` inches from the page's left and top edges, a text per line: no
        ligatures, which a PDF reader maps back to no text ("finding" reads "nding"), and matplotlib
        only leaves them out of single-line texts."""
        for n, line in enumerate(value.split("\n")):
            position = (left / width, 1 - (top + n * line_height) / height)
            figure.text(*position, line, fontfeatures=["-liga"], **style)  # type: ignore[arg-type]

    text(MARGIN, 0.7, page.title, fontsize=17, weight="bold")
    text(MARGIN, 1.05, page.patient, fontsize=10)
    text(MARGIN, 1.3, page.study, fontsize=10)
    text(MARGIN, 1.75, page.headline, fontsize=13, weight="bold")
    top = 2.05
    if page.rows:
        thumbnail = min(THUMBNAIL, (height - top - BOTTOM_RESERVE) / len(page.rows) - 0.12)
        columns_left = MARGIN + thumbnail + 0.15
        for x, title in zip(COLUMN_X, COLUMNS, strict=True):
            text(columns_left + x, top, title, fontsize=8.5, weight="bold", va="bottom")
        figure.add_artist(
            Line2D([MARGIN / width, 1 - MARGIN / width], [1 - (top + 0.05) / height] * 2, lw=0.8)
        )
        top += 0.12
        for row, finding in zip(page.rows, findings, strict=False):
            for x, value in zip(COLUMN_X, row, strict=True):
                text(columns_left + x, top + thumbnail / 2, value, fontsize=8.5, va="center")
            if volume is not None:
                box = (MARGIN / width, 1 - (top + thumbnail) / height, thumbnail / width, thumbnail / height)
                draw_thumbnail(figure.add_axes(box), finding, volume)
            top += thumbnail + 0.12
        if page.overflow:
            top += 0.1
            text(MARGIN, top, page.overflow, fontsize=9, va="top")
            top += 0.15
        text(MARGIN, top + 0.1, LUNG_RADS_NOTE, fontsize=8, color="#444444", va="top")
        top += 0.45
    statement = textwrap.fill(page.statement, 95)
    lines = statement.count("\n") + 1
    figure.add_artist(
        FancyBboxPatch(
            (MARGIN, height - top - 0.2 - lines * 0.18),
            width - 2 * MARGIN,
            lines * 0.18 + 0.1,
            boxstyle="round,pad=0.08",
            facecolor="#fff4cc",
            edgecolor="#b08800",
            transform=figure.dpi_scale_trans,  # inches from the bottom left corner
        )
    )
    text(MARGIN + 0.1, top + 0.15, statement, line_height=0.18, fontsize=9.5, va="top")
    text(MARGIN, height - 0.6, page.algorithm, line_height=0.16, fontsize=7, color="#444444", va="top")
    return figure


def draw_thumbnail(axes: Axes, finding: Finding, volume: Volume) -> None:
    """The nodule's key slice around it, in lung window, with its outline and a 10 mm scale bar."""
    k = finding.axial_slice_index
    outline = nodule_outline(finding)  # (column, row), pixel centres at index + 0.5
    _, row_mm, column_mm = volume.spacing
    half_mm = max(THUMBNAIL_MIN_HALF_MM, 1.5 * finding.long_axis_mm)
    centre_column, centre_row = outline[:-1].mean(axis=0)
    half_rows, half_columns = round(half_mm / row_mm), round(half_mm / column_mm)
    r0, c0 = round(centre_row) - half_rows, round(centre_column) - half_columns
    crop = _crop(volume.hu[k], r0, c0, 2 * half_rows, 2 * half_columns)
    low = LUNG_WINDOW[0] - LUNG_WINDOW[1] / 2
    axes.imshow(
        crop,
        cmap="gray",
        vmin=low,
        vmax=low + LUNG_WINDOW[1],
        extent=(c0, c0 + crop.shape[1], r0 + crop.shape[0], r0),
        aspect=row_mm / column_mm,
        interpolation="bilinear",
    )
    axes.plot(outline[:, 0], outline[:, 1], color="#ffd400", lw=0.8)
    bar_columns = 10.0 / column_mm
    bar_row = r0 + crop.shape[0] * 0.92
    axes.plot([c0 + 2, c0 + 2 + bar_columns], [bar_row, bar_row], color="white", lw=1.5)
    axes.text(c0 + 2, bar_row - crop.shape[0] * 0.03, "10 mm", color="white", fontsize=5.5)
    axes.set_axis_off()


def _crop(
    plane: npt.NDArray[np.float32], r0: int, c0: int, rows: int, columns: int
) -> npt.NDArray[np.float32]:
    """plane[r0:r0 + rows, c0:c0 + columns], air where that lies outside the image."""
    out = np.full((rows, columns), AIR_HU, dtype=np.float32)
    top, left = max(r0, 0), max(c0, 0)
    bottom, right = min(r0 + rows, plane.shape[0]), min(c0 + columns, plane.shape[1])
    if bottom > top and right > left:
        out[top - r0 : bottom - r0, left - c0 : right - c0] = plane[top:bottom, left:right]
    return out


def pdf_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType: text a PDF reader can select and find
        figure.savefig(buffer, format="pdf", metadata={"Title": DOCUMENT_TITLE, "CreationDate": None})
    return buffer.getvalue()


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def build_summary_document(
    source_headers: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    volume: Volume | None,
    *,
    series_number: int = SUMMARY_SERIES_NUMBER,
) -> Dataset:
    """The summary page as an Encapsulated PDF in the source study. `source_headers[k]` is slice k of
    the grid of the findings and of `volume`."""
    if findings and volume is None:
        raise ValueError("the summary's thumbnails need the volume the findings are on")
    key_headers = [source_headers[f.axial_slice_index] for f in findings]
    page = summary_page(source_headers[0], findings, key_headers, algorithm)
    document = pdf_bytes(render_summary(page, findings, volume))
    now = datetime.datetime.now(datetime.UTC)
    dataset = hd.base.SOPClass(
        study_instance_uid=source_headers[0].StudyInstanceUID,
        **algorithm.new_object(series_number, SUMMARY_SERIES_DESCRIPTION),
        sop_class_uid=EncapsulatedPDFStorage,
        modality="DOC",
        content_date=now.date(),
        content_time=now.time(),
    )
    dataset.copy_patient_and_study_information(source_headers[0])
    if "SpecificCharacterSet" in source_headers[0]:  # the patient's name is in the source's encoding
        dataset.SpecificCharacterSet = source_headers[0].SpecificCharacterSet
    dataset.ConversionType = "WSD"  # SC Equipment: made on a workstation
    dataset.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    dataset.BurnedInAnnotation = "YES"  # the page identifies the patient
    dataset.RecognizableVisualFeatures = "NO"
    dataset.DocumentTitle = DOCUMENT_TITLE
    dataset.ConceptNameCodeSequence = DicomSequence()
    dataset.VerificationFlag = "UNVERIFIED"
    dataset.MIMETypeOfEncapsulatedDocument = "application/pdf"
    dataset.EncapsulatedDocumentLength = len(document)
    dataset.EncapsulatedDocument = document + b"\0" * (len(document) % 2)
    if key_headers:
        dataset.SourceInstanceSequence = DicomSequence(_references(key_headers))
    dataset.ContributingEquipmentSequence = DicomSequence([algorithm.contributing_equipment()])
    return dataset


def _references(headers: Sequence[Dataset]) -> list[Dataset]:
    items: dict[str, Dataset] = {}
    for header in headers:
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        items.setdefault(str(header.SOPInstanceUID), item)
    return list(items.values())
