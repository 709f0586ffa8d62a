"""What the pipeline reports for each nodule it finds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.characterisation import characterise
from models.lung_rads import lung_rads_category
from models.measurements import BoxMask, axial_diameters, volume_mm3
from models.volume import Volume

Point = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Finding:
    """One detected nodule. Coordinates are DICOM patient coordinates (LPS), millimetres; the mask and
    `axial_slice_index` are on the voxel grid of the analysed series."""

    centre_mm: Point
    probability: float
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    max_hu: float
    nodule_type: str
    solid_part_mm: float
    side: str
    zone: str
    lung_rads: str
    axial_slice_index: int
    long_axis_ends_mm: tuple[Point, Point]
    short_axis_ends_mm: tuple[Point, Point]
    mask: BoxMask = field(repr=False)

    @property
    def mean_diameter_mm(self) -> float:
        return (self.long_axis_mm + self.short_axis_mm) / 2

    def to_json(self) -> dict[str, Any]:
        return {
            "centre_mm": [round(v, 2) for v in self.centre_mm],
            "probability": round(self.probability, 4),
            "long_axis_mm": round(self.long_axis_mm, 2),
            "short_axis_mm": round(self.short_axis_mm, 2),
            "mean_diameter_mm": round(self.mean_diameter_mm, 2),
            "volume_mm3": round(self.volume_mm3, 1),
            "mean_hu": round(self.mean_hu, 1),
            "max_hu": round(self.max_hu, 1),
            "type": self.nodule_type,
            "solid_part_mm": round(self.solid_part_mm, 2),
            "side": self.side,
            "zone": self.zone,
            "lung_rads_suggestion": self.lung_rads,
            "axial_slice_index": self.axial_slice_index,
            "long_axis_ends_mm": [[round(v, 2) for v in p] for p in self.long_axis_ends_mm],
            "short_axis_ends_mm": [[round(v, 2) for v in p] for p in self.short_axis_ends_mm],
            "mask_voxels": self.mask.voxel_count,
        }


def measure_finding(volume: Volume, mask: BoxMask, probability: float, side: str, zone: str) -> Finding:
    """A nodule's finding from its mask on the series' grid: axes on the axial slice of largest area,
    volume, attenuation, type and the Lung-RADS suggestion, as radiologists measure them."""
    axial = axial_diameters(mask, volume.spacing)
    hu = volume.hu[mask.slices()][mask.array]
    character = characterise(mask, volume, axial.mean_diameter_mm)

    def mm(kji: Any) -> Point:
        xyz = volume.index_to_patient(kji)
        return float(xyz[0]), float(xyz[1]), float(xyz[2])

    return Finding(
        centre_mm=mm(mask.centroid_kji()),
        probability=float(probability),
        long_axis_mm=axial.long_axis_mm,
        short_axis_mm=axial.short_axis_mm,
        volume_mm3=volume_mm3(mask, volume.spacing),
        mean_hu=float(hu.mean()),
        max_hu=float(hu.max()),
        nodule_type=character.nodule_type,
        solid_part_mm=character.solid_part_mm,
        side=side,
        zone=zone,
        lung_rads=lung_rads_category(character.nodule_type, axial.mean_diameter_mm, character.solid_part_mm),
        axial_slice_index=axial.slice_index,
        long_axis_ends_mm=(mm(axial.long_axis_ends[0]), mm(axial.long_axis_ends[1])),
        short_axis_ends_mm=(mm(axial.short_axis_ends[0]), mm(axial.short_axis_ends[1])),
        mask=mask,
    )
