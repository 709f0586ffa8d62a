"""A deterministic synthetic chest CT: body wall, skeleton, mediastinum, lungs with lobes and
fissures, pulmonary vessel trees and airways, rendered in HU on an acquisition's grid.

    anatomy, acq = generate_chest(seed, n_slices=300)   # noiseless, PSF applied
    ... insert nodules into anatomy.volume.hu ...
    add_noise(anatomy.volume.hu, acq, rng)              # models.synthetic.acquisition

Coordinates follow ``models.volume``: arrays (k, j, i) = (slice, row, column), patient LPS mm.
The scan is axial, k grows with z (head-wards), j with y (posterior), i with x (patient left).
The patient is built to fit the scan: the range starts 1-4 cm above the lung apices (see
``Acquisition.geometry`` for the z of the slices), the body fills 80-92 % of the field of view.

How it is drawn, for speed:
- everything that is a smooth function of (x, y) with a z-dependent scale (body outline, wall
  layers, ribs, diaphragm, fissure surfaces) is precomputed once on the 2D slice grid, so a slice
  costs a few dozen whole-slice numpy operations, on two threads;
- tubes (great vessels, airways, the pulmonary trees) are capsules rasterised in batches of equal
  bounding boxes, with partial-volume occupancy from the overlap of the voxel with the tube;
- the pulmonary trees are grown level by level (all branches of a generation at once) by the
  volume-filling branching algorithm (Tawhai et al. 2000): each branch supplies a set of points
  in its lobe, splits it in two by a plane and sends a child towards each part's centroid, at
  Murray's bifurcation angles; radii follow a Murray-like law in the number of points supplied.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import scipy.ndimage as ndi

from models.synthetic.acquisition import (
    Acquisition,
    apply_in_plane_resolution,
    apply_through_plane_resolution,
    sample_acquisition,
)
from models.synthetic.portable import arccos, arctan2, cos, dot, exp, norm, power, principal_axes, sin
from models.volume import Volume

F32 = np.float32
T = TypeVar("T")
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

AIR_HU = -1000.0
N_THETA = 2048

RIGHT_UPPER, RIGHT_MIDDLE, RIGHT_LOWER, LEFT_UPPER, LEFT_LOWER = 1, 2, 3, 4, 5
LOBE_NAMES = {
    RIGHT_UPPER: "right upper",
    RIGHT_MIDDLE: "right middle",
    RIGHT_LOWER: "right lower",
    LEFT_UPPER: "left upper",
    LEFT_LOWER: "left lower",
}


# Angles from the posterior midline (radians) at which the wall muscle thickness is sampled.
_MUSCLE_PHI = np.array([0.0, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 2.85, np.pi])

PULMONARY_KINDS = ("artery", "vein")


@dataclass(frozen=True)
class VesselSegment:
    """One straight piece of a vessel centreline, LPS mm, radius varying linearly along it.

    ``kind`` is "artery" or "vein" for the pulmonary trees (drawn inside the lungs only: the first
    branches start at the hilum, inside the mediastinum), otherwise the name of a mediastinal
    group: "aorta", "supra-aortic", "systemic veins", "pulmonary arteries" (trunk, right and left
    arteries up to the hila), "pulmonary veins" (left atrium and the veins to the hila).
    """

    p0_mm: npt.NDArray[np.float64]
    p1_mm: npt.NDArray[np.float64]
    radius0_mm: float
    radius1_mm: float
    kind: str = "artery"


@dataclass
class ChestAnatomy:
    volume: Volume  # noiseless HU, float32, PSF applied
    lobes: npt.NDArray[np.uint8]  # 0 not lung, 1..5 the lobes (vessels and airways inside included)
    vessels: list[VesselSegment]
    fissure_points_mm: npt.NDArray[np.float64]  # (N, 3) on the fissures, inside the lungs
    fissure_normals: npt.NDArray[np.float64]  # (N, 3) unit normals there (pointing head-wards)
    vessel_mask: BoolArray  # voxels at least half inside a pulmonary vessel (hilar ones included)
    airway_mask: BoolArray  # voxels at least half inside an airway lumen (trachea included)
    body_mask: BoolArray  # inside the skin
    landmarks_mm: dict[str, float] = field(default_factory=dict)  # z of apex, carina, domes...
    blood_hu: float = 40.0  # HU of blood (vessels, heart), contrast-enhanced when > 100
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds spent in each stage

    @property
    def lung_mask(self) -> BoolArray:
        return self.lobes > 0

    def pulmonary_vessels(self) -> list[VesselSegment]:
        """The segments of the lung trees (for juxtavascular placement: check ``lobes`` at the
        chosen point, a segment near the hilum may run outside the lung)."""
        return [s for s in self.vessels if s.kind in PULMONARY_KINDS]


# --------------------------------------------------------------------------------------------
# Patient parameters
# --------------------------------------------------------------------------------------------


@dataclass
class _Patient:
    """Every random choice about one patient, drawn once from the generator."""

    # tissue HU
    fat_hu: float
    muscle_hu: float
    skin_hu: float
    liver_hu: float
    spleen_hu: float
    blood_hu: float
    myocardium_hu: float
    cortical_hu: float
    marrow_hu: float
    vertebra_hu: float
    cartilage_hu: float
    lung_hu: float
    dependent_hu: float
    # body outline and wall (mm)
    y_body: float
    half_width: float
    half_ap_ant: float
    half_ap_post: float
    exponent_ant: float
    exponent_post: float
    body_harmonics: npt.NDArray[np.float64]  # (n, 3): order, amplitude, phase
    wall_lat: float
    wall_ant: float
    wall_post: float
    muscle_profile: npt.NDArray[np.float64]  # wall muscle thickness (mm) at _MUSCLE_PHI
    muscle_harmonics: npt.NDArray[np.float64]
    skin_mm: float
    body_z_wave: npt.NDArray[np.float64]  # (n, 3): wavelength, amplitude, phase
    # landmarks (z, mm)
    z_apex: float
    z_carina: float
    z_arch: float
    z_dome_right: float
    z_dome_left: float
    z_base: float
    # lungs
    x_mid: float  # mediastinal midline
    apex_x: float
    apex_y: float
    apex_height: float
    dome_x: float
    dome_y: float
    dome_curv_out: float
    dome_curv_in: float
    dome_curv_y: float
    med_half_ant: float
    med_half_mid: float
    fissures: dict[str, npt.NDArray[np.float64]]  # name -> coefficients of z(x, y)
    # skeleton
    rib_pitch: float
    rib_drop: float
    rib_z1: float
    rib_half_height: float
    rib_half_thick: float
    vert_pitch: float
    vert_phase: float
    vert_rx: float
    vert_ry: float
    y_vert: float
    sternum_top: float
    sternum_bottom: float
    kidney_x: float
    kidney_z: float  # centre of the left kidney
    kidney_hu: float
    table_gap: float  # from the back to the table top (mm)
    table_radius: float  # curvature of the table top
    table_depth: float  # from the top shell to the bottom shell
    table_hu: float
    gas_level: float  # stomach gas: y of the air-fluid level from the body centre
    gas_depth: float  # its height under the dome
    scapula_length: float  # from the carina down to the inferior angle
    scapula_gap: float  # muscle between the ribs and the scapula
    clavicle_height: float  # above the lung apex, at the sternal end
    # heart (centre xyz, semi-axes, rotation columns = heart axes in LPS)
    heart_centre: npt.NDArray[np.float64]
    heart_axes: npt.NDArray[np.float64]
    heart_rotation: npt.NDArray[np.float64]
    heart_fat: npt.NDArray[np.float64]  # epicardial fat thickness along each heart axis
    # trees
    murray_exponent: float
    leaf_radius: float
    tree_points: int


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _sample_patient(acq: Acquisition, rng: np.random.Generator) -> _Patient:
    contrast = rng.random() < 0.45
    fov = acq.pixel_spacing * min(acq.rows, acq.columns)
    half_width = min(fov / 2 * _u(rng, 0.80, 0.92), 215.0)
    half_ap = half_width * _u(rng, 0.60, 0.74)
    wall_lat = _u(rng, 0.13, 0.26) * half_width
    wall_ant = _u(rng, 0.14, 0.25) * half_ap
    wall_post = _u(rng, 0.32, 0.42) * half_ap

    # The technologist fits the scan range to the lungs: a margin above the apices, the rest
    # below the costophrenic recesses; a range too short for the lungs cuts both ends.
    spacing, origin = acq.geometry()
    z_low, z_high = origin[2], origin[2] + spacing[0] * (acq.n_slices - 1)
    lung_height = _u(rng, 235.0, 285.0)
    spare = z_high - z_low - lung_height
    z_apex = z_high - (min(_u(rng, 12.0, 40.0), 0.5 * spare) if spare > 0 else 0.5 * spare)
    z_base = z_apex - lung_height
    z_dome_right = z_base + _u(rng, 55.0, 80.0)
    z_dome_left = z_dome_right - _u(rng, 8.0, 25.0)
    z_carina = z_apex - _u(rng, 85.0, 105.0)
    y_body = _u(rng, -8.0, 8.0)
    x_mid = _u(rng, -2.0, 6.0)
    cavity_ap_post = half_ap * 1.04 - wall_post
    cavity_half_width = half_width - wall_lat

    heart_axes = np.array([_u(rng, 52, 62), _u(rng, 38, 46), _u(rng, 34, 42)])
    heart_rotation = _heart_rotation(rng)
    heart_extent_z = float(np.sqrt(np.sum((heart_rotation[2] * heart_axes) ** 2)))
    heart_bottom = z_dome_left - _u(rng, 15.0, 25.0)
    heart_centre = np.array([_u(rng, 24, 38), y_body - _u(rng, 14, 28), heart_bottom + heart_extent_z])

    blood = _u(rng, 150, 250) if contrast else _u(rng, 35, 50)
    return _Patient(
        fat_hu=_u(rng, -110, -88),
        muscle_hu=_u(rng, 42, 58),
        skin_hu=_u(rng, 10, 40),
        liver_hu=_u(rng, 50, 66) + (25.0 if contrast else 0.0),
        spleen_hu=_u(rng, 40, 55) + (30.0 if contrast else 0.0),
        blood_hu=blood,
        myocardium_hu=_u(rng, 40, 55) + (50.0 if contrast else 0.0),
        cortical_hu=_u(rng, 750, 1150),
        marrow_hu=_u(rng, 190, 300),
        vertebra_hu=_u(rng, 170, 290),
        cartilage_hu=_u(rng, 90, 170),
        lung_hu=_u(rng, -885, -840),
        dependent_hu=_u(rng, 40, 100),
        y_body=y_body,
        half_width=half_width,
        half_ap_ant=half_ap * _u(rng, 0.95, 1.02),
        half_ap_post=half_ap * 1.04,
        exponent_ant=_u(rng, 1.9, 2.3),
        exponent_post=_u(rng, 2.3, 2.9),
        body_harmonics=np.column_stack(
            [np.arange(2, 7), rng.uniform(0, 0.018, 5), rng.uniform(0, 2 * np.pi, 5)]
        ),
        wall_lat=wall_lat,
        wall_ant=wall_ant,
        wall_post=wall_post,
        muscle_profile=np.array(
            [
                60.0,
                60.0,
                _u(rng, 18, 28),
                _u(rng, 14, 22),
                _u(rng, 6, 12),
                _u(rng, 6, 12),
                _u(rng, 12, 22),
                _u(rng, 6, 10),
                _u(rng, 3, 5),
            ]
        ),
        muscle_harmonics=np.column_stack(
            [np.arange(2, 6), rng.uniform(0, 0.2, 4), rng.uniform(0, 2 * np.pi, 4)]
        ),
        skin_mm=_u(rng, 1.5, 2.5),
        body_z_wave=np.column_stack(
            [rng.uniform(150, 400, 3), rng.uniform(0, 0.02, 3), rng.uniform(0, 2 * np.pi, 3)]
        ),
        z_apex=z_apex,
        z_carina=z_carina,
        z_arch=z_carina + _u(rng, 15, 30),
        z_dome_right=z_dome_right,
        z_dome_left=z_dome_left,
        z_base=z_base,
        x_mid=x_mid,
        apex_x=cavity_half_width * _u(rng, 0.36, 0.46),
        apex_y=y_body + _u(rng, 0.05, 0.3) * cavity_ap_post,
        apex_height=_u(rng, 30.0, 45.0),
        dome_x=cavity_half_width * _u(rng, 0.40, 0.52),
        dome_y=y_body - _u(rng, 0, 20),
        dome_curv_out=_u(rng, 0.008, 0.013),
        dome_curv_in=_u(rng, 0.002, 0.004),
        dome_curv_y=(z_dome_right - z_base) / (1.7 * (cavity_ap_post + 15) ** 2),
        med_half_ant=_u(rng, 1.5, 4.0),
        med_half_mid=_u(rng, 6.0, 11.0),
        fissures=_sample_fissures(
            rng, x_mid, y_body, cavity_ap_post, half_ap - wall_ant, z_carina, z_dome_right, z_dome_left
        ),
        rib_pitch=_u(rng, 21.0, 26.0),
        rib_drop=_u(rng, 90.0, 120.0),
        rib_z1=z_apex + _u(rng, 0.0, 12.0),
        rib_half_height=_u(rng, 5.0, 7.0),
        rib_half_thick=_u(rng, 3.3, 4.5),
        vert_pitch=_u(rng, 22.0, 27.0),
        vert_phase=_u(rng, 0.0, 1.0),
        vert_rx=_u(rng, 17.0, 22.0),
        vert_ry=_u(rng, 14.0, 17.0),
        y_vert=y_body + cavity_ap_post - _u(rng, 17.0, 24.0),
        sternum_top=z_apex - _u(rng, 25.0, 40.0),
        sternum_bottom=z_dome_right - _u(rng, 0.0, 20.0),
        kidney_x=_u(rng, 60.0, 75.0),
        kidney_z=z_base - _u(rng, 35.0, 55.0),
        kidney_hu=_u(rng, 140, 190) if contrast else _u(rng, 30, 40),
        table_gap=_u(rng, -4.0, 4.0),
        table_radius=_u(rng, 500.0, 1200.0),
        table_depth=_u(rng, 25.0, 45.0),
        table_hu=_u(rng, 150.0, 400.0),
        gas_level=_u(rng, -30.0, 0.0),
        gas_depth=_u(rng, 0.0, 30.0),
        scapula_length=_u(rng, 50.0, 80.0),
        scapula_gap=_u(rng, 6.0, 14.0),
        clavicle_height=_u(rng, -5.0, 15.0),
        heart_centre=heart_centre,
        heart_axes=heart_axes,
        heart_rotation=heart_rotation,
        heart_fat=np.array([_u(rng, 6, 14), _u(rng, 2, 7), _u(rng, 2, 7)]),
        murray_exponent=_u(rng, 3.0, 3.2),
        leaf_radius=_u(rng, 0.27, 0.31),
        tree_points=int(rng.integers(1800, 2600)),
    )


def _heart_rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Rows: the heart's long axis (to the apex: left, anterior, inferior) and two normals."""
    long_axis = np.array([_u(rng, 0.55, 0.75), -_u(rng, 0.45, 0.65), -_u(rng, 0.35, 0.55)])
    long_axis /= norm(long_axis)
    second = np.cross(long_axis, [0.0, 0.0, 1.0])
    second /= norm(second)
    third = np.cross(long_axis, second)
    return np.stack([long_axis, second, third])


def _sample_fissures(
    rng: np.random.Generator,
    x_mid: float,
    y_body: float,
    cavity_post: float,
    cavity_ant: float,
    z_carina: float,
    z_dome_right: float,
    z_dome_left: float,
) -> dict[str, npt.NDArray[np.float64]]:
    """Each fissure is z = c0 + c1 * y + c2 * |x - c7| + two undulations (amplitude, phase) + a bend.

    The oblique fissures run from high at the back (about the carina) down to the front of the
    diaphragm, their lateral parts further forward (on axial slices they run from posteromedial
    to anterolateral); the horizontal fissure is nearly level, below the hilum.
    """
    y_post, y_ant = y_body + cavity_post, y_body - 0.6 * cavity_ant

    def oblique(z_post: float, z_ant: float) -> npt.NDArray[np.float64]:
        slope = (z_post - z_ant) / (y_post - y_ant)
        lateral = _u(rng, 0.15, 0.35) * slope
        c0 = z_post - slope * y_post - lateral * 40.0
        return np.array(
            [
                c0,
                slope,
                lateral,
                _u(rng, 2, 6),
                _u(rng, 0, 6.3),
                _u(rng, 2, 6),
                _u(rng, 0, 6.3),
                x_mid,
                _u(rng, -15, 15),
            ]
        )

    z_h = z_carina - _u(rng, 15.0, 30.0)
    return {
        "right_oblique": oblique(z_carina + _u(rng, -5, 20), z_dome_right + _u(rng, -8, 8)),
        "left_oblique": oblique(z_carina + _u(rng, 0, 25), z_dome_left + _u(rng, -8, 8)),
        "right_horizontal": np.array(
            [
                z_h,
                _u(rng, -0.08, 0.08),
                _u(rng, -0.06, 0.06),
                _u(rng, 1, 4),
                _u(rng, 0, 6.3),
                _u(rng, 1, 4),
                _u(rng, 0, 6.3),
                x_mid,
                _u(rng, -5, 5),
            ]
        ),
    }


def _fissure_z(c: npt.NDArray[np.float64], x: FloatArray, y: FloatArray) -> FloatArray:
    """z of a fissure surface; x is measured from the midline (c[7]), outwards on both sides, and
    c[8] bends the surface (a parabola in x, 60 mm out)."""
    lateral = np.abs(x - c[7])
    return (
        c[0]
        + c[1] * y
        + c[2] * lateral
        + c[3] * np.sin(lateral / 37.0 + c[4])
        + c[5] * np.sin(y / 29.0 + lateral / 61.0 + c[6])
        + c[8] * ((lateral - 60.0) / 60.0) ** 2
    ).astype(F32)


def _fissure_gradient(
    c: npt.NDArray[np.float64], x: FloatArray, y: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(dz/dx, dz/dy) of a fissure surface."""
    lateral = np.abs(x - c[7])
    sign = np.sign(x - c[7])
    d_lat = (
        c[2]
        + c[3] / 37.0 * np.cos(lateral / 37.0 + c[4])
        + c[5] / 61.0 * np.cos(y / 29.0 + lateral / 61.0 + c[6])
        + c[8] * 2.0 * (lateral - 60.0) / 3600.0
    )
    dy = c[1] + c[5] / 29.0 * np.cos(y / 29.0 + lateral / 61.0 + c[6])
    return (sign * d_lat).astype(F32), dy.astype(F32)


# --------------------------------------------------------------------------------------------
# Smooth random fields (lung texture, fat / soft tissue mixing)
# --------------------------------------------------------------------------------------------


class _SmoothField:
    """A Gaussian random field with correlation length ~ ``cell`` mm: random values on a coarse
    lattice, interpolated linearly (no BLAS: it would fight the slice threads for the cores)."""

    def __init__(self, rng: np.random.Generator, x: FloatArray, y: FloatArray, z: FloatArray, cell: float):
        nx = int(np.ceil((x[-1] - x[0]) / cell)) + 3
        ny = int(np.ceil((y[-1] - y[0]) / cell)) + 3
        nz = int(np.ceil(abs(z[-1] - z[0]) / cell)) + 3
        coarse = rng.standard_normal((nz, ny, nx))
        # A light smoothing of the coarse lattice hides its axes.
        coarse = (
            coarse
            + 0.5
            * (
                np.roll(coarse, 1, 1)
                + np.roll(coarse, -1, 1)
                + np.roll(coarse, 1, 2)
                + np.roll(coarse, -1, 2)
            )
        ) / np.sqrt(2.0)
        self._coarse = coarse.astype(F32)
        self._z0, self._cell = float(min(z[0], z[-1])) - cell, cell
        self._rows = _lerp_table((y - (y[0] - cell)) / cell, ny)
        self._cols = _lerp_table((x - (x[0] - cell)) / cell, nx)

    def at(self, z: float) -> FloatArray:
        t = (z - self._z0) / self._cell
        k = min(max(int(t), 0), self._coarse.shape[0] - 2)
        f = F32(min(max(t - k, 0.0), 1.0))
        plane = (1 - f) * self._coarse[k] + f * self._coarse[k + 1]
        j, wj = self._rows
        rows = plane[j] * (1 - wj)[:, None] + plane[j + 1] * wj[:, None]
        i, wi = self._cols
        return rows[:, i] * (1 - wi) + rows[:, i + 1] * wi


def _lerp_table(t: npt.NDArray[np.float64], n: int) -> tuple[npt.NDArray[np.intp], FloatArray]:
    lower = np.clip(np.floor(t).astype(np.intp), 0, n - 2)
    return lower, np.clip(t - lower, 0.0, 1.0).astype(F32)


# --------------------------------------------------------------------------------------------
# The slice renderer: everything that is not a tube
# --------------------------------------------------------------------------------------------


def _smoothstep(t: npt.ArrayLike) -> npt.NDArray[np.float64]:
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _superellipse_radius(
    theta: npt.NDArray[np.float64], a: float, b_ant: float, b_post: float, p_ant: float, p_post: float
) -> npt.NDArray[np.float64]:
    """Polar radius of a superellipse whose anterior (y < 0) and posterior halves differ, blended
    smoothly across the sides."""
    s, c = np.sin(theta), np.cos(theta)
    posterior = _smoothstep((s + 0.4) / 0.8)
    b = b_ant + (b_post - b_ant) * posterior
    p = p_ant + (p_post - p_ant) * posterior
    return power(power(np.abs(c / a), p) + power(np.abs(s / b), p), -1.0 / p)


class _SliceRenderer:
    """Draws one axial slice at a time: body wall, ribs, scapulae, clavicles, spine, sternum,
    abdomen, heart, lungs. All 2D tables are cut to the body's bounding box (air outside)."""

    def __init__(
        self, patient: _Patient, acq: Acquisition, rng: np.random.Generator, envelope: _Envelope
    ) -> None:
        self.p = p = patient
        self.envelope = envelope
        spacing, origin = acq.geometry()
        self.slice_spacing = spacing[0]
        self.ps = spacing[1]
        self.z = (origin[2] + spacing[0] * np.arange(acq.n_slices)).astype(F32)
        x = (origin[0] + spacing[2] * np.arange(acq.columns)).astype(F32)
        y = (origin[1] + spacing[1] * np.arange(acq.rows)).astype(F32)
        body_r, cavity_parts, muscle_depth = self._polar_tables()
        self.crop = self._body_box(x, y, body_r)
        x, y = x[self.crop[1]], y[self.crop[0]]
        self.x, self.y = x, y
        self.outside = self._table(*np.meshgrid(x.astype(np.float64), y.astype(np.float64)))
        xg, yg = (a.astype(F32) for a in np.meshgrid(x, y))
        self.xg, self.yg = xg, yg
        # The back rests on the table: the body is flattened against its top.
        self.above_table = yg < self.table_y - 1.0 - xg**2 / (2.0 * p.table_radius)
        dy = yg - p.y_body
        r = np.hypot(xg, dy)
        index = self._theta_index(xg, dy)
        self.r = r.astype(F32)
        self.r_body = body_r[index].astype(F32)
        self.rho_body = (r / self.r_body).astype(F32)
        self.cavity_parts = tuple(part[index].astype(F32) for part in cavity_parts)
        self.muscle_depth = muscle_depth[index].astype(F32)
        # Angle from the posterior midline: 0 at the spine, pi at the sternum, on either side.
        phi = arccos(np.clip(dy / np.maximum(r, 1e-6), -1.0, 1.0))
        self.phi = phi.astype(F32)
        phi0, phi1 = np.radians(20.0), np.radians(9.0)
        self.rib_progress = ((phi - phi0) / (np.pi - phi0 - phi1)).astype(F32)
        # Ribs run nearly level behind, slope steeply down round the side, level off in front.
        self.rib_drop = (p.rib_drop * _smoothstep((self.rib_progress - 0.05) / 0.65)).astype(F32)
        self._lung_tables()
        self.texture = _SmoothField(rng, x, y, self.z, cell=14.0)
        self.mixing = _SmoothField(rng, x, y, self.z, cell=22.0)

    # -- precomputation -------------------------------------------------------------------

    def _polar_tables(
        self,
    ) -> tuple[npt.NDArray[np.float64], tuple[npt.NDArray[np.float64], ...], npt.NDArray[np.float64]]:
        """Body radius, cavity radius (lateral, front, back parts) and the depth outside the cavity
        to which the wall muscle reaches, over theta."""
        p = self.p
        t = np.linspace(-np.pi, np.pi, N_THETA, endpoint=False)
        body = _superellipse_radius(
            t, p.half_width, p.half_ap_ant, p.half_ap_post, p.exponent_ant, p.exponent_post
        )
        for order, amplitude, phase in p.body_harmonics:
            body *= 1.0 + amplitude * np.cos(order * t + phase)
        s, c = np.sin(t), np.cos(t)
        wall = p.wall_lat * c**2 + np.where(s < 0, p.wall_ant, p.wall_post) * s**2
        cavity = body - wall
        cavity_parts = (cavity * c**2, cavity * s**2 * (s < 0), cavity * s**2 * (s >= 0))
        # Muscle by angle from the spine (paraspinal, trapezius and latissimus, serratus, pectoral,
        # thin over the sternum); subcutaneous fat fills the rest of the wall, so that where the
        # rib cage narrows (the upper chest) the fat (axillae) takes up the room.
        muscle = np.interp(arccos(s), _MUSCLE_PHI, p.muscle_profile)
        muscle = ndi.gaussian_filter1d(muscle, N_THETA / 36.0, mode="wrap")  # no corners
        for order, amplitude, phase in p.muscle_harmonics:
            muscle *= 1.0 + amplitude * np.cos(order * t + phase)
        return body, cavity_parts, 2 * p.rib_half_thick + 2.0 + muscle

    def _theta_index(self, xg: FloatArray, dy: FloatArray) -> npt.NDArray[np.intp]:
        theta = arctan2(dy, xg)
        return ((theta + np.pi) / (2 * np.pi) * N_THETA).astype(np.intp) % N_THETA

    def _body_box(self, x: FloatArray, y: FloatArray, body_r: npt.NDArray[np.float64]) -> tuple[slice, slice]:
        """Rows and columns that the body (at its widest slice) and the table can reach."""
        p = self.p
        s_max = 1.0 + float(np.sum(np.abs(p.body_z_wave[:, 1])))
        xg, yg = np.meshgrid(x, y)
        dy = yg - p.y_body
        inside = np.hypot(xg, dy) < body_r[self._theta_index(xg, dy)] * s_max
        # The patient lies on the table: its top touches the back at the mean body size.
        self.table_y = p.y_body + float(body_r[(3 * N_THETA) // 4]) + p.table_gap
        inside |= self._table(xg, yg) > AIR_HU
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if not len(rows):
            return slice(0, 1), slice(0, 1)
        j0, j1 = max(int(rows[0]) - 4, 0), min(int(rows[-1]) + 5, len(y))
        i0, i1 = max(int(cols[0]) - 4, 0), min(int(cols[-1]) + 5, len(x))
        return slice(j0, j1), slice(i0, i1)

    def _table(self, xg: npt.NDArray[np.float64], yg: npt.NDArray[np.float64]) -> FloatArray:
        """The patient table under the back: two thin curved carbon-fibre shells over foam."""
        p = self.p
        half_width = 0.8 * p.half_width + 40.0
        out = np.full(xg.shape, AIR_HU, dtype=F32)
        for offset, radius, thickness in (
            (0.0, p.table_radius, 1.6),
            (p.table_depth, 1.3 * p.table_radius, 2.2),
        ):
            centre = self.table_y + offset - xg**2 / (2.0 * radius)
            # Partial volume of the shell in the pixel.
            cover = np.clip((0.5 * thickness + 0.5 * self.ps - np.abs(yg - centre)) / self.ps, 0.0, 1.0)
            cover *= np.abs(xg) < half_width * (1.0 - 0.1 * (offset > 0))
            np.maximum(out, AIR_HU + cover * (p.table_hu - AIR_HU), out=out)
        return out

    def _lung_tables(self) -> None:
        p, xg, yg = self.p, self.xg, self.yg
        self.fz = {name: _fissure_z(c, xg, yg) for name, c in p.fissures.items()}
        self.fissure_width, self.fissure_gain = {}, {}
        for name, c in p.fissures.items():
            gx, gy = _fissure_gradient(c, xg, yg)
            norm = np.sqrt(1.0 + gx * gx + gy * gy)
            self.fissure_gain[name] = (1.0 / norm).astype(F32)
            # Extent of a voxel across the sheet (its projection on the sheet's normal).
            self.fissure_width[name] = (
                (np.abs(gx) * self.ps + np.abs(gy) * self.ps + self.slice_spacing) / norm
            ).astype(F32)
        self.z_diaphragm = self._diaphragm(xg, yg)
        self.z_diaphragm_top = float(self.z_diaphragm.max())
        self.abdomen_hu = self._abdomen_map()
        self.right = xg < p.x_mid

    def _diaphragm(self, xg: FloatArray, yg: FloatArray) -> FloatArray:
        p = self.p
        lateral = np.abs(xg - p.x_mid) - p.dome_x
        drop_x = np.where(lateral > 0, p.dome_curv_out, p.dome_curv_in) * lateral**2
        dy = yg - p.dome_y
        drop_y = p.dome_curv_y * dy**2 * np.where(dy > 0, 1.7, 0.8)
        top = p.z_dome_left + (p.z_dome_right - p.z_dome_left) * _smoothstep((p.x_mid + 25 - xg) / 50)
        return (top - drop_x - drop_y).astype(F32)

    def _abdomen_map(self) -> FloatArray:
        """HU of the organs below the diaphragm (NaN where the fat fill shows): the liver on the
        right, its left lobe reaching across the midline in front, the stomach on the left in
        front, the spleen on the left behind."""
        p, xg, yg = self.p, self.xg, self.yg
        half_w, half_ap = p.half_width - p.wall_lat, p.half_ap_post - p.wall_post
        u, v = (xg - p.x_mid) / half_w, (yg - p.y_body) / half_ap
        hu = np.full(xg.shape, np.nan, dtype=F32)
        stomach = ((u - 0.45) / 0.38) ** 2 + ((v + 0.25) / 0.42) ** 2 < 1.0
        spleen = ((u - 0.62) / 0.26) ** 2 + ((v - 0.38) / 0.36) ** 2 < 1.0
        # The liver's left edge: a smooth curve, far left in front (left lobe), midline behind.
        edge = 0.35 * exp(-(((v + 0.35) / 0.45) ** 2)) - 0.05
        liver = u < edge
        hu[stomach] = 0.6 * p.muscle_hu
        hu[spleen] = p.spleen_hu
        hu[liver] = p.liver_hu
        # Gas in the fundus of the stomach: a bubble under the left dome, its floor the air-fluid
        # level (a coronal plane: the patient lies supine).
        self.fundus = stomach & ~liver & (yg < p.y_body + p.gas_level)
        self.fundus_z = (
            self.z_diaphragm
            - 6.0
            - p.gas_depth
            * np.sqrt(np.clip(1.0 - ((u - 0.45) / 0.3) ** 2 - ((v + 0.1) / 0.35) ** 2, 0.0, 1.0))
        )
        return hu

    # -- per slice -------------------------------------------------------------------------

    def body_scale(self, z: float) -> float:
        scale = 1.0
        for wavelength, amplitude, phase in self.p.body_z_wave:
            scale += amplitude * np.sin(2 * np.pi * z / wavelength + phase)
        return float(scale)

    def cavity_scales(self, z: float) -> tuple[float, float, float]:
        """(lateral, anterior, posterior) scale of the rib cage: it widens from the thoracic inlet
        down to the diaphragm, mostly sideways."""
        p = self.p
        t = float(np.clip((p.z_apex + 5.0 - z) / (p.z_apex + 5.0 - p.z_dome_right), 0.0, 1.0))
        grow = 1.0 - (1.0 - t) ** 2.2
        return 0.45 + 0.55 * grow, 0.72 + 0.28 * grow, 0.93 + 0.07 * grow

    def cavity_radius(self, z: float, s_body: float) -> FloatArray:
        lat, ant, post = self.cavity_scales(z)
        a, b, c = self.cavity_parts
        return (a * F32(lat * s_body) + b * F32(ant * s_body)) + c * F32(post * s_body)

    def front(self, z: float, s_body: float) -> float:
        """y of the inner surface of the anterior chest wall (behind the sternum)."""
        return self.p.y_body - (self.p.half_ap_ant - self.p.wall_ant) * self.cavity_scales(z)[1] * s_body

    def back(self, z: float, s_body: float) -> float:
        return self.p.y_body + (self.p.half_ap_post - self.p.wall_post) * self.cavity_scales(z)[2] * s_body

    def render(
        self, z: float, hu_full: FloatArray, lobes_full: npt.NDArray[np.uint8], body_full: BoolArray
    ) -> None:
        hu = np.empty(self.xg.shape, dtype=F32)
        lobes = np.zeros(self.xg.shape, dtype=np.uint8)
        body = np.empty(self.xg.shape, dtype=bool)
        self._render_crop(z, hu, lobes, body)
        hu_full[...] = AIR_HU
        lobes_full[...] = 0
        body_full[...] = False
        hu_full[self.crop] = hu
        lobes_full[self.crop] = lobes
        body_full[self.crop] = body

    def _render_crop(self, z: float, hu: FloatArray, lobes: npt.NDArray[np.uint8], body: BoolArray) -> None:
        p = self.p
        s_body = self.body_scale(z)
        depth_body = (F32(s_body) - self.rho_body) * self.r_body
        depth_cav = self.cavity_radius(z, s_body) - self.r
        np.greater(depth_body, 0.0, out=body)
        body &= self.above_table

        hu[...] = self._cavity_fill(z)
        hu[depth_cav < 0] = p.muscle_hu
        # Where the rib cage narrows (upper chest), the shoulder girdle muscles take most of the room.
        lat, ant, post = self.cavity_scales(z)
        a, b, c = self.cavity_parts
        extra = (a * F32(1.0 - lat) + b * F32(1.0 - ant) + c * F32(1.0 - post)) * F32(0.7 * s_body)
        hu[(depth_cav < -(self.muscle_depth + extra)) | (depth_body < p.skin_mm + 3.0)] = p.fat_hu
        hu[depth_body < p.skin_mm] = p.skin_hu
        outside = ~body
        hu[outside] = self.outside[outside]  # air, and the table
        wall = np.flatnonzero(((depth_cav < 0) & (depth_cav > -30.0)).ravel())
        self._ribs(z, hu, depth_cav, wall)
        self._scapulae(z, hu, depth_cav, wall)
        self._clavicles(z, hu, depth_cav, wall)
        below = self._abdomen(z, hu, depth_cav)
        self._spine(z, hu)
        self._sternum(z, hu, s_body)
        heart_region = self._heart(z, hu)
        lung = self._lung_mask(z, depth_cav, s_body, heart_region, below)
        self._lungs(z, hu, lobes, lung, s_body)

    def _cavity_fill(self, z: float) -> FloatArray:
        """Mostly fat in the mediastinum; at the thoracic inlet, muscle with fat planes."""
        p = self.p
        neck = float(_smoothstep((z - (p.z_apex - 45.0)) / 45.0))
        muscle = np.clip(self.mixing.at(z) * F32(0.9) + F32(0.55), 0.0, 1.0) * F32(0.1 + 0.85 * neck)
        return muscle * F32(p.muscle_hu - p.fat_hu) + F32(p.fat_hu)

    def _ribs(self, z: float, hu: FloatArray, depth_cav: FloatArray, wall: npt.NDArray[np.intp]) -> None:
        p = self.p
        radial = (depth_cav.ravel()[wall] + (p.rib_half_thick + 1.0)) / p.rib_half_thick
        u = (p.rib_z1 - (z + self.rib_drop.ravel()[wall])) / p.rib_pitch
        n = np.rint(u)
        vertical = (u - n) * (p.rib_pitch / p.rib_half_height)
        e = radial * radial + vertical * vertical
        progress = self.rib_progress.ravel()[wall]
        # Ribs 1-7 reach the sternum through cartilage, 8-10 end short, 11-12 float.
        bone_end = np.select([n < 7, n < 10], [0.80, 0.70], 0.52)
        cartilage_end = np.select([n < 7, n < 10], [1.0, 0.85], 0.52)
        valid = (e < 1.0) & (n >= 0) & (n < 12) & (progress >= 0)
        bone = valid & (progress <= bone_end)
        cartilage = valid & (progress > bone_end) & (progress <= cartilage_end)
        cortex = (1.0 - 1.5 / p.rib_half_thick) ** 2
        flat = hu.reshape(-1)
        flat[wall[bone]] = np.where(e[bone] < cortex, p.marrow_hu, p.cortical_hu)
        flat[wall[cartilage]] = p.cartilage_hu

    def _scapulae(self, z: float, hu: FloatArray, depth_cav: FloatArray, wall: npt.NDArray[np.intp]) -> None:
        """Thin plates on the back of the upper ribs, thicker along the lateral border, which runs
        from the shoulder down and in to the inferior angle."""
        p = self.p
        z_top, z_bottom = p.z_apex + 15.0, p.z_carina - p.scapula_length
        if not z_bottom < z < z_top:
            return
        t = (z_top - z) / (z_top - z_bottom)  # 0 at the shoulder, 1 at the inferior angle
        phi_med = np.radians(28.0 + 6.0 * t)
        phi_lat = np.radians(88.0 - 48.0 * t**1.5)
        phi = self.phi.ravel()[wall]
        depth = depth_cav.ravel()[wall] + (2 * p.rib_half_thick + 2.0 + p.scapula_gap)
        across = np.clip((phi - phi_med) / max(phi_lat - phi_med, 1e-3), -1.0, 2.0)
        half = 1.2 + 3.0 * np.clip((across - 0.75) / 0.25, 0.0, 1.0)
        bone = (across >= 0) & (across <= 1) & (np.abs(depth + half - 1.2) < half)
        hu.reshape(-1)[wall[bone]] = 0.7 * p.cortical_hu

    def _clavicles(self, z: float, hu: FloatArray, depth_cav: FloatArray, wall: npt.NDArray[np.intp]) -> None:
        p = self.p
        z_mid = p.z_apex + p.clavicle_height
        if abs(z - z_mid) > 40.0:
            return
        phi = self.phi.ravel()[wall]
        centre = z_mid + 25.0 * ((np.pi - phi) / 1.2) ** 2  # rising towards the shoulders
        radial = (depth_cav.ravel()[wall] + 2 * p.rib_half_thick + 9.0) / 6.0
        vertical = (z - centre) / 6.5
        e = radial * radial + vertical * vertical
        bone = (e < 1.0) & (phi > np.radians(100.0)) & (phi < np.radians(172.0))
        hu.reshape(-1)[wall[bone]] = np.where(e[bone] < 0.45, p.marrow_hu, p.cortical_hu)

    def _window(self, cx: float, cy: float, half: float) -> tuple[slice, slice]:
        j0 = int(np.searchsorted(self.y, cy - half))
        j1 = int(np.searchsorted(self.y, cy + half))
        i0 = int(np.searchsorted(self.x, cx - half))
        i1 = int(np.searchsorted(self.x, cx + half))
        return slice(j0, j1), slice(i0, i1)

    def _spine(self, z: float, hu: FloatArray) -> None:
        p = self.p
        win = self._window(0.0, p.y_vert + 30.0, 70.0)
        xg, yg = self.xg[win], self.yg[win]
        out = hu[win]
        phase = ((z - p.vert_phase * p.vert_pitch) / p.vert_pitch) % 1.0
        body_e = (xg / p.vert_rx) ** 2 + ((yg - p.y_vert) / p.vert_ry) ** 2
        if phase < 0.18:  # intervertebral disc
            out[body_e < 1.0] = 80.0
        else:
            out[body_e < 1.0] = p.cortical_hu * 0.55
            inner = (xg / (p.vert_rx - 1.5)) ** 2 + ((yg - p.y_vert) / (p.vert_ry - 1.5)) ** 2
            out[inner < 1.0] = p.vertebra_hu
        canal_y = p.y_vert + p.vert_ry + 8.0
        canal_r = np.hypot(xg, (yg - canal_y) * 1.15)
        arch = np.zeros(xg.shape, dtype=bool)
        if 0.25 < phase < 0.9:  # pedicles and laminae round the canal
            arch |= (canal_r < 13.5) & (yg > p.y_vert + p.vert_ry - 3)
        if phase > 0.45 or phase < 0.05:  # spinous process, sloping down from the vertebra above
            behind = yg - canal_y - 9.0
            arch |= (np.abs(xg) < 3.5 - 0.04 * behind) & (behind > 0) & (behind < 26.0)
        if 0.3 < phase < 0.75:  # transverse processes, back and out towards the rib tubercles
            u, v = np.abs(xg) - 8.0, yg - canal_y + 3.0
            along = u * 0.906 + v * 0.423
            across = v * 0.906 - u * 0.423
            arch |= (along > 0) & (along < 27.0) & (np.abs(across) < 4.5 - 0.05 * along)
        out[arch] = 0.5 * (p.cortical_hu + p.vertebra_hu)
        out[canal_r < 8.0] = 25.0

    def _sternum(self, z: float, hu: FloatArray, s_body: float) -> None:
        p = self.p
        if not p.sternum_bottom < z < p.sternum_top:
            return
        front = self.front(z, s_body)
        t = (p.sternum_top - z) / (p.sternum_top - p.sternum_bottom)
        half_w = 13.0 + 12.0 * float(_smoothstep(1.0 - t / 0.3))
        half_t = 6.0
        win = self._window(0.0, front - half_t, half_w + 5.0)
        xg, yg = self.xg[win], self.yg[win]
        e = (xg / half_w) ** 2 + ((yg - (front - half_t - 1.0)) / half_t) ** 2
        inner = (xg / (half_w - 1.5)) ** 2 + ((yg - (front - half_t - 1.0)) / (half_t - 1.5)) ** 2
        out = hu[win]
        out[e < 1.0] = p.cortical_hu * 0.8
        out[inner < 1.0] = p.marrow_hu

    def _abdomen(self, z: float, hu: FloatArray, depth_cav: FloatArray) -> BoolArray | None:
        """Below the diaphragm: a muscular sheet 4 mm thick, then the abdominal organs."""
        if z >= self.z_diaphragm_top:
            return None
        p = self.p
        cavity = depth_cav > 0
        under = cavity & (self.z_diaphragm > z)
        hu[under & (self.z_diaphragm - 4.0 <= z)] = p.muscle_hu
        organs = cavity & (self.z_diaphragm - 4.0 > z) & ~np.isnan(self.abdomen_hu)
        hu[organs] = self.abdomen_hu[organs]
        self._kidneys(z, hu)
        gas = organs & self.fundus & (self.fundus_z < z)
        hu[gas] = AIR_HU
        return under

    def _kidneys(self, z: float, hu: FloatArray) -> None:
        """Upper poles of the kidneys beside the spine, the right one a little lower."""
        p = self.p
        for side, dz in ((-1.0, -12.0), (1.0, 0.0)):
            cx, cy, cz = p.x_mid + side * p.kidney_x, p.y_vert + 6.0, p.kidney_z + dz
            if abs(z - cz) >= 55.0:
                continue
            scale = np.sqrt(1.0 - ((z - cz) / 55.0) ** 2)
            win = self._window(cx, cy, 32.0)
            e = ((self.xg[win] - cx) / (27.0 * scale)) ** 2 + ((self.yg[win] - cy) / (22.0 * scale)) ** 2
            hu[win][e < 1.0] = p.kidney_hu

    def _heart(self, z: float, hu: FloatArray) -> tuple[tuple[slice, slice], BoolArray] | None:
        """The heart (myocardium, blood pool, septum) and its fat pad; returns the window and the
        region the lungs leave to it."""
        p = self.p
        c, axes, rot, fat = p.heart_centre, p.heart_axes, p.heart_rotation, p.heart_fat
        extent = np.sqrt(np.sum((rot * (axes + fat + 4.0)[:, None]) ** 2, axis=0))
        if abs(z - c[2]) > extent[2]:
            return None
        win = self._window(float(c[0]), float(c[1]), float(max(extent[0], extent[1])) + 2.0)
        dx, dy, dz = self.xg[win] - F32(c[0]), self.yg[win] - F32(c[1]), F32(z - c[2])
        u = [(F32(rot[a, 0]) * dx + F32(rot[a, 1]) * dy + F32(rot[a, 2]) * dz) for a in range(3)]
        q = sum((u[a] * F32(1 / axes[a])) ** 2 for a in range(3))
        # The fat pad is thickest at the apex (the fat ellipsoid is shifted towards it).
        q_fat = ((u[0] - F32(0.5 * fat[0])) * F32(1 / (axes[0] + fat[0]))) ** 2 + sum(
            (u[a] * F32(1 / (axes[a] + fat[a]))) ** 2 for a in (1, 2)
        )
        q_pool = sum((u[a] * F32(1 / (axes[a] - 9.0))) ** 2 for a in range(3))
        # The heart rests on the diaphragm: its inferior surface is flattened there.
        above = self.z_diaphragm[win] < z
        out = hu[win]
        out[(q_fat < 1.0) & above] = p.fat_hu
        out[(q < 1.0) & above] = p.myocardium_hu
        septum = np.abs(0.8 * u[1] + 0.6 * u[2] + 8.0) < 5.0
        out[(q_pool < 1.0) & ~septum & above] = p.blood_hu
        return win, q_fat < 1.0

    def _lung_mask(
        self,
        z: float,
        depth_cav: FloatArray,
        s_body: float,
        heart: tuple[tuple[slice, slice], BoolArray] | None,
        below: BoolArray | None,
    ) -> BoolArray:
        p, xg, yg = self.p, self.xg, self.yg
        q = (p.z_apex - z) / p.apex_height
        if q <= 0:
            return np.zeros(xg.shape, dtype=bool)
        lung = depth_cav > 1.5
        if below is not None:
            lung &= ~below
        if heart is not None:
            lung[heart[0]] &= ~heart[1]
        if q < 6.0:
            # Apices: round domes set towards the back, that widen (forwards most) until the rib
            # cage takes over.
            ax = (p.half_width - p.wall_lat) * 0.22
            ay = (p.half_ap_post - p.wall_post) * 0.34 * (1.0 + 0.3 * q)
            y_centre = p.apex_y - 12.0 * min(q, 3.0)
            cap = ((np.abs(xg - p.x_mid) - p.apex_x) / ax) ** 2 + ((yg - y_centre) / ay) ** 2
            lung &= cap < q + q * q
        # Mediastinum: a band between sternum and spine, narrow in front, then the envelope of
        # the great vessels and airways, then the spine.
        front = self.front(z, s_body)
        half = p.med_half_ant + (p.med_half_mid - p.med_half_ant) * _smoothstep((self.y - front) / 60.0)
        band = np.abs(self.x - p.x_mid)[None, :] < half.astype(F32)[:, None]
        band &= (self.y < p.y_vert + p.vert_ry)[:, None]
        lung &= ~band
        lung &= ~self.envelope.mask(z, self.x, self.y)
        win = self._window(0.0, p.y_vert + 20.0, p.vert_rx + 30.0)
        xw, yw = xg[win], yg[win]
        spine = ((xw / (p.vert_rx + 4.0)) ** 2 + ((yw - p.y_vert) / (p.vert_ry + 4.0)) ** 2 < 1.0) | (
            (np.abs(xw) < p.vert_rx * 0.9 + 3.0) & (yw > p.y_vert)
        )
        lung[win] &= ~spine
        return lung

    def _lungs(
        self, z: float, hu: FloatArray, lobes: npt.NDArray[np.uint8], lung: BoolArray, s_body: float
    ) -> None:
        idx = np.flatnonzero(lung.ravel())
        if not len(idx):
            return
        p = self.p
        right = self.right.ravel()[idx]
        lower_r = z < self.fz["right_oblique"].ravel()[idx]
        lower_l = z < self.fz["left_oblique"].ravel()[idx]
        middle = z < self.fz["right_horizontal"].ravel()[idx]
        label = np.where(
            right,
            np.where(lower_r, RIGHT_LOWER, np.where(middle, RIGHT_MIDDLE, RIGHT_UPPER)),
            np.where(lower_l, LEFT_LOWER, LEFT_UPPER),
        )
        lobes.reshape(-1)[idx] = label
        back = self.back(z, s_body)
        dependent = (p.dependent_hu * _smoothstep((self.y - (back - 70.0)) / 70.0) ** 2).astype(F32)
        rows = idx // hu.shape[1]
        value = dependent[rows] + self.texture.at(z).ravel()[idx] * F32(18.0) + F32(p.lung_hu)
        value += self._fissure_density(z, idx, right, lower_r)
        hu.reshape(-1)[idx] = value

    def _fissure_density(
        self, z: float, idx: npt.NDArray[np.intp], right: BoolArray, lower_r: BoolArray
    ) -> FloatArray:
        """Fissures as 0.3 mm tissue sheets, averaged over the voxel's extent across them."""
        thickness, contrast = 0.3, 550.0
        total = np.zeros(len(idx), dtype=F32)
        for name, where in (
            ("right_oblique", right),
            ("left_oblique", ~right),
            ("right_horizontal", right & ~lower_r),
        ):
            d = np.abs(z - self.fz[name].ravel()[idx])
            near = np.flatnonzero(where & (d < 6.0))
            if not len(near):
                continue
            d = d[near] * self.fissure_gain[name].ravel()[idx[near]]
            w = self.fissure_width[name].ravel()[idx[near]]
            overlap = np.minimum(d + 0.5 * w, 0.5 * thickness) - np.maximum(d - 0.5 * w, -0.5 * thickness)
            total[near] += np.clip(overlap / w, 0.0, 1.0) * F32(contrast)
        return total


# --------------------------------------------------------------------------------------------
# Tubes: capsule rasterisation in batches
# --------------------------------------------------------------------------------------------


@dataclass
class _Tubes:
    p0: npt.NDArray[np.float64]  # (n, 3) LPS mm
    p1: npt.NDArray[np.float64]
    r0: npt.NDArray[np.float64]
    r1: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.r0)

    def subset(self, keep: npt.NDArray[np.bool_]) -> _Tubes:
        return _Tubes(self.p0[keep], self.p1[keep], self.r0[keep], self.r1[keep])

    @staticmethod
    def concat(parts: list[_Tubes]) -> _Tubes:
        return _Tubes(
            np.concatenate([t.p0 for t in parts]).reshape(-1, 3),
            np.concatenate([t.p1 for t in parts]).reshape(-1, 3),
            np.concatenate([t.r0 for t in parts]),
            np.concatenate([t.r1 for t in parts]),
        )


def _polyline(points: npt.ArrayLike, radii: npt.ArrayLike, per_segment: int = 4) -> _Tubes:
    """A smooth tube through control points (Catmull-Rom), radius interpolated linearly."""
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    padded = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    samples, sample_r = [], []
    for a in range(len(pts) - 1):
        p0, p1, p2, p3 = padded[a : a + 4]
        for t in np.arange(per_segment) / per_segment:
            samples.append(
                0.5
                * (
                    (2 * p1)
                    + (-p0 + p2) * t
                    + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                    + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
                )
            )
            sample_r.append(rad[a] + (rad[a + 1] - rad[a]) * t)
    samples.append(pts[-1])
    sample_r.append(rad[-1])
    s, r = np.array(samples), np.array(sample_r)
    return _Tubes(s[:-1], s[1:], r[:-1], r[1:])


_BUCKETS = np.array(
    [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        10,
        12,
        14,
        16,
        20,
        24,
        28,
        32,
        40,
        48,
        56,
        64,
        80,
        96,
        112,
        128,
        160,
        192,
        224,
        256,
        320,
        384,
        448,
        512,
        640,
        768,
        1024,
    ]
)


_WORKERS = max(1, min(2, os.cpu_count() or 1))
_EXECUTOR: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """numpy and ndimage release the GIL on whole-array work: two threads use both cores."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="chest")
    return _EXECUTOR


def _ordered_map(fn: Callable[..., T], tasks: list[tuple], ahead: int = 4) -> Iterator[T]:
    """``fn(*task)`` for each task on the pool, yielded in task order, a few tasks ahead."""
    if _WORKERS == 1:
        yield from (fn(*task) for task in tasks)
        return
    pending: deque[Future[T]] = deque()
    for task in tasks:
        pending.append(_pool().submit(fn, *task))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # k, j, i
    origin: tuple[float, float, float]  # x, y, z of voxel (0, 0, 0)
    aperture: tuple[float, float, float]  # extent each voxel averages over: slice thickness, pixel

    def to_kji_mm(self, xyz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """LPS mm to millimetres along (k, j, i) from voxel (0, 0, 0)."""
        o = self.origin
        return np.stack([xyz[..., 2] - o[2], xyz[..., 1] - o[1], xyz[..., 0] - o[0]], axis=-1)


def _tube_voxels(
    tubes: _Tubes, grid: _Grid, pad_mm: float = 0.0, max_elements: int = 1 << 20
) -> Iterator[tuple[npt.NDArray[np.int64], FloatArray]]:
    """Yield (flat voxel indices, occupancy in (0, 1]) of the tubes, radius widened by ``pad_mm``.

    The occupancy is the overlap of the voxel, projected on the direction from the centreline, with
    the tube's cross-section: a partial-volume estimate that keeps 1 mm vessels from aliasing.
    Chunks are computed on the worker threads and yielded in a fixed order.
    """
    tasks = list(_capsule_tasks(tubes, grid, pad_mm, max_elements))
    yield from _ordered_map(_capsule_chunk, tasks)


def _capsule_tasks(tubes: _Tubes, grid: _Grid, pad_mm: float, max_elements: int) -> Iterator[tuple]:
    """Batches of capsules whose bounding boxes round up to the same size."""
    if len(tubes) == 0:
        return
    spacing, aperture = np.asarray(grid.spacing), np.asarray(grid.aperture)
    shape = np.asarray(grid.shape)
    q0, q1 = grid.to_kji_mm(tubes.p0), grid.to_kji_mm(tubes.p1)
    reach = np.maximum(tubes.r0, tubes.r1)[:, None] + pad_mm + max(spacing.max(), aperture.max())
    lo = np.floor((np.minimum(q0, q1) - reach) / spacing).astype(np.int64)
    hi = np.ceil((np.maximum(q0, q1) + reach) / spacing).astype(np.int64)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape - 1)
    ok = np.all(hi >= lo, axis=1)
    if not ok.any():
        return
    q0, q1, lo, hi = q0[ok], q1[ok], lo[ok], hi[ok]
    r0, r1 = tubes.r0[ok] + pad_mm, tubes.r1[ok] + pad_mm
    dims = _BUCKETS[np.searchsorted(_BUCKETS, hi - lo + 1)]
    dims = np.minimum(dims, shape)
    lo = np.minimum(lo, shape - dims)
    keys, inverse = np.unique(dims, axis=0, return_inverse=True)
    for g, key in enumerate(keys):
        members = np.flatnonzero(inverse.ravel() == g)
        per_chunk = max(1, max_elements // int(np.prod(key)))
        for start in range(0, len(members), per_chunk):
            m = members[start : start + per_chunk]
            yield q0[m], q1[m], r0[m], r1[m], lo[m], key, spacing, aperture, grid.shape


def _capsule_chunk(
    q0: npt.NDArray[np.float64],
    q1: npt.NDArray[np.float64],
    r0: npt.NDArray[np.float64],
    r1: npt.NDArray[np.float64],
    lo: npt.NDArray[np.int64],
    dims: npt.NDArray[np.int64],
    spacing: npt.NDArray[np.float64],
    aperture: npt.NDArray[np.float64],
    shape: tuple[int, int, int],
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Occupancy of a batch of capsules in their equal-size boxes (see ``_tube_voxels``)."""
    bk, bj, bi = (int(d) for d in dims)
    sk, sj, si = (float(s) for s in spacing)
    ak, aj, ai = (float(a) for a in aperture)
    u = (q1 - q0).astype(F32)
    length2 = np.maximum(np.sum(u * u, axis=1), 1e-6).astype(F32)
    # Voxel positions relative to p0 along each axis: (G, b) arrays, broadcast to (G, bk, bj, bi).
    ck = ((lo[:, 0:1] + np.arange(bk)) * sk - q0[:, 0:1]).astype(F32)[:, :, None, None]
    cj = ((lo[:, 1:2] + np.arange(bj)) * sj - q0[:, 1:2]).astype(F32)[:, None, :, None]
    ci = ((lo[:, 2:3] + np.arange(bi)) * si - q0[:, 2:3]).astype(F32)[:, None, None, :]
    uk, uj, ui = (u[:, a, None, None, None] for a in range(3))
    inv_l2 = (1.0 / length2)[:, None, None, None]
    t = (ck * uk + cj * uj) + ci * ui
    t *= inv_l2
    np.clip(t, 0.0, 1.0, out=t)
    vk = ck - t * uk
    vj = cj - t * uj
    vi = ci - t * ui
    d = np.sqrt(vk * vk + vj * vj + vi * vi)
    # Width of the voxel's aperture along the direction from the centreline (its projection on
    # it): through the plane that is the slice thickness, so thin slices resolve thin vessels.
    w = np.abs(vk) * ak
    w += np.abs(vj) * aj
    w += np.abs(vi) * ai
    w /= np.maximum(d, 1e-3)
    np.maximum(w, min(ak, aj, ai), out=w)
    r = r0.astype(F32)[:, None, None, None] + t * (r1 - r0).astype(F32)[:, None, None, None]
    half = 0.5 * w
    occ = np.minimum(d + half, r)
    occ -= np.maximum(d - half, -r)
    occ /= w
    g, a, b, c = np.nonzero(occ > 0.02)
    values = np.minimum(occ[g, a, b, c], 1.0)
    nj, ni = shape[1], shape[2]
    lin = ((lo[g, 0] + a) * nj + (lo[g, 1] + b)) * ni + (lo[g, 2] + c)
    return lin.astype(np.int64), values.astype(F32)


def _paint(
    hu_flat: FloatArray,
    tubes: _Tubes,
    grid: _Grid,
    value: float,
    *,
    darker: bool = False,
    allowed: npt.NDArray[np.bool_] | None = None,
    mask: BoolArray | None = None,
) -> None:
    """Blend ``value`` into the voxels by occupancy. Brighter values combine by maximum, darker
    ones (``darker``: air) by minimum, so overlapping tubes do not add up."""
    combine = np.minimum if darker else np.maximum
    for lin, occ in _tube_voxels(tubes, grid):
        if allowed is not None:
            keep = allowed[lin]
            lin, occ = lin[keep], occ[keep]
        old = hu_flat[lin]
        combine.at(hu_flat, lin, old + occ * (F32(value) - old))
        if mask is not None:
            mask[lin[occ >= 0.5]] = True


# --------------------------------------------------------------------------------------------
# Mediastinal tubes: great vessels, trachea and main bronchi, oesophagus
# --------------------------------------------------------------------------------------------


class _Envelope:
    """The mediastinal pleura on each slice: the union of the cross-sections of the central tubes
    (each widened by its fat margin), blurred and thresholded, so that the lungs meet the
    mediastinum along a smooth outline: notches between neighbouring vessels narrower than about
    twice the smoothing fill in, and, unlike a sum of fields, crowded tubes do not inflate it."""

    smoothing_mm = 5.0
    threshold = 0.35

    def __init__(self, tubes: list[_Tubes]) -> None:
        self.tubes = _Tubes.concat(tubes)
        r = np.maximum(self.tubes.r0, self.tubes.r1)
        self.z_lo = np.minimum(self.tubes.p0[:, 2], self.tubes.p1[:, 2]) - r
        self.z_hi = np.maximum(self.tubes.p0[:, 2], self.tubes.p1[:, 2]) + r

    def mask(self, z: float, x: FloatArray, y: FloatArray) -> BoolArray:
        out = np.zeros((len(y), len(x)), dtype=bool)
        near = np.flatnonzero((self.z_lo <= z) & (self.z_hi >= z))
        if not len(near):
            return out
        t = self.tubes.subset(near)
        r = np.maximum(t.r0, t.r1)[:, None]
        lo = np.minimum(t.p0, t.p1)[:, :2] - r
        hi = np.maximum(t.p0, t.p1)[:, :2] + r
        pad = 3.0 * self.smoothing_mm
        j0, j1 = np.searchsorted(y, lo[:, 1].min() - pad), np.searchsorted(y, hi[:, 1].max() + pad)
        i0, i1 = np.searchsorted(x, lo[:, 0].min() - pad), np.searchsorted(x, hi[:, 0].max() + pad)
        if j1 <= j0 or i1 <= i0:
            return out
        union = np.zeros((j1 - j0, i1 - i0), dtype=F32)
        for a in range(len(t)):
            b0, b1 = np.searchsorted(y, lo[a, 1]), np.searchsorted(y, hi[a, 1])
            c0, c1 = np.searchsorted(x, lo[a, 0]), np.searchsorted(x, hi[a, 0])
            if b1 <= b0 or c1 <= c0:
                continue
            inside = _plane_capsule_distance(t, a, x[c0:c1][None, :], y[b0:b1][:, None], z) < 0
            union[b0 - j0 : b1 - j0, c0 - i0 : c1 - i0][inside] = 1.0
        sigma = self.smoothing_mm / float(x[1] - x[0])
        out[j0:j1, i0:i1] = ndi.gaussian_filter(union, sigma, truncate=3.0) > self.threshold
        return out


def _plane_capsule_distance(t: _Tubes, a: int, xs: FloatArray, ys: FloatArray, z: float) -> FloatArray:
    """Signed distance from points (xs, ys, z) to capsule ``a`` of ``t`` (negative inside)."""
    p0, u = t.p0[a], t.p1[a] - t.p0[a]
    length2 = max(float(dot(u, u)), 1e-9)
    dx, dy, dz = xs - p0[0], ys - p0[1], z - p0[2]
    s = np.clip((dx * u[0] + dy * u[1] + dz * u[2]) / length2, 0.0, 1.0)
    d = np.sqrt((dx - s * u[0]) ** 2 + (dy - s * u[1]) ** 2 + (dz - s * u[2]) ** 2)
    return (d - (t.r0[a] + s * (t.r1[a] - t.r0[a]))).astype(F32)


@dataclass
class _Hila:
    """Where the mediastinal tubes hand over to the lung trees (per side)."""

    artery: dict[str, npt.NDArray[np.float64]]
    artery_dir: dict[str, npt.NDArray[np.float64]]
    vein: dict[str, npt.NDArray[np.float64]]
    vein_dir: dict[str, npt.NDArray[np.float64]]
    bronchus: dict[str, npt.NDArray[np.float64]]  # end of the main bronchus


@dataclass
class _Mediastinum:
    vessels: dict[str, tuple[_Tubes, float]]  # name -> (tubes, carve margin mm)
    hila: _Hila
    airway_wall: _Tubes  # trachea and main bronchi, outer surface
    airway_lumen: _Tubes
    envelope: _Envelope


def _mediastinal_tubes(p: _Patient, rng: np.random.Generator, z_top: float, z_bottom: float) -> _Mediastinum:
    """Great vessels, oesophagus, trachea and main bronchi, placed around the spine and carina
    as on an atlas (left-right and front-back relations kept: aorta in front of the trachea,
    pulmonary trunk left of the ascending aorta, right pulmonary artery in front of the right
    main bronchus, left one arching over the left main bronchus)."""
    top = max(z_top, p.z_apex) + 20.0
    bottom = min(z_bottom, p.z_base) - 30.0
    zc, za, x0 = p.z_carina, p.z_arch, p.x_mid
    heart_top = p.heart_centre[2] + 0.55 * p.heart_axes[2]
    y_eso = p.y_vert - p.vert_ry - _u(rng, 8, 11)
    y_tr = y_eso - _u(rng, 17, 21)
    r_asc, r_desc, r_tr = _u(rng, 14, 17), _u(rng, 10.5, 12.5), _u(rng, 8.0, 9.5)
    x_asc, y_asc = x0 - _u(rng, 2, 8), y_tr - _u(rng, 32, 40)
    x_desc = x0 + _u(rng, 17, 23)
    y_desc = p.y_vert - 0.5 * p.vert_ry - r_desc - 3.0
    x_svc, y_svc = x_asc - r_asc - _u(rng, 11, 15), y_asc + _u(rng, 2, 10)

    aorta = _polyline(
        [
            [x_asc + 10, y_asc - 2, heart_top - 40],
            [x_asc, y_asc, heart_top - 5],
            [x_asc, y_asc + 2, za - 14],
            [x0 - 2, y_asc + 12, za],
            [x0 + 14, y_tr - 4, za + 4],
            [x_desc, y_desc - 4, za - 6],
            [x_desc, y_desc, za - 30],
            [x_desc - 5, y_desc - 3, p.z_dome_left - 20],
            [x0 + 5, y_desc - 8, bottom],
        ],
        [r_asc, r_asc, r_asc * 0.95, r_asc * 0.9, 13.0, r_desc + 1, r_desc, r_desc, r_desc * 0.9],
    )
    supra_aortic = [
        _polyline(
            [[x0 - 2, y_asc + 10, za + 6], [x0 - 14, y_tr - 22, za + 40], [x0 - 24, y_tr - 18, top]],
            [7, 6.5, 6],
        ),
        _polyline(
            [[x0 + 7, y_tr - 12, za + 8], [x0 + 11, y_tr - 14, za + 40], [x0 + 14, y_tr - 12, top]],
            [4.5, 4.2, 4],
        ),
        _polyline(
            [[x0 + 16, y_tr - 4, za + 8], [x0 + 26, y_tr + 2, za + 40], [x0 + 36, y_tr + 8, top]],
            [5.5, 5.2, 5],
        ),
    ]
    systemic_veins = [
        _polyline(
            [[x_svc + 2, y_svc, top], [x_svc, y_svc, za], [x_svc + 4, y_svc + 4, heart_top - 20]], [8, 10, 11]
        ),
        _polyline(
            [[x0 + 42, y_asc - 6, za + 45], [x0 + 10, y_asc - 8, za + 30], [x_svc + 2, y_svc, za + 15]],
            [6, 6, 7],
        ),
        _polyline(
            [
                [x0 - 8, p.y_vert - p.vert_ry + 4, bottom],
                [x0 - 9, p.y_vert - p.vert_ry + 2, zc - 10],
                [x0 - 16, y_tr + 2, zc + 8],
                [x_svc + 3, y_svc + 6, zc + 12],
            ],
            [4, 4, 4.5, 5],
        ),
        _polyline(
            [[x0 - 22, p.y_body + 5, p.heart_centre[2] - 20], [x0 - 24, p.y_body + 12, bottom]], [12, 13]
        ),
    ]

    bifurcation = np.array([x0 + 15, y_tr - 17, zc - 12])
    rpa_mid = np.array([x0 - 12, y_tr - 19, zc - 17])
    lpa_mid = np.array([x0 + 33, y_tr - 6, zc - 2])
    hilum_r = np.array([x0 - _u(rng, 48, 56), y_tr - _u(rng, 4, 10), zc - _u(rng, 20, 28)])
    hilum_l = np.array([x0 + _u(rng, 46, 54), y_tr + _u(rng, 2, 10), zc - _u(rng, 10, 16)])
    pulmonary_arteries = [
        _polyline(
            [[x0 + 28, y_asc - 8, heart_top - 25], [x0 + 24, y_asc + 2, heart_top], bifurcation],
            [13.5, 13.5, 12.5],
        ),
        _polyline([bifurcation, rpa_mid, hilum_r], [11, 10, 8.5]),
        _polyline([bifurcation, lpa_mid, hilum_l], [11, 10, 8.5]),
    ]
    atrium = np.array([x0 + 8, y_eso - _u(rng, 22, 28), zc - _u(rng, 40, 50)])
    vein_r = np.array([x0 - _u(rng, 42, 50), atrium[1] - _u(rng, 0, 10), atrium[2] - _u(rng, 5, 15)])
    vein_l = np.array([x0 + _u(rng, 42, 50), atrium[1] - _u(rng, -5, 5), atrium[2] - _u(rng, 0, 10)])
    pulmonary_veins = [
        _Tubes(atrium[None] - [8, 0, 0], atrium[None] + [8, 0, 0], np.array([19.0]), np.array([19.0])),
        _polyline([atrium, vein_r], [9, 7.5], 2),
        _polyline([atrium, vein_l], [9, 7.5], 2),
    ]
    esophagus = _polyline(
        [
            [x0 + 2, y_eso, top],
            [x0 + 5, y_eso, zc],
            [x0 + 10, y_desc - 16, p.z_dome_left - 10],
            [x0 + 30, y_desc - 25, p.z_dome_left - 35],
        ],
        [7.5, 7.5, 8, 8],
    )

    carina = np.array([x0 + 1, y_tr, zc])
    bronchus_r = np.array([x0 - 28, y_tr + 5, zc - 17])
    bronchus_l = np.array([x0 + 34, y_tr + 7, zc - 22])
    airways = [
        _polyline([[x0, y_tr - 6, top], [x0 + 1, y_tr - 2, za], carina], [r_tr, r_tr, r_tr * 0.9]),
        _polyline([carina, bronchus_r], [r_tr * 0.8, 6.5], 3),
        _polyline([carina, bronchus_l], [r_tr * 0.75, 5.5], 3),
    ]
    lumen = _Tubes.concat(airways)
    wall = _Tubes(lumen.p0, lumen.p1, lumen.r0 + 1.8, lumen.r1 + 1.8)
    hila = _Hila(
        artery={"right": hilum_r, "left": hilum_l},
        artery_dir={"right": _unit(hilum_r - rpa_mid), "left": _unit(hilum_l - lpa_mid)},
        vein={"right": vein_r, "left": vein_l},
        vein_dir={"right": _unit(vein_r - atrium), "left": _unit(vein_l - atrium)},
        bronchus={"right": bronchus_r, "left": bronchus_l},
    )
    groups = {
        "aorta": ([aorta], 4.0),
        "supra-aortic": (supra_aortic, 2.0),
        "systemic veins": (systemic_veins, 2.5),
        "pulmonary arteries": (pulmonary_arteries, 3.0),
        "pulmonary veins": (pulmonary_veins, 1.5),
        "esophagus": ([esophagus], 2.5),
        "airways": (airways, 3.5),
    }
    envelope = _Envelope(
        [
            _Tubes(t.p0, t.p1, t.r0 + margin, t.r1 + margin)
            for pieces, margin in groups.values()
            for t in pieces
        ]
    )
    vessels = {
        name: (_Tubes.concat(pieces), margin)
        for name, (pieces, margin) in groups.items()
        if name != "airways"
    }
    return _Mediastinum(vessels, hila, wall, lumen, envelope)


def _unit(v: npt.ArrayLike) -> npt.NDArray[np.float64]:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(norm(v)[..., None], 1e-12)


# --------------------------------------------------------------------------------------------
# Pulmonary trees
# --------------------------------------------------------------------------------------------


@dataclass
class _Tree:
    start: npt.NDArray[np.float64]  # (m, 3)
    end: npt.NDArray[np.float64]
    parent: npt.NDArray[np.int64]  # -1 for the root's children
    supplied: npt.NDArray[np.int64]  # points supplied (leaves downstream)
    level: npt.NDArray[np.int64]

    def radii(self, leaf_radius: float, exponent: float) -> npt.NDArray[np.float64]:
        """Murray-like power law in the points supplied, steepened towards the hilum: the tree's
        leaves stand for the sub-millimetre vessels, below which real trees branch many more
        times, so one exponent cannot give both the thin periphery and the 6-8 mm lobar arteries.
        The constants put the lobar, segmental, subsegmental and peripheral radii near 7, 2.7,
        1.4 and 0.3 mm, and were tuned so that the density and brightness of vessel cross-sections
        on slices come near those of the LIDC cases."""
        n = self.supplied.astype(np.float64)
        hilar = 1.0 + 2.0 * np.sqrt(n / n.max())
        return leaf_radius * power(n, 1.0 / exponent) * hilar


def _sample_lung_points(
    lobes: npt.NDArray[np.uint8], grid: _Grid, side_lobes: tuple[int, ...], n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """``n`` points uniformly inside the given lobes (LPS mm) and their lobe labels."""
    spacing = np.asarray(grid.spacing)
    points, labels = [], []
    need = n
    for _ in range(20):
        cand = rng.uniform(0, 1, (4 * need + 100, 3)) * (np.asarray(grid.shape) - 1)
        idx = np.rint(cand).astype(np.int64)
        lab = lobes[idx[:, 0], idx[:, 1], idx[:, 2]]
        keep = np.isin(lab, side_lobes)
        kji_mm = cand[keep] * spacing
        xyz = np.stack(
            [kji_mm[:, 2] + grid.origin[0], kji_mm[:, 1] + grid.origin[1], kji_mm[:, 0] + grid.origin[2]],
            axis=1,
        )
        points.append(xyz[:need])
        labels.append(lab[keep][:need].astype(np.int64))
        need -= len(points[-1])
        if need <= 0:
            break
    return np.concatenate(points), np.concatenate(labels)


def _grow_tree(
    root: npt.NDArray[np.float64],
    root_dir: npt.NDArray[np.float64],
    points: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    rng: np.random.Generator,
    min_length: float = 1.5,
) -> _Tree:
    """Volume-filling branching, one generation at a time (see the module docstring)."""
    starts, ends, parents, supplied, levels = [], [], [], [], []
    n_branches = 0
    # Generation 0: one branch per lobe, from the hilum towards the lobe's centroid.
    _, owner = np.unique(labels, return_inverse=True)
    owner = owner.ravel()
    m = int(owner.max()) + 1
    origin = np.repeat(root[None], m, axis=0)
    parent_dir = np.repeat(root_dir[None], m, axis=0)
    parent_id = np.full(m, -1, dtype=np.int64)
    parent_counts = np.full(m, len(points))
    level = 0
    while len(points) and m:
        counts = np.bincount(owner, minlength=m)
        centroid = np.stack([np.bincount(owner, points[:, a], minlength=m) for a in range(3)], 1)
        centroid /= np.maximum(counts, 1)[:, None]
        share = counts / parent_counts
        end, terminal = _branch_ends(origin, parent_dir, centroid, counts, share, rng, min_length, level)
        ids = n_branches + np.arange(m)
        starts.append(origin)
        ends.append(end)
        parents.append(parent_id)
        supplied.append(counts)
        levels.append(np.full(m, level))
        n_branches += m
        # Points of terminal branches are served; the others split in two.
        alive = ~terminal[owner]
        points, owner = points[alive], owner[alive]
        if not len(points):
            break
        direction = _unit(end - origin)
        side = _split_sides(points, owner, centroid, direction, m, rng)
        child_key = owner * 2 + side
        keys, owner = np.unique(child_key, return_inverse=True)
        owner = owner.ravel()
        from_branch = keys // 2
        origin = end[from_branch]
        parent_dir = direction[from_branch]
        parent_id = ids[from_branch]
        parent_counts = counts[from_branch]
        m = len(keys)
        level += 1
    return _Tree(
        np.concatenate(starts),
        np.concatenate(ends),
        np.concatenate(parents),
        np.concatenate(supplied),
        np.concatenate(levels),
    )


def _branch_ends(
    origin: npt.NDArray[np.float64],
    parent_dir: npt.NDArray[np.float64],
    centroid: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    share: npt.NDArray[np.float64],
    rng: np.random.Generator,
    min_length: float,
    level: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Each branch heads for its points' centroid and covers 35-50 % of the way (all of it when it
    supplies one point). It turns from its parent's direction by no more than the angle of
    Murray's minimum-work bifurcation for its share of the flow: the larger child nearly goes
    straight on, the smaller one leaves at a wide angle."""
    to_c = centroid - origin
    dist = norm(to_c)
    direction = _unit(to_c)
    if level > 0:
        cosang = np.clip(np.sum(direction * parent_dir, axis=1), -1.0, 1.0)
        f = np.clip(share, 1e-3, 1.0)
        cos_murray = (1 + power(f, 4 / 3) - power(1 - f, 4 / 3)) / (2 * power(f, 2 / 3))
        angle = np.minimum(arccos(cosang), arccos(np.clip(cos_murray, -1.0, 1.0)))
        angle += rng.normal(0, np.radians(4.0), len(angle))
        perp = direction - cosang[:, None] * parent_dir
        perp = np.where((norm(perp) > 1e-6)[:, None], _unit(perp), direction)
        direction = cos(angle)[:, None] * parent_dir + sin(angle)[:, None] * perp
    fraction = rng.uniform(0.35, 0.5, len(dist))
    length = fraction * dist
    terminal = (counts <= 1) | (length < min_length)
    length = np.where(terminal, np.maximum(dist, min_length), length)
    end = origin + direction * length[:, None]
    wobble = rng.normal(0, 0.03, end.shape) * length[:, None]
    return end + wobble, terminal


def _split_sides(
    points: npt.NDArray[np.float64],
    owner: npt.NDArray[np.int64],
    centroid: npt.NDArray[np.float64],
    direction: npt.NDArray[np.float64],
    m: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.int64]:
    """Split each branch's points by a plane that contains the branch direction and is normal to
    their widest spread across the branch, placed off-centre so that one side gets 15-40 % of
    them: pulmonary vessels branch asymmetrically, a trunk running on and giving off side
    branches, which keeps the vessels long and continuous on a slice."""
    q = points - centroid[owner]
    d = direction[owner]
    q -= np.sum(q * d, axis=1, keepdims=True) * d
    cov = np.empty((m, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(owner, q[:, a] * q[:, b], minlength=m)
    normal = principal_axes(cov + 1e-9 * np.eye(3))
    # Either side may get the smaller share: principal_axes' sign leans one way, and with that lean
    # the trees grew 5 % longer (docs/pipeline.md, "What limits the CPM", item 17).
    normal *= np.where(rng.random(m) < 0.5, -1.0, 1.0)[:, None]
    projection = np.sum(q * normal[owner], axis=1)
    counts = np.bincount(owner, minlength=m)
    order = np.lexsort((projection, owner))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(start, counts)
    minor = rng.uniform(0.15, 0.4, m)
    cut = np.clip(np.rint(minor * counts), 1, np.maximum(counts - 1, 1))
    return (rank >= cut[owner]).astype(np.int64)


def _airway_tree(
    tree: _Tree,
    radii: npt.NDArray[np.float64],
    root: npt.NDArray[np.float64],
    min_artery_radius: float,
    rng: np.random.Generator,
) -> tuple[_Tubes, _Tubes]:
    """Bronchi alongside the larger arteries (the bronchovascular bundle): each artery branch with
    radius above ``min_artery_radius`` gets a bronchus, offset sideways by a direction carried from
    parent to child; the lobar bronchi start at ``root``, the end of the main bronchus.
    Returns (outer wall, lumen)."""
    root_offset = _unit(root - tree.start[0])
    keep = radii >= min_artery_radius
    idx = np.flatnonzero(keep)  # parents come before children
    offset_dir = np.zeros((len(radii), 3))
    direction = _unit(tree.end - tree.start)
    for b in idx:
        ref = root_offset if tree.parent[b] < 0 else offset_dir[tree.parent[b]]
        d = direction[b]
        v = ref - dot(ref, d) * d
        offset_dir[b] = _unit(v) if norm(v) > 1e-6 else _unit(np.cross(d, [0.0, 0.0, 1.0]))
    lumen_r = radii[idx] * rng.uniform(0.65, 0.9, len(idx))
    wall = 0.2 * lumen_r + 0.3
    gap = radii[idx] + lumen_r + wall + 0.4
    parent = tree.parent[idx]
    start_dir = np.where((parent >= 0)[:, None], offset_dir[np.maximum(parent, 0)], root_offset[None])
    p0 = np.where((parent >= 0)[:, None], tree.start[idx] + start_dir * gap[:, None], root[None])
    p1 = tree.end[idx] + offset_dir[idx] * gap[:, None]
    lumen = _Tubes(p0, p1, lumen_r, lumen_r)
    outer = _Tubes(p0, p1, lumen_r + wall, lumen_r + wall)
    return outer, lumen


# --------------------------------------------------------------------------------------------
# Fissure sample points
# --------------------------------------------------------------------------------------------


def _fissure_samples(
    p: _Patient, lobes: npt.NDArray[np.uint8], grid: _Grid, step: float = 4.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Points on the fissure surfaces where they actually separate the expected lobes."""
    o, sp, shape = np.asarray(grid.origin), np.asarray(grid.spacing), np.asarray(grid.shape)
    xs = np.arange(o[0], o[0] + sp[2] * shape[2], step)
    ys = np.arange(o[1], o[1] + sp[1] * shape[1], step)
    xg, yg = (a.astype(F32) for a in np.meshgrid(xs, ys))
    pairs = {
        "right_oblique": ((RIGHT_UPPER, RIGHT_MIDDLE), (RIGHT_LOWER,)),
        "right_horizontal": ((RIGHT_UPPER,), (RIGHT_MIDDLE,)),
        "left_oblique": ((LEFT_UPPER,), (LEFT_LOWER,)),
    }
    all_points, all_normals = [], []
    for name, (above, below) in pairs.items():
        c = p.fissures[name]
        zg = _fissure_z(c, xg, yg)
        gx, gy = _fissure_gradient(c, xg, yg)
        pts = np.stack([xg.ravel(), yg.ravel(), zg.ravel()], 1).astype(np.float64)
        normals = _unit(np.stack([-gx.ravel(), -gy.ravel(), np.ones(gx.size)], 1).astype(np.float64))
        up = _lobe_at(lobes, grid, pts + 2.5 * normals)
        down = _lobe_at(lobes, grid, pts - 2.5 * normals)
        ok = np.isin(up, above) & np.isin(down, below)
        all_points.append(pts[ok])
        all_normals.append(normals[ok])
    return np.concatenate(all_points), np.concatenate(all_normals)


def _lobe_at(
    lobes: npt.NDArray[np.uint8], grid: _Grid, xyz: npt.NDArray[np.float64]
) -> npt.NDArray[np.uint8]:
    kji = np.rint(grid.to_kji_mm(xyz) / np.asarray(grid.spacing)).astype(np.int64)
    inside = np.all((kji >= 0) & (kji < np.asarray(grid.shape)), axis=1)
    out = np.zeros(len(xyz), dtype=np.uint8)
    k = kji[inside]
    out[inside] = lobes[k[:, 0], k[:, 1], k[:, 2]]
    return out


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


_SIDES = {"right": (RIGHT_UPPER, RIGHT_MIDDLE, RIGHT_LOWER), "left": (LEFT_UPPER, LEFT_LOWER)}


def build_chest(acq: Acquisition, rng: np.random.Generator) -> ChestAnatomy:
    """The noiseless chest of a patient drawn from ``rng``, on ``acq``'s grid, PSF applied."""
    clock = _Clock()
    patient = _sample_patient(acq, rng)
    spacing, origin = acq.geometry()
    grid = _Grid(acq.shape, spacing, origin, (acq.slice_thickness, spacing[1], spacing[2]))
    z_first = origin[2]
    z_last = origin[2] + spacing[0] * (acq.n_slices - 1)
    mediastinum = _mediastinal_tubes(patient, rng, z_last, z_first)
    renderer = _SliceRenderer(patient, acq, rng, mediastinum.envelope)
    hu = np.empty(acq.shape, dtype=F32)
    lobes = np.empty(acq.shape, dtype=np.uint8)
    body = np.empty(acq.shape, dtype=bool)

    def render(k0: int, k1: int) -> None:
        for k in range(k0, k1):
            renderer.render(float(renderer.z[k]), hu[k], lobes[k], body[k])

    list(_ordered_map(render, [(k, min(k + 4, acq.n_slices)) for k in range(0, acq.n_slices, 4)], ahead=8))
    clock.lap("slices")
    # The slices were sampled at their centres: give them the slice profile now. The tubes that
    # follow are averaged over the slice thickness as they are drawn; the kernel blur comes last.
    body_box = hu[:, renderer.crop[0], renderer.crop[1]]  # air outside it stays air
    apply_through_plane_resolution(body_box, acq)
    clock.lap("resolution")

    vessel_mask = np.zeros(acq.shape, dtype=bool)
    airway_mask = np.zeros(acq.shape, dtype=bool)
    segments = _paint_mediastinum(patient, mediastinum, grid, hu, lobes, vessel_mask)
    clock.lap("mediastinum")
    segments += _paint_lung_trees(patient, mediastinum, grid, hu, lobes, vessel_mask, airway_mask, rng, clock)
    apply_in_plane_resolution(body_box, acq)
    clock.lap("resolution")
    points, normals = _fissure_samples(patient, lobes, grid)
    clock.lap("fissures")
    return ChestAnatomy(
        volume=Volume(hu=hu, spacing=spacing, origin=origin),
        lobes=lobes,
        vessels=segments,
        fissure_points_mm=points,
        fissure_normals=normals,
        vessel_mask=vessel_mask,
        airway_mask=airway_mask,
        body_mask=body,
        landmarks_mm={
            "lung_apex_z": patient.z_apex,
            "carina_z": patient.z_carina,
            "aortic_arch_z": patient.z_arch,
            "right_dome_z": patient.z_dome_right,
            "left_dome_z": patient.z_dome_left,
            "lung_base_z": patient.z_base,
        },
        blood_hu=patient.blood_hu,
        timings_s=clock.laps,
    )


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def _paint_mediastinum(
    p: _Patient,
    m: _Mediastinum,
    grid: _Grid,
    hu: FloatArray,
    lobes: npt.NDArray[np.uint8],
    vessel_mask: BoolArray,
) -> list[VesselSegment]:
    hu_flat = hu.reshape(-1)
    segments: list[VesselSegment] = []
    for name, (tubes, _) in m.vessels.items():
        if name != "esophagus":
            segments += _segments(tubes, name)
    for name, (tubes, _) in m.vessels.items():
        value = 0.6 * p.muscle_hu if name == "esophagus" else p.blood_hu
        hilar = vessel_mask.reshape(-1) if name.startswith("pulmonary") else None
        _paint(hu_flat, tubes, grid, value, mask=hilar)
    return segments


def _paint_lung_trees(
    p: _Patient,
    m: _Mediastinum,
    grid: _Grid,
    hu: FloatArray,
    lobes: npt.NDArray[np.uint8],
    vessel_mask: BoolArray,
    airway_mask: BoolArray,
    rng: np.random.Generator,
    clock: _Clock,
) -> list[VesselSegment]:
    """Grow an arterial and a venous tree in each lung, paint them, then the airways."""
    hu_flat, lung_flat = hu.reshape(-1), lobes.reshape(-1) > 0
    segments: list[VesselSegment] = []
    walls, lumens = [m.airway_wall], [m.airway_lumen]
    for side, side_lobes in _SIDES.items():
        for kind, root, root_dir in (
            ("artery", m.hila.artery[side], m.hila.artery_dir[side]),
            ("vein", m.hila.vein[side], m.hila.vein_dir[side]),
        ):
            n = int(p.tree_points * (1.1 if side == "right" else 0.9))
            points, labels = _sample_lung_points(lobes, grid, side_lobes, n, rng)
            tree = _grow_tree(root, root_dir, points, labels, rng)
            clock.lap("tree growth")
            radii = np.minimum(tree.radii(p.leaf_radius, p.murray_exponent), 8.5)
            # Taper: each branch starts between its parent's radius and its own.
            parent_r = np.where(tree.parent >= 0, radii[np.maximum(tree.parent, 0)], 8.5)
            tubes = _bend(_Tubes(tree.start, tree.end, np.sqrt(parent_r * radii), radii), rng)
            segments += _segments(tubes, kind)
            # Inside the lungs only: where a branch crosses the mediastinum it would show as a
            # stray vessel in the fat; the hilar vessels come out of the mediastinal outline.
            _paint(hu_flat, tubes, grid, p.blood_hu, allowed=lung_flat, mask=vessel_mask.reshape(-1))
            if kind == "artery":
                wall, lumen = _airway_tree(tree, radii, m.hila.bronchus[side], 1.5, rng)
                walls.append(wall)
                lumens.append(lumen)
            clock.lap("tree painting")
    _paint(hu_flat, _Tubes.concat(walls), grid, 0.4 * p.muscle_hu)
    _paint(hu_flat, _Tubes.concat(lumens), grid, AIR_HU, darker=True, mask=airway_mask.reshape(-1))
    clock.lap("airways")
    return segments


def _bend(tubes: _Tubes, rng: np.random.Generator, min_length: float = 5.0) -> _Tubes:
    """Split each branch longer than ``min_length`` in three pieces along a gentle bow (up to ~7 %
    of its length sideways): real vessels curve. The branch ends stay where they were."""
    d = tubes.p1 - tubes.p0
    length = norm(d)
    long = length > min_length
    if not long.any():
        return tubes
    short = tubes.subset(~long)
    t = tubes.subset(long)
    d = d[long]
    side = _unit(np.cross(d, rng.normal(size=d.shape)))
    bow = (rng.uniform(-0.08, 0.08, len(d)) * length[long])[:, None] * side
    knots = [t.p0, t.p0 + d / 3 + 0.866 * bow, t.p0 + 2 * d / 3 + 0.866 * bow, t.p1]
    radius = [t.r0 + (t.r1 - t.r0) * f for f in (0.0, 1 / 3, 2 / 3, 1.0)]
    pieces = [_Tubes(knots[a], knots[a + 1], radius[a], radius[a + 1]) for a in range(3)]
    return _Tubes.concat([short, *pieces])


def _segments(tubes: _Tubes, kind: str) -> list[VesselSegment]:
    return [
        VesselSegment(tubes.p0[a], tubes.p1[a], float(tubes.r0[a]), float(tubes.r1[a]), kind)
        for a in range(len(tubes))
    ]


def generate_chest(seed: int, n_slices: int | None = None) -> tuple[ChestAnatomy, Acquisition]:
    """A random acquisition and chest for ``seed``; noise is not added (nodules go in first)."""
    rng = np.random.default_rng(seed)
    acq = sample_acquisition(rng, n_slices)
    return build_chest(acq, rng), acq
