"""Serves the prebuilt OHIF viewer for the local Orthanc, on one origin.

    python3 orthanc/viewer/serve.py [--port 3000] [--orthanc http://127.0.0.1:8042] [--dist DIR]

- ``/app-config.js``: written from ``app-config.js.in`` next to this file.
- ``/dicom-web/...`` and ``/wado...``: forwarded to Orthanc (a reverse proxy), so that the browser
  sees a single origin and Orthanc needs no CORS headers.
- any other path: a file of OHIF's ``dist/``, else ``index.html`` (OHIF is a single-page app:
  ``/viewer?StudyInstanceUIDs=...`` is one of its routes, not a file).

Standard library only; it listens on localhost unless ``--host`` says otherwise. For a local test
bench, like the Orthanc it serves: no authentication.
"""

from __future__ import annotations

import argparse
import http.client
import posixpath
import sys
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
DEFAULT_DIST = HERE.parents[1] / "var" / "viewer" / "ohif-3.13.2" / "dist"
PROXIED_PREFIXES = ("/dicom-web/", "/wado")
# Hop-by-hop headers (RFC 9110, 7.6.1) are not forwarded; the body is re-sent with its own length.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host",
}  # fmt: skip
# OHIF uses SharedArrayBuffer where the page is cross-origin isolated; everything here is same-origin.
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}
PROXY_TIMEOUT_S = 120.0


def render_app_config(orthanc_url: str) -> bytes:
    """OHIF's app-config.js for an Orthanc at ``orthanc_url`` reached through this server.

    Orthanc's DICOMweb plugin writes BulkDataURIs as ``http://localhost:<port>/dicom-web/...`` (the
    "Host" of orthanc/orthanc.json.in); OHIF rewrites that prefix to this server's /dicom-web/."""
    port = urllib.parse.urlsplit(orthanc_url).port or 80
    template = (HERE / "app-config.js.in").read_text()
    text = template.replace("@ORTHANC_URL@", orthanc_url)
    text = text.replace("@ORTHANC_BULKDATA_PREFIX@", f"http://localhost:{port}/dicom-web/")
    return text.encode()


class ViewerHandler(SimpleHTTPRequestHandler):
    """OHIF's static files with a single-page-app fallback, its config, and a proxy to Orthanc."""

    protocol_version = "HTTP/1.1"
    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
    }

    def __init__(self, *args: object, orthanc: urllib.parse.SplitResult, app_config: bytes, **kwargs: object):
        self.orthanc = orthanc
        self.app_config = app_config
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(PROXIED_PREFIXES):
            self._proxy()
        elif path == "/app-config.js":
            self._send_bytes(self.app_config, "application/javascript")
        else:
            super().do_GET()

    def do_HEAD(self) -> None:
        if urllib.parse.urlsplit(self.path).path.startswith(PROXIED_PREFIXES):
            self._proxy()
        else:
            super().do_HEAD()

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path.startswith(PROXIED_PREFIXES):
            self._proxy()
        else:
            self.send_error(405)

    def translate_path(self, path: str) -> str:
        """The file for ``path`` in dist/, or index.html when there is none (client-side routes)."""
        local = Path(super().translate_path(path))
        if local.is_file():
            return str(local)
        return str(Path(self.directory) / "index.html")

    def _send_bytes(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        target = posixpath.join(self.orthanc.path or "/", self.path.lstrip("/"))
        upstream = http.client.HTTPConnection(
            self.orthanc.hostname or "127.0.0.1", self.orthanc.port or 80, timeout=PROXY_TIMEOUT_S
        )
        try:
            upstream.request(self.command, target, body=body, headers=headers)
            answer = upstream.getresponse()
            # Whole answers (frames, metadata) are small enough to hold; a length lets the browser
            # keep its connection open.
            content = answer.read()
        except OSError as error:
            self.send_error(502, f"Orthanc at {self.orthanc.geturl()} did not answer: {error}")
            return
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:  # type: ignore[attr-defined]
            super().log_message(format, *args)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    verbose = False


def make_server(host: str, port: int, orthanc_url: str, dist: Path, verbose: bool = False) -> ViewerServer:
    """The server, bound (``port`` 0: a free one, see ``server_address``); call ``serve_forever()``."""
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"no OHIF build at {dist} (run orthanc/viewer/install.sh)")
    handler = partial(
        ViewerHandler,
        directory=str(dist),
        orthanc=urllib.parse.urlsplit(orthanc_url.rstrip("/")),
        app_config=render_app_config(orthanc_url),
    )
    server = ViewerServer((host, port), handler)
    server.verbose = verbose
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve OHIF for the local Orthanc (orthanc/viewer).")
    parser.add_argument("--port", type=int, default=3000, help="HTTP port of the viewer (default 3000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP root")
    parser.add_argument("--dist", type=Path, default=DEFAULT_DIST, help="OHIF's dist/ folder")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    options = parser.parse_args(argv)
    try:
        server = make_server(options.host, options.port, options.orthanc, options.dist, options.verbose)
    except (FileNotFoundError, OSError) as error:
        print(f"serve.py: {error}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"OHIF for {options.orthanc} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
