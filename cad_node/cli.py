"""The `cad-node` command."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from cad_node.jobs_commands import jobs
from cad_node.node_commands import config, dashboard, db, demo, listen, send, up, worker
from cad_node.settings import CONFIG_VARIABLE


@click.group()
@click.version_option(package_name="cad-node")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"A TOML settings file (else ${CONFIG_VARIABLE}).",
)
def main(config_file: Path | None) -> None:
    """Lung CT CAD node: finds, outlines and measures lung nodules in chest CT."""
    if config_file is not None:
        os.environ[CONFIG_VARIABLE] = str(config_file.resolve())


for _command in (up, listen, worker, send, demo, config, db, jobs, dashboard):
    main.add_command(_command)


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


def _echo_progress(started: float) -> Callable[[str], None]:
    return lambda message: click.echo(f"[{time.perf_counter() - started:7.1f} s] {message}", err=True)


@main.command()
@click.argument("series_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for findings.json."
)
@click.option("--device", help="torch device (default: a GPU where there is one, else the CPU).")
@click.option(
    "--extras",
    default="gsps,kos,summary",
    show_default=True,
    help="Extra DICOM results, comma-separated (gsps, kos, summary), or 'none'.",
)
def analyze(series_dir: Path, out_dir: Path, device: str | None, extras: str) -> None:
    """Run the shipped pipeline on a CT series and write DIR/findings.json, DIR/sr.dcm and, when there are
    findings, DIR/seg.dcm; and the extras: DIR/gsps.dcm, kos.dcm (with findings), summary.dcm (PDF)."""
    from cad_node.result_encoding import EXTRA_OUTPUTS

    chosen = [] if extras.strip() == "none" else [e.strip() for e in extras.split(",") if e.strip()]
    if not set(chosen) <= set(EXTRA_OUTPUTS):
        raise click.BadParameter(f"choose among {', '.join(EXTRA_OUTPUTS)}, or 'none'", param_hint="--extras")
    from models.pipeline import Pipeline
    from models.pipeline import analyze as run_pipeline
    from models.series_loading import SeriesError, load_series

    started = time.perf_counter()
    progress = _echo_progress(started)
    try:
        series = load_series(series_dir)
    except SeriesError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    pipeline = Pipeline.load(device=device)
    progress(f"model {pipeline.version} on {pipeline.device}; series of {series.volume.shape[0]} slices")
    analysis = run_pipeline(series.volume, pipeline, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "model_version": pipeline.version,
        "series_instance_uid": series.series_instance_uid,
        "coordinates": "DICOM patient coordinates (LPS), millimetres",
        "candidates": len(analysis.candidates),
        "seconds": analysis.seconds,
        "findings": [finding.to_json() for finding in analysis.findings],
    }
    path = out_dir / "findings.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    for number, finding in enumerate(analysis.findings, start=1):
        centre = ", ".join(f"{v:.1f}" for v in finding.centre_mm)
        click.echo(
            f"{number:>2}  p={finding.probability:.2f}  {finding.nodule_type:<12} "
            f"{finding.long_axis_mm:5.1f} x {finding.short_axis_mm:<5.1f} mm  {finding.side} {finding.zone}  "
            f"Lung-RADS {finding.lung_rads} (suggestion)  ({centre})"
        )
    click.echo(f"{len(analysis.findings)} findings in {path} ({time.perf_counter() - started:.1f} s)")
    from cad_node.algorithm import AlgorithmIdentity
    from cad_node.result_encoding import encode_results, write_results
    from models.pipeline import WEIGHTS_DIR

    algorithm = AlgorithmIdentity.for_weights(pipeline.version, WEIGHTS_DIR)
    findings = analysis.findings
    results = encode_results(
        series.headers, series.frame_numbers, findings, algorithm, extras=chosen, volume=series.volume
    )
    for written in write_results(results, out_dir):
        click.echo(f"DICOM result: {written}")


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("var/training"),
    show_default=True,
    help="Where the training shards, checkpoints, logs and curves go.",
)
@click.option("--networks", default="detector,classifier,segmenter", show_default=True)
@click.option(
    "--pretrain-epochs", type=click.IntRange(min=0), help="Epochs on synthetic cases (0: no pretraining)."
)
@click.option(
    "--finetune-epochs",
    type=click.IntRange(min=0),
    help="Epochs on insertions into real CT (with the synthetic cases, for the detector; 0: none).",
)
@click.option(
    "--from-shipped",
    is_flag=True,
    help="Go on from the shipped networks instead of from scratch; each stays shipped unless beaten.",
)
@click.option(
    "--start-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Go on from this checkpoint of one network (e.g. a detector pretrained on a GPU, "
    "models/pretraining.py); the shipped network stays unless beaten.",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=0, min_open=True),
    help="Time for the whole command, for one network: its stages share it in proportion to their "
    "work, stop starting epochs that would end past it, and anneal their learning rate over the "
    "epochs that fit (shards and mining count against it).",
)
@click.option(
    "--compare-scratch/--no-compare-scratch",
    default=None,
    help="Also train on insertions alone, to measure what synthetic pretraining brings "
    "(default: on, except with --minutes).",
)
@click.option(
    "--ship/--no-ship", default=True, show_default=True, help="Copy the best weights into the package."
)
@click.option(
    "--detection-passes",
    help="The grids (mm, comma-separated, e.g. 1.0,0.7) the detector runs on for the classifier: its "
    "candidates, merged, are what the classifier learns from and is judged behind, and what the "
    "pipeline will run with it (default: the shipped classifier's).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Processes that build missing training shards side by side (default: one a core, as memory allows).",
)
def train(
    data_dir: Path,
    networks: str,
    pretrain_epochs: int | None,
    finetune_epochs: int | None,
    compare_scratch: bool | None,
    ship: bool,
    from_shipped: bool,
    start_from: Path | None,
    detection_passes: str | None,
    minutes: float | None,
    workers: int | None,
) -> None:
    """Train the networks from the project's own data: synthetic pretraining, then fine-tuning on
    nodules inserted into the LIDC backgrounds. The classifier also learns from the shipped
    detector's own candidates, so a new detector is trained (and shipped) first."""
    from models.datasets import default_workers
    from models.training_runs import Budget, train_all

    started = time.perf_counter()
    default = Budget()
    budget = Budget(
        pretrain_epochs=default.pretrain_epochs if pretrain_epochs is None else pretrain_epochs,
        finetune_epochs=default.finetune_epochs if finetune_epochs is None else finetune_epochs,
        deadline=None if minutes is None else time.monotonic() + 60 * minutes,
    )
    chosen = [n.strip() for n in networks.split(",")]
    if minutes is not None and (len(chosen) != 1 or compare_scratch):
        raise click.BadParameter(
            "a time budget is shared by one network's stages: name one network in --networks, "
            "without --compare-scratch",
            param_hint="--minutes",
        )
    if start_from is not None and (from_shipped or len(chosen) != 1):
        raise click.BadParameter(
            "a checkpoint is one network's: name it alone in --networks, without --from-shipped",
            param_hint="--start-from",
        )
    if budget.pretrain_epochs + budget.finetune_epochs == 0:
        raise click.BadParameter(
            "nothing to train: both stages have 0 epochs", param_hint="--pretrain-epochs"
        )
    summary = train_all(
        data_dir,
        chosen,
        budget,
        compare_scratch=minutes is None if compare_scratch is None else compare_scratch,
        ship_weights=ship,
        from_shipped=from_shipped,
        start_from=start_from,
        passes_mm=_passes(detection_passes),
        workers=workers or default_workers(),
        progress=_echo_progress(started),
    )
    click.echo(json.dumps(summary, indent=2))
    if any("weights" in entry for entry in summary["networks"].values()):
        click.echo("new networks change the operating point: run `cad-node calibrate`")


def _passes(text: str | None) -> tuple[float, ...] | None:
    """`--detection-passes`: grids of 0.5 to 1 mm, the detector's own 1 mm first."""
    if text is None:
        return None
    try:
        passes = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"not a list of numbers: {text!r}", param_hint="--detection-passes"
        ) from None
    if passes[0] != 1.0 or not all(0.5 <= p <= 1.0 for p in passes) or len(set(passes)) != len(passes):
        raise click.BadParameter(
            "the 1 mm grid first, then finer ones down to 0.5 mm, each once (e.g. 1.0,0.7)",
            param_hint="--detection-passes",
        )
    return passes


def _unit_grid(text: str | None, default: tuple[float, ...], option: str) -> list[float]:
    """A comma-separated list of numbers between 0 and 1 (`default` when not given)."""
    if text is None:
        return list(default)
    try:
        grid = [float(t) for t in text.split(",")]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from error
    if not grid or not all(0.0 <= t <= 1.0 for t in grid):
        raise click.BadParameter("values between 0 and 1", param_hint=option)
    return grid


@main.command()
@click.option("--device", help="torch device (default: a GPU where there is one, else the CPU).")
@click.option(
    "--detector-thresholds",
    help="The detector thresholds to try, comma-separated (default: 0.05,0.1,0.2,0.3).",
)
@click.option(
    "--detector-weights",
    help="The detector's weights in the finding's probability to try, comma-separated "
    "(default: 0.5,0.6,0.7,0.8,0.9; 0.5 is the plain geometric mean with the classifier's).",
)
@click.option(
    "--ship/--no-ship",
    default=True,
    show_default=True,
    help="Write the chosen operating point into the shipped detector's metadata.",
)
def calibrate(
    device: str | None, detector_thresholds: str | None, detector_weights: str | None, ship: bool
) -> None:
    """Choose the operating point (detector threshold, detector weight, probability threshold) on the
    validation cases."""
    from models import calibration
    from models.pipeline import WEIGHTS_DIR, Pipeline

    started = time.perf_counter()
    thresholds = _unit_grid(detector_thresholds, calibration.DETECTOR_THRESHOLDS, "--detector-thresholds")
    weights = _unit_grid(detector_weights, calibration.DETECTOR_WEIGHTS, "--detector-weights")
    pipeline = Pipeline.load(device=device)
    result = calibration.calibrate(pipeline, thresholds, weights, progress=_echo_progress(started))
    click.echo(f"model {pipeline.version}")
    click.echo(result.format_table())
    if ship:
        path = calibration.ship_thresholds(result, WEIGHTS_DIR)
        click.echo(f"operating point {result.thresholds} written into {path}")


@main.command()
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=Path("var/evaluation"), show_default=True
)
@click.option("--cases", "max_cases", type=int, help="Evaluate on the first N held-out cases only.")
@click.option("--device", help="torch device (default: a GPU where there is one, else the CPU).")
@click.option(
    "--detector-threshold",
    type=click.FloatRange(0.0, 1.0),
    help="Try another candidate threshold on the detector's heatmap (default: the shipped one).",
)
def evaluate(
    out_dir: Path, max_cases: int | None, device: str | None, detector_threshold: float | None
) -> None:
    """Evaluate the shipped pipeline: FROC, CPM, F1, Dice and size errors on held-out cases by type and
    size, and the LUNA16 listing of the two real LIDC scans."""
    from models.evaluation_runs import evaluate_pipeline
    from models.pipeline import Pipeline

    started = time.perf_counter()
    pipeline = Pipeline.load(device=device)
    if detector_threshold is not None:
        pipeline = pipeline.with_detector_threshold(detector_threshold)
    output = evaluate_pipeline(pipeline, out_dir, max_cases=max_cases, progress=_echo_progress(started))
    click.echo(
        f"model {pipeline.version}, detector threshold {pipeline.thresholds.detector}, "
        f"detector weight {pipeline.thresholds.detector_weight}, "
        f"operating point p >= {pipeline.thresholds.probability}"
    )
    click.echo(
        f"held-out cases: {output.held_out.scans}, fingerprint {output.cases_fingerprint} "
        "(figures compare only between reports of the same fingerprint)"
    )
    click.echo(output.held_out.format_table())
    click.echo("At the operating point, by background (insertions: into the LIDC scans training also saw)")
    for kind, figures in output.by_background.items():
        point = figures.point
        click.echo(
            f"  {kind}: {figures.scans} scans, sensitivity {point.recall:.3f} "
            f"({point.tp}/{point.tp + point.fn}), {point.fp_per_scan:.2f} false positives per scan"
        )
    missed, small = output.missed["all"], output.missed["3-6 mm"]
    click.echo(f"Nodules never found ({sum(missed.values())}), by where the pipeline lost them (3 to 6 mm):")
    for stage, count in missed.most_common():
        click.echo(f"  {stage}: {count} ({small[stage]})")
    for listing in output.lidc_listings:
        click.echo(listing)
    seconds = output.seconds_per_scan
    click.echo(f"pipeline time per scan: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")
    click.echo("files: " + ", ".join(str(p) for p in output.files))
