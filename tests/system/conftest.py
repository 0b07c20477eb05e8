"""The native stack for system tests: started once per session with a throwaway prefix.

The stack runs from ``stack/start`` exactly as a person starts it, against the PostgreSQL and
Redis on localhost, with its own databases, Redis key prefix and state folder. It is always
stopped at the end, also when a test or the start-up fails: ``stack/stop`` kills every process
group (and the databases are dropped); if that fails too, the process groups named by the pid
files are killed here.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_unless_required

REPO_ROOT = Path(__file__).resolve().parents[2]
STACK_DIR = REPO_ROOT / "stack"
#: Start-up includes migrating two fresh databases on a 2-core machine (~1-2 min measured).
START_TIMEOUT_S = 600


@dataclass
class NativeStack:
    """A running native stack: its URLs, credentials and settings (from its env file)."""

    prefix: str
    state_dir: Path
    env: dict[str, str]

    @property
    def api_url(self) -> str:
        return self.env["WBC_STACK_API_URL"]

    @property
    def mlflow_url(self) -> str:
        return self.env["WBC_MLFLOW_TRACKING_URI"]

    def log_tails(self, lines: int = 40) -> str:
        """The end of every service log (for failure messages)."""
        parts = []
        for log in sorted((self.state_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """System tests start seven server processes and train a model: run them only when asked.

    Asked means ``pytest -m system`` (or any -m expression naming ``system`` positively) or
    ``WBC_RUN_SYSTEM_TESTS=1``; a plain ``pytest`` reports them as skipped with this reason.
    """
    markexpr = config.getoption("markexpr", "") or ""
    asked = ("system" in markexpr and "not system" not in markexpr) or os.environ.get("WBC_RUN_SYSTEM_TESTS") == "1"
    if asked:
        return
    skip = pytest.mark.skip(reason="system test: run with `pytest -m system tests/system` (or WBC_RUN_SYSTEM_TESTS=1)")
    for item in items:
        if "system" in item.keywords:
            item.add_marker(skip)


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines stack/start writes (values shell-quoted)."""
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = shlex.split(value)[0] if value else ""
    return env


def _services_reachable() -> str | None:
    """Why the stack cannot start here (PostgreSQL/Redis down), or None."""
    import psycopg2
    import redis

    pg_url = os.environ.get("WBC_STACK_PG_URL", "postgresql://postgres@localhost:5432/postgres")
    redis_url = os.environ.get("WBC_STACK_REDIS_URL", "redis://localhost:6379/0")
    try:
        psycopg2.connect(pg_url, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return f"PostgreSQL ({pg_url}) is not reachable: {exc}"
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis ({redis_url}) is not reachable: {exc}"
    return None


def _kill_leftover_groups(state_dir: Path) -> None:
    """Last resort: SIGKILL the process groups the stack's pid files name."""
    for pid_file in (state_dir / "pids").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.killpg(pid, signal.SIGKILL)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            pass


def _run_stack(command: str, *args: str, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(STACK_DIR / command), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def native_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeStack]:
    """Start the native stack for the session; stop it and drop its databases afterwards."""
    reason = _services_reachable()
    if reason:
        skip_unless_required(f"native stack needs PostgreSQL and Redis on localhost: {reason}")
    prefix = f"wbct_{secrets.token_hex(4)}"
    root = tmp_path_factory.mktemp("native-stack")
    state_dir = root / "state"
    classify_dir = root / "classify-images"
    classify_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "WBC_", "MLFLOW_"))}
    env["WBC_WORKERS"] = "1"  # two cores: one image worker per task
    env["WBC_ALLOWED_ROOTS"] = str(tmp_path_factory.getbasetemp())  # the tests' data_dir params
    # The test copies a drop and classifies it at once: no waiting for files still being copied.
    env["WBC_SETTLE_MINUTES"] = "0"
    common = ["--prefix", prefix, "--state-dir", str(state_dir)]
    begun = time.monotonic()
    try:
        started = _run_stack(
            "start", *common, "--classify-dir", str(classify_dir), "--timeout", str(START_TIMEOUT_S - 60),
            timeout=START_TIMEOUT_S, env=env,
        )  # fmt: skip
        stack = NativeStack(prefix=prefix, state_dir=state_dir, env={})
        if started.returncode != 0:
            pytest.fail(
                f"stack/start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}\n{stack.log_tails()}"
            )
        stack.env = read_env_file(state_dir / "stack.env")
        print(f"\nnative stack {prefix} up in {time.monotonic() - begun:.0f} s", flush=True)
        yield stack
    finally:
        try:
            stopped = _run_stack("stop", *common, "--drop-databases", timeout=180, env=env)
            if stopped.returncode != 0:
                print(f"stack/stop failed: {stopped.stdout}\n{stopped.stderr}")
        finally:
            _kill_leftover_groups(state_dir)


class AirflowClient:
    """The few calls of Airflow 3's REST API (v2) the system tests make, with a JWT."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        response = self.session.post(
            f"{self.base_url}/auth/token", json={"username": username, "password": password}, timeout=30
        )
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def get(self, path: str, **params: Any) -> Any:
        response = self.session.get(f"{self.base_url}/api/v2{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Wait until the dag-processor has parsed ``dag_id``; fail with its import errors."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.session.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=30)
            if response.status_code == 200:
                return
            time.sleep(3)
        errors = self.get("/importErrors").get("import_errors", [])
        pytest.fail(f"DAG {dag_id} not parsed after {timeout:.0f} s; import errors: {errors}")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Unpause ``dag_id`` and start a run with ``conf``; returns the run id."""
        self.session.patch(
            f"{self.base_url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30
        ).raise_for_status()
        response = self.session.post(
            f"{self.base_url}/api/v2/dags/{dag_id}/dagRuns",
            json={"logical_date": None, "conf": conf},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]

    def task_log(self, dag_id: str, run_id: str, ti: dict[str, Any]) -> str:
        """The end of a task instance's log (structured lines rendered as text)."""
        response = self.session.get(
            f"{self.base_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}"
            f"/logs/{max(ti.get('try_number') or 1, 1)}",
            params={"full_content": "true", "map_index": ti.get("map_index", -1)},
            timeout=30,
        )
        if response.status_code != 200:
            return f"(log not available: {response.status_code} {response.text[:200]})"
        lines = []
        for entry in response.json().get("content", []):
            if isinstance(entry, dict):
                errors = "; ".join(
                    f"{e.get('exc_type')}: {e.get('exc_value')}" for e in entry.get("error_detail") or []
                )
                lines.append(f"{entry.get('timestamp', '')} {entry.get('level', '')} {entry.get('event', '')} {errors}")
            else:
                lines.append(str(entry))
        return "\n".join(lines)[-6000:]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        """A task's return value (for failure messages), or the error text."""
        response = self.session.get(
            f"{self.base_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            timeout=30,
        )
        return response.json().get("value") if response.status_code == 200 else response.text[:300]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        """Wait until the run finishes; fail with the failed tasks' logs unless it succeeded."""
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                break
            time.sleep(5)
        if run.get("state") != "success":
            tis = self.task_instances(dag_id, run_id)
            states = {ti["task_id"]: ti["state"] for ti in tis}
            logs = "\n".join(
                f"--- {ti['task_id']}[{ti.get('map_index')}]\n{self.task_log(dag_id, run_id, ti)}"
                for ti in tis
                if ti["state"] in ("failed", "up_for_retry")
            )
            pytest.fail(f"{dag_id} run {run_id} ended {run.get('state')!r} (timeout {timeout:.0f} s): {states}\n{logs}")
        return run


@pytest.fixture(scope="session")
def airflow(native_stack: NativeStack) -> AirflowClient:
    """An authenticated REST client of the stack's api-server."""
    return AirflowClient(
        native_stack.api_url,
        native_stack.env["AIRFLOW_ADMIN_USERNAME"],
        native_stack.env["AIRFLOW_ADMIN_PASSWORD"],
    )


#: The training tasks that run the network (training, then calibration's passes over the images):
#: they go to queue ``gpu``, every other task to ``default``.
GPU_TASKS = {"train_model", "calibrate"}


def assert_tasks_ran_on_their_queues(training_run: dict[str, Any]) -> None:
    """Every task of a finished ``wbc_training`` run succeeded; the GPU tasks went to queue ``gpu``
    and ran on the gpu worker (hostname ``gpu@…``), the rest on the cpu worker."""
    tis = {ti["task_id"]: ti for ti in training_run["task_instances"]}
    assert {ti["state"] for ti in tis.values()} == {"success"}, {k: v["state"] for k, v in tis.items()}
    for task in GPU_TASKS:
        assert tis[task]["queue"] == "gpu", (task, tis[task]["queue"])
        assert tis[task]["hostname"].startswith("gpu@"), (task, tis[task]["hostname"])
    others = {task: ti["hostname"] for task, ti in tis.items() if task not in GPU_TASKS}
    assert all(host.startswith("cpu@") for host in others.values()), others
