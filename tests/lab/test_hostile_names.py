"""Hostile names in the lab's pages (issue 28), in a real browser: drops, files, a reviewer's name
and note carrying HTML, attribute breakers, ``javascript:`` URLs, ``#?%``, a Unicode direction
override, a newline and a 240-character name. Each page (the drops list, each drop's review queue
and report) is opened twice: with the lab's Content-Security-Policy (no canary set, no dialog, no
policy violation in the console) and with it switched off in this test (no payload element in the
page, every name shown exactly, in its own ``<bdi>``; a newline shows as a space, as HTML does).
Every drop's links lead to that drop.

The lab's app runs here under uvicorn with a test :class:`~wbc_tasks.lab.auth.LabAccess` (the
Simple auth manager cannot have user names with ``,`` or ``:``) over a night of real images
classified with a tiny registered model.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.parse

import pytest

from tests.lab.conftest import start_chromium
from tests.lab.test_lab import wait_for
from tests.serving.conftest import base_settings, drop_source, register_tiny_model
from wbc_tasks.lab.auth import LabUser

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Canary-setting payloads: a page that runs any of them sets window.__pwned.
DROPS = {
    "script": "<script src=data:,window.__pwned='drop-script'>",  # a folder name holds no '/'
    "attribute": "\"'><img src=x onerror=window.__pwned='drop-attr'>",
    "javascript-url": "javascript:window.__pwned='drop-js'",
    "url-characters": "a#b?c=%41 d&e",
    "direction-override": "\u202eslide-7 gpj.exe",
    "newline": "first line\nsecond <b>line<\\b>",
    "long": "w" * 226 + "<svg onload=1>",  # 240 characters
}
FILES = ["<svg onload=window.__pwned='file'>.jpg", "\u202eq#%?.jpg"]
REVIEWER = "eve, admin: \"><img src=x onerror=window.__pwned='user'>"
NOTE = "</textarea><script>window.__pwned='note'</script>"
PAYLOAD_TAGS = ("script", "img[src='x']", "svg", "iframe", "object", "embed")


class HostileAccess:
    """Everyone may read and review, as a user with a hostile name; no login page."""

    async def identify(self, request, credentials) -> LabUser:
        return LabUser(REVIEWER, None)

    def is_allowed(self, who, method) -> bool:
        return True

    def login_url(self, request) -> str:
        return "/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """The lab's app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the lab's app did not start"
            time.sleep(0.1)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(with the policy, without it): two apps over the same classified hostile drops."""
    from wbc_tasks.lab.app import create_app
    from wbc_tasks.lab.security import SecurityHeaders
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_decisions import record_review

    folder = tmp_path_factory.mktemp("hostile")
    settings = base_settings(folder / "wbc-home")
    settings.classify_dir.mkdir(parents=True)
    register_tiny_model(settings, seed=1, alias="champion")
    images = sorted(drop_source("2026-11-24").iterdir())
    for name in DROPS.values():
        drop = settings.classify_dir / name
        drop.mkdir()
        for image, file_name in zip(images, FILES, strict=False):
            shutil.copy(image, drop / file_name)
    classify_new_images(settings)
    record_review(settings, f"{DROPS['script']}/{FILES[0]}", "neutrophils", reviewer=REVIEWER, note=NOTE)

    env = {
        "WBC_HOME": str(settings.home),
        "WBC_CLASSIFY_DIR": str(settings.classify_dir),
        "WBC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "WBC_PREDICTIONS_DB_URL": settings.predictions_db_url,
        "WBC_REVIEW_THRESHOLD": "0.99",  # every cell in the queue: every file name is shown
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with_policy = create_app(HostileAccess())
        without = create_app(HostileAccess())
        without.user_middleware = [m for m in without.user_middleware if m.cls is not SecurityHeaders]
        started = [Server(with_policy), Server(without)]
        try:
            yield {"csp": started[0], "no-csp": started[1]}
        finally:
            for server in started:
                server.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = start_chromium(tmp_path_factory.mktemp("profile"))
    yield browser
    browser.quit()


def shown(name: str) -> str:
    """The display rule: a name's text as shown, inside its own <bdi> (HTML shows a newline as a
    space)."""
    return " ".join(name.split("\n"))


def pages() -> list[tuple[str, str]]:
    quoted = {key: urllib.parse.quote(name, safe="") for key, name in DROPS.items()}
    found = [("drops", "/drops")]
    for key in DROPS:
        found += [(f"review:{key}", f"/drops/{quoted[key]}/review"), (f"report:{key}", f"/drops/{quoted[key]}/report")]
    return found


def open_page(browser, url: str) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    browser.get(url)
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").text, url)
    time.sleep(0.3)  # let any handler that could run, run
    try:
        alert = browser.switch_to.alert
        text = alert.text
        alert.dismiss()
        raise AssertionError(f"a dialog opened on {url}: {text!r}")
    except NoAlertPresentException:
        pass


@pytest.mark.parametrize("mode", ["csp", "no-csp"])
def test_no_hostile_name_runs_or_renders_as_markup_on_any_page(servers, driver, mode):
    from selenium.webdriver.common.by import By

    server = servers[mode]
    driver.get_log("browser")  # start from an empty console
    opened = 0
    for label, path in pages():
        open_page(driver, server.url(path))
        opened += 1
        assert driver.execute_script("return window.__pwned === undefined"), (mode, label)
        if mode == "csp":
            violations = [e for e in driver.get_log("browser") if "Content Security Policy" in e.get("message", "")]
            assert violations == [], (label, violations)
            continue
        for selector in PAYLOAD_TAGS:
            found = [e.get_attribute("outerHTML") for e in driver.find_elements(By.CSS_SELECTOR, selector)]
            own = [html for html in found if "nonce=" in html or "/image?" in html]  # the page's own
            assert found == own, (label, selector, found)
        texts = [e.text for e in driver.find_elements(By.TAG_NAME, "bdi")]
        key = label.split(":", 1)[1] if ":" in label else None
        expected = [shown(DROPS[key])] if key else [shown(n) for n in DROPS.values()]
        for name in expected:
            assert name in texts, (label, name, texts[:8])
        if label.startswith("review:"):
            for file_name in FILES:
                assert shown(file_name) in texts, (label, file_name)
        if label == "review:script":
            assert shown(REVIEWER) in texts
    assert opened == 1 + 2 * len(DROPS)


def test_every_drops_links_lead_to_that_drop(servers, driver):
    from selenium.webdriver.common.by import By

    server = servers["csp"]
    open_page(driver, server.url("/drops"))
    links = {
        (a.get_attribute("href"), a.text)
        for a in driver.find_elements(By.CSS_SELECTOR, "td a")
        if a.text in ("review", "differential report")
    }
    assert len(links) == 2 * len(DROPS)
    reached = set()
    for href, text in sorted(links):
        open_page(driver, href)
        drop = urllib.parse.unquote(urllib.parse.urlsplit(driver.current_url).path).split("/drops/", 1)[1]
        drop = drop.rsplit("/", 1)[0]
        assert drop in DROPS.values(), (href, drop)
        heading = driver.find_element(By.TAG_NAME, "h1").find_element(By.TAG_NAME, "bdi").text
        assert heading == shown(drop), (href, heading)
        reached.add((drop, text))
    assert len(reached) == 2 * len(DROPS)
