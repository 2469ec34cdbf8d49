"""The console in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by Selenium, against a real uvicorn
server on 127.0.0.1: log in, read the agents, open a waiting procurement agent's timeline,
approve it from the approvals queue and see it complete; verify its audit chain; registry
and health. A screenshot of each page is saved under ``$TORPOR_ARTEFACTS`` (else the test's
tmp dir) for review; the README's timeline picture is one of them.

Outside CI, a machine without the browser skips this module with a loud reason; in CI
(``$CI`` set, or ``TORPOR_BROWSER_TESTS=required`` as ``.ci/run`` sets it) a missing browser
is a failure: the test must run there.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, register, token

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
BIG = {"item": "laptops", "amount": 75000}

if not (BROWSER and DRIVER):
    why = ("the console's browser tests need Debian's chromium and chromium-driver "
           "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    if os.environ.get("CI") or os.environ.get("TORPOR_BROWSER_TESTS") == "required":
        raise RuntimeError(f"CI must run the browser tests: {why}")
    pytest.skip(f"SKIPPED LOUDLY: {why}", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the check: a clear reason rather than an ImportError)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(BROWSER)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``$TORPOR_ARTEFACTS/console`` or the test's tmp dir."""
    root = os.environ.get("TORPOR_ARTEFACTS")
    d = Path(root) / "console" if root else tmp_path / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _shoot(driver: Any, shots: Path, name: str, *, full: bool = True) -> Path:
    path = shots / f"{name}.png"
    driver.set_window_size(1280, 800)
    if full:  # the whole page, not the window: as tall as its content
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, max(800, min(int(height) + 40, 4000)))
    assert driver.save_screenshot(str(path)), name
    assert path.stat().st_size > 5_000, f"{name}: an empty screenshot"
    return path


def test_log_in_open_a_timeline_approve_and_see_it_complete(browser: Any, shots: Path, bundles: BundleFactory,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "store"
    [procurement] = register(store, bundles.example("procurement"))
    with InProcessServer(store) as srv:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read", "approvals:write", "registry:write")
        with httpx.Client(base_url=srv.url, timeout=60, headers=auth(ops)) as api:
            done = api.post("/v1/runs", json={"agent": procurement, "input": {"item": "monitors", "amount": 4800,
                                                                              "note": "call +44 20 7946 0018"},
                                              "wait": 60}).json()
            waiting = api.post("/v1/runs", json={"agent": procurement, "input": BIG, "wait": 60}).json()
            assert done["status"] == "completed" and waiting["status"] == "waiting_approval"
            with bundles.example("procurement").open("rb") as f:
                api.post("/v1/bundles", params={"name": "procurement", "tag": "production"}, content=f.read())
        aid = waiting["agent_id"]
        wait = WebDriverWait(browser, 30)

        # Log in: the console sends an anonymous browser to its login page.
        browser.get(srv.url + "/")
        wait.until(ec.presence_of_element_located((By.ID, "token")))
        assert "/console/login" in browser.current_url
        _shoot(browser, shots, "login")
        browser.find_element(By.ID, "token").send_keys(ops)
        browser.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.ID, "agents")))
        assert browser.find_element(By.ID, "tenant").text == "acme"
        counts = browser.find_element(By.ID, "counts").text
        assert "waiting_approval" in counts and "completed" in counts
        cookie = browser.get_cookie("torpor_session")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie").find("torpor_session") == -1  # script cannot read it
        _shoot(browser, shots, "agents")

        # A completed agent's timeline: the PII denial with its rule, the chart.
        browser.find_element(By.LINK_TEXT, done["agent_id"]).click()
        wait.until(ec.presence_of_element_located((By.ID, "timeline-chart")))
        kinds = [tr.get_attribute("data-kind") for tr in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")]
        assert "tool.denied" in kinds and "checkpoint" in kinds and kinds[-1] == "agent.completed"
        assert "validators[1].detect." in browser.find_element(By.ID, "timeline").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline-chart rect.bar")) >= 10
        _shoot(browser, shots, "timeline-completed")

        # The waiting agent's timeline: its approval wait, the call it waits on.
        browser.get(f"{srv.url}/console/agents/{aid}")
        wait.until(ec.presence_of_element_located((By.ID, "approval")))
        assert browser.find_element(By.ID, "status").text == "waiting_approval"
        assert "erp.create_po" in browser.find_element(By.ID, "approval").text
        assert browser.find_elements(By.CSS_SELECTOR, "#timeline-chart rect.bar.waiting")
        _shoot(browser, shots, "timeline-waiting")

        # The approvals queue: approve with a note; the agent resumes and completes.
        browser.find_element(By.LINK_TEXT, "Approvals").click()
        section = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"section[data-agent='{aid}']")))
        _shoot(browser, shots, "approvals")
        section.find_element(By.NAME, "note").send_keys("ok by the CFO")
        section.find_element(By.ID, f"approve-{aid}").click()
        wait.until(ec.url_contains(f"/console/agents/{aid}"))
        deadline = time.monotonic() + 60
        while browser.find_element(By.ID, "status").text != "completed":  # the page reloads itself while it moves
            assert time.monotonic() < deadline, browser.find_element(By.ID, "status").text
            time.sleep(0.5)
            if browser.find_element(By.ID, "status").text != "completed":
                browser.refresh()
        text = browser.find_element(By.ID, "timeline").text
        assert "ok by the CFO" in text and "resumed from checkpoint" in text
        assert '"status": "ordered"' in browser.find_element(By.ID, "output").text
        assert srv.host.get_agent(aid)["status"] == "completed"
        browser.execute_script("window.scrollTo(0, 0)")
        path = _shoot(browser, shots, "timeline", full=False)  # the README's picture: the top of the page

        # Its audit chain, verified by the button.
        browser.get(f"{srv.url}/console/agents/{aid}/audit")
        browser.find_element(By.ID, "verify").click()
        verdict = wait.until(ec.presence_of_element_located((By.ID, "verdict")))
        assert "ok" in (verdict.get_attribute("class") or "")
        _shoot(browser, shots, "audit")

        # Registry (a policy diff) and health.
        browser.get(f"{srv.url}/console/registry?a=procurement%40production&b=procurement")
        wait.until(ec.presence_of_element_located((By.ID, "diff")))
        _shoot(browser, shots, "registry")

        # Log out: the console asks for a login again; an admin sees the server-wide health.
        browser.find_element(By.ID, "logout").click()
        wait.until(ec.presence_of_element_located((By.ID, "token")))
        browser.get(f"{srv.url}/console/health")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(
            token(srv.host.store, "acme", "admin"))
        browser.find_element(By.ID, "login").click()
        assert "ready" in wait.until(ec.presence_of_element_located((By.ID, "readiness"))).text
        captions = [f.text for f in browser.find_elements(By.TAG_NAME, "figcaption")]
        assert any(c.startswith("resume latency") for c in captions) and "tool calls by outcome" in captions
        _shoot(browser, shots, "health")
    assert path.exists()
