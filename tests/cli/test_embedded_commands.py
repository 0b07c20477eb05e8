"""README's `wbc` commands that start Airflow or MLflow, run exactly as README writes them, from a
shell whose PATH holds no `airflow` or `mlflow` (no activated environment): they find their
executables, a component that dies ends the command with its error, and SIGTERM leaves no child.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

WBC = REPO_ROOT / ".venv" / "bin" / "wbc"
#: Long enough for Airflow's four components to start on a busy 2-core machine.
START_TIMEOUT = 300


def plain_shell_env(home: Path) -> dict[str, str]:
    """A new user's shell: no activated environment (PATH without `airflow`/`mlflow`), no
    Airflow or WBC settings, the state in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WBC_", "AIRFLOW", "MLFLOW_", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env["WBC_HOME"] = str(home)
    env["WBC_WORKERS"] = "1"
    for tool in ("airflow", "mlflow"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} is on the test's PATH"
    return env


class Started:
    """A command started in the background, with every process it started remembered."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> None:
        self.log = open(Path(env["WBC_HOME"]).parent / f"{Path(argv[0]).name}-{time.monotonic_ns()}.log", "w+b")  # noqa: SIM115 - the command writes to it until stopped
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)
        self.seen: set[psutil.Process] = set()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def remember_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen.update(psutil.Process(self.process.pid).children(recursive=True))

    def wait_until(self, check, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_children()
            if self.process.poll() is not None:
                pytest.fail(f"the command ended ({self.process.returncode}) before {what}:\n{self.output()[-4000:]}")
            if check():
                return
            time.sleep(1)
        pytest.fail(f"no {what} after {timeout} s:\n{self.output()[-4000:]}")

    def terminate_and_wait(self) -> int:
        self.remember_children()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.log.close()
        return code

    def leftovers(self) -> list[psutil.Process]:
        return [p for p in self.seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def kill_all(self) -> None:
        for process in [*self.leftovers(), psutil.Process(self.process.pid) if self.process.poll() is None else None]:
            if process is not None:
                with contextlib.suppress(psutil.Error):
                    process.kill()


def http_json(url: str, *, token: str | None = None, body: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        # Generous: the first request of a freshly started server is slow on a busy two-core machine.
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_airflow_ui_as_readme_writes_it_logs_in_lists_the_dags_and_stops_cleanly(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    port = free_port()
    ui = Started([str(WBC), "airflow-ui", "--port", str(port)], env)
    try:
        ui.wait_until(lambda: answers(f"http://127.0.0.1:{port}/api/v2/monitor/health"), "health endpoint")
        ui.wait_until(lambda: "Airflow is ready" in ui.output(), "ready banner")
        password_file = tmp_path / "wbc-home" / "airflow" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(password_file.read_text())["admin"]
        assert f"password: {password}" in ui.output()
        status, token = http_json(
            f"http://127.0.0.1:{port}/auth/token", body={"username": "admin", "password": password}
        )
        assert status in (200, 201), status
        assert http_json(f"http://127.0.0.1:{port}/api/v2/dags")[0] == 401  # anonymous
        ui.wait_until(
            lambda: len(http_json(f"http://127.0.0.1:{port}/api/v2/dags", token=token["access_token"])[1]["dags"]) == 4,
            "four parsed DAGs",
        )
        status, dags = http_json(f"http://127.0.0.1:{port}/api/v2/dags", token=token["access_token"])
        assert sorted(d["dag_id"] for d in dags["dags"]) == [
            "wbc_adaptation",
            "wbc_batch_classification",
            "wbc_maintenance",
            "wbc_training",
        ]
        assert len(ui.seen) >= 4  # the four components, at least

        code = ui.terminate_and_wait()
        assert code == 128 + signal.SIGTERM
        assert ui.leftovers() == []
        assert port_closed(port)
    finally:
        ui.kill_all()


def test_a_component_that_dies_ends_make_airflow_ui_with_its_error(tmp_path):
    """The API server cannot bind (the port is taken): `make airflow-ui` stops the other
    components and exits non-zero naming the one that died, instead of hanging."""
    env = plain_shell_env(tmp_path / "wbc-home")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        ui = Started(["make", "--no-print-directory", "airflow-ui", f"ARGS=--port {port}"], env)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while ui.process.poll() is None and time.monotonic() < deadline:
                ui.remember_children()
                time.sleep(1)
            assert ui.process.poll() is not None, f"still running after {START_TIMEOUT} s:\n{ui.output()[-3000:]}"
            assert ui.process.returncode != 0
            assert "wbc: api-server exited with status" in ui.output()
            time.sleep(1)
            assert ui.leftovers() == []
        finally:
            ui.kill_all()


def test_mlflow_ui_as_readme_writes_it_serves_and_stops_cleanly(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    port = free_port()
    ui = Started([str(WBC), "mlflow-ui", "--port", str(port)], env)
    try:
        ui.wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), "MLflow health endpoint")
        status, found = http_json(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", body={"max_results": 10}
        )
        assert status == 200 and "experiments" in found
        ui.wait_until(lambda: "MLflow is ready" in ui.output(), "ready banner")
        assert ui.terminate_and_wait() == 128 + signal.SIGTERM
        assert ui.leftovers() == []
        assert port_closed(port)
    finally:
        ui.kill_all()


def test_sigterm_to_wbc_train_stops_its_airflow_child(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    train = Started([str(WBC), "train", "--profile", "demo"], env)
    try:
        train.wait_until(
            lambda: any("dags" in p.cmdline() and "test" in p.cmdline() for p in train.seen if p.is_running()),
            "`airflow dags test` child",
        )
        train.wait_until(lambda: any((tmp_path / "wbc-home" / "work" / "runs").glob("*/split")), "split step started")
        assert train.terminate_and_wait() == 128 + signal.SIGTERM
        assert train.leftovers() == []
    finally:
        train.kill_all()


def test_make_demo_ends_with_a_summary_of_the_run(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    done = subprocess.run(
        ["make", "--no-print-directory", "demo"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.rindex("wbc_training run ") :]
    assert ": succeeded" in summary.splitlines()[0]
    assert "model: wbc-classifier version 1 (models:/wbc-classifier/1)" in summary
    assert "test metrics (" in summary and "balanced_accuracy 0." in summary
    assert "champion: version 1 became the champion" in summary
    assert "/dags/wbc_training/runs/manual__" in summary and "/#/experiments/" in summary


def test_train_gpu_profile_without_weights_fails_at_once_with_the_instructions(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    env["KERAS_HOME"] = str(tmp_path / "empty-keras")
    done = subprocess.run([str(WBC), "train", "--profile", "gpu"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    for words in (
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "WBC_VGG16_WEIGHTS",
        str(tmp_path / "empty-keras" / "models"),
        "weights=none",
    ):
        assert words in done.stderr
    assert not (tmp_path / "wbc-home" / "airflow").exists()  # Airflow never started


def test_train_with_the_data_folder_one_level_too_high_fails_at_once_suggesting_the_right_one(tmp_path):
    env = plain_shell_env(tmp_path / "wbc-home")
    top = tmp_path / "wbc-bench"
    for label in ("blasts", "bands"):
        (top / "WBC" / label).mkdir(parents=True)
        (top / "WBC" / label / "a.png").write_bytes(b"placeholder")
    (top / "classify-images").mkdir()
    env["WBC_DATA_DIR"] = str(top)
    done = subprocess.run([str(WBC), "train"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{top / 'WBC'} holds class folders (bands, blasts): did you mean that folder?" in done.stderr
    assert not (tmp_path / "wbc-home" / "airflow").exists()
