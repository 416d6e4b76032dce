"""The dashboard in a real headless Chromium while a real daemon runs: a dropped job appears and
its progress advances without a reload until it is done with its thumbnail; a failed job's
retry button brings it back to the queue; an upload into a preset folder produces its result.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and Selenium;
skipped, saying which is missing, without them. Screenshots are saved under the test's
temporary folder (``web-artifacts/``), or ``$QIE_WEB_ARTIFACTS`` when set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.daemon import Folders, make_image, tiny_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,900")

webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed (pip install selenium)")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def eventually(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - the page may be between two updates
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running daemon serving its pages, the fake engine taking a second a stage, a preset
    folder, and a browser."""
    root = tmp_path_factory.mktemp("browser")
    artifacts = Path(os.environ.get("QIE_WEB_ARTIFACTS") or root / "web-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    folders = Folders(root / "site")
    winter = folders.inbox / "winter"
    winter.mkdir()
    (winter / "preset.json").write_text(json.dumps({"prompt": "make it winter", "megapixels": 0.01, "steps": 2}))
    port = free_port()
    daemon = folders.serve(QIE_HTTP_LISTEN=f"127.0.0.1:{port}", QIE_FAKE__UNIT_SECONDS="1.0",
                           QIE_MAX_ATTEMPTS="1", QIE_FAULTS="job.flaky.stage.encode_latent@1=eio")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='qie-chromium-')}"):
        options.add_argument(flag)
    browser = None
    try:
        daemon.wait_ready()
        eventually(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 30, "a healthy daemon")
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        browser.implicitly_wait(0)
        yield {"folders": folders, "daemon": daemon, "browser": browser, "url": f"http://127.0.0.1:{port}",
               "artifacts": artifacts}
    finally:
        if browser is not None:
            browser.quit()
        daemon.stop()


def row_state(browser, name: str) -> str:
    for row in browser.find_elements(By.CSS_SELECTOR, "#jobs tr"):
        link = row.find_elements(By.CSS_SELECTOR, "td.name a")
        if link and link[0].text.endswith(f" {name}"):
            return row.get_attribute("data-state") or ""
    return ""


def row_of(browser, name: str):
    for row in browser.find_elements(By.CSS_SELECTOR, "#jobs tr"):
        link = row.find_elements(By.CSS_SELECTOR, "td.name a")
        if link and link[0].text.endswith(f" {name}"):
            return row
    return None


def thumbnail_loaded(browser, name: str) -> bool:
    row = row_of(browser, name)
    images = row.find_elements(By.CSS_SELECTOR, "td.thumb img") if row is not None else []
    return bool(images) and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                   images[0])


def test_a_dropped_job_appears_and_its_progress_advances_live_until_done_with_its_thumbnail(site):
    browser, folders = site["browser"], site["folders"]
    browser.get(site["url"] + "/")
    browser.execute_script("window.notReloaded = true")
    folders.drop("live", tiny_job(steps=12, megapixels=0.01))

    eventually(lambda: row_of(browser, "live"), 30, "the dropped job to appear")
    seen = []

    def progress_then_done() -> bool:
        row = row_of(browser, "live")
        text = row.find_element(By.CSS_SELECTOR, "td.progress").text.strip() if row is not None else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
            if len(seen) == 4:
                browser.save_screenshot(str(site["artifacts"] / "queue-running.png"))
        return row_state(browser, "live") == "done"

    eventually(progress_then_done, 60, "the job to be done")
    assert browser.execute_script("return window.notReloaded === true"), "the page was reloaded"
    assert any("sample" in text for text in seen), seen
    assert len(seen) >= 3, f"the progress did not advance on the page: {seen}"
    eventually(lambda: thumbnail_loaded(browser, "live"), 20, "the output thumbnail")
    browser.save_screenshot(str(site["artifacts"] / "queue-done.png"))

    row_of(browser, "live").find_element(By.CSS_SELECTOR, "td.name a").click()
    eventually(lambda: browser.find_elements(By.CSS_SELECTOR, ".compare img#output"), 20, "the job page")
    eventually(lambda: all(browser.execute_script("return arguments[0].naturalWidth > 0", img)
                           for img in browser.find_elements(By.CSS_SELECTOR, ".compare img")), 20, "before and after")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".compare img")) == 2
    browser.save_screenshot(str(site["artifacts"] / "job-before-after.png"))


def test_a_failed_jobs_retry_button_brings_it_back_to_the_queue(site):
    browser, folders = site["browser"], site["folders"]
    folders.drop("flaky", tiny_job(seed=3))  # its first encode_latent fails (an injected I/O error)
    browser.get(site["url"] + "/failed")
    browser.execute_script("window.notReloaded = true")
    eventually(lambda: row_state(browser, "flaky") == "failed", 60, "the failure to show on the failed page")
    row = row_of(browser, "flaky")
    assert "temporary problem" in row.find_element(By.CSS_SELECTOR, ".error").text
    browser.save_screenshot(str(site["artifacts"] / "failed.png"))
    row.find_element(By.CSS_SELECTOR, "button.retry").click()

    eventually(lambda: folders.job_states().get("flaky") in ("queued", "running", "done"), 20, "the job requeued")
    browser.get(site["url"] + "/?state=active")
    eventually(lambda: row_state(browser, "flaky") in ("queued", "running"), 20, "the job in the queue")
    browser.get(site["url"] + "/")
    eventually(lambda: row_state(browser, "flaky") == "done", 60, "the retried job to finish")


def test_an_upload_into_a_preset_folder_produces_its_result(site, tmp_path: Path):
    browser, folders = site["browser"], site["folders"]
    photo = make_image(tmp_path / "snowman.png", (96, 96), (200, 200, 220))
    browser.get(site["url"] + "/upload")
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=preset]").click()
    browser.save_screenshot(str(site["artifacts"] / "upload.png"))
    browser.find_element(By.CSS_SELECTOR, "form.upload button").click()
    placed = eventually(lambda: browser.find_element(By.ID, "placed").text, 20, "the upload to be placed")
    assert "winter/snowman.png" in placed

    browser.get(site["url"] + "/?preset=winter")
    eventually(lambda: row_state(browser, "winter/snowman") == "done", 60, "the preset's result")
    assert (folders.outbox / "winter" / "snowman.png").is_file()
    eventually(lambda: thumbnail_loaded(browser, "winter/snowman"), 20, "its thumbnail")


def test_the_live_endpoints_answer_while_the_daemon_runs(site):
    url = site["url"]
    assert httpx.get(url + "/healthz").json()["ok"] is True
    assert httpx.get(url + "/readyz").json()["checks"]["engine"] == "fake: created"
    browser = site["browser"]
    browser.get(url + "/daemons")
    assert "fake" in browser.find_element(By.TAG_NAME, "main").text
    browser.save_screenshot(str(site["artifacts"] / "daemons.png"))
    with httpx.stream("GET", url + "/api/events", timeout=10) as stream:
        first = next(stream.iter_lines())
    assert first == "event: hello"
