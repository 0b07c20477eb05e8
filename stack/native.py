"""Run the production stack natively: the docker-compose topology as local processes.

For machines without Docker and for the system tests. PostgreSQL and Redis are expected to run
already (their URLs are options); everything else is started here, each process in its own
process group with a log file and a pid file in a state folder:

    stack/start   create the databases if missing, write the env file, migrate Airflow's
                  database, start whatever is not running, wait until it is healthy
    stack/stop    stop every process group (workers first), clean stale pid files
    stack/status  what runs, where the UIs are, where the env file is

The services, queues and shared settings come from ``stack/stack.toml``, the same declaration
tests/test_stack_config.py checks docker-compose.yml against. Every name this stack creates
(databases, Redis keys, the state folder) carries its prefix, so a throwaway prefix never touches
another stack. Written by hand (no library runs Airflow + MLflow as supervised local processes
without Docker); it uses only the standard library and packages the project already depends on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_FILE = Path(__file__).resolve().parent / "stack.toml"
PLUGINS_FOLDER = Path(__file__).resolve().parent / "plugins"
#: Marks every process of one stack (value: its state folder), so stop finds strays by id.
STACK_ID_VAR = "WBC_STACK_ID"
#: Exit status of ``status`` when something is not running.
EXIT_NOT_RUNNING = 3
_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


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
        _write_private(self.state_dir / "stack.json", json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> "StackConfig":
        path = state_dir / "stack.json"
        if not path.is_file():
            raise StackError(f"{path} not found: no stack was started with this state folder")
        data = json.loads(path.read_text())
        data["state_dir"] = Path(data["state_dir"])
        return cls(**data)


class StackError(RuntimeError):
    """A problem the user must fix (printed without a traceback)."""


@dataclass
class ProcessSpec:
    """One long-running process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    queues: list[str] = field(default_factory=list)
    role: str | None = None


# --------------------------------------------------------------------------- settings and secrets


def _write_private(path: Path, text: str) -> None:
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
    values = {
        key: given.get(key) or current.get(key) or make() for key, make in generators.items()
    }
    if values != current:
        _write_private(path, "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return values


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            argv += ["--host", "127.0.0.1", "--port", str(config.api_port), "--workers", "1"]
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
    _write_private(path, text)
    return path


def write_env_file(config: StackConfig, secret: dict[str, str]) -> Path:
    """``stack.env``: source it (``set -a; . stack.env``) to use airflow/wbc/mlflow on this stack."""
    env = stack_environment(config, secret)
    env["AIRFLOW_ADMIN_USERNAME"] = secret["AIRFLOW_ADMIN_USERNAME"]
    env["AIRFLOW_ADMIN_PASSWORD"] = secret["AIRFLOW_ADMIN_PASSWORD"]
    env["WBC_STACK_API_URL"] = config.api_url
    lines = ["# Written by stack/start; holds secrets: do not commit or share.\n"]
    lines += [f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items())]
    _write_private(config.env_file, "".join(lines))
    return config.env_file


# --------------------------------------------------------------------------- databases


def ensure_databases(config: StackConfig) -> list[str]:
    """Create the stack's PostgreSQL databases that do not exist yet; returns those created."""
    import psycopg2
    from psycopg2 import sql

    created = []
    try:
        conn = psycopg2.connect(config.pg_url)
    except psycopg2.OperationalError as exc:
        raise StackError(f"PostgreSQL at {_hide_password(config.pg_url)} is not reachable: {exc}") from exc
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for key in load_topology()["databases"]:
                name = config.database_name(key)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    finally:
        conn.close()
    return created


def drop_databases(config: StackConfig) -> list[str]:
    """Drop this stack's databases (only names carrying its prefix); returns those dropped."""
    import psycopg2
    from psycopg2 import sql

    dropped = []
    conn = psycopg2.connect(config.pg_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for key in load_topology()["databases"]:
                name = config.database_name(key)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is not None:
                    cur.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
                    dropped.append(name)
    finally:
        conn.close()
    return dropped


def check_dependencies() -> None:
    """Fail early, by name, on drivers the stack needs beyond an embedded install."""
    import importlib.util

    # Import name -> why the stack needs it.
    needed = {
        "psycopg2": "PostgreSQL driver",
        "asyncpg": "Airflow 3's async access to a PostgreSQL metadata database",
        "redis": "Celery broker client",
        "flask_wtf": "MLflow's basic-auth app (the mlflow[auth] extra)",
    }
    missing = [f"{name} ({why})" for name, why in needed.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise StackError(f"missing Python packages: {'; '.join(missing)}. Run 'uv sync --extra cpu'")


def check_redis(config: StackConfig) -> None:
    import redis

    try:
        redis.Redis.from_url(config.redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise StackError(f"Redis at {config.redis_url} is not reachable: {exc}") from exc


def purge_redis_keys(config: StackConfig) -> int:
    """Delete the broker keys carrying this stack's prefix; returns how many."""
    import redis

    client = redis.Redis.from_url(config.redis_url)
    keys = list(client.scan_iter(match=f"{config.prefix}:*", count=500))
    if keys:
        client.delete(*keys)
    return len(keys)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------- processes


def _pid_file(config: StackConfig, name: str) -> Path:
    return config.pid_dir / f"{name}.pid"


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(process group, session, start time in clock ticks) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Fields after the command name, which may itself contain spaces and parentheses.
    rest = text[text.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    return int(rest[2]), int(rest[3]), int(rest[19])


def running_pid(config: StackConfig, name: str) -> int | None:
    """The pid of a running service of this stack, or None (a stale pid file is removed).

    A pid file holds the pid and the process's start time: a pid the system reused for another
    process does not match (setproctitle overwrites /proc/<pid>/environ and cmdline, so those
    cannot tell). The process leads its own session, which stop uses to find every child.
    """
    path = _pid_file(config, name)
    try:
        pid_text, started_text = path.read_text().split()
        pid, started = int(pid_text), int(started_text)
    except (FileNotFoundError, ValueError):
        path.unlink(missing_ok=True)
        return None
    stat = _proc_stat(pid)
    if stat is not None and stat[1] == pid and stat[2] == started:
        return pid
    path.unlink(missing_ok=True)
    return None


def start_process(config: StackConfig, spec: ProcessSpec) -> int:
    """Start one service in its own session (= process group); returns its pid."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    config.pid_dir.mkdir(parents=True, exist_ok=True)
    with (config.log_dir / f"{spec.name}.log").open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(spec.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=config.state_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stat = _proc_stat(proc.pid)
    if stat is None:
        raise StackError(f"{spec.name} exited at once: see {config.log_dir / (spec.name + '.log')}")
    _pid_file(config, spec.name).write_text(f"{proc.pid} {stat[2]}\n")
    return proc.pid


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in this process group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] == pgid:
                return True
    return False


def _session_members(session_ids: set[int]) -> list[int]:
    """Live processes in any of these sessions (children that left their process group)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] in session_ids:
                members.append(int(entry.name))
    return members


def stop_stack(config: StackConfig, timeout: float = 30.0) -> list[str]:
    """Stop every service by process group: TERM (workers first), then KILL after ``timeout``."""
    names = [spec["name"] for spec in load_topology()["services"]]
    groups: dict[str, int] = {}
    for name in reversed(names):
        pid = running_pid(config, name)
        if pid is not None:
            groups[name] = pid
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(_group_alive(p) for p in groups.values()) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pgid in groups.values():
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    sessions = set(groups.values())
    for pid in _session_members(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # SIGKILL is delivered asynchronously: return only once the processes are really gone, so a
    # start right after a stop cannot meet them (ports, pid files) and a check sees none alive.
    deadline = time.monotonic() + 10
    while _session_members(sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    if config.pid_dir.is_dir():
        for path in config.pid_dir.glob("*.pid"):
            path.unlink(missing_ok=True)
    return list(groups)


# --------------------------------------------------------------------------- health


def _http_status(url: str, timeout: float = 3.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def airflow_health(config: StackConfig) -> dict[str, str]:
    """Component -> status from the api-server's public ``/api/v2/monitor/health``."""
    try:
        with urllib.request.urlopen(f"{config.api_url}/api/v2/monitor/health", timeout=3) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return {key: str(value.get("status")) for key, value in body.items() if isinstance(value, dict)}


def worker_nodes(config: StackConfig) -> dict[str, str]:
    """Service name -> Celery node name of each worker."""
    from celery.utils.nodenames import host_format

    return {
        service["name"]: host_format(f"{service['role']}@%h")
        for service in load_topology()["services"]
        if service.get("role")
    }


def ping_workers(config: StackConfig) -> set[str]:
    """Celery node names that answer a ping through the stack's broker."""
    from celery import Celery

    app = Celery(broker=config.redis_url)
    app.conf.broker_transport_options = {"global_keyprefix": f"{config.prefix}:"}
    app.conf.broker_connection_retry_on_startup = False
    try:
        replies = app.control.ping(destination=list(worker_nodes(config).values()), timeout=1.5)
    except Exception:  # noqa: BLE001 - a broker hiccup means "not yet"
        return set()
    finally:
        app.close()
    return {node for reply in replies for node in reply}


def health(config: StackConfig) -> dict[str, bool]:
    """Service name -> healthy, for every service the native stack runs."""
    result: dict[str, bool] = {"mlflow": _http_status(f"{config.mlflow_url}/health") == 200}
    components = airflow_health(config)
    result["airflow-apiserver"] = components.get("metadatabase") == "healthy"
    result["airflow-scheduler"] = components.get("scheduler") == "healthy"
    result["airflow-dag-processor"] = components.get("dag_processor") == "healthy"
    result["airflow-triggerer"] = components.get("triggerer") == "healthy"
    nodes = worker_nodes(config)
    answered = ping_workers(config) if any(running_pid(config, n) for n in nodes) else set()
    for name, node in nodes.items():
        result[name] = node in answered
    return result


# --------------------------------------------------------------------------- commands


def resolve_config(args: argparse.Namespace) -> StackConfig:
    """Options on the command line, else what this state folder was started with, else defaults."""
    prefix = args.prefix
    if not _PREFIX_PATTERN.match(prefix):
        raise StackError(f"prefix {prefix!r}: use 1-31 lower-case letters, digits or _, starting with a letter")
    state_dir = Path(args.state_dir or REPO_ROOT / ".wbc" / "stack" / prefix).resolve()
    saved = StackConfig.load(state_dir) if (state_dir / "stack.json").is_file() else None

    def pick(option: Any, attribute: str, default: Any) -> Any:
        if option not in (None, 0, ""):
            return option
        return getattr(saved, attribute) if saved else default

    def abs_or_none(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value else None

    return StackConfig(
        prefix=prefix,
        state_dir=state_dir,
        pg_url=pick(args.pg_url, "pg_url", "postgresql://postgres@localhost:5432/postgres"),
        redis_url=pick(args.redis_url, "redis_url", "redis://localhost:6379/0"),
        api_port=pick(getattr(args, "api_port", None), "api_port", 0) or free_port(),
        mlflow_port=pick(getattr(args, "mlflow_port", None), "mlflow_port", 0) or free_port(),
        data_dir=abs_or_none(pick(getattr(args, "data_dir", None), "data_dir", None)),
        work_dir=abs_or_none(pick(getattr(args, "work_dir", None), "work_dir", None)),
        classify_dir=abs_or_none(pick(getattr(args, "classify_dir", None), "classify_dir", None)),
        worker_concurrency=pick(getattr(args, "worker_concurrency", None), "worker_concurrency", 1),
    )


def migrate_airflow(config: StackConfig, secret: dict[str, str]) -> None:
    """``airflow db migrate`` (idempotent) and the Simple auth manager's password file."""
    env = process_environment(stack_environment(config, secret))
    config.airflow_home.mkdir(parents=True, exist_ok=True)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with (config.log_dir / "airflow-init.log").open("ab") as log:
        done = subprocess.run(
            [str(Path(config.bin_dir) / "airflow"), "db", "migrate"],
            env=env, cwd=config.state_dir, stdout=log, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise StackError(f"airflow db migrate failed: see {config.log_dir / 'airflow-init.log'}")
    passwords = {secret["AIRFLOW_ADMIN_USERNAME"]: secret["AIRFLOW_ADMIN_PASSWORD"]}
    _write_private(config.airflow_home / "passwords.json", json.dumps(passwords) + "\n")


def command_start(args: argparse.Namespace) -> int:
    begun = time.monotonic()
    config = resolve_config(args)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.save()
    secret = load_secrets(config, Path(args.env_file) if args.env_file else None)
    check_dependencies()
    check_redis(config)
    created = ensure_databases(config)
    if created:
        print(f"created databases: {', '.join(created)}")
    write_mlflow_auth_config(config)
    (config.state_dir / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    for folder in ("WBC_WORK_DIR", "WBC_CLASSIFY_DIR"):
        Path(stack_environment(config, secret)[folder]).mkdir(parents=True, exist_ok=True)
    env_file = write_env_file(config, secret)
    specs = process_specs(config, secret)
    to_start = [spec for spec in specs if running_pid(config, spec.name) is None]
    if any(spec.name.startswith("airflow-") for spec in to_start):
        print("migrating the Airflow database ...", flush=True)
        migrate_airflow(config, secret)
    for spec in to_start:
        pid = start_process(config, spec)
        print(f"started {spec.name} (pid {pid})", flush=True)
    if not args.no_wait:
        wait_healthy(config, secret, timeout=args.timeout)
    print(f"stack '{config.prefix}' up in {time.monotonic() - begun:.0f} s")
    print(f"  Airflow  {config.api_url}  (user {secret['AIRFLOW_ADMIN_USERNAME']}, password in {env_file})")
    print(f"  MLflow   {config.mlflow_url}  (user {secret['MLFLOW_ADMIN_USERNAME']})")
    print(f"  env file {env_file}")
    return 0


def wait_healthy(config: StackConfig, secret: dict[str, str], timeout: float) -> None:
    """Block until every service reports healthy; raise naming the laggards and their logs."""
    deadline = time.monotonic() + timeout
    state: dict[str, bool] = {}
    while time.monotonic() < deadline:
        dead = [
            name for name in (s.name for s in process_specs(config, secret))
            if running_pid(config, name) is None
        ]  # fmt: skip
        if dead:
            logs = ", ".join(str(config.log_dir / f"{n}.log") for n in dead)
            raise StackError(
                f"{', '.join(dead)} exited during start-up: see {logs} "
                f"(the rest is still running: stack/stop --prefix {config.prefix})"
            )
        state = health(config)
        if all(state.values()):
            return
        time.sleep(2)
    lagging = [name for name, ok in state.items() if not ok]
    logs = ", ".join(str(config.log_dir / f"{n}.log") for n in lagging)
    raise StackError(
        f"not healthy after {timeout:.0f} s: {', '.join(lagging)} (see {logs}; "
        f"stack/stop --prefix {config.prefix} stops what started)"
    )


def command_stop(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or REPO_ROOT / ".wbc" / "stack" / args.prefix).resolve()
    if not (state_dir / "stack.json").is_file():
        print(f"no stack in {state_dir}: nothing to stop")
        return 0
    config = StackConfig.load(state_dir)
    stopped = stop_stack(config, timeout=args.timeout)
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.drop_databases:
        print(f"dropped databases: {', '.join(drop_databases(config)) or 'none'}")
        print(f"deleted {purge_redis_keys(config)} Redis keys with prefix {config.prefix}:")
    return 0


def command_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or REPO_ROOT / ".wbc" / "stack" / args.prefix).resolve()
    if not (state_dir / "stack.json").is_file():
        print(f"no stack in {state_dir}")
        return EXIT_NOT_RUNNING
    config = StackConfig.load(state_dir)
    secret = read_env_file(state_dir / "secrets.env")
    specs = process_specs(config, secret)
    pids = {spec.name: running_pid(config, spec.name) for spec in specs}
    healthy = health(config)
    report = {
        "prefix": config.prefix,
        "airflow_url": config.api_url,
        "mlflow_url": config.mlflow_url,
        "env_file": str(config.env_file),
        "services": {n: {"pid": pids[n], "healthy": healthy.get(n, False)} for n in pids},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"stack '{config.prefix}'  Airflow {config.api_url}  MLflow {config.mlflow_url}")
        for name, info in report["services"].items():
            state = "healthy" if info["healthy"] else ("running" if info["pid"] else "stopped")
            print(f"  {name:24} {state:8} {info['pid'] or ''}")
        print(f"  env file {config.env_file}")
    return 0 if all(p is not None for p in pids.values()) else EXIT_NOT_RUNNING


def command_plan(args: argparse.Namespace) -> int:
    """Print the processes ``start`` would run (argv and settings, secrets masked) as JSON."""
    config = resolve_config(args)
    fake = {key: "<secret>" for key in (
        "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
        "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY",
    )}  # fmt: skip
    fake.update(AIRFLOW_ADMIN_USERNAME="admin", MLFLOW_ADMIN_USERNAME="admin")
    stack_keys = set(stack_environment(config, fake)) | {"WBC_WORKER_ROLE"}
    stack_keys |= set(load_topology()["worker_settings"])
    plan = {
        spec.name: {
            "argv": spec.argv,
            "queues": spec.queues,
            "role": spec.role,
            "env": {k: v for k, v in sorted(spec.env.items()) if k in stack_keys or k.startswith("MLFLOW_")},
        }
        for spec in process_specs(config, fake)
    }
    print(json.dumps(plan, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=os.environ.get("WBC_STACK_PREFIX", "wbc_stack"),
                        help="names databases, Redis keys and the state folder (env WBC_STACK_PREFIX)")
    common.add_argument("--state-dir", default=os.environ.get("WBC_STACK_STATE_DIR"),
                        help="logs, pid files, env file (default .wbc/stack/<prefix>; env WBC_STACK_STATE_DIR)")
    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--pg-url", default=os.environ.get("WBC_STACK_PG_URL"),
                       help="PostgreSQL server URL with a user allowed to create databases "
                            "(default postgresql://postgres@localhost:5432/postgres; env WBC_STACK_PG_URL)")
    setup.add_argument("--redis-url", default=os.environ.get("WBC_STACK_REDIS_URL"),
                       help="Redis broker URL incl. database number (default redis://localhost:6379/0)")
    setup.add_argument("--api-port", type=int, help="Airflow api-server port (default: a free one)")
    setup.add_argument("--mlflow-port", type=int, help="MLflow server port (default: a free one)")
    setup.add_argument("--data-dir", help="labelled images for training (WBC_DATA_DIR)")
    setup.add_argument("--work-dir", help="run folders (WBC_WORK_DIR; default in the state folder)")
    setup.add_argument("--classify-dir", help="nightly drop folder (WBC_CLASSIFY_DIR)")
    setup.add_argument("--worker-concurrency", type=int, help="task slots of the CPU worker (default 1)")
    setup.add_argument("--env-file", help="read passwords/keys from this .env (names as in .env.example)")
    start = sub.add_parser("start", parents=[common, setup], help="start what is not running")
    start.add_argument("--timeout", type=float, default=300, help="seconds to wait for health")
    start.add_argument("--no-wait", action="store_true", help="do not wait until healthy")
    start.set_defaults(func=command_start)
    stop = sub.add_parser("stop", parents=[common], help="stop every process group of the stack")
    stop.add_argument("--timeout", type=float, default=30, help="seconds before SIGKILL")
    stop.add_argument("--drop-databases", action="store_true",
                      help="also drop the stack's databases and Redis keys (throwaway stacks)")
    stop.set_defaults(func=command_stop)
    status = sub.add_parser("status", parents=[common], help="what runs and where")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=command_status)
    plan = sub.add_parser("plan", parents=[common, setup], help="print the process plan as JSON")
    plan.set_defaults(func=command_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
