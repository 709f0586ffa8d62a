"""The CT acquisition of a synthetic scan: its grid, its resolution and its noise.

The anatomy (``anatomy.py``) is drawn on the grid that :meth:`Acquisition.geometry` gives; the
system blur (:func:`apply_resolution`) is applied to the noiseless HU, and the noise
(:func:`add_noise`) is added last, after the nodules.

Noise model: filtered back-projection noise is Gaussian with a noise power spectrum (NPS) that is
small at DC, rises like the ramp filter and is cut off by the reconstruction kernel's window,
``NPS(f) ~ (f + f0) * W(f)^2``. A soft kernel cuts off early (blobby, low-pass texture), a sharp
kernel late (fine grain, most power near the Nyquist frequency). Slices are independent unless
they overlap, in which case neighbours share part of their noise.

Resolution: the PSF is Gaussian, the kernel's in the plane and the slice profile (FWHM = slice
thickness) through it. ``apply_resolution`` applies both to content sampled at voxel centres; the
two halves are also available apart for content already averaged over the slice thickness.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.fft
import scipy.ndimage as ndi

from models.synthetic.portable import exp

KERNELS = ("soft", "sharp")

# DICOM ConvolutionKernel names by vendor family, for the sampler.
_KERNEL_NAMES = {
    "soft": ("STANDARD", "SOFT", "B30f", "B31f", "FC13", "B"),
    "sharp": ("LUNG", "BONE", "B60f", "B70f", "FC52", "L"),
}
_DEFAULT_KERNEL_NAME = {"soft": "STANDARD", "sharp": "LUNG"}

# In-plane PSF (Gaussian sigma, mm): MTF50 ~ 0.38 lp/mm for a standard body kernel, ~ 0.65 lp/mm
# for a lung kernel (sigma = sqrt(ln 2 / 2) / (pi * f50)).
_PSF_SIGMA_MM = {"soft": 0.49, "sharp": 0.29}

# Cut-off of the kernel window W(f) = exp(-(f / fc)^2) in cycles/mm. The soft one is fitted to the
# NPS measured in the liver of the LIDC cases (GE STANDARD): flat to 0.3 cycles/mm, ~ 0 by 0.7.
_NPS_CUTOFF = {"soft": 0.5, "sharp": 1.3}
_NPS_FLOOR = {"soft": 0.15, "sharp": 0.03}

# Centre of the scanned range along z (mm). The anatomy is built around it: lung apices near
# -30 mm, diaphragm domes near -220 mm.
Z_CENTRE_MM = -170.0

# (thickness, spacing) pairs the sampler chooses from: contiguous and overlapping reconstructions.
_RECONSTRUCTIONS = (
    (0.625, 0.625),
    (0.75, 0.625),
    (1.0, 1.0),
    (1.0, 0.8),
    (1.25, 1.25),
    (1.25, 1.0),
    (1.5, 1.5),
    (2.0, 2.0),
    (2.0, 1.6),
    (2.5, 2.5),
    (2.5, 2.0),
)


@dataclass(frozen=True, kw_only=True)
class Acquisition:
    n_slices: int
    pixel_spacing: float
    slice_thickness: float
    slice_spacing: float
    kernel: str
    noise_sd_hu: float
    kvp: float = 120.0
    rows: int = 512
    columns: int = 512
    kernel_name: str = ""

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.n_slices < 1 or self.rows < 16 or self.columns < 16:
            raise ValueError("the grid needs at least 1 slice and 16 x 16 pixels")
        if min(self.pixel_spacing, self.slice_thickness, self.slice_spacing) <= 0:
            raise ValueError("spacings and thickness must be positive")
        if self.slice_spacing > self.slice_thickness + 1e-6:
            raise ValueError("slice spacing larger than the thickness would leave gaps")
        if self.noise_sd_hu < 0:
            raise ValueError("noise_sd_hu must not be negative")

    @property
    def convolution_kernel(self) -> str:
        """The name to write as DICOM ConvolutionKernel."""
        return self.kernel_name or _DEFAULT_KERNEL_NAME[self.kernel]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_slices, self.rows, self.columns)

    @property
    def field_of_view_mm(self) -> float:
        return self.pixel_spacing * max(self.rows, self.columns)

    def geometry(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(spacing in kji order, origin in LPS mm) for the axial grid.

        The isocentre (x = y = 0) is the centre of the field of view and the patient lies centred
        on it; slice k = 0 is the most inferior, and the slices are centred on ``Z_CENTRE_MM``.
        """
        ps = float(self.pixel_spacing)
        spacing = (float(self.slice_spacing), ps, ps)
        origin = (
            -0.5 * (self.columns - 1) * ps,
            -0.5 * (self.rows - 1) * ps,
            Z_CENTRE_MM - 0.5 * (self.n_slices - 1) * self.slice_spacing,
        )
        return spacing, origin


def sample_acquisition(rng: np.random.Generator, n_slices: int | None = None) -> Acquisition:
    """A plausible chest CT protocol: 280-380 mm of coverage, 512 x 512, FOV 307-460 mm."""
    coverage = rng.uniform(280.0, 380.0)
    if n_slices is None:
        thickness, spacing = _RECONSTRUCTIONS[rng.integers(len(_RECONSTRUCTIONS))]
        n_slices = int(np.clip(round(coverage / spacing), 100, 400))
    else:
        # The reconstruction whose coverage with this many slices is nearest the sampled one.
        errors = [abs(n_slices * s - coverage) + rng.uniform(0, 15) for _, s in _RECONSTRUCTIONS]
        thickness, spacing = _RECONSTRUCTIONS[int(np.argmin(errors))]
    kernel = "soft" if rng.random() < 0.6 else "sharp"
    low, high = (10.0, 25.0) if kernel == "soft" else (40.0, 90.0)
    # Thinner slices collect fewer photons: noise ~ thickness^-1/2, kept in the kernel's range.
    noise = float(np.clip(rng.uniform(low, high) * (1.25 / thickness) ** 0.25, low, high))
    names = _KERNEL_NAMES[kernel]
    return Acquisition(
        n_slices=int(n_slices),
        pixel_spacing=round(rng.uniform(307.0, 460.0)) / 512.0,
        slice_thickness=thickness,
        slice_spacing=spacing,
        kernel=kernel,
        kernel_name=names[rng.integers(len(names))],
        noise_sd_hu=noise,
        kvp=float(rng.choice([100.0, 120.0, 120.0, 120.0, 140.0])),
    )


def psf_sigma_mm(acq: Acquisition) -> tuple[float, float, float]:
    """Gaussian sigma of the system blur in kji order: the slice profile (FWHM = thickness) through
    the plane, the kernel's PSF in the plane."""
    in_plane = _PSF_SIGMA_MM[acq.kernel]
    return (acq.slice_thickness / 2.3548, in_plane, in_plane)


def apply_resolution(hu: npt.NDArray[np.float32], acq: Acquisition) -> npt.NDArray[np.float32]:
    """Blur ``hu`` (k, j, i) by the system PSF, in place; returns the same array.

    Works on any sub-volume sampled on the acquisition's grid (a nodule patch, for instance),
    whose values are samples at the voxel centres.
    """
    apply_through_plane_resolution(hu, acq)
    return apply_in_plane_resolution(hu, acq)


def apply_through_plane_resolution(hu: npt.NDArray[np.float32], acq: Acquisition) -> npt.NDArray[np.float32]:
    """The slice profile alone (for content sampled at the slice centres), in place."""
    _blur_through_plane(hu, psf_sigma_mm(acq)[0] / acq.slice_spacing)
    return hu


def apply_in_plane_resolution(hu: npt.NDArray[np.float32], acq: Acquisition) -> npt.NDArray[np.float32]:
    """The kernel's PSF alone, in place (for content already averaged over the slice profile)."""
    _, sigma_j, sigma_i = psf_sigma_mm(acq)

    def in_plane(k0: int, k1: int) -> None:
        slab = hu[k0:k1]
        for axis, sigma_mm in ((2, sigma_i), (1, sigma_j)):
            if hu.shape[axis] > 1:
                ndi.gaussian_filter1d(
                    slab, sigma_mm / acq.pixel_spacing, axis=axis, output=slab, mode="nearest", truncate=3.0
                )

    # ndimage releases the GIL: slabs of slices on two threads.
    chunks = [(k, min(k + 8, hu.shape[0])) for k in range(0, hu.shape[0], 8)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda c: in_plane(*c), chunks))
    return hu


def _gaussian_taps(sigma: float, truncate: float = 3.0) -> npt.NDArray[np.float64]:
    radius = max(1, int(truncate * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return taps / taps.sum()


def _blur_through_plane(hu: npt.NDArray[np.float32], sigma_slices: float) -> None:
    """Gaussian blur along k as a short sum of shifted slabs (edges replicated): filtering a
    (k, j, i) array along its slowest axis with ndimage is several times slower than this."""
    n_k = hu.shape[0]
    if n_k < 2 or sigma_slices < 0.05:
        return
    taps = _gaussian_taps(sigma_slices).astype(np.float32)
    radius = len(taps) // 2
    chunk = 16
    # The original values of the `radius` slices before the chunk (already overwritten in hu).
    before = np.repeat(hu[:1], radius, axis=0)
    for start in range(0, n_k, chunk):
        stop = min(start + chunk, n_k)
        after = hu[stop : stop + radius]
        pad = np.repeat(hu[-1:], radius - len(after), axis=0)
        source = np.concatenate([before, hu[start:stop], after, pad])
        out = taps[0] * source[: stop - start]
        for t in range(1, len(taps)):
            out += taps[t] * source[t : t + stop - start]
        before = source[stop - start : stop - start + radius]
        hu[start:stop] = out


def noise_power_filter(acq: Acquisition, n_j: int, n_i: int) -> npt.NDArray[np.float32]:
    """Amplitude filter sqrt(NPS) on the rfft2 grid of an (n_j, n_i) slice."""
    fj = np.fft.fftfreq(n_j, d=acq.pixel_spacing)[:, None]
    fi = np.fft.rfftfreq(n_i, d=acq.pixel_spacing)[None, :]
    f = np.sqrt(fj**2 + fi**2)
    cutoff = _NPS_CUTOFF[acq.kernel]
    # Measured NPS do not vanish at DC (interpolation, beam hardening, tube drift): a floor there,
    # larger for the smooth kernels, whose noise looks blotchier.
    floor = _NPS_FLOOR[acq.kernel]
    return (np.sqrt(f + floor) * exp(-((f / cutoff) ** 2))).astype(np.float32)


def _noise_bank(
    acq: Acquisition, rng: np.random.Generator, n_j: int, n_i: int, m: int
) -> npt.NDArray[np.float32]:
    """``m`` independent unit-variance noise slices, tiled 2 x 2 so that any cyclic shift of one
    is a view (the FFT fields are periodic, the tiling has no seam)."""
    white = rng.standard_normal((m, n_j, n_i), dtype=np.float32)
    spectrum = scipy.fft.rfft2(white, workers=2)
    spectrum *= noise_power_filter(acq, n_j, n_i)
    fields = scipy.fft.irfft2(spectrum, s=(n_j, n_i), workers=2).astype(np.float32)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return np.tile(fields, (1, 2, 2))


def _overlap_taps(acq: Acquisition) -> npt.NDArray[np.float32]:
    """Through-plane noise filter [c, 1, c] (unit gain in variance) giving adjacent overlapping
    slices the correlation of their shared thickness, 1 - spacing / thickness."""
    rho = min(max(1.0 - acq.slice_spacing / acq.slice_thickness, 0.0), 0.7)
    if rho < 0.02:
        return np.ones(1, dtype=np.float32)
    # rho = 2c / (1 + 2c^2), the smaller root.
    c = (1.0 - np.sqrt(max(1.0 - 2.0 * rho * rho, 0.0))) / (2.0 * rho)
    taps = np.array([c, 1.0, c])
    return (taps / np.sqrt(np.sum(taps**2))).astype(np.float32)


def add_noise(hu: npt.NDArray[np.float32], acq: Acquisition, rng: np.random.Generator) -> None:
    """Add CT noise of standard deviation ``acq.noise_sd_hu`` to ``hu`` (k, j, i), in place.

    Each slice's noise is the normalised sum of two randomly shifted and flipped fields from a
    small bank of FFT-filtered fields: the statistics (Gaussian, the kernel's NPS) are exact and it
    costs a few additions per slice instead of a 2D FFT.
    """
    if acq.noise_sd_hu <= 0:
        return
    n_k, n_j, n_i = hu.shape
    m = int(min(16, max(4, n_k)))
    bank = _noise_bank(acq, rng, n_j, n_i, m)
    taps = _overlap_taps(acq)
    radius = len(taps) // 2
    n_fields = n_k + 2 * radius
    first = rng.integers(0, m, n_fields)
    second = (first + rng.integers(1, m, n_fields)) % m
    shifts = rng.integers(0, [n_j, n_i, n_j, n_i], size=(n_fields, 4))
    flips = rng.integers(0, 2, size=(n_fields, 4)).astype(bool)
    weight = np.float32(acq.noise_sd_hu / np.sqrt(2.0))

    def view(b: int, sj: int, si: int, flip_j: bool, flip_i: bool) -> npt.NDArray[np.float32]:
        v = bank[b, sj : sj + n_j, si : si + n_i]
        return v[:: -1 if flip_j else 1, :: -1 if flip_i else 1]

    def field(f: int) -> npt.NDArray[np.float32]:
        s, fl = shifts[f], flips[f]
        out = view(int(first[f]), s[0], s[1], fl[0], fl[1]) * weight
        out += view(int(second[f]), s[2], s[3], fl[2], fl[3]) * weight
        return out

    window = [field(f) for f in range(2 * radius)]
    for k in range(n_k):
        window.append(field(k + 2 * radius))
        if radius == 0:
            hu[k] += window[-1]
        else:
            for w, f in zip(taps, window, strict=True):
                hu[k] += w * f
        window.pop(0)
