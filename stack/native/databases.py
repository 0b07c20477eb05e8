"""PostgreSQL and Redis, which the native stack expects running: its share of each.

Owns what the stack creates and removes on those servers, all named with the stack's prefix:
the databases of ``stack.toml``'s ``[databases]`` (created if missing, dropped on request), the
Redis broker keys (purged on request), and Airflow's schema and admin user (``airflow db
migrate``, the Simple auth manager's password file). Also the start-up checks that the servers
answer and that the drivers are installed.

Imports: ``config`` of this package; psycopg2, redis and sqlalchemy lazily.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .config import (
    StackConfig,
    StackError,
    load_topology,
    process_environment,
    stack_environment,
    write_private,
)


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
                    cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
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
    """Fail early, with the URL, when the broker does not answer."""
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
    """The URL as error messages show it (password masked)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


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
    write_private(config.airflow_home / "passwords.json", json.dumps(passwords) + "\n")
