"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

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


@pytest.fixture
def dcmtk() -> None:
    """The dcmtk and dicom3tools programs the end-to-end tests use as the PACS and the validator."""
    for program in ("storescp", "storescu", "echoscu", "dciodvfy"):
        _require_tool(program)


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


POSTGRES_URL = os.environ.get("CAD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CAD_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _unavailable(service: str, reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: CI must provide {service}")
    pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server ($CAD_TEST_POSTGRES_URL), dropped afterwards. Skips
    when the server cannot be reached (fails when CI is set)."""
    from sqlalchemy import create_engine, make_url, text

    server = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"cadnode_test_{uuid.uuid4().hex[:12]}"
    try:
        with server.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        server.dispose()
        where = make_url(POSTGRES_URL).render_as_string()
        _unavailable("PostgreSQL", f"PostgreSQL at {where} cannot be reached ({error})")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An emptied Redis database ($CAD_TEST_REDIS_URL, a free index of 1 to 15), emptied again afterwards.
    Skips when the server cannot be reached (fails when CI is set)."""
    import redis

    base = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        base.ping()
    except redis.RedisError as error:
        _unavailable("Redis", f"Redis at {REDIS_URL} cannot be reached ({error})")
    for index in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{index}")
        if client.set("cad-node-test-lock", "1", nx=True, ex=3600):
            if client.dbsize() == 1:
                break
            client.delete("cad-node-test-lock")  # someone else's data is there
        client.close()
    else:
        _unavailable("Redis", "no free Redis database index (1 to 15) for the test")
    try:
        yield f"{REDIS_URL}/{index}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def start_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``start_node(**settings)``: a running Listener on 127.0.0.1 and a free port, its data in tmp_path,
    with no disk limits, accepting the test module's ``SENDER`` AE title."""
    from cad_node.job_database import JobDatabase
    from cad_node.listener import Listener
    from cad_node.schema_migration import upgrade
    from cad_node.settings import Settings
    from tests.peers import free_port

    listeners: list[Listener] = []

    def start(**overrides: Any) -> Listener:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"node{len(listeners)}",
            "host": "127.0.0.1",
            "port": free_port(),
            "allowed_callers": [request.module.SENDER],
            "min_free_disk_mb": 0,
            "disk_floor_mb": 0,
            **overrides,
        }
        settings = Settings(**values)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
        listener = Listener(settings, JobDatabase(settings.effective_database_url))
        listener.start()
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.stop()
        listener.database.close()
