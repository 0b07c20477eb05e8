"""Airflow and MLflow on the embedded state (``WBC_HOME``: SQLite, local folders), as ``wbc``
starts them: the environment, the executables, the commands and their readiness checks.

Every child gets this environment's ``bin`` folder first on ``PATH``: Airflow starts its own
components and task runners as ``airflow …`` looked up on ``PATH``, and a user who runs
``.venv/bin/wbc`` without activating the environment has no ``airflow`` there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from wbc_tasks.cli.supervise import Child, ChildFailed, Supervisor
from wbc_tasks.core.settings import Settings, dags_folder

#: The four components ``airflow standalone`` runs, in the order they are started.
AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")


def bin_dir() -> Path:
    """The folder holding this interpreter and the ``airflow``/``mlflow`` executables installed
    beside it (not resolved: a virtual environment's python is a link to the base one)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """``name`` from this environment's ``bin``; a clear error when it is not installed there."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the '{name}' command is not installed in this environment "
            f"({bin_dir().parent}); run `make setup` (or `uv sync --extra cpu`) first"
        )
    return str(path)


def child_environment(settings: Settings) -> dict[str, str]:
    """The environment of every child: ``bin_dir()`` first on PATH, ``WBC_HOME`` passed on."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir()), *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    env.setdefault("WBC_HOME", str(settings.home))
    return env


def airflow_environment(settings: Settings) -> dict[str, str]:
    """Environment for Airflow commands on the embedded state (SQLite under ``WBC_HOME``)."""
    env = child_environment(settings)
    env.setdefault("AIRFLOW_HOME", str(settings.home / "airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(dags_folder()))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return env


def ensure_airflow_database(env: dict[str, str]) -> None:
    """Create and migrate the embedded Airflow database on first use."""
    home = Path(env["AIRFLOW_HOME"])
    if (home / "airflow.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    print(f"Creating Airflow's database in {home} (first use only)", flush=True)
    done = subprocess.run(
        [executable("airflow"), "db", "migrate"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ChildFailed("airflow db migrate", done.returncode, (done.stdout + done.stderr)[-4000:])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def airflow_ui_env(settings: Settings, host: str, port: int) -> dict[str, str]:
    """The embedded environment for a local Airflow with all four components: LocalExecutor
    and the simple auth manager (as ``airflow standalone`` forces), this port everywhere."""
    env = airflow_environment(settings)
    env["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    env["AIRFLOW__CORE__AUTH_MANAGER"] = (
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    base = f"http://{'localhost' if host in ('0.0.0.0', '127.0.0.1', '::') else host}:{port}"
    env["AIRFLOW__API__PORT"] = str(port)
    env.setdefault("AIRFLOW__API__BASE_URL", base)
    # Task runners report to the API server; it must be this one, on this port.
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://127.0.0.1:{port}/execution/"
    return env


def password_file(env: dict[str, str]) -> Path:
    """Where the simple auth manager keeps the generated admin password."""
    return Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"


def admin_password(env: dict[str, str]) -> str | None:
    """The generated password of user ``admin``, once the API server has written it."""
    try:
        return str(json.loads(password_file(env).read_text())["admin"])
    except (OSError, ValueError, KeyError):
        return None


def run_airflow_ui(settings: Settings, *, host: str, port: int, out: Callable[[str], None] = print) -> int:
    """Airflow's four components on the embedded state until SIGINT/SIGTERM or one of them
    exits (then the others are stopped and its last lines shown)."""
    env = airflow_ui_env(settings, host, port)
    airflow = executable("airflow")
    ensure_airflow_database(env)
    children = [
        Child(name, [airflow, name, *(["--host", host, "--port", str(port)] if name == "api-server" else [])])
        for name in AIRFLOW_COMPONENTS
    ]
    health = f"http://127.0.0.1:{port}/api/v2/monitor/health"

    def banner() -> None:
        url = env["AIRFLOW__API__BASE_URL"]
        out("")
        out(f"Airflow is ready: {url}  (user: admin, password: {admin_password(env) or 'see below'})")
        out(f"  password file: {password_file(env)}")
        out(f"  trigger training: {url}/dags/wbc_training  (the ▶ button opens the form)")
        out("  stop: Ctrl-C")
        out("")

    return _supervise(Supervisor(children, env, serve=True, ready=lambda: http_ok(health), on_ready=banner))


def run_mlflow_ui(settings: Settings, *, host: str, port: int, out: Callable[[str], None] = print) -> int:
    """MLflow's UI on the embedded tracking database until SIGINT/SIGTERM or it exits."""
    env = child_environment(settings)
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    argv = [
        executable("mlflow"),
        "server",
        "--backend-store-uri",
        settings.mlflow_tracking_uri,
        "--default-artifact-root",
        settings.mlflow_artifact_root.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    url = f"http://{host}:{port}"

    def banner() -> None:
        out(
            f"\nMLflow is ready: {url}  (experiments {settings.mlflow_experiment}, "
            f"{settings.classify_experiment}; registry: {settings.model_name})\n  stop: Ctrl-C\n"
        )

    return _supervise(
        Supervisor(
            [Child("mlflow", argv)],
            env,
            serve=True,
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
            on_ready=banner,
        )
    )


def run_airflow_command(settings: Settings, *args: str) -> int:
    """One Airflow CLI command on the embedded state (e.g. ``dags test``), its output passed
    through; SIGINT/SIGTERM stop it and everything it started before this returns."""
    env = airflow_environment(settings)
    ensure_airflow_database(env)
    child = Child("airflow", [executable("airflow"), *args])
    return _supervise(Supervisor([child], env, serve=False, prefix_output=False))


def _supervise(supervisor: Supervisor) -> int:
    try:
        return supervisor.run()
    except ChildFailed as failure:
        print(f"\nwbc: {failure.report()}", file=sys.stderr, flush=True)
        return failure.code if failure.code and failure.code > 0 else 1
