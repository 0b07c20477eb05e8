"""What one native stack is: its settings, secrets, env files and the processes it runs.

Owns ``StackConfig`` (saved as ``stack.json`` in the state folder), ``StackError``, the parsed
``stack/stack.toml``, the secrets file, ``.env``-style files (reading ``KEY=value`` files,
writing ``stack.env`` and MLflow's basic-auth settings) and the process plan: the argv and
environment of every long-running service. Nothing here starts a process or opens a connection.

Imports: the standard library (sqlalchemy and cryptography lazily); nothing else of this package.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STACK_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = STACK_DIR.parent
TOPOLOGY_FILE = STACK_DIR / "stack.toml"
PLUGINS_FOLDER = STACK_DIR / "plugins"
#: Set for every process of one stack (value: its state folder); never inherited from the caller.
STACK_ID_VAR = "WBC_STACK_ID"
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


# --------------------------------------------------------------------------- stack.toml and settings


def load_topology(path: Path = TOPOLOGY_FILE) -> dict[str, Any]:
    """The parsed ``stack.toml``: settings tables and the ``services`` list."""
    with path.open("rb") as file:
        return tomllib.load(file)


@dataclass
class StackConfig:
    """Where one native stack lives and what it connects to (saved as ``stack.json``)."""

    prefix: str
    state_dir: Path
    pg_url: str
    redis_url: str
    api_port: int
    mlflow_port: int
    data_dir: str | None = None
    work_dir: str | None = None
    classify_dir: str | None = None
    worker_concurrency: int = 1
    bin_dir: str = field(default_factory=lambda: str(Path(sys.executable).parent))

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "stack.env"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def database_name(self, key: str) -> str:
        return f"{self.prefix}_{load_topology()['databases'][key]}"

    def database_url(self, key: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL of one of this stack's databases on the configured server."""
        from sqlalchemy.engine import make_url

        url = make_url(self.pg_url).set(drivername=driver, database=self.database_name(key))
        return url.render_as_string(hide_password=False)

    def save(self) -> None:
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        write_private(self.state_dir / "stack.json", json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> StackConfig:
        path = state_dir / "stack.json"
        if not path.is_file():
            raise StackError(f"{path} not found: no stack was started with this state folder")
        data = json.loads(path.read_text())
        data["state_dir"] = Path(data["state_dir"])
        return cls(**data)


class StackError(RuntimeError):
    """A problem the user must fix (printed without a traceback)."""


# --------------------------------------------------------------------------- secrets and env files


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (it may hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a docker-compose style ``.env`` file (quotes stripped, # comments)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise StackError(f"{path}:{number}: expected KEY=value, got {line!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_secrets(config: StackConfig, env_file: Path | None) -> dict[str, str]:
    """Passwords and keys of this stack: from ``env_file`` where given, else generated once.

    Uses the variable names of ``.env.example`` so one ``.env`` can serve compose and native.
    """
    from cryptography.fernet import Fernet

    path = config.state_dir / "secrets.env"
    current = read_env_file(path) if path.is_file() else {}
    given = read_env_file(env_file) if env_file else {}
    generators = {
        "AIRFLOW_ADMIN_USERNAME": lambda: "admin",
        "AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(18),
        "MLFLOW_ADMIN_USERNAME": lambda: "admin",
        "MLFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(18),
        "MLFLOW_FLASK_SECRET_KEY": lambda: secrets.token_hex(32),
        "AIRFLOW_FERNET_KEY": lambda: Fernet.generate_key().decode(),
        "AIRFLOW_JWT_SECRET": lambda: secrets.token_hex(32),
        "AIRFLOW_API_SECRET_KEY": lambda: secrets.token_hex(32),
    }
    values = {key: given.get(key) or current.get(key) or make() for key, make in generators.items()}
    if values != current:
        write_private(path, "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return values


# --------------------------------------------------------------------------- the process plan


@dataclass
class ProcessSpec:
    """One long-running process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    queues: list[str] = field(default_factory=list)
    role: str | None = None


def stack_environment(config: StackConfig, secret: dict[str, str]) -> dict[str, str]:
    """The AIRFLOW__*, WBC_* and MLflow variables every Airflow process of the stack gets."""
    topology = load_topology()
    airflow_home = config.airflow_home
    env: dict[str, str] = dict(topology["airflow_settings"])
    env.update(
        {
            STACK_ID_VAR: str(config.state_dir),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__FERNET_KEY": secret["AIRFLOW_FERNET_KEY"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{config.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{secret['AIRFLOW_ADMIN_USERNAME']}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": config.database_url("airflow"),
            "AIRFLOW__CELERY__BROKER_URL": config.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + config.database_url("airflow"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(config.worker_concurrency),
            # Several stacks may share one Redis database: every key gets the stack's prefix.
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": f"{config.prefix}:",
            "AIRFLOW__API__BASE_URL": f"http://localhost:{config.api_port}",
            "AIRFLOW__API__SECRET_KEY": secret["AIRFLOW_API_SECRET_KEY"],
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secret["AIRFLOW_JWT_SECRET"],
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
            # New DAG files are found within 30 s instead of 5 min (tests add none, people do).
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "WBC_HOME": str(config.state_dir / "wbc"),
            "WBC_WORK_DIR": config.work_dir or str(config.state_dir / "wbc" / "work"),
            "WBC_CLASSIFY_DIR": config.classify_dir or str(config.state_dir / "wbc" / "classify-images"),
            "WBC_MLFLOW_TRACKING_URI": config.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": secret["MLFLOW_ADMIN_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
            "WBC_PREDICTIONS_DB_URL": config.database_url("predictions"),
        }
    )
    if config.data_dir:
        env["WBC_DATA_DIR"] = config.data_dir
    return env


def process_environment(stack_env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its Airflow/MLflow settings, plus the stack's.

    Inherited ``AIRFLOW__*`` variables (a test session sets some) would silently override the
    stack's; ``WBC_*`` settings the caller chose (``WBC_WORKERS=1``) pass through unless the
    stack sets them itself.
    """
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW__", "AIRFLOW_", "MLFLOW_")) and k != STACK_ID_VAR
    }
    base.update(stack_env)
    return base


def process_specs(config: StackConfig, secret: dict[str, str]) -> list[ProcessSpec]:
    """The long-running processes, in start order, built from ``stack.toml``."""
    topology = load_topology()
    bin_dir = Path(config.bin_dir)
    airflow = str(bin_dir / "airflow")
    base_env = process_environment(stack_environment(config, secret))
    specs: list[ProcessSpec] = []
    for service in topology["services"]:
        name = service["name"]
        if service.get("external") or service.get("init"):
            continue
        if name == "mlflow":
            specs.append(mlflow_spec(config, secret, base_env))
            continue
        argv = [airflow, *service["airflow"]]
        env = dict(base_env)
        queues: list[str] = []
        role = service.get("role")
        if name == "airflow-apiserver":
            argv += [
                "--host",
                "127.0.0.1",
                "--port",
                str(config.api_port),
                "--workers",
                "1",
            ]
        elif name == "airflow-triggerer":
            # Logs are on this machine's disk, where the api-server reads them: no log server
            # (its fixed port would clash with a second stack).
            argv += ["--skip-serve-logs"]
        elif role:
            queues = list(service["queues"])
            concurrency = service.get("concurrency", config.worker_concurrency)
            argv += [
                "--queues", ",".join(queues),
                "--concurrency", str(concurrency),
                "--celery-hostname", f"{role}@%h",
                "--skip-serve-logs",
            ]  # fmt: skip
            env.update(topology["worker_settings"])
            env["WBC_WORKER_ROLE"] = role
        specs.append(ProcessSpec(name=name, argv=argv, env=env, queues=queues, role=role))
    return specs


def mlflow_spec(config: StackConfig, secret: dict[str, str], base_env: dict[str, str]) -> ProcessSpec:
    """The MLflow tracking server: PostgreSQL backend, proxied artifacts, basic auth."""
    auth_ini = config.state_dir / "mlflow" / "basic_auth.ini"
    env = {k: v for k, v in base_env.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": secret["MLFLOW_ADMIN_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SECRET_KEY"],
        }
    )
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    argv = [
        str(Path(config.bin_dir) / "mlflow"), "server",
        "--host", "127.0.0.1",
        "--port", str(config.mlflow_port),
        "--workers", "1",
        "--backend-store-uri", config.database_url("mlflow"),
        "--serve-artifacts",
        "--artifacts-destination", str(config.state_dir / "mlflow" / "artifacts"),
        "--app-name", "basic-auth",
    ]  # fmt: skip
    return ProcessSpec(name="mlflow", argv=argv, env=env)


def write_mlflow_auth_config(config: StackConfig) -> Path:
    """The basic-auth settings (users live in their own database; admin password from env)."""
    template = (REPO_ROOT / "mlflow" / "basic_auth.ini.template").read_text()
    text = template.replace("${MLFLOW_AUTH_DATABASE_URI}", config.database_url("mlflow_auth"))
    path = config.state_dir / "mlflow" / "basic_auth.ini"
    write_private(path, text)
    return path


def write_env_file(config: StackConfig, secret: dict[str, str]) -> Path:
    """``stack.env``: source it (``set -a; . stack.env``) to use airflow/wbc/mlflow on this stack."""
    env = stack_environment(config, secret)
    env["AIRFLOW_ADMIN_USERNAME"] = secret["AIRFLOW_ADMIN_USERNAME"]
    env["AIRFLOW_ADMIN_PASSWORD"] = secret["AIRFLOW_ADMIN_PASSWORD"]
    env["WBC_STACK_API_URL"] = config.api_url
    lines = ["# Written by stack/start; holds secrets: do not commit or share.\n"]
    lines += [f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items())]
    write_private(config.env_file, "".join(lines))
    return config.env_file
