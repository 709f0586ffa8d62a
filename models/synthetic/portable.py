"""Arithmetic that rounds the same on every x86-64 CPU, for the data layer.

numpy hands `@`, `np.dot`, the norm of a whole vector and `np.linalg.eigh` to OpenBLAS, which picks
its kernels by CPU (SkylakeX, Haswell, Zen, ...), each summing in its own order; and numpy's own
arccos, arctan2, exp, log and power (`x ** 3` too) run other SIMD code on CPUs with AVX-512, each
rounding other last bits. The synthetic chests' vessel trees grow on those bits (a branch's
geometry decides how its points split, generation after generation), and the nodules' placement
branches on them, so before this module the same seed drew other cases on other machines
(docs/pipeline.md, "What limits the CPM", item 17). Elementwise arithmetic and numpy's own sums round
the same everywhere; the functions here are made of them, or of the C library's, which picks one
implementation on every x86-64 CPU with FMA. numpy's float64 sin, cos, hypot and sqrt, which the
slice renderer still calls on whole grids, round the same at every SIMD level of numpy 2.4
(measured); a numpy that vectorised them otherwise would show in tests/test_portable.py, which draws a
case with OpenBLAS and numpy held to the oldest x86-64 code and compares it, to the bit, with this
machine's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]

# Cyclic Jacobi sweeps for a 3 x 3 symmetric matrix: it converges quadratically, to the last bit in
# five or six; more cost nothing that matters and leave no doubt.
_JACOBI_SWEEPS = 10


def dot(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Inner product over the last axis (broadcasting), summed in order."""
    a, b = np.asarray(a), np.asarray(b)
    out = a[..., 0] * b[..., 0]
    for k in range(1, a.shape[-1]):
        out += a[..., k] * b[..., k]
    return out


def norm(v: npt.ArrayLike) -> FloatArray:
    """Euclidean norm over the last axis."""
    return np.sqrt(dot(v, v))


def matmul(a: npt.ArrayLike, m: npt.ArrayLike) -> FloatArray:
    """`a @ m` for points `a` (..., k) and a small matrix `m` (k, n), one column of `m` at a time."""
    a, m = np.asarray(a), np.asarray(m)
    out = np.empty(a.shape[:-1] + m.shape[1:], dtype=np.result_type(a, m))
    for n in range(m.shape[1]):
        out[..., n] = dot(a, m[:, n])
    return out


def principal_axes(sym: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Unit eigenvector of the largest eigenvalue of each symmetric 3 x 3 matrix (..., 3, 3), by
    cyclic Jacobi rotations: `np.linalg.eigh` would go through LAPACK on OpenBLAS's kernels."""
    a = np.array(sym, dtype=np.float64)
    v = np.broadcast_to(np.eye(3), a.shape).copy()
    for _ in range(_JACOBI_SWEEPS):
        for p, q in ((0, 1), (0, 2), (1, 2)):
            apq = a[..., p, q]
            rotate = apq != 0.0
            with np.errstate(over="ignore"):
                theta = (a[..., q, q] - a[..., p, p]) / np.where(rotate, 2.0 * apq, 1.0)
                t = np.where(theta >= 0.0, 1.0, -1.0) / (np.abs(theta) + np.sqrt(theta * theta + 1.0))
            t = np.where(rotate, t, 0.0)
            c = 1.0 / np.sqrt(t * t + 1.0)
            s = t * c
            j = np.broadcast_to(np.eye(3), a.shape).copy()
            j[..., p, p] = c
            j[..., q, q] = c
            j[..., p, q] = s
            j[..., q, p] = -s
            a = _batched(np.swapaxes(j, -1, -2), _batched(a, j))
            v = _batched(v, j)
    largest = np.argmax(np.diagonal(a, axis1=-2, axis2=-1), axis=-1)
    return np.take_along_axis(v, largest[..., None, None], axis=-1)[..., 0]


def _batched(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """x @ y for stacks of 3 x 3 matrices, summed in order."""
    return dot(x[..., :, None, :], np.swapaxes(y, -1, -2)[..., None, :, :])


def sin(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return _by_the_c_library(math.sin, x)


def cos(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return _by_the_c_library(math.cos, x)


def arccos(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """For x in [-1, 1]."""
    return _by_the_c_library(math.acos, x)


def arctan2(y: npt.ArrayLike, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return _by_the_c_library(math.atan2, y, x)


def exp(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return _by_the_c_library(math.exp, x)


def power(x: npt.ArrayLike, p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return _by_the_c_library(math.pow, x, p)


def _by_the_c_library(fn: Callable[..., float], *args: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Element by element, about 0.1 us each: for the trees' branches and the slice grid's tables
    computed once, not for every voxel."""
    each = np.frompyfunc(fn, len(args), 1)
    return np.asarray(each(*(np.asarray(a, dtype=np.float64) for a in args)), dtype=np.float64)
