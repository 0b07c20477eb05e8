#!/usr/bin/env python3
"""Back up a running compose stack, and restore it into a fresh one (issue 28).

    docker/stack_backup.py backup  OUT_DIR  [--compose "docker compose"] [--env-file .env]
    docker/stack_backup.py restore BACKUP   [--compose "docker compose"] [--env-file .env]

Only the standard library and the compose command: it runs on the stack's host.

What a backup holds:
- one ``pg_dump -Fc`` per database of the stack's PostgreSQL (listed from the server: Airflow's
  metadata, MLflow's tracking store and users, the predictions with the reviews), each a
  consistent snapshot taken while everything keeps running;
- the ``mlflow-artifacts`` volume (every model the registry points at), taken after MLflow's
  dump and under the promotion lock, so every version in the dump has its files and no promotion
  moves the champion in between;
- the pseudonym key from the work volume, when one was generated there;
- ``manifest.json`` (written last): each file's size and sha256, and each table of each database
  with its row count and a checksum of its rows (from the dump's own data, so it describes exactly
  the backup's point).

The secrets are the operator's ``.env`` (passwords, Fernet, JWT and Flask keys): keep it with the
backup, somewhere as safe; the restored stack is started with it, so every login still works.

The backup's point: each database holds the rows committed before its snapshot. A nightly run in
flight has committed whole chunks (one transaction each): those are in the backup. The restore
marks runs that were in flight failed before the scheduler starts (through Airflow's REST API, as
a person would): their work folders are not in the backup, and the next night classifies the
files the restored state has not seen, once.

Restore (into a stack whose volumes were removed): checks every file against the manifest first
(a corrupted or partial backup fails naming the file, before anything is written), starts
PostgreSQL, restores each database and compares every table with the manifest, unpacks the
artifacts and the key, starts Airflow's API server alone to fail the in-flight runs, then starts
everything.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MANIFEST = "manifest.json"
ARTIFACTS = "mlflow-artifacts.tgz"
KEY_FILE = "pseudonym_key"
WORK_KEY = "/data/work/.pseudonym_key"
UNFINISHED_RUNS = ("queued", "running")
HOLD_PROMOTION_LOCK = (
    "import signal, sys\n"
    "from wbc_tasks.core.settings import get_settings\n"
    "from wbc_tasks.registry.promotion import promotion_lock\n"
    "signal.alarm(3600)  # never held past an hour, whatever happens to the backup\n"
    "with promotion_lock(get_settings()):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.read()\n"
)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message names the file or table."""


class Stack:
    """The compose command of one stack and its ``.env``."""

    def __init__(self, compose: str, env_file: Path) -> None:
        self.compose_argv = shlex.split(compose)
        self.env = _read_env(env_file)
        self.user = self.env.get("POSTGRES_USER", "wbc")

    def compose(self, *args: str, stdin=None, stdout=None, check: bool = True, timeout: float = 900):
        done = subprocess.run(
            [*self.compose_argv, *args],
            stdin=stdin,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise BackupError(f"{' '.join(args[:3])} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
        return done

    def psql(self, database: str, sql: str) -> list[str]:
        done = self.compose("exec", "-T", "postgres", "psql", "-U", self.user, "-d", database, "-Atc", sql)
        return done.stdout.decode().splitlines()

    def databases(self) -> list[str]:
        rows = self.psql(
            "postgres", "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres'"
        )
        return sorted(rows)

    def table_checksums(self, dump: Path) -> dict[str, dict[str, object]]:
        """Each table of a custom-format dump: rows and a checksum of them, from the dump's data."""
        with open(dump, "rb") as handle:
            done = self.compose("exec", "-T", "postgres", "pg_restore", "--data-only", "-f", "-", stdin=handle)
        return checksums_of_sql(done.stdout)

    def airflow_url(self) -> str:
        return self.env.get("AIRFLOW_BASE_URL") or f"http://{self.env.get('AIRFLOW_BIND', '127.0.0.1:8080')}"

    def wait_for_postgres(self, timeout: float = 300) -> None:
        def ready() -> bool:
            return self.compose("exec", "-T", "postgres", "pg_isready", "-U", self.user, check=False).returncode == 0

        wait_until(ready, "PostgreSQL", timeout)

    def wait_for_api_server(self, timeout: float = 600) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.airflow_url()}/api/v2/monitor/health", timeout=10) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_until(ready, "Airflow's API server", timeout)


def wait_until(ready, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(3)
    raise BackupError(f"{what} not ready after {timeout:.0f} s")


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def checksums_of_sql(sql: bytes) -> dict[str, dict[str, object]]:
    """Tables of a plain SQL dump's ``COPY ... FROM stdin`` blocks: rows and the sha256 of their
    sorted row hashes (independent of row order)."""
    tables: dict[str, dict[str, object]] = {}
    current: str | None = None
    hashes: list[str] = []
    for line in sql.split(b"\n"):
        if current is None:
            if line.startswith(b"COPY ") and line.endswith(b"FROM stdin;"):
                current, hashes = line.split(b" ")[1].decode(), []
            continue
        if line == b"\\.":
            digest = hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()
            tables[current] = {"rows": len(hashes), "sha256": digest}
            current = None
            continue
        hashes.append(hashlib.sha256(line).hexdigest())
    return tables


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backup(stack: Stack, out: Path) -> dict:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=False)
    holder = subprocess.Popen(
        [*stack.compose_argv, "exec", "-T", "airflow-scheduler", "python", "-c", HOLD_PROMOTION_LOCK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        if not any(line.strip() == b"locked" for line in iter(holder.stdout.readline, b"")):
            raise BackupError(f"could not take the promotion lock: {holder.stderr.read().decode()[-2000:]}")
        databases = {}
        for database in stack.databases():
            dump = out / f"{database}.dump"
            with open(dump, "wb") as handle:
                stack.compose("exec", "-T", "postgres", "pg_dump", "-U", stack.user, "-Fc", database, stdout=handle)
            databases[database] = stack.table_checksums(dump)
        # Through a bind mount, not the attached stdout: the archive is binary.
        stack.compose(
            "run", "--rm", "--no-deps", "-T", "--user", "root", "-v", f"{out.resolve()}:/backup",
            "--entrypoint", "tar", "mlflow", "-czf", f"/backup/{ARTIFACTS}", "-C", "/mlflow", "artifacts",
        )  # fmt: skip
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            holder.kill()  # the holder inside gives the lock up at its alarm
    key = stack.compose("exec", "-T", "airflow-scheduler", "cat", WORK_KEY, check=False)
    if key.returncode == 0 and key.stdout:
        (out / KEY_FILE).write_bytes(key.stdout)
        (out / KEY_FILE).chmod(0o600)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(out.iterdir())}
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files, "databases": databases}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    manifest["seconds"] = round(time.monotonic() - started, 1)
    return manifest


def check_files(folder: Path) -> dict:
    """The manifest, after every file it lists was found whole; BackupError naming the first that is not."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BackupError(f"{path}: no manifest (an unfinished backup?)")
    manifest = json.loads(path.read_text())
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise BackupError(f"{file}: missing from the backup")
        if file.stat().st_size != expected["bytes"] or sha256_of(file) != expected["sha256"]:
            raise BackupError(f"{file}: does not match the manifest (corrupted or partial)")
    return manifest


def _airflow(stack: Stack, method: str, path: str, body: dict | None = None) -> dict:
    base = stack.airflow_url()
    login = json.dumps(
        {"username": stack.env.get("AIRFLOW_ADMIN_USERNAME", "admin"), "password": stack.env["AIRFLOW_ADMIN_PASSWORD"]}
    ).encode()
    request = urllib.request.Request(f"{base}/auth/token", login, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        token = json.loads(reply.read())["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(base + path, data, headers, method=method), timeout=60) as reply:
        return json.loads(reply.read() or b"{}")


def fail_unfinished_runs(stack: Stack) -> list[str]:
    """Mark the DAG runs the backup caught in flight failed (their work folders are not restored)."""
    failed = []
    for state in UNFINISHED_RUNS:
        for run in _airflow(stack, "GET", f"/api/v2/dags/~/dagRuns?state={state}&limit=100")["dag_runs"]:
            path = f"/api/v2/dags/{run['dag_id']}/dagRuns/{urllib.request.quote(run['dag_run_id'], safe='')}"
            _airflow(stack, "PATCH", path, {"state": "failed"})
            failed.append(f"{run['dag_id']}/{run['dag_run_id']}")
    return failed


def restore(stack: Stack, folder: Path) -> dict:
    started = time.monotonic()
    manifest = check_files(folder)
    stack.compose("up", "--detach", "postgres", "redis")
    stack.wait_for_postgres()
    for database, tables in manifest["databases"].items():
        with open(folder / f"{database}.dump", "rb") as handle:
            stack.compose(
                "exec", "-T", "postgres", "pg_restore", "-U", stack.user, "-d", database,
                "--clean", "--if-exists", "--no-owner", "--exit-on-error", stdin=handle,
            )  # fmt: skip
        plain = stack.compose("exec", "-T", "postgres", "pg_dump", "-U", stack.user, "--data-only", database)
        restored = checksums_of_sql(plain.stdout)
        for table, expected in tables.items():
            if restored.get(table) != expected:
                raise BackupError(f"{database}.{table}: restored {restored.get(table)}, backed up {expected}")
    stack.compose(
        "run", "--rm", "--no-deps", "-T", "--user", "root", "-v", f"{folder.resolve()}:/backup:ro",
        "--entrypoint", "tar", "mlflow", "-xzf", f"/backup/{ARTIFACTS}", "-C", "/mlflow",
    )  # fmt: skip
    if (folder / KEY_FILE).is_file():
        encoded = base64.b64encode((folder / KEY_FILE).read_bytes()).decode()
        write_key = "; ".join(
            (
                "import base64, os",
                f"open({WORK_KEY!r}, 'wb').write(base64.b64decode({encoded!r}))",
                f"os.chmod({WORK_KEY!r}, 0o600)",
            )
        )
        stack.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "airflow-init", "-c", write_key)
    # Airflow's init (migrations: none due; the login file from .env), then its API server alone:
    # the scheduler must not pick the in-flight runs up before they are marked failed.
    stack.compose("run", "--rm", "--no-deps", "airflow-init", timeout=900)
    stack.compose("up", "--detach", "--no-deps", "airflow-apiserver")
    stack.wait_for_api_server()
    failed = fail_unfinished_runs(stack)
    stack.compose("up", "--detach")
    return {"seconds": round(time.monotonic() - started, 1), "runs_marked_failed": failed, "tables_checked": sum(
        len(t) for t in manifest["databases"].values())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("backup", "restore"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--compose", default="docker compose", help="the compose command (default: docker compose)")
    parser.add_argument("--env-file", type=Path, default=Path(".env"))
    args = parser.parse_args(argv)
    stack = Stack(args.compose, args.env_file)
    try:
        result = backup(stack, args.folder) if args.action == "backup" else restore(stack, args.folder)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in result.items() if k != "databases"} if args.action == "backup" else result
    if args.action == "backup":
        summary["tables"] = sum(len(t) for t in result["databases"].values())
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
