"""The admin dashboard and /metrics on a real SQLite job database and the embedded Celery queue."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cad_node.dashboard import create_app
from cad_node.job_database import Delivery, DeliveryStatus, Job, JobStatus, utcnow
from cad_node.job_database import WorkerBeat as WorkerBeatRow
from cad_node.job_queue import ANALYSE_TASK, EXPORT_TASK, JobQueue, make_celery
from cad_node.node_health import queue_lengths
from cad_node.settings import Settings
from cad_node.worker_heartbeat import STALE_AFTER_S, Heartbeat, read_beats
from tests.dashboard_rows import (
    PACS,
    PATIENT_ID,
    PATIENT_NAME,
    STEPS,
    TOKEN,
    UNREACHABLE,
    Node,
    at,
    day,
    make_node,
)

BEARER = {"Authorization": f"Bearer {TOKEN}"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = make_node(tmp_path / "node")
    yield made
    made.database.close()


@pytest.fixture
def client(node: Node) -> TestClient:
    return TestClient(create_app(node.settings, node.database), follow_redirects=False)


def pages(node: Node) -> list[str]:
    return ["/", f"/jobs/{node.done}", f"/jobs/{node.failed}", "/health", "/metrics", "/?state=failed"]


def queue_messages(settings: Settings, queue: str) -> list[tuple[str, list[object]]]:
    messages = []
    for path in sorted((settings.queue_dir / "messages").glob(f"*.{queue}.msg")):
        message = json.loads(path.read_text())
        args, _kwargs, _options = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], args))
    return messages


def test_every_page_but_the_probe_refuses_without_the_token(client: TestClient, node: Node) -> None:
    wrong = [{}, {"Authorization": "Bearer nope"}, basic("admin", "nope"), {"Authorization": "Basic %%%"}]
    for path in pages(node):
        for headers in wrong:
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert 'Basic realm="cad-node"' in response.headers["www-authenticate"]
            assert PATIENT_NAME not in response.text
        # A browser gets the login form instead of its own password prompt.
        page = client.get(path, headers=BROWSER)
        assert page.status_code == 401 and '<form method="post" action="/login">' in page.text
        assert page.headers["www-authenticate"] == 'Bearer realm="cad-node"'
    for path in (f"/jobs/{node.failed}/retry", "/logout"):
        assert client.post(path).status_code == 401
    with node.database.session() as session:
        assert session.get_one(Job, node.failed).status == JobStatus.FAILED
    assert not queue_messages(node.settings, "analysis")
    for hidden in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(hidden).status_code == 404


def test_bearer_and_basic_password_are_accepted(client: TestClient, node: Node) -> None:
    for headers in (BEARER, basic("admin", TOKEN), basic("", TOKEN), basic("anyone", TOKEN)):
        for path in pages(node):
            assert client.get(path, headers=headers).status_code == 200, (path, headers)


def test_login_form_sets_an_http_only_session_cookie(client: TestClient, node: Node) -> None:
    refused = client.post("/login", data={"token": "guess", "next": "/health"})
    assert refused.status_code == 401 and "not the admin token" in refused.text
    assert "set-cookie" not in refused.headers
    login = client.post("/login", data={"token": TOKEN, "next": "/health"})
    assert login.status_code == 303 and login.headers["location"] == "/health"
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() not in cookie
    for path in pages(node):
        assert client.get(path).status_code == 200
    # A form posted from another site is refused even with the cookie.
    assert (
        client.post(f"/jobs/{node.failed}/retry", headers={"Origin": "https://evil.example"}).status_code
        == 403
    )
    assert client.post("/logout").status_code == 303
    assert client.get("/").status_code == 401
    # After login, only a path on this site: no open redirect.
    away = client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert away.headers["location"] == "/"


def test_forged_or_expired_session_cookie_is_refused(client: TestClient) -> None:
    for forged in ("9999999999.deadbeef", "1.abc", "", TOKEN):
        client.cookies.set("cad_node_session", forged)
        assert client.get("/").status_code == 401


def test_health_probe_is_open_and_says_only_ok(client: TestClient, node: Node) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")
    full = node.settings.model_copy(update={"min_free_disk_mb": 10**12})  # more than any disk
    low = TestClient(create_app(full, node.database)).get("/healthz")
    assert (low.status_code, low.text) == (503, "not ok\n")


def test_job_list_newest_first_with_what_an_admin_looks_for(client: TestClient, node: Node) -> None:
    page = html.unescape(client.get("/", headers=BEARER).text)
    order = [
        page.index(f'href="/jobs/{n}"') for n in (node.queued, node.skipped, node.undelivered, node.failed)
    ]
    assert order == sorted(order)
    assert order[-1] < page.index(f'href="/jobs/{node.done}"')
    for shown in ("PACS", "300", 'series 3 "LUNG 1.0"', f"{day(1)} 09:00:00", "delivered", "8.5 s", "<svg"):
        assert shown in page
    assert "candidate detection: 3.40 s" in page  # the step bar's tooltip


def test_job_list_filters_by_state_and_date(client: TestClient, node: Node) -> None:
    def jobs_in(query: str) -> set[int]:
        text = client.get(f"/?{query}", headers=BEARER).text
        return {
            n
            for n in (node.done, node.failed, node.undelivered, node.skipped, node.queued)
            if f'"/jobs/{n}"' in text
        }

    assert jobs_in("state=failed") == {node.failed}
    assert jobs_in("state=done") == {node.done, node.undelivered}
    assert jobs_in(f"since={day(2)}&until={day(4)}") == {node.failed, node.undelivered, node.skipped}
    assert jobs_in(f"state=done&since={day(2)}") == {node.undelivered}
    assert jobs_in(f"until={day(0)}") == set()
    assert client.get("/?since=yesterday", headers=BEARER).status_code == 400
    assert client.get("/?state=lost", headers=BEARER).status_code == 400


def test_job_page_shows_choice_findings_steps_traceback_and_delivery_attempts(
    client: TestClient, node: Node
) -> None:
    done = client.get(f"/jobs/{node.done}", headers=BEARER).text
    expected = ["thinnest eligible series", "slices 5.00 mm thick (at most 3 mm)", "part-solid", "12.0 mm"]
    for shown in (*expected, "4A", "right upper", *STEPS, "stored", "1 attempt"):
        assert shown in done, shown
    assert "Retry" not in done  # delivered: nothing to retry

    failed = client.get(f"/jobs/{node.failed}", headers=BEARER).text
    assert "slice spacing is not uniform (1.25 mm and 2.5 mm)" in failed
    assert "Traceback (most recent call last):" in failed and "line 133, in run_analysis" in failed
    assert "Run the analysis again" in failed

    undelivered = client.get(f"/jobs/{node.undelivered}", headers=BEARER).text
    assert undelivered.count(UNREACHABLE) == 4  # the last error, then each of the three attempts
    assert f"{day(3)} 12:00:00" in undelivered and f"Send the results again to {PACS}" in undelivered
    assert client.get("/jobs/999", headers=BEARER).status_code == 404


def test_patient_name_only_on_the_job_page_never_in_lists_or_logs(
    client: TestClient, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = client.get(f"/jobs/{node.done}", headers=BEARER).text
    assert PATIENT_NAME in job and PATIENT_ID in job
    client.post("/login", data={"token": "wrong"})
    client.post(f"/jobs/{node.failed}/retry", headers=BEARER)
    for path in ("/", "/?state=done", f"/jobs/{node.failed}", "/health", "/metrics", "/healthz"):
        text = client.get(path, headers=BEARER).text
        assert PATIENT_NAME not in text and PATIENT_ID not in text, path
    assert "login refused" in caplog.text and f"job {node.failed}: analysis queued again" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    assert "Doe" not in caplog.text


def test_retry_button_queues_a_failed_job_as_the_command_does(client: TestClient, node: Node) -> None:
    response = client.post(f"/jobs/{node.failed}/retry", headers=BEARER)
    assert (
        response.status_code == 303 and response.headers["location"] == f"/jobs/{node.failed}?notice=retried"
    )
    assert queue_messages(node.settings, "analysis") == [(ANALYSE_TASK, [node.failed])]
    with node.database.session() as session:
        job = session.get_one(Job, node.failed)
        assert (job.status, job.attempts, job.reason) == (JobStatus.QUEUED, 0, "retried by an admin")
        assert job.study.status == "queued"
    assert "Retry queued." in client.get(response.headers["location"], headers=BEARER).text

    client.post(f"/jobs/{node.undelivered}/retry", headers=BEARER)
    assert queue_messages(node.settings, "export") == [(EXPORT_TASK, [node.undelivered, PACS])]
    with node.database.session() as session:
        delivery = session.query(Delivery).filter_by(job_id=node.undelivered).one()
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 0)

    nothing = client.post(f"/jobs/{node.done}/retry", headers=BEARER)
    assert nothing.headers["location"] == f"/jobs/{node.done}?notice=nothing-to-retry"
    assert client.post("/jobs/999/retry", headers=BEARER).status_code == 404
    assert len(queue_messages(node.settings, "analysis")) == 1


def test_health_page(client: TestClient, node: Node) -> None:
    JobQueue(make_celery(node.settings)).analyse(node.queued)
    beat = Heartbeat(node.settings.effective_database_url, "analysis")
    beat.start()
    try:
        page = client.get("/health", headers=BEARER).text
    finally:
        beat.stop()
    assert "reachable" in page and "Workers: 1 alive" in page and beat.name in page
    assert "1 job queued" in page and "free</span> of" in page
    assert f"{day(1)} 10:00:00 UTC" in page and f'href="/jobs/{node.done}"' in page  # the last delivery
    assert TOKEN not in page


def test_metrics(client: TestClient, node: Node) -> None:
    queue = JobQueue(make_celery(node.settings))
    queue.analyse(node.queued)
    queue.export(node.undelivered, PACS)
    queue.export(node.undelivered, PACS)
    with node.database.session() as session:  # one export worker beating, one that stopped
        session.add(WorkerBeatRow(name="export@node1-10", queue="export", host="node1", pid=10))
        stale = utcnow() - dt.timedelta(seconds=2 * STALE_AFTER_S)
        session.add(
            WorkerBeatRow(name="export@node1-11", queue="export", host="node1", pid=11, beat_at=stale)
        )

    response = client.get("/metrics", headers=BEARER)
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert (
        value("cad_node_instances_received", "cad_node_instances_received_total") == 300 + 120 + 200 + 2 + 150
    )
    assert families["cad_node_instances_received"].type == "counter"
    studies = {s.labels["state"]: s.value for s in families["cad_node_studies"].samples}
    assert studies == {"receiving": 0, "queued": 1, "analysing": 0, "done": 2, "skipped": 1, "failed": 1}
    assert value("cad_node_jobs", "cad_node_jobs", state="failed") == 1
    steps = families["cad_node_step_duration_seconds"]
    assert steps.type == "histogram"
    detection = "cad_node_step_duration_seconds"
    assert value(detection, f"{detection}_count", step="candidate detection") == 2
    assert value(detection, f"{detection}_sum", step="candidate detection") == pytest.approx(43.4)
    assert value(detection, f"{detection}_bucket", step="candidate detection", le="5.0") == 1
    assert value(detection, f"{detection}_bucket", step="candidate detection", le="30.0") == 1
    assert value(detection, f"{detection}_bucket", step="candidate detection", le="60.0") == 2
    assert value(detection, f"{detection}_bucket", step="candidate detection", le="+Inf") == 2
    assert value(detection, f"{detection}_count", step="load series") == 2
    assert value("cad_node_export_failures", "cad_node_export_failures_total") == 3
    assert families["cad_node_export_failures"].type == "counter"
    assert value("cad_node_deliveries", "cad_node_deliveries", state="failed") == 1
    assert value("cad_node_queue_length", "cad_node_queue_length", queue="analysis") == 1
    assert value("cad_node_queue_length", "cad_node_queue_length", queue="export") == 2
    assert value("cad_node_workers_alive", "cad_node_workers_alive", queue="export") == 1
    assert value("cad_node_workers_alive", "cad_node_workers_alive", queue="analysis") == 0
    assert value("cad_node_instance_store_free_bytes", "cad_node_instance_store_free_bytes") > 0
    last = value("cad_node_last_delivery_timestamp_seconds", "cad_node_last_delivery_timestamp_seconds")
    assert last == at(1, 10).replace(tzinfo=dt.UTC).timestamp()


def test_worker_heartbeat_row(node: Node) -> None:
    beat = Heartbeat(node.settings.effective_database_url, "analysis")
    beat.start()
    (beats,) = read_beats(node.database)
    assert (beats.queue, beats.pid, beats.alive) == ("analysis", os.getpid(), True)
    later = utcnow() + dt.timedelta(seconds=2 * STALE_AFTER_S)
    assert read_beats(node.database, now=later)[0].alive is False
    beat.stop()
    assert read_beats(node.database) == []


def test_queue_lengths_on_redis(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/15"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
    except redis.RedisError as error:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at 127.0.0.1:6379 cannot be reached ({error}), and CI is set")
        pytest.skip(f"Redis at 127.0.0.1:6379 cannot be reached: {error}")
    settings = Settings(data_dir=tmp_path, broker_url=url)
    before = queue_lengths(settings)
    marker = 987_654_321  # a job id no one else's message carries, so they can be removed again
    queue = JobQueue(make_celery(settings))
    try:
        queue.analyse(marker)
        queue.analyse(marker)
        queue.export(marker, PACS)
        after = queue_lengths(settings)
        assert after["analysis"] == (before["analysis"] or 0) + 2
        assert after["export"] == (before["export"] or 0) + 1
    finally:
        for name in ("analysis", "export"):
            for raw in client.lrange(name, 0, -1):
                if f"[{marker}".encode() in raw:
                    client.lrem(name, 0, raw)
        client.close()
    unreachable = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    assert queue_lengths(unreachable) == {"analysis": None, "export": None}


def test_admin_token_is_a_secret_and_the_dashboard_needs_it() -> None:
    settings = Settings(admin_token="s3cret-token", dashboard_port=8080)
    assert settings.shown()["admin_token"] == "***"
    assert "s3cret-token" not in repr(settings)
    with pytest.raises(ValueError, match="CAD_NODE_ADMIN_TOKEN"):
        create_app(Settings(), None)  # type: ignore[arg-type]
