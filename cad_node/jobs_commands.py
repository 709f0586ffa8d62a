"""`cad-node jobs list | show | retry`: what came in, what was analysed, what was delivered, what failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from cad_node.job_database import DeliveryStatus, Job, JobDatabase
from cad_node.node_commands import load_settings


def job_summary(job: Job) -> dict[str, Any]:
    seconds = None
    if job.started_at and job.finished_at:
        seconds = round((job.finished_at - job.started_at).total_seconds(), 1)
    return {
        "id": job.id,
        "study_uid": job.study.study_uid,
        "calling_ae": job.study.calling_ae,
        "status": job.status,
        "series_uid": job.series_uid,
        "findings": len(job.findings),
        "created_at": job.created_at.isoformat(timespec="seconds") + "Z",
        "seconds": seconds,
        "deliveries": {d.destination: d.status for d in job.deliveries},
        "reason": job.reason,
    }


def job_details(job: Job) -> dict[str, Any]:
    return {
        **job_summary(job),
        "attempts": job.attempts,
        "error_trace": job.error_trace,
        "worker": job.worker,
        "model_version": job.model_version,
        "study_instances": job.study.instance_count,
        "study_note": job.study.note,
        "study_files": "kept"
        if job.study.purged_at is None
        else f"received instances and result files removed by the retention policy at "
        f"{job.study.purged_at.isoformat(timespec='seconds')}Z (the records stay)",
        "selection": job.selection,
        "steps": [{"name": s.name, "seconds": s.seconds} for s in job.steps],
        "findings": [f.details for f in job.findings],
        "results": [
            {"kind": r.kind, "sop_instance_uid": r.sop_instance_uid, "path": r.path} for r in job.results
        ],
        "deliveries": [
            {
                "destination": d.destination,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "attempt_log": [
                    {
                        "started_at": a.started_at.isoformat(timespec="seconds") + "Z",
                        "seconds": a.seconds,
                        "error": a.error,
                        "stored": a.stored,
                    }
                    for a in d.attempt_log
                ],
                "delivered_at": d.delivered_at.isoformat(timespec="seconds") + "Z"
                if d.delivered_at
                else None,
            }
            for d in job.deliveries
        ],
    }


def _database(data_dir: Path | None) -> JobDatabase:
    return JobDatabase(load_settings(data_dir=data_dir).effective_database_url)


_LOAD = (
    selectinload(Job.study),
    selectinload(Job.findings),
    selectinload(Job.deliveries),
    selectinload(Job.steps),
)
data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Data folder."
)


@click.group()
def jobs() -> None:
    """The job database: studies received, jobs, steps, findings, deliveries."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.option("--limit", default=50, show_default=True)
@data_dir_option
def jobs_list(as_json: bool, limit: int, data_dir: Path | None) -> None:
    """The latest jobs, newest first."""
    database = _database(data_dir)
    with database.session() as session:
        rows = [
            job_summary(job)
            for job in session.scalars(select(Job).options(*_LOAD).order_by(Job.id.desc()).limit(limit))
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        f"{'job':>5}  {'status':<10} {'from':<16} {'nodules':>7} {'time':>7}  {'delivered':<10} reason"
    )
    for row in rows:
        delivered = _delivery_word(row["deliveries"])
        seconds = f"{row['seconds']:.0f} s" if row["seconds"] is not None else "-"
        click.echo(
            f"{row['id']:>5}  {row['status']:<10} {row['calling_ae']:<16} {row['findings']:>7} {seconds:>7}  "
            f"{delivered:<10} {row['reason']}"
        )


def _delivery_word(deliveries: dict[str, str]) -> str:
    if not deliveries:
        return "-"
    done = sum(status == DeliveryStatus.DELIVERED for status in deliveries.values())
    failed = sum(status == DeliveryStatus.FAILED for status in deliveries.values())
    return f"{done}/{len(deliveries)}" + (f" {failed} failed" if failed else "")


@jobs.command("show")
@click.argument("job_id", type=int)
@data_dir_option
def jobs_show(job_id: int, data_dir: Path | None) -> None:
    """Everything about one job: the series chosen and why, each step's time, findings, deliveries."""
    database = _database(data_dir)
    with database.session() as session:
        job = session.get(Job, job_id, options=[*_LOAD, selectinload(Job.results)])
        if job is None:
            raise click.ClickException(f"no job {job_id}")
        click.echo(json.dumps(job_details(job), indent=2, default=str))


@jobs.command("retry")
@click.argument("job_id", type=int)
@data_dir_option
def jobs_retry(job_id: int, data_dir: Path | None) -> None:
    """Run a failed job again, or send its results again where a delivery failed."""
    from cad_node.job_queue import JobQueue, make_celery
    from cad_node.job_retry import RetryError, retry_job

    settings = load_settings(data_dir=data_dir)
    database = JobDatabase(settings.effective_database_url)
    try:
        action = retry_job(database, JobQueue(make_celery(settings)), job_id)
    except RetryError as refused:
        raise click.ClickException(str(refused)) from refused
    click.echo(f"job {job_id}: {action}")
