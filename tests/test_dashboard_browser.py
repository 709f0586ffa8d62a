"""The dashboard in headless Chromium (Selenium): log in, the job list, a job page and its retry button,
the health page. Screenshots go to docs/images/dashboard-*.png when CAD_NODE_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cad_node.dashboard.serving import dashboard_server
from cad_node.job_database import Job, JobStatus
from cad_node.worker_heartbeat import Heartbeat
from tests.conftest import _require_tool
from tests.dashboard_rows import PATIENT_NAME, TOKEN, Node, make_node

if os.environ.get("CI"):
    import selenium  # noqa: F401 (CI must have the test extra: fail here rather than skip)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
WIDTH = 1400


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = make_node(tmp_path / "node", destinations=["PACS@10.0.0.5:104"])
    beats = [Heartbeat(made.settings.effective_database_url, queue) for queue in ("analysis", "export")]
    for beat in beats:
        beat.start()
    yield made
    for beat in beats:
        beat.stop()
    made.database.close()


@pytest.fixture
def base_url(node: Node) -> Iterator[str]:
    server = dashboard_server(node.settings, node.database, "127.0.0.1", 0)
    server.start()
    yield server.address.rstrip("/")
    server.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = _require_tool("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=_require_tool("chromedriver")), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    if os.environ.get("CAD_NODE_UPDATE_SCREENSHOTS") == "1":
        return REPOSITORY / "docs" / "images"
    return tmp_path


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page: the window made as tall as the document."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, max(600, min(int(height) + 100, 2400)))
    assert driver.save_screenshot(str(path)), path
    driver.set_window_size(WIDTH, 900)


def submit(driver: WebDriver, button: str, then_title: str) -> None:
    """Click and wait for the next page: the old one is still there right after the click."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, button).click()
    WebDriverWait(driver, 10).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 10).until(expected_conditions.title_contains(then_title))


def test_admin_logs_in_reads_jobs_and_retries_one(
    browser: WebDriver, base_url: str, node: Node, screenshots: Path
) -> None:
    browser.get(base_url + "/")
    assert "Log in" in browser.title
    browser.find_element(By.NAME, "token").send_keys("not the token")
    submit(browser, "form button[type=submit]", "Log in")
    assert "That is not the admin token." in browser.page_source
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    submit(browser, "form button[type=submit]", "Jobs")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    assert [row.find_element(By.TAG_NAME, "a").text for row in rows] == ["5", "4", "3", "2", "1"]
    assert PATIENT_NAME not in browser.page_source
    (session,) = browser.get_cookies()
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""
    screenshot(browser, screenshots / "dashboard-jobs.png")

    Select(browser.find_element(By.NAME, "state")).select_by_value("failed")
    submit(browser, "form.filters button", "Jobs")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    assert [row.find_element(By.TAG_NAME, "a").text for row in rows] == [str(node.failed)]

    browser.get(f"{base_url}/jobs/{node.done}")
    assert PATIENT_NAME in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.step-bars rect")) == 7
    screenshot(browser, screenshots / "dashboard-job.png")

    browser.get(f"{base_url}/jobs/{node.failed}")
    assert "slice spacing is not uniform" in browser.find_element(By.CSS_SELECTOR, "pre.trace").text
    submit(browser, "button.retry", f"Job {node.failed}")
    assert "Retry queued." in browser.find_element(By.CSS_SELECTOR, ".notice").text
    with node.database.session() as session:
        assert session.get_one(Job, node.failed).status == JobStatus.QUEUED
    assert len(list((node.settings.queue_dir / "messages").glob("*.analysis.msg"))) == 1

    browser.find_element(By.LINK_TEXT, "Health").click()
    assert "Workers: 2 alive" in browser.page_source
    screenshot(browser, screenshots / "dashboard-health.png")

    submit(browser, "header form button", "Log in")  # log out
    browser.get(base_url + "/health")
    assert "Log in" in browser.title
