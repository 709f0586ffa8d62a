"""Ground truth of a case: each nodule's centre, size, type and mask, measured the way the pipeline
measures its own findings, written as JSON beside the DICOM series and a label map of the masks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from models.lung_rads import lung_rads_category
from models.measurements import AxialDiameters, BoxMask, axial_diameters, volume_mm3
from models.preprocessing import to_sitk
from models.volume import Volume

SCHEMA = "cad-node ground truth 1"
JSON_NAME = "ground_truth.json"
LABELS_NAME = "ground_truth_labels.nii.gz"


@dataclass(frozen=True)
class NoduleTruth:
    label: int
    centre_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    nodule_type: str
    solid_part_mm: float
    shape: str
    location: str
    side: str
    lobe: str | None
    mean_hu: float
    lung_rads: str
    nominal_diameter_mm: float
    axial_slice_index: int
    long_axis_ends_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    short_axis_ends_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    mask: BoxMask = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        del record["mask"]
        record["type"] = record.pop("nodule_type")
        record["mask_voxels"] = self.mask.voxel_count
        record["mask_box_offset_kji"] = list(self.mask.offset)
        record["mask_box_shape_kji"] = list(self.mask.array.shape)
        return _rounded(record)


@dataclass(frozen=True)
class IgnoreMark:
    """A real reader's mark in a background scan that is not a target: neither hit nor false positive.
    ``diameter_mm`` is 0 for a mark without a measured size (a point mark); ``reader_id`` names the
    reader who made the mark, when known."""

    centre_mm: tuple[float, float, float]
    kind: str
    diameter_mm: float
    reader_id: str | None = None


def measure_nodule(
    label: int,
    mask: BoxMask,
    volume: Volume,
    *,
    nodule_type: str,
    solid_part: BoxMask | None,
    shape: str,
    location: str,
    side: str,
    lobe: str | None,
    nominal_diameter_mm: float,
) -> NoduleTruth:
    if mask.voxel_count == 0:
        raise ValueError(f"nodule {label} has an empty mask")
    axial = axial_diameters(mask, volume.spacing)
    if nodule_type == "part-solid":
        solid_part_mm = axial_diameters(solid_part, volume.spacing).mean_diameter_mm if solid_part else 0.0
    else:
        solid_part_mm = 0.0 if nodule_type == "ground-glass" else axial.mean_diameter_mm
    return NoduleTruth(
        label=label,
        centre_mm=_point(volume.index_to_patient(mask.centroid_kji())),
        long_axis_mm=axial.long_axis_mm,
        short_axis_mm=axial.short_axis_mm,
        mean_diameter_mm=axial.mean_diameter_mm,
        volume_mm3=volume_mm3(mask, volume.spacing),
        nodule_type=nodule_type,
        solid_part_mm=solid_part_mm,
        shape=shape,
        location=location,
        side=side,
        lobe=lobe,
        mean_hu=float(volume.hu[mask.slices()][mask.array].mean()),
        lung_rads=lung_rads_category(nodule_type, axial.mean_diameter_mm, solid_part_mm),
        nominal_diameter_mm=nominal_diameter_mm,
        axial_slice_index=axial.slice_index,
        long_axis_ends_mm=_ends(volume, axial.long_axis_ends),
        short_axis_ends_mm=_ends(volume, axial.short_axis_ends),
        mask=mask,
    )


def write_ground_truth(
    out_dir: Path,
    volume: Volume,
    nodules: list[NoduleTruth],
    *,
    case: dict[str, Any],
    ignore: list[IgnoreMark] | None = None,
) -> Path:
    """DIR/ground_truth.json, and DIR/ground_truth_labels.nii.gz: each nodule's mask as its label."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for nodule in nodules:
        nodule.mask.paste_into(labels, nodule.label)
    sitk.WriteImage(to_sitk(volume, labels), str(out_dir / LABELS_NAME), useCompression=True)
    document = {
        "schema": SCHEMA,
        "coordinates": "DICOM patient coordinates (LPS), millimetres",
        "case": case,
        "labels_file": LABELS_NAME,
        "nodules": [n.to_json() for n in nodules],
        "ignore": [_rounded(asdict(mark)) for mark in ignore or []],
    }
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_ground_truth(case_dir: Path) -> dict[str, Any]:
    return json.loads((case_dir / JSON_NAME).read_text())


def read_labels(case_dir: Path) -> npt.NDArray[np.uint8]:
    """The label map in array order (k, j, i), on the grid of the case's series."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / LABELS_NAME)))


def _point(xyz: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return float(xyz[0]), float(xyz[1]), float(xyz[2])


def _ends(volume: Volume, ends: AxialDiameters.__annotations__ | Any) -> Any:
    return tuple(_point(volume.index_to_patient(end)) for end in ends)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value
