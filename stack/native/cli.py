"""The command line of the native stack: ``start``, ``stop``, ``status`` and ``plan``.

Owns the options (each with its ``WBC_STACK_*`` environment variable), how they combine with
what a state folder was started with (``resolve_config``), the order of the start-up steps, and
what each command prints and exits with: 0 when done, 1 on a ``StackError`` (printed as
``error: ...`` without a traceback), ``EXIT_NOT_RUNNING`` from ``status`` when a service is down.
stack/start, stack/stop and stack/status run ``main`` through ``__main__.py``.

Imports: ``config``, ``databases``, ``processes`` and ``health`` of this package.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .config import (
    PREFIX_PATTERN,
    REPO_ROOT,
    StackConfig,
    StackError,
    load_secrets,
    load_topology,
    process_specs,
    read_env_file,
    stack_environment,
    write_env_file,
    write_mlflow_auth_config,
)
from .databases import (
    check_dependencies,
    check_redis,
    drop_databases,
    ensure_databases,
    migrate_airflow,
    purge_redis_keys,
)
from .health import health, wait_healthy
from .processes import running_pid, start_process, stop_stack

DESCRIPTION = "Run the production stack natively: the docker-compose topology as local processes."
#: Exit status of ``status`` when something is not running.
EXIT_NOT_RUNNING = 3


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state_dir(args: argparse.Namespace) -> Path:
    """The state folder the options name: ``--state-dir``, else .wbc/stack/<prefix>."""
    return Path(args.state_dir or REPO_ROOT / ".wbc" / "stack" / args.prefix).resolve()


def resolve_config(args: argparse.Namespace) -> StackConfig:
    """Options on the command line, else what this state folder was started with, else defaults."""
    prefix = args.prefix
    if not PREFIX_PATTERN.match(prefix):
        raise StackError(f"prefix {prefix!r}: use 1-31 lower-case letters, digits or _, starting with a letter")
    state_dir = _state_dir(args)
    saved = StackConfig.load(state_dir) if (state_dir / "stack.json").is_file() else None

    def pick(attribute: str, default: Any) -> Any:
        # 0 and "" mean "not given" too: they are never valid ports, counts or paths.
        option = getattr(args, attribute, None)
        if option not in (None, 0, ""):
            return option
        return getattr(saved, attribute) if saved else default

    def abs_or_none(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value else None

    return StackConfig(
        prefix=prefix,
        state_dir=state_dir,
        pg_url=pick("pg_url", "postgresql://postgres@localhost:5432/postgres"),
        redis_url=pick("redis_url", "redis://localhost:6379/0"),
        api_port=pick("api_port", 0) or free_port(),
        mlflow_port=pick("mlflow_port", 0) or free_port(),
        data_dir=abs_or_none(pick("data_dir", None)),
        work_dir=abs_or_none(pick("work_dir", None)),
        classify_dir=abs_or_none(pick("classify_dir", None)),
        worker_concurrency=pick("worker_concurrency", 1),
    )


def command_start(args: argparse.Namespace) -> int:
    """Create what is missing, start what is not running, wait until healthy."""
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
    airflow_user = secret["AIRFLOW_ADMIN_USERNAME"]
    print(f"stack '{config.prefix}' up in {time.monotonic() - begun:.0f} s")
    print(f"  Airflow  {config.api_url}  (user {airflow_user}, password in {env_file})")
    print(f"  MLflow   {config.mlflow_url}  (user {secret['MLFLOW_ADMIN_USERNAME']})")
    print(f"  env file {env_file}")
    return 0


def command_stop(args: argparse.Namespace) -> int:
    """Stop every process group; with ``--drop-databases`` also remove the stack's data."""
    state_dir = _state_dir(args)
    if not (state_dir / "stack.json").is_file():
        print(f"no stack in {state_dir}: nothing to stop")
        return 0
    config = StackConfig.load(state_dir)
    stopped = stop_stack(config, timeout=args.timeout)
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.drop_databases:
        print(f"dropped databases: {', '.join(drop_databases(config)) or 'none'}")
        purged = purge_redis_keys(config)
        print(f"deleted {purged} Redis keys with prefix {config.prefix}:")
    return 0


def command_status(args: argparse.Namespace) -> int:
    """Print what runs and where; exit ``EXIT_NOT_RUNNING`` unless every service runs."""
    state_dir = _state_dir(args)
    if not (state_dir / "stack.json").is_file():
        print(f"no stack in {state_dir}")
        return EXIT_NOT_RUNNING
    config = StackConfig.load(state_dir)
    secret = read_env_file(state_dir / "secrets.env")
    specs = process_specs(config, secret)
    pids = {spec.name: running_pid(config, spec.name) for spec in specs}
    healthy = health(config)
    services = {n: {"pid": pids[n], "healthy": healthy.get(n, False)} for n in pids}
    report = {
        "prefix": config.prefix,
        "airflow_url": config.api_url,
        "mlflow_url": config.mlflow_url,
        "env_file": str(config.env_file),
        "services": services,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"stack '{config.prefix}'  Airflow {config.api_url}  MLflow {config.mlflow_url}")
        for name, info in services.items():
            state = "healthy" if info["healthy"] else "running" if info["pid"] else "stopped"
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

    def shown(env: dict[str, str]) -> dict[str, str]:
        # The caller's own variables are no part of the plan; the stack's and MLflow's are.
        return {k: v for k, v in sorted(env.items()) if k in stack_keys or k.startswith("MLFLOW_")}

    plan = {
        spec.name: {
            "argv": spec.argv,
            "queues": spec.queues,
            "role": spec.role,
            "env": shown(spec.env),
        }
        for spec in process_specs(config, fake)
    }
    print(json.dumps(plan, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``stack`` parser: one sub-command each for start, stop, status and plan."""
    parser = argparse.ArgumentParser(prog="stack", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        default=os.environ.get("WBC_STACK_PREFIX", "wbc_stack"),
        help="names databases, Redis keys and the state folder (env WBC_STACK_PREFIX)",
    )
    common.add_argument(
        "--state-dir",
        default=os.environ.get("WBC_STACK_STATE_DIR"),
        help="logs, pid files, env file (default .wbc/stack/<prefix>; env WBC_STACK_STATE_DIR)",
    )
    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument(
        "--pg-url",
        default=os.environ.get("WBC_STACK_PG_URL"),
        help="PostgreSQL server URL with a user allowed to create databases "
        "(default postgresql://postgres@localhost:5432/postgres; env WBC_STACK_PG_URL)",
    )
    setup.add_argument(
        "--redis-url",
        default=os.environ.get("WBC_STACK_REDIS_URL"),
        help="Redis broker URL incl. database number (default redis://localhost:6379/0)",
    )
    setup.add_argument("--api-port", type=int, help="Airflow api-server port (default: a free one)")
    setup.add_argument("--mlflow-port", type=int, help="MLflow server port (default: a free one)")
    setup.add_argument("--data-dir", help="labelled images for training (WBC_DATA_DIR)")
    setup.add_argument("--work-dir", help="run folders (WBC_WORK_DIR; default in the state folder)")
    setup.add_argument("--classify-dir", help="nightly drop folder (WBC_CLASSIFY_DIR)")
    setup.add_argument(
        "--worker-concurrency",
        type=int,
        help="task slots of the CPU worker (default 1)",
    )
    setup.add_argument(
        "--env-file",
        help="read passwords/keys from this .env (names as in .env.example)",
    )
    start = sub.add_parser("start", parents=[common, setup], help="start what is not running")
    start.add_argument("--timeout", type=float, default=300, help="seconds to wait for health")
    start.add_argument("--no-wait", action="store_true", help="do not wait until healthy")
    start.set_defaults(func=command_start)
    stop = sub.add_parser("stop", parents=[common], help="stop every process group of the stack")
    stop.add_argument("--timeout", type=float, default=30, help="seconds before SIGKILL")
    stop.add_argument(
        "--drop-databases",
        action="store_true",
        help="also drop the stack's databases and Redis keys (throwaway stacks)",
    )
    stop.set_defaults(func=command_stop)
    status = sub.add_parser("status", parents=[common], help="what runs and where")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=command_status)
    plan = sub.add_parser("plan", parents=[common, setup], help="print the process plan as JSON")
    plan.set_defaults(func=command_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ``StackError`` becomes ``error: ...`` on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
