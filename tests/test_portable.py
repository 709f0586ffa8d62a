"""The data layer draws the same cases on every CPU (models/synthetic/portable.py)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__  # type: ignore[no-redef]

from models.synthetic.portable import arccos, arctan2, cos, dot, exp, matmul, norm, power, principal_axes, sin

ROOT = Path(__file__).resolve().parents[1]

# A shortened synthetic chest: its trees and nodules drawn in full, in seconds.
_CASE = """
import hashlib, json
from models.synthetic.cases import synthesize_case
case = synthesize_case(3000, 6, n_slices=120)
print(json.dumps({
    "voxels": hashlib.sha256(case.volume.hu.tobytes()).hexdigest(),
    "nodules": [(n.nodule_type, list(n.centre_mm), n.volume_mm3) for n in case.nodules],
}))
"""


def _case_under(env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CASE],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_same_case_whatever_kernels_blas_and_numpy_pick() -> None:
    """OpenBLAS picks its kernels by CPU and numpy its SIMD code, and each rounds differently;
    before the data layer's own arithmetic, a seed drew other vessel trees and nodules on other
    machines. Here both are held to the oldest x86-64 code (SSE3 kernels, numpy's baseline) and
    compared with what this machine picks: voxels and nodules must be the same to the last bit."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"OPENBLAS_CORETYPE names x86 kernels; this machine is {platform.machine()}")
    above_baseline = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    native = _case_under({})
    oldest = _case_under({"OPENBLAS_CORETYPE": "Prescott", "NPY_DISABLE_CPU_FEATURES": above_baseline})
    assert len(native["nodules"]) == 6
    assert oldest == native


def test_principal_axes_are_those_of_eigh() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3, 3))
    sym = x + np.swapaxes(x, -1, -2)
    axes = principal_axes(sym)
    values, vectors = np.linalg.eigh(sym)
    assert np.allclose(np.abs(np.sum(axes * vectors[..., 2], axis=-1)), 1.0, atol=1e-12)
    assert np.allclose(np.einsum("nij,nj->ni", sym, axes), values[:, 2:] * axes, atol=1e-12)
    assert np.allclose(principal_axes(np.diag([1.0, 3.0, 2.0])), [0.0, 1.0, 0.0])
    assert np.allclose(principal_axes(np.zeros((3, 3))), [1.0, 0.0, 0.0])


def test_dot_norm_and_matmul_are_numpys() -> None:
    rng = np.random.default_rng(1)
    a, b, m = rng.normal(size=(7, 3)), rng.normal(size=3), rng.normal(size=(3, 3))
    assert np.allclose(dot(a, b), a @ b, atol=1e-15)
    assert np.allclose(norm(a), np.linalg.norm(a, axis=-1), atol=1e-15)
    assert norm(np.array([3.0, 4.0, 0.0])) == 5.0
    assert np.allclose(matmul(a, m), a @ m, atol=1e-15)
    assert matmul(a.astype(np.float32), m.astype(np.float32)).dtype == np.float32


def test_elementwise_functions_are_the_c_librarys() -> None:
    x = np.linspace(-0.99, 0.99, 11).reshape(11, 1)
    for ours, libm in ((sin, math.sin), (cos, math.cos), (arccos, math.acos), (exp, math.exp)):
        assert ours(x).shape == (11, 1) and ours(x).dtype == np.float64
        assert ours(x).ravel().tolist() == [libm(v) for v in x.ravel()]
    assert arctan2(x, 0.5).ravel().tolist() == [math.atan2(v, 0.5) for v in x.ravel()]
    assert power(np.abs(x), 4 / 3).ravel().tolist() == [math.pow(abs(v), 4 / 3) for v in x.ravel()]
