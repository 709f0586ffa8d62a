"""The Celery application the node queues work on: analysis of a study, export of its results.

By default the broker is kombu's filesystem transport in the data folder, so one machine runs the
whole node with no server; `CAD_NODE_BROKER_URL=redis://...` for several machines. The job database
is the record of work: a message only says "look at job N", and a lost message is sent again by the
study assembler's sweep.
"""

from __future__ import annotations

from celery import Celery

from cad_node.settings import Settings

ANALYSIS_QUEUE = "analysis"
EXPORT_QUEUE = "export"
ANALYSE_TASK = "workers.tasks.analyse_job"
EXPORT_TASK = "workers.tasks.export_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("cad_node", broker=settings.effective_broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_routes={ANALYSE_TASK: {"queue": ANALYSIS_QUEUE}, EXPORT_TASK: {"queue": EXPORT_QUEUE}},
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    if settings.effective_broker_url.startswith("filesystem://"):
        folder = settings.queue_dir.resolve()
        (folder / "messages").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder / "messages"),
            "data_folder_out": str(folder / "messages"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.25,
        }
        # The filesystem transport has no fanout for remote control and events.
        app.conf.worker_enable_remote_control = False
        app.conf.worker_send_task_events = False
    return app


class JobQueue:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def analyse(self, job_id: int) -> None:
        self.app.send_task(ANALYSE_TASK, args=[job_id], queue=ANALYSIS_QUEUE)

    def export(self, job_id: int, destination: str, countdown: float = 0.0) -> None:
        self.app.send_task(EXPORT_TASK, args=[job_id, destination], queue=EXPORT_QUEUE, countdown=countdown)
