"""The node's settings, in one place: defaults, then an optional TOML file, then `CAD_NODE_*` variables.

The TOML file is named by `CAD_NODE_CONFIG` (or `cad-node --config FILE`). Every setting has a variable
of its own name in capitals: `CAD_NODE_DATA_DIR`, `CAD_NODE_BROKER_URL`, `CAD_NODE_DATABASE_URL`...
Lists are JSON in variables (`CAD_NODE_DESTINATIONS='["PACS@10.0.0.5:104"]'`) and arrays in TOML.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cad_node.series_selection import SelectionRules

CONFIG_VARIABLE = "CAD_NODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash, 16 at most
_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
_CALLER = re.compile(r"^(?P<aet>[^@]{1,16})(@(?P<host>[^:@]+))?$")


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network: `AET@HOST:PORT`."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = _PEER.match(text.strip())
        if match is None or not _AE_TITLE.match(match["aet"]) or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r} is not AET@HOST:PORT (AE title of 1 to 16 characters, port 1-65535)")
        return cls(match["aet"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Caller:
    """An allowed calling application entity: `AET`, or `AET@HOST` to also require its address."""

    ae_title: str
    host: str | None

    @classmethod
    def parse(cls, text: str) -> Caller:
        match = _CALLER.match(text.strip())
        if match is None or not _AE_TITLE.match(match["aet"]):
            raise ValueError(f"{text!r} is not AET or AET@HOST")
        return cls(match["aet"].strip(), match["host"])

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAD_NODE_", extra="forbid")

    data_dir: Path = Field(Path("var/node"), description="Instance store, results, database, queue.")
    ae_title: str = Field("CADNODE", description="The node's AE title.")
    host: str = Field("0.0.0.0", description="Address the listener binds to.")
    port: int = Field(11112, description="The listener's DICOM port.")
    allowed_callers: list[str] = Field(
        default_factory=list,
        description="AET or AET@HOST allowed to send; empty: the destinations' AE titles and hosts.",
    )
    destinations: list[str] = Field(
        default_factory=list, description="Where results go, AET@HOST:PORT (usually the sending PACS)."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite in the data folder.")
    broker_url: str = Field("", description="Celery broker; empty: an embedded filesystem queue.")
    quiet_period_s: float = Field(20.0, description="A study is complete after this long without instances.")
    min_free_disk_mb: int = Field(
        1024, ge=0, description="The disk watermark: below this much free disk, new studies are refused."
    )
    disk_floor_mb: int = Field(
        256, ge=0, description="Below this (at most the watermark), every instance is refused."
    )
    retention_hours: float = Field(
        72.0, ge=0, description="Instances and results are removed this long after delivery; 0: kept."
    )
    export_attempts: int = Field(6, description="C-STORE attempts per destination before failing.")
    export_backoff_s: float = Field(5.0, description="First wait between export attempts; doubles.")
    analysis_concurrency: int = Field(1, description="Studies analysed at once per worker.")
    device: str = Field("", description="torch device for the networks; empty: a GPU if any, else CPU.")
    extra_outputs: list[Literal["gsps", "kos", "summary"]] = Field(
        default_factory=lambda: ["gsps", "kos", "summary"],
        description="Results beside SR and SEG: gsps (outlines), kos (key images), summary (PDF page).",
    )
    admin_token: str = Field(
        "", repr=False, description="The admin dashboard's login token (bearer, or basic password)."
    )
    dashboard_host: str = Field("127.0.0.1", description="Address the admin dashboard binds to.")
    dashboard_port: int = Field(0, description="The admin dashboard's HTTP port in `cad-node up`; 0: none.")
    max_slice_thickness_mm: float = 3.0
    min_coverage_mm: float = 150.0
    min_slices: int = 40

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip():
            raise ValueError(f"{value!r} is not an AE title (1 to 16 printable characters, no backslash)")
        return value.strip()

    @field_validator("destinations")
    @classmethod
    def _check_destinations(cls, values: list[str]) -> list[str]:
        return [str(Peer.parse(v)) for v in values]

    @field_validator("allowed_callers")
    @classmethod
    def _check_callers(cls, values: list[str]) -> list[str]:
        return [str(Caller.parse(v)) for v in values]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_VARIABLE)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_VARIABLE} names {config_file}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    # Derived locations: everything the node writes stays under data_dir.
    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.sqlite').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def peers(self) -> list[Peer]:
        return [Peer.parse(d) for d in self.destinations]

    @property
    def callers(self) -> list[Caller]:
        """Who may send: as configured, else each destination (the PACS that receives results)."""
        if self.allowed_callers:
            return [Caller.parse(c) for c in self.allowed_callers]
        return [Caller(p.ae_title, p.host) for p in self.peers]

    @property
    def selection_rules(self) -> SelectionRules:
        return SelectionRules(
            max_slice_thickness_mm=self.max_slice_thickness_mm,
            min_coverage_mm=self.min_coverage_mm,
            min_slices=self.min_slices,
        )

    def shown(self) -> dict[str, Any]:
        """The effective settings, as `cad-node config show` prints them."""
        values = self.model_dump(mode="json")
        values["database_url"] = _without_password(self.effective_database_url)
        values["broker_url"] = _without_password(self.effective_broker_url)
        values["admin_token"] = "***" if self.admin_token else ""
        values["config_file"] = os.environ.get(CONFIG_VARIABLE, "")
        values["allowed_callers (effective)"] = [str(c) for c in self.callers] or ["any (none configured)"]
        return values

    def as_environment(self) -> dict[str, str]:
        """These settings as `CAD_NODE_*` variables, for the node's own child processes."""
        import json

        environment = {}
        for name, value in self.model_dump(mode="json").items():
            text = json.dumps(value) if isinstance(value, list) else str(value)
            environment[f"CAD_NODE_{name.upper()}"] = text
        return environment


def _without_password(url: str) -> str:
    # Up to the last "@" before the path: a password may hold an unescaped "@"; redis has no user.
    return re.sub(r"://([^:/@]*):[^/]*@", r"://\1:***@", url)
