"""A CT volume on its voxel grid, with the geometry that places it in patient space.

Conventions, used everywhere in the project:
- arrays are in numpy order (slice, row, column), written ``kji``;
- patient coordinates are DICOM LPS millimetres, written ``xyz``;
- ``spacing`` is in array order (slice spacing, row spacing, column spacing);
- ``direction`` is 3 x 3 and its columns are the LPS unit vectors of the array axes k, j and i,
  so that ``xyz = origin + direction @ (kji * spacing)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

AXIAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@dataclass(frozen=True, eq=False)
class Volume:
    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: npt.NDArray[np.float64] = field(default_factory=lambda: AXIAL_DIRECTION.copy())

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"a volume is 3D, got an array of shape {self.hu.shape}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("direction must be a 3 x 3 matrix of orthonormal columns")
        object.__setattr__(self, "direction", direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def index_to_patient(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Array indices (..., 3) in (k, j, i) order to LPS millimetres (..., 3)."""
        kji = np.asarray(kji, dtype=np.float64)
        return np.asarray(self.origin) + (kji * np.asarray(self.spacing)) @ self.direction.T

    def patient_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """LPS millimetres (..., 3) to fractional array indices (..., 3) in (k, j, i) order."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return ((xyz - np.asarray(self.origin)) @ self.direction) / np.asarray(self.spacing)

    def nearest_index(self, xyz: npt.ArrayLike) -> tuple[int, int, int]:
        kji = np.rint(self.patient_to_index(xyz)).astype(int)
        if np.any(kji < 0) or np.any(kji >= np.asarray(self.shape)):
            raise IndexError(f"point {np.asarray(xyz).tolist()} mm lies outside the volume")
        return int(kji[0]), int(kji[1]), int(kji[2])

    def with_hu(self, hu: npt.NDArray[np.float32]) -> Volume:
        if hu.shape != self.hu.shape:
            raise ValueError(f"new voxels {hu.shape} do not match the grid {self.hu.shape}")
        return Volume(hu=hu, spacing=self.spacing, origin=self.origin, direction=self.direction)
