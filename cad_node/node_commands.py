"""`cad-node up | listen | worker | send | config show | db upgrade`: running and feeding the node."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from cad_node.settings import Peer, Settings

NODE_OPTIONS = ("data_dir", "port", "ae_title", "destinations", "allowed_callers", "quiet_period_s")


def load_settings(**overrides: Any) -> Settings:
    """The settings from file and environment, with the command line's options on top."""
    given = {k: v for k, v in overrides.items() if v not in (None, ())}
    for key in ("destinations", "allowed_callers"):
        if key in given:
            given[key] = list(given[key])
    try:
        settings = Settings(**given)
    except (ValidationError, FileNotFoundError) as error:
        raise click.UsageError(f"bad settings: {error}") from error
    return settings.model_copy(update={"data_dir": settings.data_dir.resolve()})


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "kombu", "celery.worker.consumer", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def node_options(command: Any) -> Any:
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Data folder."),
        click.option("--port", type=int, help="DICOM port to listen on."),
        click.option("--ae-title", help="The node's AE title."),
        click.option(
            "--destination",
            "destinations",
            multiple=True,
            help="Where results go, AET@HOST:PORT (repeat for several).",
        ),
        click.option(
            "--allow", "allowed_callers", multiple=True, help="A caller allowed to send: AET or AET@HOST."
        ),
        click.option("--quiet-period", "quiet_period_s", type=float, help="Seconds without instances."),
        click.option("--verbose", is_flag=True, help="Debug logging."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@node_options
@click.option("--dashboard-port", type=int, help="Also serve the admin dashboard on this HTTP port.")
def up(verbose: bool, **options: Any) -> None:
    """Run the whole node on this machine: listener, study assembly, analysis and export workers."""
    from cad_node.node_runtime import run_up

    configure_logging(verbose)
    settings = load_settings(**options)
    if settings.dashboard_port and not settings.admin_token:
        raise click.UsageError("set CAD_NODE_ADMIN_TOKEN: the dashboard refuses everyone without it")
    run_up(settings, announce=lambda line: click.echo(line, err=True))


@click.command()
@node_options
def listen(verbose: bool, **options: Any) -> None:
    """Run the listener and study assembly only (workers run elsewhere: `cad-node worker`)."""
    from cad_node.node_runtime import prepare, run_listener, stop_on_signals

    configure_logging(verbose)
    settings = load_settings(**options)
    database = prepare(settings)
    run_listener(settings, database, stop_on_signals())


@click.command()
@click.option("--queue", type=click.Choice(["analysis", "export"]), default="analysis", show_default=True)
@click.option("--concurrency", type=int, help="Processes (analysis) or threads (export).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Data folder.")
@click.option("--device", help="torch device for the analysis, e.g. cuda:1 (one worker per GPU) or cpu.")
def worker(queue: str, concurrency: int | None, data_dir: Path | None, device: str | None) -> None:
    """Run a worker: analyses studies (loads the networks once per process) or exports results."""
    from cad_node.schema_migration import current_revision, head_revision

    settings = load_settings(data_dir=data_dir, device=device)
    os.environ.update(settings.as_environment())
    if current_revision(settings.effective_database_url) != head_revision():
        raise click.ClickException(
            "the job database is not at this version's schema: run cad-node db upgrade"
        )
    from workers.worker_main import run_worker

    run_worker(queue, concurrency or (settings.analysis_concurrency if queue == "analysis" else 4))


@click.command()
@click.option("--port", type=int, help="HTTP port (default: the dashboard_port setting, else 8080).")
@click.option("--host", help="Address to bind (default: the dashboard_host setting, 127.0.0.1).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Data folder.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def dashboard(port: int | None, host: str | None, data_dir: Path | None, verbose: bool) -> None:
    """Serve the admin dashboard and /metrics (login: the token in CAD_NODE_ADMIN_TOKEN)."""
    from cad_node.dashboard.serving import dashboard_server
    from cad_node.job_database import JobDatabase
    from cad_node.schema_migration import current_revision, head_revision

    configure_logging(verbose)
    settings = load_settings(data_dir=data_dir)
    if not settings.admin_token:
        raise click.UsageError("set CAD_NODE_ADMIN_TOKEN: the dashboard refuses everyone without it")
    if current_revision(settings.effective_database_url) != head_revision():
        raise click.ClickException("the job database is not at this schema: run cad-node db upgrade")
    try:
        server = dashboard_server(
            settings,
            JobDatabase(settings.effective_database_url),
            host or settings.dashboard_host,
            port or settings.dashboard_port or 8080,
        )
    except OSError as error:
        raise click.ClickException(f"cannot serve the dashboard: {error}") from error
    click.echo(f"cad-node dashboard at {server.address}", err=True)
    server.serve()


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "to", required=True, help="The receiver, AET@HOST:PORT.")
@click.option("--calling-ae-title", default="CADNODE-SEND", show_default=True)
def send(paths: tuple[Path, ...], to: str, calling_ae_title: str) -> None:
    """C-STORE DICOM files (or every file under the given folders) to a DICOM node."""
    from cad_node.export import ExportError, send_files

    try:
        peer = Peer.parse(to)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--to") from error
    files = sorted(
        f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file() and _is_dicom(f)
    )
    if not files:
        raise click.ClickException("no DICOM files in the given paths")
    started = time.perf_counter()
    with click.progressbar(length=len(files), label=f"sending to {peer}", file=sys.stderr) as bar:
        try:
            report = send_files(files, peer, calling_ae_title, progress=lambda n: bar.update(1))
        except ExportError as error:
            raise click.ClickException(str(error)) from error
    for path, why in report.failed.items():
        click.echo(f"failed: {path}: {why}", err=True)
    click.echo(f"sent {report.sent} of {len(files)} files in {time.perf_counter() - started:.1f} s")
    if not report.ok:
        sys.exit(1)


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


@click.group()
def config() -> None:
    """The node's settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True)
def config_show(as_json: bool) -> None:
    """Print the effective settings (defaults, the TOML file in CAD_NODE_CONFIG, CAD_NODE_* variables)."""
    shown = load_settings().shown()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for name, value in shown.items():
        click.echo(f"{name:<28} {value}")


@click.group()
def db() -> None:
    """The job database."""


@db.command("upgrade")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Data folder.")
def db_upgrade(data_dir: Path | None) -> None:
    """Create the job database or bring its schema up to date (Alembic)."""
    from cad_node.schema_migration import upgrade

    settings = load_settings(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"job database at schema {upgrade(settings.effective_database_url)}")


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
)
@click.option("--seed", default=1, show_default=True, help="The synthetic case's seed.")
@click.option("--nodules", "n_nodules", default=4, show_default=True, type=click.IntRange(1, 12))
def demo(out_dir: Path, seed: int, n_nodules: int) -> None:
    """The whole flow on this machine: a synthetic CT with known nodules sent to the node (on its embedded
    defaults), results received by a throwaway PACS, and what came back compared with the truth."""
    from cad_node.demo import DemoError, run_demo

    try:
        lines = run_demo(out_dir, seed, n_nodules, echo=lambda line: click.echo(line, err=True))
    except DemoError as error:
        raise click.ClickException(str(error)) from error
    click.echo("\n".join(lines))
