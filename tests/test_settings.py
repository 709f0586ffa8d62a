"""Settings: defaults, then a TOML file (CAD_NODE_CONFIG), then CAD_NODE_* variables; clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cad_node.settings import CONFIG_VARIABLE, Caller, Peer, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CAD_NODE_* variable of the calling shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CAD_NODE_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cad-node.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = Settings()
    assert settings.data_dir == Path("var/node")
    assert (settings.ae_title, settings.host, settings.port) == ("CADNODE", "0.0.0.0", 11112)
    assert settings.destinations == [] and settings.allowed_callers == [] and settings.callers == []
    assert settings.quiet_period_s == 20.0
    assert settings.min_free_disk_mb == 1024
    assert (settings.export_attempts, settings.export_backoff_s) == (6, 5.0)
    assert settings.effective_broker_url == "filesystem://"
    assert settings.effective_database_url == f"sqlite:///{Path('var/node/jobs.sqlite').resolve()}"
    rules = settings.selection_rules
    assert (rules.max_slice_thickness_mm, rules.min_coverage_mm, rules.min_slices) == (3.0, 150.0, 40)


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAD_NODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CAD_NODE_AE_TITLE", "ENVNODE")
    monkeypatch.setenv("CAD_NODE_PORT", "4104")
    monkeypatch.setenv("CAD_NODE_QUIET_PERIOD_S", "2.5")
    monkeypatch.setenv("CAD_NODE_DESTINATIONS", '["PACS@10.0.0.5:104", "ARCHIVE@archive.local:11112"]')
    monkeypatch.setenv("CAD_NODE_ALLOWED_CALLERS", '["MODALITY", "PACS@10.0.0.5"]')
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.instances_dir == tmp_path / "instances"
    assert (settings.ae_title, settings.port, settings.quiet_period_s) == ("ENVNODE", 4104, 2.5)
    assert settings.peers == [Peer("PACS", "10.0.0.5", 104), Peer("ARCHIVE", "archive.local", 11112)]
    assert settings.callers == [Caller("MODALITY", None), Caller("PACS", "10.0.0.5")]


def test_toml_file_named_by_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        'ae_title = "TOMLNODE"\nport = 4000\ndestinations = ["PACS@10.0.0.5:104"]\nquiet_period_s = 30\n',
    )
    monkeypatch.setenv(CONFIG_VARIABLE, str(config))
    settings = Settings()
    assert (settings.ae_title, settings.port, settings.quiet_period_s) == ("TOMLNODE", 4000, 30.0)
    assert settings.destinations == ["PACS@10.0.0.5:104"]
    assert settings.shown()["config_file"] == str(config)


def test_environment_beats_toml_and_arguments_beat_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = write_toml(tmp_path, 'ae_title = "TOMLNODE"\nport = 4000\nmin_slices = 60\n')
    monkeypatch.setenv(CONFIG_VARIABLE, str(config))
    monkeypatch.setenv("CAD_NODE_PORT", "5000")
    settings = Settings()
    assert settings.port == 5000  # environment
    assert settings.ae_title == "TOMLNODE" and settings.min_slices == 60  # TOML where no variable
    assert Settings(port=6000).port == 6000  # the command line's options come as arguments


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_VARIABLE, str(tmp_path / "absent.toml"))
    with pytest.raises(FileNotFoundError, match=r"absent\.toml"):
        Settings()


def test_unknown_setting_in_toml_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_VARIABLE, str(write_toml(tmp_path, "quiet_periods = 5\n")))
    with pytest.raises(ValidationError, match="quiet_periods"):
        Settings()


@pytest.mark.parametrize("title", ["", "   ", "SEVENTEEN_LETTERS", "BACK\\SLASH", "TAB\tX"])
def test_bad_ae_title(title: str) -> None:
    with pytest.raises(ValidationError, match="is not an AE title"):
        Settings(ae_title=title)


def test_bad_ae_title_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAD_NODE_AE_TITLE", "WAY_TOO_LONG_AE_TITLE")
    with pytest.raises(ValidationError, match="'WAY_TOO_LONG_AE_TITLE' is not an AE title"):
        Settings()


@pytest.mark.parametrize(
    "destination",
    ["PACS@10.0.0.5", "PACS10.0.0.5:104", "PACS@10.0.0.5:0", "PACS@10.0.0.5:70000", "@host:104",
     "SEVENTEEN_LETTERS@host:104", "PACS@host:port"],
)  # fmt: skip
def test_bad_destination(destination: str) -> None:
    with pytest.raises(ValidationError, match="is not AET@HOST:PORT"):
        Settings(destinations=[destination])


def test_bad_destination_list_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAD_NODE_DESTINATIONS", '["PACS@10.0.0.5:104", "ARCHIVE@archive"]')
    with pytest.raises(ValidationError, match="'ARCHIVE@archive' is not AET@HOST:PORT"):
        Settings()


def test_bad_caller() -> None:
    with pytest.raises(ValidationError, match="is not AET or AET@HOST"):
        Settings(allowed_callers=["PACS@10.0.0.5:104"])


def test_shown_hides_database_and_broker_passwords() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://cad:s3cret@db.local:5432/cadnode",
        broker_url="redis://:brokerpass@redis.local:6379/0",
    )
    shown = settings.shown()
    assert shown["database_url"] == "postgresql+psycopg://cad:***@db.local:5432/cadnode"
    assert shown["broker_url"] == "redis://:***@redis.local:6379/0"  # redis: a password, no user


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://cad:p@ss@db/cadnode", "postgresql+psycopg://cad:***@db/cadnode"),
        ("postgresql+psycopg://cad@db:5432/cadnode", "postgresql+psycopg://cad@db:5432/cadnode"),
        ("postgresql+psycopg://db:5432/cadnode", "postgresql+psycopg://db:5432/cadnode"),
    ],
)
def test_shown_database_url(url: str, expected: str) -> None:
    assert Settings(database_url=url).shown()["database_url"] == expected


def test_callers_fall_back_to_destinations() -> None:
    settings = Settings(destinations=["PACS@10.0.0.5:104", "ARCHIVE@archive.local:11112"])
    assert settings.callers == [Caller("PACS", "10.0.0.5"), Caller("ARCHIVE", "archive.local")]
    assert settings.shown()["allowed_callers (effective)"] == ["PACS@10.0.0.5", "ARCHIVE@archive.local"]
    explicit = Settings(destinations=["PACS@10.0.0.5:104"], allowed_callers=["MODALITY"])
    assert explicit.callers == [Caller("MODALITY", None)]


def test_as_environment_round_trips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = Settings(
        data_dir=tmp_path / "node",
        ae_title="ROUNDTRIP",
        port=4242,
        destinations=["PACS@10.0.0.5:104"],
        allowed_callers=["MODALITY@10.0.0.7", "PACS"],
        database_url="postgresql+psycopg://cad@db/cadnode",
        quiet_period_s=0.25,
        min_free_disk_mb=10,
        export_backoff_s=0.5,
        max_slice_thickness_mm=2.5,
    )
    environment = original.as_environment()
    assert all(name.startswith("CAD_NODE_") for name in environment)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original
