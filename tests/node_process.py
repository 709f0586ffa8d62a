"""The node as the user runs it, for end-to-end tests: `cad-node up` in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.peers import _log_tail, _stop, free_port, wait_until

NODE_AET = "CADNODE"


def run_cli(arguments: Sequence[str], environment: dict[str, str] | None = None) -> str:
    """`cad-node ARGUMENTS`: its output; RuntimeError with what it said when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "cad_node", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cad-node {' '.join(arguments)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


class _NodeFolder:
    """A node's temporary folder, with its data folder inside, while the node runs."""

    _workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def root(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("the node is not running (use it as a context manager)")
        return Path(self._workdir.name)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


class RunningNode(_NodeFolder):
    """`cad-node up` on a free port with its own data folder; `jobs()` reads `cad-node jobs list --json`."""

    def __init__(
        self,
        destinations: Sequence[str] = (),
        allowed_callers: Sequence[str] = (),
        quiet_period_s: float = 2.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.destinations = list(destinations)
        self.allowed_callers = list(allowed_callers)
        self.quiet_period_s = quiet_period_s
        self.start_timeout = start_timeout
        self.port = free_port()
        self.ae_title = NODE_AET
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "cad_node", *arguments]

    def __enter__(self) -> Self:
        self._workdir = tempfile.TemporaryDirectory(prefix="cad-node-")
        arguments = ["up", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        arguments += ["--ae-title", self.ae_title, "--quiet-period", str(self.quiet_period_s)]
        for destination in self.destinations:
            arguments += ["--destination", destination]
        for caller in self.allowed_callers:
            arguments += ["--allow", caller]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CAD_NODE_")}
        environment["TORCH_NUM_THREADS"] = "2"
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(*arguments), stdout=log, stderr=subprocess.STDOUT, env=environment
            )
        wait_until(self._ready, self.start_timeout, interval=0.3, what="the node's listener and workers")
        return self

    def _ready(self) -> bool:
        self.check_alive()
        log = self.log()
        return "listening as" in log and log.count(" ready.") >= 2

    def check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"cad-node up exited with {self._process.returncode}:\n{self.log()}")

    def log(self) -> str:
        return _log_tail(self.log_path) if self._workdir is not None else ""

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *arguments: str) -> str:
        return run_cli([*arguments, "--data-dir", str(self.data_dir)])

    def jobs(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("jobs", "list", "--json")))

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(json.loads(self.cli("jobs", "show", str(job_id))))

    def wait_for_job(self, status: str, timeout: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            self.check_alive()
            done = [j for j in self.jobs() if j["status"] == status]
            return done[0] if done else None

        return wait_until(finished, timeout, interval=1.0, what=f"a {status} job")

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self._process is not None:
                if self._process.poll() is None:
                    self._process.send_signal(signal.SIGTERM)
                _stop(self._process, grace=30)
            if kind is not None:
                print(f"--- cad-node log ---\n{self.log()}", file=sys.stderr)
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()
            self._workdir = None


class SplitNode(_NodeFolder):
    """The node as a hospital runs it: `cad-node listen` and separate `cad-node worker` processes sharing
    a broker and a job database given by URL (Redis and PostgreSQL in production)."""

    def __init__(
        self,
        broker_url: str,
        database_url: str,
        analysis_workers: int,
        destinations: Sequence[str] = (),
        allowed_callers: Sequence[str] = (),
        quiet_period_s: float = 2.0,
    ) -> None:
        self.environment = {k: v for k, v in os.environ.items() if not k.startswith("CAD_NODE_")}
        self.environment |= {
            "CAD_NODE_BROKER_URL": broker_url,
            "CAD_NODE_DATABASE_URL": database_url,
            "CAD_NODE_DESTINATIONS": json.dumps(list(destinations)),
            "CAD_NODE_ALLOWED_CALLERS": json.dumps(list(allowed_callers)),
            "CAD_NODE_QUIET_PERIOD_S": str(quiet_period_s),
            "CAD_NODE_AE_TITLE": NODE_AET,
            # Two analysis processes share two cores.
            "OMP_NUM_THREADS": "1",
        }
        self.analysis_workers = analysis_workers
        self.admin_token = "test-token-" + os.urandom(8).hex()
        self.environment["CAD_NODE_ADMIN_TOKEN"] = self.admin_token
        self.dashboard_port = free_port()
        self.port = free_port()
        self.ae_title = NODE_AET
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _start(self, name: str, *arguments: str) -> None:
        log = (self.root / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "cad_node", *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.environment, "CAD_NODE_DATA_DIR": str(self.data_dir)},
        )
        log.close()
        self._processes.append((name, process))

    def __enter__(self) -> Self:
        self._workdir = tempfile.TemporaryDirectory(prefix="cad-node-split-")
        done = subprocess.run(
            [sys.executable, "-m", "cad_node", "db", "upgrade"],
            env={**self.environment, "CAD_NODE_DATA_DIR": str(self.data_dir)},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cad-node db upgrade failed:\n{done.stdout}{done.stderr}")
        self._start("listener", "listen", "--port", str(self.port))
        for number in range(self.analysis_workers):
            self._start(f"analysis-{number}", "worker", "--queue", "analysis", "--concurrency", "1")
        self._start("export", "worker", "--queue", "export")
        self._start("dashboard", "dashboard", "--port", str(self.dashboard_port))
        wait_until(self._ready, 90, interval=0.3, what="listener, workers and dashboard")
        return self

    def _ready(self) -> bool:
        self.check_alive()
        logs = {name: (self.root / f"{name}.log").read_text(errors="replace") for name, _ in self._processes}
        workers = [text for name, text in logs.items() if name not in ("listener", "dashboard")]
        return (
            "listening as" in logs["listener"]
            and all(" ready." in text for text in workers)
            and self._serving()
        )

    def _serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/healthz", timeout=2):
                return True
        except (OSError, urllib.error.HTTPError):
            return False

    def dashboard_page(self, path: str) -> str:
        """A dashboard page, fetched as an admin tool does: with the token as a bearer token."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dashboard_port}{path}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())

    def check_alive(self) -> None:
        for name, process in self._processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return _log_tail(self.root / f"{name}.log")

    def cli(self, *arguments: str) -> str:
        return run_cli(arguments, {**self.environment, "CAD_NODE_DATA_DIR": str(self.data_dir)})

    def jobs(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("jobs", "list", "--json", "--limit", "1000")))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            for _, process in self._processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for _, process in self._processes:
                _stop(process, grace=30)
            if kind is not None:
                for name, _ in self._processes:
                    print(f"--- {name} log ---\n{self.log(name)}", file=sys.stderr)
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()
            self._workdir = None
