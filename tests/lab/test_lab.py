"""The lab's view inside Airflow, on a real API server started as README says, with a drop of real
images classified in the test: every page and endpoint needs an Airflow login (401 or a redirect
to Airflow's login page without), a viewer reads but may not decide, decisions are CSRF-guarded,
thumbnails never leave the allowed folders, the predictions table streams the same rows as
``wbc predictions``; then a real browser logs in, reviews by click and by keyboard, and sees the
reviewed differential change. Airflow's own pages (the trigger form, the navigation): test_airflow_ui.py."""

from __future__ import annotations

import html.parser
import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pandas as pd
import pytest
from PIL import Image

from tests.lab.conftest import DROP, HOSTILE_DROP, lab_url
from wbc_tasks.serving.export import PredictionFilter
from wbc_tasks.serving.export_stream import export_predictions
from wbc_tasks.serving.review_queue import latest_reviews, review_queue

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def fetch(url: str, *, token: str | None = None, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request, following no redirect."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def decide(lab, token: str, path: str, label: str, **headers: str):
    body = json.dumps({"path": path, "label": label}).encode()
    return fetch(
        lab_url(lab, "/api/reviews"), token=token, body=body, headers={"Content-Type": "application/json", **headers}
    )


def test_anonymous_requests_get_401_or_the_login_page(lab):
    for path in ("/api/predictions", "/api/drops", f"/api/drops/{DROP}/queue", "/image?path=x.jpg"):
        assert fetch(lab_url(lab, path))[0] == 401, path
    assert decide(lab, "", f"{DROP}/x.jpg", "blasts")[0] == 401
    assert fetch(lab_url(lab, "/api/predictions"), token="not-a-jwt")[0] in (401, 403)
    assert fetch(lab_url(lab, "/api/learning"))[0] == 401
    for page in ("/drops", f"/drops/{DROP}/review", f"/drops/{DROP}/report", "/learning"):
        status, headers, _ = fetch(lab_url(lab, page))
        assert status == 303, page
        assert headers["location"].startswith("/auth/login?next="), headers["location"]
        assert "%2Flab%2F" in headers["location"]


def test_a_viewer_sees_the_queue_but_gets_403_on_a_decision_and_a_user_role_may_decide(lab):
    viewer = lab.token("viewer")
    status, _, body = fetch(lab_url(lab, f"/api/drops/{DROP}/queue"), token=viewer)
    assert status == 200
    queue = json.loads(body)
    assert [c["path"] for c in queue] == [c["path"] for c in review_queue(lab.settings, DROP)]
    path = queue[-1]["path"]
    for page in ("/drops", f"/drops/{DROP}/review", f"/drops/{DROP}/report"):
        status, _, body = fetch(lab_url(lab, page), token=viewer)
        assert status == 200 and b"research use" in body.lower(), page
    assert b"(read only)" in fetch(lab_url(lab, f"/drops/{DROP}/review"), token=viewer)[2]
    status, _, body = decide(lab, viewer, path, "lymphocytes")
    assert status == 403, body
    assert all(r["path"] != path or r["reviewer"] != "viewer" for r in latest_reviews(lab.settings))

    status, _, body = decide(lab, lab.token("tech"), path, "lymphocytes")
    assert status == 201, body
    row = json.loads(body)
    assert (row["reviewer"], row["label"], row["path"]) == ("tech", "lymphocytes", path)


def test_decisions_need_a_json_body_from_this_origin(lab):
    token = lab.token("admin")
    path = review_queue(lab.settings, DROP)[0]["path"]
    form = urllib.parse.urlencode({"path": path, "label": "blasts"}).encode()
    status = fetch(
        lab_url(lab, "/api/reviews"),
        token=token,
        body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )[0]
    assert status == 415
    assert decide(lab, token, path, "blasts", Origin="https://evil.example")[0] == 403
    assert decide(lab, token, path, "blasts", **{"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert decide(lab, token, path, "skip")[0] == 422  # skip records nothing
    assert decide(lab, token, "../predictions.db", "blasts")[0] == 422


def test_thumbnails_come_from_the_original_file_and_never_from_outside_the_allowed_folders(lab):
    token = lab.token("viewer")
    path = review_queue(lab.settings, DROP)[0]["path"]
    status, headers, body = fetch(lab_url(lab, "/image", path=path, side=256), token=token)
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as image, Image.open(lab.settings.classify_dir / path) as original:
        assert max(image.size) <= 256
        assert abs(image.size[0] / image.size[1] - original.size[0] / original.size[1]) < 0.02
    secret = lab.folder / "secret.jpg"
    secret.write_bytes((lab.settings.classify_dir / path).read_bytes())
    for bad in (f"../{secret.name}", "../../secret.jpg", str(secret), f"{DROP}/../../secret.jpg", "/etc/passwd"):
        status = fetch(lab_url(lab, "/image", path=bad), token=token)[0]
        assert 400 <= status < 500, (bad, status)
    assert fetch(lab_url(lab, "/image", path=f"{DROP}/no-such.jpg"), token=token)[0] == 404


def test_predictions_over_http_are_the_table_wbc_predictions_gives(lab, tmp_path):
    token = lab.token("viewer")
    predicted = review_queue(lab.settings, DROP)[-1]["predicted_class"]
    for params in ({}, {"drop": DROP, "needs_review": "true"}, {"class": predicted, "latest": "true"}):
        status, headers, body = fetch(lab_url(lab, "/api/predictions", format="csv", **params), token=token)
        assert status == 200 and headers["content-type"].startswith("text/csv")
        expected = tmp_path / "expected.csv"
        where = PredictionFilter(
            drop=params.get("drop"),
            needs_review=True if params.get("needs_review") else None,
            predicted_class=params.get("class"),
            latest=bool(params.get("latest")),
        )
        export_predictions(lab.settings, where, fmt="csv", out=expected)
        got, want = pd.read_csv(io.BytesIO(body)), pd.read_csv(expected)
        assert len(want) > 0
        pd.testing.assert_frame_equal(got, want)

    status, _, body = fetch(lab_url(lab, "/api/predictions", format="json", drop=DROP), token=token)
    records = json.loads(body)
    csv_rows = pd.read_csv(io.BytesIO(fetch(lab_url(lab, "/api/predictions", format="csv", drop=DROP), token=token)[2]))
    assert status == 200 and len(records) == len(csv_rows) > 0
    assert set(records[0]["probabilities"]) >= {"blasts", "neutrophils"}
    status, _, body = fetch(lab_url(lab, "/api/predictions", format="parquet", drop=DROP), token=token)
    assert status == 200 and len(pd.read_parquet(io.BytesIO(body))) == len(records)
    assert fetch(lab_url(lab, "/api/predictions", format="xml"), token=token)[0] == 422
    status, _, body = fetch(lab_url(lab, "/openapi.json"))
    assert "/api/predictions" in json.loads(body)["paths"]


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


def wait_for(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception:  # noqa: BLE001 - the page is still rendering
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout} s")


def log_in(driver, lab, user: str, next_path: str, shots, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{lab.url}/lab{next_path}")
    # Anonymous: Airflow's own login page, which brings us back afterwards.
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "input[name=username]"), "login form", 120)
    assert "/auth/login" in driver.current_url
    driver.save_screenshot(str(shots / f"{name}-login.png"))
    driver.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys(user)
    driver.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(lab.passwords[user])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # Compared decoded: the login's round trip may spell a quoted path's characters differently.
    back = urllib.parse.unquote(f"/lab{next_path}")
    wait_for(lambda: back in urllib.parse.unquote(driver.current_url), f"redirect back to {next_path}", 120)


def test_a_technologist_reviews_by_click_and_by_keyboard_and_sees_the_reviewed_differential(lab, browser, tmp_path):
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser
    log_in(driver, lab, "tech", f"/drops/{DROP}/review", shots, "review")
    cells = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "section.cell"), "the queue's cells")
    assert "For research use only" in driver.page_source
    assert wait_for(
        lambda: driver.execute_script(
            "return Array.from(document.images).slice(0, 2).every(i => i.complete && i.naturalWidth > 0)"
        ),
        "thumbnails",
    )
    driver.save_screenshot(str(shots / "review-page.png"))
    before = {r["path"] for r in latest_reviews(lab.settings) if r["reviewer"] == "tech"}
    todo = [c for c in cells if "done" not in c.get_attribute("class")]
    first, second = todo[0].get_attribute("data-path"), todo[1].get_attribute("data-path")

    todo[0].find_element(By.CSS_SELECTOR, "button[data-label=eosinophils]").click()
    wait_for(lambda: "done" in todo[0].get_attribute("class"), "the clicked cell marked reviewed")
    # The page moved to the next cell by itself: a shortcut now decides for it.
    assert "current" in todo[1].get_attribute("class")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys("5").perform()  # 5 = lymphocytes
    wait_for(lambda: "done" in todo[1].get_attribute("class"), "the cell decided by keyboard marked reviewed")
    driver.save_screenshot(str(shots / "review-page-after.png"))
    latest = {r["path"]: r for r in latest_reviews(lab.settings)}
    assert (latest[first]["label"], latest[first]["reviewer"]) == ("eosinophils", "tech")
    assert (latest[second]["label"], latest[second]["reviewer"]) == ("lymphocytes", "tech")
    assert {first, second} - before

    driver.get(lab_url(lab, f"/drops/{DROP}/report"))
    text = wait_for(lambda: driver.find_element(By.TAG_NAME, "body").text, "the report")
    assert "Reviewed" in text and "research use" in text.lower()
    driver.save_screenshot(str(shots / "report-page.png"))
    driver.get(lab_url(lab, "/drops"))
    assert DROP in driver.find_element(By.TAG_NAME, "body").text
    driver.save_screenshot(str(shots / "drops-page.png"))
    print(f"screenshots: {shots}")


class _Elements(html.parser.HTMLParser):
    """Every start tag of a page and every ``href``, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.hrefs += [value for name, value in attrs if name == "href" and value]


def test_a_drop_named_to_inject_script_shows_its_name_and_runs_nothing_in_the_report(lab, browser, tmp_path):
    """Issue 28's stored XSS, reproduced: a drop folder named ``evil"><svg onload=...>``, classified
    by the nightly run, opened in the differential report (whose navigation bar put the drop's
    URL into ``href`` unescaped)."""
    from selenium.webdriver.common.by import By

    quoted = urllib.parse.quote(HOSTILE_DROP, safe="")
    token = lab.token("tech")
    status, _, body = fetch(lab_url(lab, f"/drops/{quoted}/report"), token=token)
    assert status == 200
    page = _Elements()
    page.feed(body.decode())
    assert "svg" not in page.tags
    # The bar's links lead back to the drops page and to this very drop's queue.
    review_links = [h for h in page.hrefs if h.endswith("/review")]
    assert review_links
    for link in review_links:
        assert urllib.parse.unquote(urllib.parse.urlsplit(link).path) == f"/lab/drops/{HOSTILE_DROP}/review"
        target = urllib.parse.urljoin(lab.url, link)  # percent-encoded when built: followed as it is
        status, _, queue_page = fetch(target, token=token)
        assert status == 200, target
        assert HOSTILE_DROP.encode() not in queue_page  # shown escaped, never raw

    shots = tmp_path / "screenshots"
    shots.mkdir()
    log_in(browser, lab, "tech", f"/drops/{quoted}/report", shots, "hostile-report")
    text = wait_for(lambda: browser.find_element(By.TAG_NAME, "body").text, "the report")
    assert HOSTILE_DROP in text
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.TAG_NAME, "svg") == []
    browser.find_element(By.LINK_TEXT, "Review queue of this drop").click()
    wait_for(lambda: "/review" in browser.current_url, "the queue page")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "section.cell"), "the hostile drop's cells")
    assert len(browser.find_elements(By.CSS_SELECTOR, "section.cell")) == 3
    assert browser.execute_script("return window.__pwned === undefined")


def _policy(headers: dict) -> dict[str, str]:
    csp = {k.lower(): v for k, v in headers.items()}["content-security-policy"]
    return {part.split()[0]: part for part in (p.strip() for p in csp.split(";")) if part}


def test_every_lab_response_carries_a_strict_policy_with_a_fresh_nonce_on_its_own_script(lab):
    token = lab.token("tech")
    path = review_queue(lab.settings, DROP)[0]["path"]
    routes = [
        "/drops",
        f"/drops/{DROP}/review",
        f"/drops/{DROP}/report",
        "/api/drops",
        f"/api/drops/{DROP}/queue",
        f"/image?path={urllib.parse.quote(path)}",
        "/api/predictions?format=csv",
    ]
    nonces = []
    for route in routes:
        status, headers, body = fetch(lab_url(lab, route), token=token)
        assert status == 200, route
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["x-content-type-options"] == "nosniff", route
        assert lowered["referrer-policy"] == "same-origin", route
        policy = _policy(headers)
        assert policy["script-src"].startswith("script-src 'nonce-") and "unsafe-inline" not in policy["script-src"]
        for directive in ("object-src 'none'", "base-uri 'none'", "frame-ancestors 'self'", "default-src 'none'"):
            assert directive in policy.values(), (route, directive)
        nonce = policy["script-src"].split("'nonce-")[1].rstrip("'")
        nonces.append(nonce)
        if route.endswith("/review"):
            scripts = re.findall(rb"<script([^>]*)>", body)
            assert scripts == [f' nonce="{nonce}"'.encode()], scripts
    assert len(set(nonces)) == len(nonces)  # a fresh nonce per response


def test_the_review_page_runs_its_own_script_under_the_policy_and_the_browser_reports_no_violation(
    lab, browser, tmp_path
):
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()
    log_in(browser, lab, "viewer", f"/drops/{DROP}/review", shots, "csp")
    cells = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "section.cell"), "the queue's cells")
    # The page's script ran (it marks a cell current): the nonce let it through.
    wait_for(lambda: any("current" in c.get_attribute("class") for c in cells), "the script's current cell")
    browser.get(lab_url(lab, f"/drops/{DROP}/report"))
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").text, "the report")
    violations = [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    assert violations == []
    # A planted inline script (no nonce) is refused, and the refusal is what the check above reads.
    browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.__planted = 1';"
        "document.body.appendChild(s);"
    )
    assert browser.execute_script("return window.__planted === undefined")
    planted = wait_for(
        lambda: [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")],
        "the planted script's violation in the console",
        timeout=10,
    )
    assert len(planted) >= 1


def test_drops_and_queues_come_in_pages_and_unpaged_callers_get_everything_as_before(lab):
    """Issue 31: limit and offset on /api/drops and a queue (the total in X-Total-Count); without
    them every drop and every cell, as before; the pages show where they are."""
    from wbc_tasks.serving.drop_summaries import list_drops

    def total(headers: dict) -> str:
        return {k.lower(): v for k, v in headers.items()}["x-total-count"]

    token = lab.token("viewer")
    every = list_drops(lab.settings)
    status, headers, body = fetch(lab_url(lab, "/api/drops"), token=token)
    assert status == 200 and json.loads(body) == json.loads(json.dumps(every))
    assert total(headers) == str(len(every)) and len(every) >= 2
    status, headers, body = fetch(lab_url(lab, "/api/drops?limit=1&offset=1"), token=token)
    assert status == 200 and json.loads(body) == json.loads(json.dumps(every[1:2]))
    assert total(headers) == str(len(every))
    assert fetch(lab_url(lab, "/api/drops?limit=0"), token=token)[0] == 422

    queue = review_queue(lab.settings, DROP)
    assert len(queue) > 4
    status, headers, body = fetch(lab_url(lab, f"/api/drops/{DROP}/queue?limit=3&offset=2"), token=token)
    assert [c["path"] for c in json.loads(body)] == [c["path"] for c in queue[2:5]]
    assert total(headers) == str(len(queue))
    status, _, body = fetch(lab_url(lab, f"/drops/{DROP}/review?page=1"), token=token)
    assert status == 200 and f"{len(queue)} cells to review".encode() in body
    assert fetch(lab_url(lab, "/drops?page=0"), token=token)[0] == 422


def test_the_learning_page_shows_the_reviews_the_trigger_and_the_versions_from_the_registry(lab):
    """Issue 30: how the model learns the lab's reviews, for a reader (a viewer), as HTML and JSON:
    the same counts as the database, the trigger's state, the registry's versions and aliases."""
    from wbc_tasks.serving.lab_learning import learning_status

    token = lab.token("viewer")
    status, headers, body = fetch(lab_url(lab, "/api/learning"), token=token)
    assert status == 200, body
    served = json.loads(body)
    expected = json.loads(json.dumps(learning_status(lab.settings).as_dict(), default=str))
    assert {k: served[k] for k in ("reviews", "reviewed_cells", "since_last_adaptation", "adapt_after_reviews")} == {
        k: expected[k] for k in ("reviews", "reviewed_cells", "since_last_adaptation", "adapt_after_reviews")
    }
    assert served["registry_error"] is None
    assert [(v["version"], v["aliases"]) for v in served["versions"]] == [("1", ["champion"])]

    status, _, body = fetch(lab_url(lab, "/learning"), token=token)
    page = body.decode()
    assert status == 200 and "Learning your lab's cells" in page
    assert f'<b id="since">{served["since_last_adaptation"]}</b>' in page
    assert "Automatic adaptation is off" in page  # the embedded default: WBC_ADAPT_AFTER_REVIEWS=0
    assert re.search(r'<tr data-version="1">\s*<td><b>1</b> <span class="alias">@champion</span>', page)
    assert "labelled\nimages only" in page and "not decided yet" in page
    status, _, body = fetch(lab_url(lab, "/drops"), token=token)
    assert b'/lab/learning">Learning</a>' in body  # every page links to it
