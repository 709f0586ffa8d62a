"""Retrying a job by hand: analysis again for a failed job, else its failed deliveries again.

One implementation for `cad-node jobs retry` and the dashboard's retry button.
"""

from __future__ import annotations

from sqlalchemy import select

from cad_node.job_database import Delivery, DeliveryStatus, Job, JobDatabase, JobStatus, Study, StudyStatus
from cad_node.job_queue import JobQueue


class RetryError(ValueError):
    """There is no such job, or nothing of it to retry."""


def retry_job(database: JobDatabase, queue: JobQueue, job_id: int) -> str:
    """Queue the job's analysis again (a failed job) or its failed deliveries; what was done, in words."""
    with database.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RetryError(f"no job {job_id}")
        if job.status == JobStatus.FAILED:
            job.status = JobStatus.QUEUED
            job.attempts = 0
            job.reason = "retried by an admin"
            session.get_one(Study, job.study_id).status = StudyStatus.QUEUED
            action = "analysis queued again"
            exports: list[str] = []
        else:
            failed = session.scalars(
                select(Delivery).where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.FAILED)
            ).all()
            if not failed:
                raise RetryError(f"job {job_id} is {job.status} with no failed delivery: nothing to retry")
            for delivery in failed:
                delivery.status = DeliveryStatus.PENDING
                delivery.attempts = 0
            exports = [d.destination for d in failed]
            action = "delivery queued again to " + ", ".join(exports)
    # Queued after the commit, so a worker that takes the message at once sees the new state.
    if exports:
        for destination in exports:
            queue.export(job_id, destination)
    else:
        queue.analyse(job_id)
    return action
