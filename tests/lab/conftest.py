"""The lab's server for the browser and HTTP tests: a real night classified with a tiny registered
model on real images, then Airflow started exactly as README says (``.venv/bin/wbc airflow-ui``)
with three users of the Simple auth manager: ``admin`` (ADMIN), ``tech`` (USER: may edit DAG
runs, so may review) and ``viewer`` (VIEWER: reads only)."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.test_embedded_commands import WBC, Started, answers, http_json, plain_shell_env
from tests.conftest import free_port, skip_unless_required
from tests.serving.conftest import THRESHOLD, base_settings, copy_drop, register_tiny_model

DROP = "2026-11-24"
#: The stored XSS of issue 28 as found: a drop folder whose name closes an attribute and adds an
#: element with an event handler (a canary rather than ``alert``, so a test can read it).
HOSTILE_DROP = 'evil"><svg onload=window.__pwned=1>'
USERS = {"admin": "admin", "tech": "user", "viewer": "viewer"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@dataclass
class Lab:
    """A running Airflow with the lab plugin, its state and its users' passwords."""

    url: str
    settings: object
    passwords: dict[str, str]
    ui: Started
    folder: Path

    def token(self, user: str) -> str:
        status, body = http_json(f"{self.url}/auth/token", body={"username": user, "password": self.passwords[user]})
        assert status in (200, 201), (user, status)
        return str(body["access_token"])  # type: ignore[index]


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    from wbc_tasks.serving.nightly import classify_new_images

    folder = tmp_path_factory.mktemp("lab")
    home = folder / "wbc-home"
    settings = base_settings(home)
    settings.classify_dir.mkdir(parents=True)
    register_tiny_model(settings, seed=1, alias="champion")
    copy_drop(DROP, settings)
    hostile = settings.classify_dir / HOSTILE_DROP
    hostile.mkdir()
    for image in sorted((settings.classify_dir / DROP).iterdir())[:3]:
        shutil.copy(image, hostile / image.name)
    classify_new_images(settings)

    env = plain_shell_env(home)
    env |= {
        "WBC_CLASSIFY_DIR": str(settings.classify_dir),
        "WBC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "WBC_PREDICTIONS_DB_URL": settings.predictions_db_url,
        "WBC_REVIEW_THRESHOLD": str(THRESHOLD),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
    }
    port = free_port()
    ui = Started([str(WBC), "airflow-ui", "--port", str(port)], env)
    try:
        ui.wait_until(lambda: answers(f"http://127.0.0.1:{port}/api/v2/monitor/health"), "health endpoint")
        ui.wait_until(lambda: "Airflow is ready" in ui.output(), "ready banner")
        passwords = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        yield Lab(f"http://localhost:{port}", settings, passwords, ui, folder)
    finally:
        ui.kill_all()


def lab_url(lab: Lab, route: str, **params: object) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{lab.url}/lab{route}{'?' + query if query else ''}"


def start_chromium(profile: Path):
    """Headless Debian chromium through its own chromedriver (Selenium's driver download cannot
    reach the internet), its console kept for ``get_log("browser")`` (CSP violations are reported
    there); fails where CI requires every prerequisite."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        skip_unless_required("chromium/chromedriver not installed: tests/lab/install-chromium.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
