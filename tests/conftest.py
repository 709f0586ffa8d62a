"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from models import datasets


def _require_tool(name: str) -> str:
    """Path of an external program; skip the test without it, except in CI, where it must be there."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"external program {name!r} is not on PATH"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: CI must install it")
    pytest.skip(f"{reason} (install it, e.g. dicom3tools or dcmtk, to run this test)")


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """``require_tool("dciodvfy")`` gives the program's path, or skips (fails when CI is set)."""
    return _require_tool


def _missing_data(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: CI must provide it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lidc_dir() -> Path:
    """The LIDC-IDRI sample cases: $CAD_NODE_LIDC_DIR, else shared/data/lidc beside the repository.
    Skips without them (fails when CI is set)."""
    path = datasets.lidc_root()
    if not path.is_dir():
        _missing_data(f"LIDC data not found at {path} (set CAD_NODE_LIDC_DIR)")
    return path


@pytest.fixture(scope="session")
def lidc_series_dir(lidc_dir: Path) -> Callable[[str], Path]:
    """``lidc_series_dir("LIDC-IDRI-0001")``: the case's series folder (DICOM slices and reader XML)."""

    def find(case: str) -> Path:
        try:
            return datasets.lidc_series_dir(case)
        except FileNotFoundError as missing:
            _missing_data(str(missing))

    return find


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: threads only add synchronisation, which a busy machine makes very slow."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
