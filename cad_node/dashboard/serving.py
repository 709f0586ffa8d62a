"""Serving the dashboard with uvicorn: in the foreground (`cad-node dashboard`) or in a thread (`up`).

The socket is bound before uvicorn starts, so a port in use fails at once, in the caller, with its reason.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from cad_node.dashboard.app import create_app
from cad_node.job_database import JobDatabase
from cad_node.settings import Settings


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class DashboardServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.socket = bind(host, port)
        self.host = host
        self.port = int(self.socket.getsockname()[1])  # the port given, or the one chosen for port 0
        # log_config=None: the node's own logging; no access log (the dashboard logs logins and retries).
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        if self.host in ("0.0.0.0", "::", ""):
            host = "<this host>"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve(self) -> None:
        """In the foreground, until SIGINT or SIGTERM."""
        self.server.run(sockets=[self.socket])

    def start(self, timeout_s: float = 10.0) -> None:
        """In a thread; returns once it accepts connections."""
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {self.address}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def dashboard_server(settings: Settings, database: JobDatabase, host: str, port: int) -> DashboardServer:
    return DashboardServer(create_app(settings, database), host, port)
