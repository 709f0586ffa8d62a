"""Write a :class:`~models.volume.Volume` as a standard DICOM CT series (CT Image Storage).

One file per slice k of the volume, Explicit VR Little Endian, with every module of the
CT Image IOD that applies (Patient, General Study, General Series, Frame of Reference,
General Equipment, General Acquisition, General Image, Image Plane, Image Pixel, CT Image,
VOI LUT, SOP Common).

Pixel encoding: stored values are signed 16-bit (PixelRepresentation 1, BitsStored 16)
with RescaleSlope 1 and RescaleIntercept -1024, so ``HU = stored - 1024`` and air is
stored as 0. This is the layout most CT scanners write, and it validates cleanly.
HU are rounded half-to-even (``numpy.rint``) and clipped to the representable range
[-33792, 31743], which holds every physical CT value.

Synthetic data must never pass for a real patient: the identity is the caller's
(e.g. ``SYNTHETIC^CASE 0042``), and every instance also carries
PatientIdentityRemoved YES, a De-identification Method and an Image Comment that say so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds, validate_value

from models.volume import Volume

RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1
_INT16 = np.iinfo(np.int16)
MIN_HU = _INT16.min * RESCALE_SLOPE + RESCALE_INTERCEPT
MAX_HU = _INT16.max * RESCALE_SLOPE + RESCALE_INTERCEPT

SYNTHETIC_NOTICE = "SYNTHETIC IMAGE - NOT FROM A REAL PATIENT - NOT FOR CLINICAL USE"
IMPLEMENTATION_VERSION_NAME = "CADNODE_010"
# Tiny direction-cosine components are floating-point noise (e.g. 6e-17 from a rotation);
# writing them as exact zeros keeps the header readable and changes nothing measurable.
_COSINE_NOISE = 1e-12


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what the series claims to be. Synthetic cases must say so in the name and ID."""

    patient_name: str
    patient_id: str
    study_description: str
    series_description: str
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    accession_number: str = ""
    study_id: str = "1"
    series_number: int = 1
    acquisition_number: int = 1
    derivation_description: str | None = None
    patient_sex: str = "O"
    patient_birth_date: str = ""
    patient_position: str = "FFS"
    body_part_examined: str = "CHEST"
    # None: the time of writing. Pass a fixed value for byte-identical, reproducible output.
    study_datetime: dt.datetime | None = None
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    deidentification_method: str = "Synthetic data; no real patient identity"


@dataclass(frozen=True)
class AcquisitionParameters:
    """What the scanner is said to have done; written into the CT Image and Equipment modules.

    Optional values that are None are left out (they are type 3).
    """

    slice_thickness_mm: float
    kvp: float
    convolution_kernel: str
    manufacturer: str = "cad-node synthetic"
    model_name: str = "cad-node synthetic CT"
    software_versions: str = "cad-node 0.1.0"
    institution_name: str | None = None
    tube_current_ma: float | None = None
    exposure_time_ms: float | None = None
    ctdi_vol_mgy: float | None = None
    # The phantom CTDIvol refers to: "BODY" (32 cm) or "HEAD" (16 cm).
    ctdi_phantom: str = "BODY"
    spiral_pitch_factor: float | None = None
    scan_options: str | None = "HELICAL"
    gantry_tilt_deg: float = 0.0
    # None: the in-plane field of view of the volume.
    reconstruction_diameter_mm: float | None = None
    window_centre: float = -600.0
    window_width: float = 1500.0
    window_explanation: str = "LUNG"


def write_ct_series(
    volume: Volume,
    out_dir: Path,
    identity: SeriesIdentity,
    acquisition: AcquisitionParameters,
    *,
    uid_seed: str | None = None,
) -> list[Path]:
    """Write one CT Image Storage file per slice of ``volume`` into ``out_dir``.

    ``out_dir`` must be absent or empty, so that a series is never mixed with an older one.
    With ``uid_seed`` every generated UID is a function of the seed (same seed, same UIDs);
    UIDs given in ``identity`` are used as they are. With a seed and a fixed
    ``identity.study_datetime`` the files are byte-identical from run to run.
    Returns the paths in slice order.
    """
    when = identity.study_datetime or dt.datetime.now()
    uids = _SeriesUids.make(identity, uid_seed)
    shared = _shared_dataset(volume, identity, acquisition, uids, when)  # validates before writing
    geometry = _SliceGeometry.of(volume)
    _check_empty_dir(out_dir)

    paths = []
    for k in range(volume.shape[0]):
        sop_uid = _uid(uid_seed, uids.series, "image", str(k))
        ds = _slice_dataset(shared, volume, geometry, k, sop_uid)
        path = out_dir / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def hu_to_stored(hu: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    """HU to the stored little-endian int16 values; rejects NaN and infinities."""
    if not np.all(np.isfinite(hu)):
        raise ValueError("the volume holds NaN or infinite HU; they have no DICOM encoding")
    stored = (np.rint(hu) - RESCALE_INTERCEPT) / RESCALE_SLOPE
    return np.clip(stored, _INT16.min, _INT16.max).astype("<i2")


@dataclass(frozen=True)
class _SeriesUids:
    study: str
    series: str
    frame_of_reference: str

    @classmethod
    def make(cls, identity: SeriesIdentity, seed: str | None) -> _SeriesUids:
        return cls(
            study=identity.study_instance_uid or _uid(seed, "study"),
            series=identity.series_instance_uid or _uid(seed, "series"),
            frame_of_reference=identity.frame_of_reference_uid or _uid(seed, "frame-of-reference"),
        )


def _uid(seed: str | None, *parts: str) -> str:
    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[seed, *parts]))


@dataclass(frozen=True)
class _SliceGeometry:
    """Per-slice positions and the shared orientation, all in LPS mm."""

    positions: npt.NDArray[np.float64]  # (n_slices, 3)
    row_cosine: npt.NDArray[np.float64]  # direction of increasing column index i
    column_cosine: npt.NDArray[np.float64]  # direction of increasing row index j
    slice_locations: npt.NDArray[np.float64]

    @classmethod
    def of(cls, volume: Volume) -> _SliceGeometry:
        n = volume.shape[0]
        kji = np.zeros((n, 3))
        kji[:, 0] = np.arange(n)
        positions = volume.index_to_patient(kji)
        row_cosine = _clean_cosines(volume.direction[:, 2])
        column_cosine = _clean_cosines(volume.direction[:, 1])
        normal = np.cross(row_cosine, column_cosine)
        return cls(positions, row_cosine, column_cosine, positions @ normal)


def _clean_cosines(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.where(np.abs(v) < _COSINE_NOISE, 0.0, v)


def _ds(value: float) -> str:
    # + 0.0 turns -0.0 into 0.0; format_number_as_ds keeps the value within DS's 16 characters.
    return format_number_as_ds(float(value) + 0.0)


def _ds_list(values: Sequence[float] | npt.NDArray[np.float64]) -> list[str]:
    return [_ds(v) for v in values]


def _checked(vr: str, value: str) -> str:
    """Raise on a value that the VR cannot hold, instead of writing an invalid file."""
    validate_value(vr, value, config.RAISE)
    return value


def _check_empty_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; a series is written into an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _shared_dataset(
    volume: Volume,
    identity: SeriesIdentity,
    acquisition: AcquisitionParameters,
    uids: _SeriesUids,
    when: dt.datetime,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    _add_patient(ds, identity)
    _add_study_and_series(ds, identity, uids, when)
    _add_equipment(ds, acquisition)
    _add_image(ds, identity, when)
    _add_image_pixel(ds, volume)
    _add_ct_image(ds, volume, acquisition)
    return ds


def _add_patient(ds: Dataset, identity: SeriesIdentity) -> None:
    ds.PatientName = _checked("PN", identity.patient_name)
    ds.PatientID = _checked("LO", identity.patient_id)
    ds.PatientBirthDate = _checked("DA", identity.patient_birth_date)
    ds.PatientSex = _checked("CS", identity.patient_sex)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _checked("LO", identity.deidentification_method)


def _add_study_and_series(
    ds: Dataset, identity: SeriesIdentity, uids: _SeriesUids, when: dt.datetime
) -> None:
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyInstanceUID = _checked("UI", uids.study)
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = _checked("SH", identity.study_id)
    ds.AccessionNumber = _checked("SH", identity.accession_number)
    ds.StudyDescription = _checked("LO", identity.study_description)

    ds.Modality = "CT"
    ds.SeriesInstanceUID = _checked("UI", uids.series)
    ds.SeriesNumber = identity.series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = _checked("LO", identity.series_description)
    ds.BodyPartExamined = _checked("CS", identity.body_part_examined)
    ds.PatientPosition = _checked("CS", identity.patient_position)

    ds.FrameOfReferenceUID = _checked("UI", uids.frame_of_reference)
    ds.PositionReferenceIndicator = ""


def _add_equipment(ds: Dataset, acquisition: AcquisitionParameters) -> None:
    ds.Manufacturer = _checked("LO", acquisition.manufacturer)
    if acquisition.institution_name is not None:
        ds.InstitutionName = _checked("LO", acquisition.institution_name)
    ds.ManufacturerModelName = _checked("LO", acquisition.model_name)
    ds.SoftwareVersions = _checked("LO", acquisition.software_versions)


def _add_image(ds: Dataset, identity: SeriesIdentity, when: dt.datetime) -> None:
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.ImageType = [_checked("CS", value) for value in identity.image_type]
    ds.AcquisitionNumber = identity.acquisition_number
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    if identity.derivation_description is not None:
        ds.DerivationDescription = _checked("ST", identity.derivation_description)
    ds.ImageComments = SYNTHETIC_NOTICE
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _add_image_pixel(ds: Dataset, volume: Volume) -> None:
    _, rows, columns = volume.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = _ds_list(volume.spacing[1:])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = _ds(RESCALE_SLOPE)
    ds.RescaleType = "HU"


def _add_ct_image(ds: Dataset, volume: Volume, acquisition: AcquisitionParameters) -> None:
    ds.SliceThickness = _ds(acquisition.slice_thickness_mm)
    ds.SpacingBetweenSlices = _ds(volume.spacing[0])
    ds.KVP = _ds(acquisition.kvp)
    ds.ReconstructionDiameter = _ds(acquisition.reconstruction_diameter_mm or _field_of_view_mm(volume))
    ds.GantryDetectorTilt = _ds(acquisition.gantry_tilt_deg)
    if acquisition.scan_options is not None:
        ds.ScanOptions = _checked("CS", acquisition.scan_options)
    if acquisition.exposure_time_ms is not None:
        ds.ExposureTime = round(acquisition.exposure_time_ms)
    if acquisition.tube_current_ma is not None:
        ds.XRayTubeCurrent = round(acquisition.tube_current_ma)
    ds.ConvolutionKernel = _checked("SH", acquisition.convolution_kernel)
    if acquisition.spiral_pitch_factor is not None:
        ds.SpiralPitchFactor = acquisition.spiral_pitch_factor
    if acquisition.ctdi_vol_mgy is not None:
        ds.CTDIvol = acquisition.ctdi_vol_mgy
        ds.CTDIPhantomTypeCodeSequence = [_ctdi_phantom_code(acquisition.ctdi_phantom)]
    ds.WindowCenter = _ds(acquisition.window_centre)
    ds.WindowWidth = _ds(acquisition.window_width)
    ds.WindowCenterWidthExplanation = _checked("LO", acquisition.window_explanation)


_CTDI_PHANTOMS = {
    "BODY": ("113691", "IEC Body Dosimetry Phantom"),
    "HEAD": ("113690", "IEC Head Dosimetry Phantom"),
}


def _ctdi_phantom_code(phantom: str) -> Dataset:
    if phantom not in _CTDI_PHANTOMS:
        raise ValueError(f"CTDI phantom must be one of {sorted(_CTDI_PHANTOMS)}, got {phantom!r}")
    value, meaning = _CTDI_PHANTOMS[phantom]
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = meaning
    return code


def _field_of_view_mm(volume: Volume) -> float:
    _, rows, columns = volume.shape
    return max(rows * volume.spacing[1], columns * volume.spacing[2])


def _slice_dataset(
    shared: Dataset, volume: Volume, geometry: _SliceGeometry, k: int, sop_uid: str
) -> Dataset:
    ds = Dataset()
    # Shallow: the shared elements are never modified, so the slices can hold the same objects.
    ds.update(shared)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = _ds_list(geometry.positions[k])
    ds.ImageOrientationPatient = _ds_list([*geometry.row_cosine, *geometry.column_cosine])
    ds.SliceLocation = _ds(geometry.slice_locations[k])
    # Explicit OW: pixel data's VR is "OB or OW" in the dictionary, resolved here once, not at write.
    ds.add_new(0x7FE00010, "OW", hu_to_stored(volume.hu[k]).tobytes())
    ds.file_meta = _file_meta(sop_uid)
    return ds


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta
