"""The Celery tasks; `cad-node worker` runs them. Everything a task needs is made once per process."""

from __future__ import annotations

import functools
import logging

from celery import Task

from cad_node.job_database import JobDatabase
from cad_node.job_queue import ANALYSE_TASK, EXPORT_TASK, JobQueue, make_celery
from cad_node.settings import Settings

log = logging.getLogger(__name__)

settings = Settings()
app = make_celery(settings)


@functools.cache
def _database() -> JobDatabase:
    return JobDatabase(settings.effective_database_url)


@app.task(name=ANALYSE_TASK)
def analyse_job(job_id: int) -> None:
    from workers.analysis import run_analysis

    run_analysis(job_id, settings, _database(), JobQueue(app))


@app.task(name=EXPORT_TASK, bind=True, max_retries=None)
def export_job(self: Task, job_id: int, destination: str) -> None:
    from workers.delivery import run_delivery

    wait = run_delivery(job_id, destination, settings, _database())
    if wait is not None:
        raise self.retry(countdown=wait)
