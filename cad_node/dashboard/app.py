"""The dashboard's pages and endpoints (FastAPI, pages rendered on the server with Jinja2).

Routes: `/healthz` (open: "ok" or "not ok", nothing else), `/login`, `/logout`, and behind the login
`/` (the jobs), `/jobs/{id}`, `/jobs/{id}/retry` (POST), `/health` and `/metrics` (Prometheus).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cad_node.dashboard.auth import (
    SESSION_COOKIE,
    SESSION_S,
    Authenticator,
    LoginRequired,
    challenge,
    safe_next,
    wants_html,
)
from cad_node.dashboard.step_chart import STEP_COLOURS, colour, stacked_bar, step_bars
from cad_node.dashboard.views import JobFilter, health_page, job_page, job_rows
from cad_node.job_database import JobDatabase, JobStatus
from cad_node.job_queue import JobQueue, make_celery
from cad_node.job_retry import RetryError, retry_job
from cad_node.metrics import node_registry
from cad_node.node_health import database_reachable, instance_store_disk
from cad_node.settings import Settings

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
NOTICES = {
    "retried": "Retry queued.",
    "nothing-to-retry": "Nothing to retry: the job has not failed and no delivery failed.",
}


def create_app(
    settings: Settings, database: JobDatabase, queue: Callable[[], JobQueue] | None = None
) -> FastAPI:
    """The dashboard over this job database; `queue` makes the queue a retry sends to (made on first use)."""
    authenticator = Authenticator(settings.admin_token)
    registry = node_registry(settings, database)
    pages = _environment()
    queue_maker = queue or (lambda: JobQueue(make_celery(settings)))
    made: list[JobQueue] = []

    def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        html = pages.get_template(template).render(request=request, node=settings.ae_title, **values)
        return HTMLResponse(html, status_code=status_code)

    def require_admin(request: Request) -> None:
        if not authenticator.accepts(request):
            raise LoginRequired

    app = FastAPI(title="cad-node dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _error: LoginRequired) -> Response:
        headers = {"WWW-Authenticate": challenge(request), "Cache-Control": "no-store"}
        if wants_html(request):
            page = render(request, "login.html", 401, next=request.url.path, error="")
            page.headers.update(headers)
            return page
        return PlainTextResponse(
            "login required: the admin token as bearer or basic password\n", 401, headers
        )

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> PlainTextResponse:
        ok = database_reachable(database) and not instance_store_disk(settings).low
        return PlainTextResponse("ok\n" if ok else "not ok\n", 200 if ok else 503)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return render(request, "login.html", next=safe_next(next), error="")

    @app.post("/login")
    def login(
        request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"
    ) -> Response:
        if not authenticator.is_token(token):
            log.warning("dashboard: login refused from %s", _client(request))
            return render(
                request, "login.html", 401, next=safe_next(next), error="That is not the admin token."
            )
        response = RedirectResponse(safe_next(next), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            authenticator.new_session(),
            max_age=SESSION_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        log.info("dashboard: login from %s", _client(request))
        return response

    admin = APIRouter(dependencies=[Depends(require_admin), Depends(_same_origin)])

    @admin.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @admin.get("/", response_class=HTMLResponse)
    def jobs(
        request: Request,
        state: str = "",
        since: str = "",
        until: str = "",
        before: Annotated[int | None, Query()] = None,
    ) -> HTMLResponse:
        if state and state not in list(JobStatus):
            raise HTTPException(400, f"unknown state {state!r}")
        wanted = JobFilter(state, _day(since, "since"), _day(until, "until"), before)
        rows, next_before = job_rows(database, wanted)
        return render(
            request,
            "jobs.html",
            rows=rows,
            wanted=wanted,
            states=list(JobStatus),
            next_before=next_before,
            longest_s=max((row.total_seconds for row in rows), default=0.0),
            legend=list(STEP_COLOURS.items()),
        )

    @admin.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job(request: Request, job_id: int, notice: str = "") -> HTMLResponse:
        page = job_page(database, job_id)
        if page is None:
            raise HTTPException(404, f"no job {job_id}")
        return render(request, "job.html", page=page, notice=NOTICES.get(notice, ""))

    @admin.post("/jobs/{job_id}/retry")
    def retry(request: Request, job_id: int) -> Response:
        if not made:
            made.append(queue_maker())
        try:
            action = retry_job(database, made[0], job_id)
        except RetryError as refused:
            if str(refused).startswith("no job"):
                raise HTTPException(404, str(refused)) from refused
            return RedirectResponse(f"/jobs/{job_id}?notice=nothing-to-retry", status_code=303)
        log.info("dashboard: job %d: %s (from %s)", job_id, action, _client(request))
        return RedirectResponse(f"/jobs/{job_id}?notice=retried", status_code=303)

    @admin.get("/health", response_class=HTMLResponse)
    def health(request: Request) -> HTMLResponse:
        page = health_page(settings, database)
        return render(request, "health.html", page=page)

    @admin.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin)
    return app


def _same_origin(request: Request) -> None:
    """A form posted from another site is refused (the session cookie is SameSite=Strict besides)."""
    origin = request.headers.get("origin")
    if request.method == "POST" and origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-site request refused")


def _day(text: str, name: str) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as error:
        raise HTTPException(400, f"{name}: {text!r} is not a date (YYYY-MM-DD)") from error


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined, trim_blocks=True
    )
    environment.globals.update(stacked_bar=stacked_bar, step_bars=step_bars, colour=colour)
    environment.filters.update(when=_when, ago=_ago, size=_size)
    return environment


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _ago(moment: dt.datetime | None, now: dt.datetime) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, (now - moment).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"
