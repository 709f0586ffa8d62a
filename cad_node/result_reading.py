"""Reading the node's SR back, as a receiving system would: each nodule's identifier, where its outline
lies in patient coordinates, its measurements and categories. The demo and the tests use it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes


@dataclass(frozen=True)
class ReportedNodule:
    tracking_id: str
    centre_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    nodule_type: str
    lung_rads: str

    @property
    def name(self) -> str:
        """ "Nodule N": the tracking identifier without OHIF's tool prefix."""
        return self.tracking_id.rsplit(":", 1)[-1]


def reported_nodules(sr: Dataset, source: Mapping[str, Dataset]) -> list[ReportedNodule]:
    """The nodules of a TID 1500 report; `source` maps SOP Instance UID to the header of each image the
    report may point at (the centre is the centre of the outline, through that image's geometry)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    nodules = []
    for group in report.content.get_planar_roi_measurement_groups():
        region = group.roi
        if region is None:
            continue
        image = source[region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        centre = outline_centre_mm(np.asarray(region.value, dtype=np.float64), image)
        values = {m.name.value: float(m.value) for m in group.get_measurements() if m.derivation is None}
        qualities = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
        nodules.append(
            ReportedNodule(
                tracking_id=str(group.tracking_identifier),
                centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                long_axis_mm=values.get(codes.SCT.LongAxis.value, float("nan")),
                short_axis_mm=values.get(codes.SCT.ShortAxis.value, float("nan")),
                volume_mm3=values.get(codes.SCT.Volume.value, float("nan")),
                nodule_type=qualities.get("Nodule type", ""),
                lung_rads=qualities.get("Lung-RADS v2022 category (CAD suggestion)", ""),
            )
        )
    return nodules


def outline_centre_mm(outline: npt.NDArray[np.float64], image: Dataset) -> npt.NDArray[np.float64]:
    """The mean of a closed 2D outline's points, (column, row) with (0, 0) at the top left corner of the
    image as SR coordinates are, in patient coordinates (mm)."""
    points = outline[:-1] if len(outline) > 1 and np.allclose(outline[0], outline[-1]) else outline
    column, row = points.mean(axis=0)
    orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return (
        np.asarray(image.ImagePositionPatient, dtype=np.float64)
        + (column - 0.5) * column_spacing * orientation[:3]
        + (row - 0.5) * row_spacing * orientation[3:]
    )
