"""The `cad-node` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="cad-node")
def main() -> None:
    """Lung CT CAD node: finds, outlines and measures lung nodules in chest CT."""


@main.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write the case into (new or empty).",
)
@click.option("--seed", required=True, type=int, help="Same seed, same case.")
@click.option(
    "--nodules",
    "n_nodules",
    default=3,
    show_default=True,
    type=click.IntRange(0, 40),
    help="Number of nodules.",
)
@click.option(
    "--background",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A real CT series folder to insert the nodules into, instead of a synthetic chest.",
)
@click.option(
    "--slices",
    "n_slices",
    type=click.IntRange(100, 400),
    help="Slices of a synthetic chest (default: random).",
)
@click.option(
    "--preview", is_flag=True, help="Also write preview.png: each nodule on its axial slice, outlined."
)
def synth(
    out_dir: Path, seed: int, n_nodules: int, background: Path | None, n_slices: int | None, preview: bool
) -> None:
    """Write one chest CT case with known nodules: a DICOM CT series and DIR/ground_truth.json."""
    from models.synthetic.case_writing import SynthesisError, synthesize

    if out_dir.exists() and any(out_dir.iterdir()):
        raise click.UsageError(f"{out_dir} is not empty: give a new or empty folder")
    started = time.perf_counter()
    try:
        written = synthesize(
            out_dir,
            seed=seed,
            n_nodules=n_nodules,
            background=background,
            n_slices=n_slices,
            preview=preview,
            progress=lambda message: click.echo(
                f"[{time.perf_counter() - started:6.1f} s] {message}", err=True
            ),
        )
    except SynthesisError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    click.echo(written.summary)
    click.echo(f"series: {len(written.series_files)} slices in {out_dir}")
    click.echo(f"ground truth: {written.ground_truth}")
    if written.preview is not None:
        click.echo(f"preview: {written.preview}")
    click.echo(f"done in {time.perf_counter() - started:.1f} s")
