"""Real DICOM peers for end-to-end tests: dcmtk's storescp and a local Orthanc (orthanc/start.sh).

Both are context managers that start the program on free ports, wait until it answers, and end it
on exit. A missing program skips the test (fails when CI is set), as ``require_tool`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.conftest import _require_tool

ORTHANC_START = Path(__file__).resolve().parents[1] / "orthanc" / "start.sh"
LOG_TAIL_CHARS = 6000

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on localhost now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk programs: without TCP_NODELAY they are very slow on loopback."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    files: Iterable[Path], port: int, called_aet: str, calling_aet: str = "PUSHER", host: str = "127.0.0.1"
) -> float:
    """Sends the files with dcmtk's storescu in one association; gives the seconds it took."""
    program = _require_tool("storescu")
    command = [program, "-aet", calling_aet, "-aec", called_aet, host, str(port), *map(str, files)]
    started = time.monotonic()
    done = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return time.monotonic() - started


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "") -> T:
    """Polls until ``predicate()`` is truthy and gives that value; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout} s: {what or predicate}")
        time.sleep(interval)


def _log_tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-LOG_TAIL_CHARS:]


def _stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


class Storescp:
    """dcmtk storescp on a free port: a DICOM storage SCP writing what it receives into ``folder``.

    It accepts all storage SOP classes and transfer syntaxes storescp supports (``+xa``). With
    ``unique_names`` (the default) every reception gets its own file, so an object sent twice shows
    up twice; without it files are named after the SOP instance UID (``CT.<uid>.dcm``).
    """

    def __init__(self, ae_title: str = "STORESCP", unique_names: bool = True, start_timeout: float = 15.0):
        self.ae_title = ae_title
        self.unique_names = unique_names
        self.start_timeout = start_timeout
        self.port = 0
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def folder(self) -> Path:
        return self._root / "received"

    @property
    def log_path(self) -> Path:
        return self._root / "storescp.log"

    @property
    def _root(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("Storescp is not running (use it as a context manager)")
        return Path(self._workdir.name)

    def __enter__(self) -> Self:
        program = _require_tool("storescp")
        echoscu = _require_tool("echoscu")
        self._workdir = tempfile.TemporaryDirectory(prefix="storescp-")
        self.folder.mkdir()
        self.port = free_port()
        names = ["+uf"] if self.unique_names else []
        command = [program, "-v", "-aet", self.ae_title, "-od", str(self.folder), *names, "-fe", ".dcm"]
        command += ["+xa", "-dhl", str(self.port)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        try:
            wait_until(lambda: self._answers_echo(echoscu), self.start_timeout, what="storescp answers echo")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _answers_echo(self, echoscu: str) -> bool:
        self.check_alive()
        command = [echoscu, "-aec", self.ae_title, "-to", "2", "127.0.0.1", str(self.port)]
        return subprocess.run(command, env=dcmtk_env(), capture_output=True, timeout=10).returncode == 0

    def check_alive(self) -> None:
        """Raises with storescp's log if it has ended."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"storescp ended ({self._process.returncode}); its log:\n{_log_tail(self.log_path)}"
            )

    def received(self) -> list[Path]:
        """The files written so far (a file still being written may be among them)."""
        return sorted(path for path in self.folder.iterdir() if path.is_file())

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Waits until at least ``count`` files are there and none is still growing; gives them all."""

        def settled() -> list[Path]:
            self.check_alive()
            files = self.received()
            if len(files) < count:
                return []
            sizes = [path.stat().st_size for path in files]
            time.sleep(0.1)
            return files if self.received() == files and [p.stat().st_size for p in files] == sizes else []

        return wait_until(settled, timeout, what=f"storescp has {count} files (has {len(self.received())})")

    def log(self) -> str:
        return _log_tail(self.log_path)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self._process is not None:
                died = self._process.poll() is not None
                _stop(self._process)
                if died and kind is None:
                    raise RuntimeError(
                        f"storescp ended early ({self._process.returncode}); its log:\n{self.log()}"
                    )
        finally:
            self._process = None
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None


class Orthanc:
    """A local Orthanc (orthanc/start.sh) on free DICOM and HTTP ports, as the hospital PACS.

    ``node`` (``AET@HOST:PORT``) is registered as the modality "cad-node", to which
    orthanc/autoforward.lua sends each study's CT series once it has been stable for ``stable_age`` s.
    """

    def __init__(
        self,
        node: str,
        ae_title: str = "ORTHANC",
        stable_age: int = 2,
        start_timeout: float = 30.0,
    ):
        self.node = node
        self.ae_title = ae_title
        self.stable_age = stable_age
        self.start_timeout = start_timeout
        self.dicom_port = 0
        self.http_port = 0
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("Orthanc is not running (use it as a context manager)")
        return Path(self._workdir.name) / "orthanc.log"

    def __enter__(self) -> Self:
        _require_tool("Orthanc")
        self._workdir = tempfile.TemporaryDirectory(prefix="orthanc-")
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        command = [
            "bash", str(ORTHANC_START), "--dir", str(Path(self._workdir.name) / "data"),
            "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
            "--aet", self.ae_title, "--node", self.node, "--stable-age", str(self.stable_age),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._answers, self.start_timeout, what="Orthanc answers GET /system")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _answers(self) -> bool:
        self.check_alive()
        try:
            self.rest("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def check_alive(self) -> None:
        """Raises with Orthanc's log if it has ended."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"Orthanc ended ({self._process.returncode}); its log:\n{self.log()}")

    def log(self) -> str:
        return _log_tail(self.log_path)

    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        """Calls Orthanc's REST API and gives the decoded JSON answer (None for an empty one)."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read()
        return json.loads(text) if text.strip() else None

    def studies(self) -> list[str]:
        """Orthanc's ids of the studies it holds."""
        return list(self.rest("/studies"))

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        """Each series of the study: Modality, SeriesInstanceUID, Instances (count), ID (Orthanc's)."""
        return [
            {
                "ID": series["ID"],
                "Modality": series["MainDicomTags"].get("Modality", ""),
                "SeriesInstanceUID": series["MainDicomTags"]["SeriesInstanceUID"],
                "Instances": len(series["Instances"]),
            }
            for series in self.rest(f"/studies/{study_id}/series")
        ]

    def study_metadata(self, study_id: str) -> dict[str, str]:
        names: Sequence[str] = self.rest(f"/studies/{study_id}/metadata")
        return {name: self._text(f"/studies/{study_id}/metadata/{name}") for name in names}

    def _text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as answer:
            return str(answer.read().decode())

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str = "") -> T:
        """``wait_until`` that also fails at once, with the log, if Orthanc has ended."""

        def checked() -> T:
            self.check_alive()
            return predicate()

        return wait_until(checked, timeout, what=what)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self._process is not None:
                died = self._process.poll() is not None
                if kind is not None:
                    # pytest shows a failing test's captured stderr: Orthanc's log explains most failures.
                    print(f"--- Orthanc's log (end) ---\n{self.log()}", file=sys.stderr)
                _stop(self._process)
                if died and kind is None:
                    code = self._process.returncode
                    raise RuntimeError(f"Orthanc ended early ({code}); its log:\n{self.log()}")
        finally:
            self._process = None
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None
