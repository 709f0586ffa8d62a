"""Which workers are alive: each worker process touches a file of its own under `data_dir/workers`.

The file is named `<queue>@<host>-<pid>`; its modification time is the last beat. The dashboard and the
metrics read the folder; a file not touched for `STALE_AFTER_S` belongs to a worker that stopped.
Celery's remote control cannot say this on the filesystem broker (it has no fanout).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BEAT_EVERY_S = 10.0
STALE_AFTER_S = 3 * BEAT_EVERY_S
FORGET_AFTER_S = 24 * 3600.0  # files of workers stopped this long ago are no longer listed


def heartbeat_dir(data_dir: Path) -> Path:
    return data_dir / "workers"


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
    """Touches this process's file every `BEAT_EVERY_S` in a daemon thread; removes it on `stop`."""

    def __init__(self, data_dir: Path, queue: str) -> None:
        self.path = heartbeat_dir(data_dir) / f"{queue}@{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_EVERY_S):
            # On a full or vanished disk the next beat tries again; meanwhile the worker shows as stale.
            with contextlib.suppress(OSError):
                self.path.touch()


def read_beats(data_dir: Path, now: float | None = None) -> list[WorkerBeat]:
    """The workers that beat within the last day, alive ones first."""
    now = time.time() if now is None else now
    beats = []
    folder = heartbeat_dir(data_dir)
    for path in folder.iterdir() if folder.is_dir() else ():
        queue, _, rest = path.name.partition("@")
        host, _, pid = rest.rpartition("-")
        if not queue or not host or not pid.isdigit():
            continue
        try:
            age = max(0.0, now - path.stat().st_mtime)
        except FileNotFoundError:
            continue
        if age <= FORGET_AFTER_S:
            beats.append(WorkerBeat(queue, host, int(pid), age))
    return sorted(beats, key=lambda b: (not b.alive, b.queue, b.host, b.pid))
