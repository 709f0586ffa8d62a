"""Which workers are alive: each worker process writes its row of the `worker_beats` table every
`BEAT_EVERY_S`, wherever it runs, since all share the job database.

A row not written for `STALE_AFTER_S` belongs to a worker that stopped. Celery's remote control cannot
say this on the filesystem broker (it has no fanout).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from dataclasses import dataclass

from sqlalchemy import delete, select

from cad_node.job_database import JobDatabase, utcnow
from cad_node.job_database import WorkerBeat as BeatRow

log = logging.getLogger(__name__)

BEAT_EVERY_S = 10.0
STALE_AFTER_S = 3 * BEAT_EVERY_S
FORGET_AFTER_S = 24 * 3600.0  # workers stopped this long ago are no longer listed


@dataclass(frozen=True)
class WorkerBeat:
    queue: str
    host: str
    pid: int
    seconds_ago: float

    @property
    def alive(self) -> bool:
        return self.seconds_ago <= STALE_AFTER_S

    @property
    def name(self) -> str:
        return f"{self.queue}@{self.host}-{self.pid}"


class Heartbeat:
    """Writes this process's row every `BEAT_EVERY_S` in a daemon thread; removes it on `stop`. It opens
    a connection per beat (a worker forks its pool processes; no connection may be shared with them)."""

    def __init__(self, database_url: str, queue: str) -> None:
        self.database = JobDatabase(database_url, pooled=False)
        self.beat = WorkerBeat(queue, socket.gethostname(), os.getpid(), 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    @property
    def name(self) -> str:
        return self.beat.name

    def start(self) -> None:
        with self.database.session() as session:
            session.merge(
                BeatRow(name=self.name, queue=self.beat.queue, host=self.beat.host, pid=self.beat.pid)
            )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self.database.session() as session:
            session.execute(delete(BeatRow).where(BeatRow.name == self.name))
        self.database.close()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_EVERY_S):
            try:
                with self.database.session() as session:
                    row = session.get(BeatRow, self.name)
                    if row is None:
                        session.add(
                            BeatRow(
                                name=self.name, queue=self.beat.queue, host=self.beat.host, pid=self.beat.pid
                            )
                        )
                    else:
                        row.beat_at = utcnow()
            except Exception as error:  # the database is away: the worker shows as stale meanwhile
                log.warning("heartbeat not written (%s); trying again", error)


def read_beats(database: JobDatabase, now: dt.datetime | None = None) -> list[WorkerBeat]:
    """The workers that beat within the last day, alive ones first."""
    now = now or utcnow()
    with database.session() as session:
        rows = session.scalars(
            select(BeatRow).where(BeatRow.beat_at >= now - dt.timedelta(seconds=FORGET_AFTER_S))
        ).all()
        beats = [
            WorkerBeat(row.queue, row.host, row.pid, max(0.0, (now - row.beat_at).total_seconds()))
            for row in rows
        ]
    return sorted(beats, key=lambda b: (not b.alive, b.queue, b.host, b.pid))
