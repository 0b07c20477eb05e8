"""The users' first path through Airflow itself, on the same Airflow as ``test_lab.py`` (started as
README says): the plugin and its links are registered (``/api/v2/plugins``), "WBC lab" in the UI's
Browse menu opens the drops, and in a real browser a technologist opens ``wbc_training``'s trigger
form, reads the params with their descriptions, meets the form's checks, and triggers a valid tiny
run that is queued (the DAG stays paused, so no training starts; the run is deleted afterwards)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import unquote

import pytest

from tests.lab.conftest import DROP
from tests.lab.test_lab import wait_for
from wbc_tasks.training.params import TRAINING_PARAM_SPECS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DAG = "wbc_training"
#: What the technologist types into the form: a tiny run (weights "none" is chosen in its select).
TINY = {"image_size": "32", "epochs_head": "0", "epochs_finetune": "1", "augment_per_class": "0"}


def api(lab, method: str, route: str, token: str, body: dict | None = None):
    """(status, decoded JSON or None) of one call of Airflow's REST API."""
    request = urllib.request.Request(
        f"{lab.url}/api/v2{route}", data=None if body is None else json.dumps(body).encode(), method=method
    )
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, (json.loads(raw) if raw else None)


def runs(lab, token: str) -> list[dict]:
    status, body = api(lab, "GET", f"/dags/{DAG}/dagRuns", token)
    assert status == 200, body
    return list(body["dag_runs"])


def log_in_to_airflow(driver, lab, user: str, path: str, shot) -> None:
    """Open ``path`` of Airflow's UI anonymously, log in on Airflow's login page, come back."""
    from selenium.webdriver.common.by import By

    driver.get(f"{lab.url}{path}")
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "input[name=username]"), "login form", 120)
    assert "/auth/login" in driver.current_url
    driver.save_screenshot(str(shot))
    driver.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys(user)
    driver.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(lab.passwords[user])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: driver.current_url.rstrip("/").endswith(path.rstrip("/")), f"redirect back to {path}", 120)


def test_the_plugin_and_its_links_are_registered_in_airflow(lab):
    status, body = api(lab, "GET", "/plugins", lab.token("viewer"))
    assert status == 200, body
    plugin = next(p for p in body["plugins"] if p["name"] == "wbc_lab")
    assert "wbc_airflow.lab_plugin:LabPlugin" in plugin["source"], plugin  # the package's entry point
    views = {v["name"]: v for v in plugin["external_views"]}
    drops = views["WBC lab: drops and review"]
    assert (drops["href"], drops["destination"], drops["url_route"]) == ("lab/drops", "nav", "wbc-lab")
    assert views["WBC predictions API (OpenAPI)"]["href"] == "lab/openapi.json"
    assert views["Review and differential of this run's drops"]["destination"] == "dag_run"
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/lab"]
    assert api(lab, "GET", "/plugins", "")[0] == 401


def test_the_wbc_lab_link_in_airflows_navigation_opens_the_drops(lab, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver, shots = browser, tmp_path / "screenshots"
    shots.mkdir()
    log_in_to_airflow(driver, lab, "viewer", "/", shots / "login.png")
    wait_for(lambda: driver.find_element(By.XPATH, "//button[normalize-space()='Browse']"), "Browse menu").click()
    link = wait_for(
        lambda: driver.find_element(By.XPATH, "//*[@role='menuitem'][contains(., 'WBC lab: drops and review')]"),
        "the WBC lab link in the Browse menu",
    )
    driver.save_screenshot(str(shots / "browse-menu.png"))
    link.click()
    wait_for(lambda: "/plugin/wbc-lab" in driver.current_url, "the plugin's page")
    frame = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "iframe[src*='lab/drops']"), "the drops frame")
    driver.switch_to.frame(frame)
    text = wait_for(lambda: DROP in (t := driver.find_element(By.TAG_NAME, "body").text) and t, "the drops list")
    assert "research use" in text.lower()
    driver.switch_to.default_content()
    driver.save_screenshot(str(shots / "wbc-lab-in-airflow.png"))
    print(f"screenshots: {shots}")


def test_a_technologist_triggers_a_tiny_training_run_from_airflows_form(lab, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    admin, tech = lab.token("admin"), lab.token("tech")
    # Paused (as Airflow creates DAGs): a run triggered without unpausing stays queued, no training starts.
    assert api(lab, "PATCH", f"/dags/{DAG}", admin, {"is_paused": True})[0] == 200
    known = {r["dag_run_id"] for r in runs(lab, tech)}
    # The server checks the params too: what the form never lets through is refused over the API.
    status, body = api(lab, "POST", f"/dags/{DAG}/dagRuns", tech, {"logical_date": None, "conf": {"image_size": 5}})
    assert status == 400 and "image_size" in json.dumps(body), (status, body)

    driver, shots = browser, tmp_path / "screenshots"
    shots.mkdir()
    log_in_to_airflow(driver, lab, "tech", f"/dags/{DAG}", shots / "login.png")
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"), "Trigger").click()
    size = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "input[name=element_image_size]"), "the form")
    dialog = size.find_element(By.XPATH, "ancestor::*[@role='dialog']")
    assert f"Trigger Dag - {DAG}" in dialog.text
    text = dialog.get_attribute("textContent")
    for name in ("data_dir", "include_reviewed", "image_size", "weights", "epochs_finetune", "min_blast_recall"):
        assert name in text, name
        assert TRAINING_PARAM_SPECS[name]["description"] in text, name
    driver.save_screenshot(str(shots / "trigger-form.png"))

    def show(element) -> None:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)

    def retype(element, value: str) -> None:
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.BACKSPACE)
        if value:
            element.send_keys(value)
        element.send_keys(Keys.TAB)

    submit = driver.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]")
    # Below the minimum: the form holds the value at the param's minimum (32) as soon as the field is left.
    assert size.get_attribute("aria-valuemin") == "32"
    retype(size, "5")
    wait_for(lambda: size.get_attribute("value") == "32", "image_size held at its minimum")
    # Emptied, a required param shows the form's error and the run cannot be triggered.
    retype(size, "")
    show(size)
    error = wait_for(
        lambda: driver.find_element(By.XPATH, "//*[normalize-space()='This field is required']"),
        "the form's error on an empty image_size",
    )
    assert error.is_displayed()
    wait_for(lambda: not submit.is_enabled(), "Trigger disabled while the form has an error")
    driver.save_screenshot(str(shots / "trigger-form-error.png"))

    for name, value in TINY.items():
        retype(driver.find_element(By.CSS_SELECTOR, f"input[name=element_{name}]"), value)
    weights = driver.find_element(By.CSS_SELECTOR, "#element_weights input[role=combobox]")
    show(weights)
    weights.send_keys("none")
    weights.send_keys(Keys.ENTER)
    wait_for(
        lambda: driver.find_element(By.CSS_SELECTOR, "input[name=element_weights]").get_attribute("value") == "none",
        "weights none",
    )
    unpause = driver.find_element(By.XPATH, f"//label[contains(., 'Unpause {DAG} on trigger')]")
    show(unpause)
    unpause.click()
    wait_for(lambda: unpause.get_attribute("data-state") == "unchecked", "unpause unticked")
    wait_for(lambda: submit.is_enabled(), "Trigger enabled again")
    show(submit)
    driver.save_screenshot(str(shots / "trigger-form-tiny.png"))
    submit.click()

    new = []
    try:
        new = wait_for(lambda: [r for r in runs(lab, tech) if r["dag_run_id"] not in known], "a new run")
        (run,) = new
        assert run["state"] == "queued" and run["run_type"] == "manual", run
        assert run["triggering_user_name"] == "tech", run
        conf = run["conf"]
        assert (conf["image_size"], conf["weights"], conf["epochs_finetune"], conf["augment_per_class"]) == (
            32,
            "none",
            1,
            0,
        ), conf
        # The UI opens the run, queued, with the plugin's tab for the run's drops.
        # The page source names the run (in the trigger's toast) before the run's page has rendered.
        wait_for(lambda: run["dag_run_id"] in unquote(driver.current_url), "the run's page")
        tab = "Review and differential of this run's drops"
        body = wait_for(
            lambda: "Queued" in (text := driver.find_element(By.TAG_NAME, "body").text) and tab in text and text,
            f"the run shown queued with the tab {tab!r}",
            180,
        )
        assert "seed for augmentation" not in body.lower(), "the trigger form is still shown"
        driver.save_screenshot(str(shots / "run-queued.png"))
        assert api(lab, "GET", f"/dags/{DAG}", admin)[1]["is_paused"] is True
    finally:
        for run in new:
            api(lab, "DELETE", f"/dags/{DAG}/dagRuns/{run['dag_run_id']}", admin)
    print(f"screenshots: {shots}")
