"""Benchmark of the lab's view (issue 16), on a real Airflow API server started as README says
(``wbc airflow-ui``), like tests/lab: reviewing 100 flagged cells with the keyboard-equivalent
POSTs (and the review page loads between them), then the predictions endpoint streaming 100,000
synthetic rows as CSV against ``wbc predictions`` on the same database: rows/s and peak memory
(resident set of the API server's process tree, and of the ``wbc predictions`` process).

    .venv/bin/python bench/bench_lab_api.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cli.test_embedded_commands import WBC, Started, answers, http_json, plain_shell_env  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.serving.conftest import THRESHOLD, base_settings, copy_drop, make_prediction, make_seen, register_tiny_model  # noqa: E402
from wbc_tasks.serving import predictions as db  # noqa: E402


class PeakRss:
    """Polls the resident memory of a process and its children every 20 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(request: urllib.request.Request) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        body = response.read()
    return time.perf_counter() - start, body


def synthetic_rows(settings, n: int) -> None:
    """``n`` classified files in drop ``synthetic`` (one prediction each), in batches."""
    with db.open_engine(settings.predictions_db_url) as engine:
        for start in range(0, n, 10_000):
            preds, seen = [], []
            for i in range(start, min(n, start + 10_000)):
                sha = hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()
                preds.append(make_prediction(sha, "1", best=i % 9, confidence=0.5 + (i % 50) / 100, review=i % 3 == 0))
                seen.append(make_seen(f"synthetic/cell_{i:06d}.jpg", sha, "synthetic"))
            with engine.begin() as connection:
                db.insert_ignore(connection, db.predictions, preds)
                db.insert_ignore(connection, db.files_seen, seen)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    from wbc_tasks.serving.nightly import classify_new_images

    folder = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    home = folder / "wbc-home"
    settings = base_settings(home)
    settings.classify_dir.mkdir(parents=True)
    register_tiny_model(settings, seed=1, alias="champion")
    copy_drop("2026-11-24", settings)
    classify_new_images(settings)
    t0 = time.perf_counter()
    synthetic_rows(settings, args.rows)
    print(f"inserted {args.rows} synthetic rows in {time.perf_counter() - t0:.1f} s", flush=True)

    env = plain_shell_env(home) | {
        "WBC_CLASSIFY_DIR": str(settings.classify_dir),
        "WBC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "WBC_PREDICTIONS_DB_URL": settings.predictions_db_url,
        "WBC_REVIEW_THRESHOLD": str(THRESHOLD),
    }
    port = free_port()
    ui = Started([str(WBC), "airflow-ui", "--port", str(port)], env)
    base = f"http://localhost:{port}"
    try:
        ui.wait_until(lambda: answers(f"{base}/api/v2/monitor/health"), "health endpoint")
        ui.wait_until(lambda: "Airflow is ready" in ui.output(), "ready banner")
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        token = http_json(f"{base}/auth/token", body={"username": "admin", "password": password})[1]["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        queue = json.loads(timed(urllib.request.Request(f"{base}/lab/api/drops/2026-11-24/queue", headers=auth))[1])
        page, post = [], []
        for cell in queue[:100]:
            page.append(timed(urllib.request.Request(f"{base}/lab/drops/2026-11-24/review", headers=auth))[0])
            body = json.dumps({"path": cell["path"], "label": "lymphocytes"}).encode()
            request = urllib.request.Request(
                f"{base}/lab/api/reviews", data=body, headers={**auth, "Content-Type": "application/json"}
            )
            post.append(timed(request)[0])
        # The API server: the child of `wbc airflow-ui` whose process tree listens on the port.
        listening = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
        api = next(
            p
            for p in psutil.Process(ui.process.pid).children()
            if listening & {q.pid for q in [p, *p.children(recursive=True)]}
        )
        with PeakRss(api.pid) as server_memory:
            rest = psutil.Process(api.pid)
            idle = sum(p.memory_info().rss for p in [rest, *rest.children(recursive=True)])
            seconds, csv = timed(
                urllib.request.Request(f"{base}/lab/api/predictions?format=csv&drop=synthetic", headers=auth)
            )
        http_rows = csv.count(b"\n") - 1
        cli_out = folder / "cli.csv"
        start = time.perf_counter()
        cli = subprocess.Popen(
            [str(WBC), "predictions", "--drop", "synthetic", "--format", "csv", "--out", str(cli_out)], env=env
        )
        with PeakRss(cli.pid) as cli_memory:
            cli.wait()
        cli_seconds = time.perf_counter() - start
        cli_rows = cli_out.read_text().count("\n") - 1
    finally:
        ui.kill_all()
    mib = 1 << 20
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
                f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB",
                "reviews": len(post),
                "review_page_ms": {"median": statistics.median(page) * 1e3, "p95": pct(page, 0.95) * 1e3},
                "decision_post_ms": {"median": statistics.median(post) * 1e3, "p95": pct(post, 0.95) * 1e3},
                "http_csv": {
                    "rows": http_rows,
                    "seconds": seconds,
                    "rows_per_s": http_rows / seconds,
                    "api_server_rss_idle_mib": idle / mib,
                    "api_server_rss_peak_mib": server_memory.peak / mib,
                },
                "wbc_predictions_csv": {
                    "rows": cli_rows,
                    "seconds": cli_seconds,
                    "rows_per_s": cli_rows / cli_seconds,
                    "rss_peak_mib": cli_memory.peak / mib,
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
