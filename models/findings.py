"""What the pipeline reports for each nodule it finds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.measurements import BoxMask

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
