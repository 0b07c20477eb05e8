"""Backup and restore of the embedded state (``WBC_HOME``): a consistent copy taken while
everything keeps running, and a restore that checks the whole backup before it writes anything.

What a backup holds, relative to ``WBC_HOME``: each SQLite database (Airflow's, MLflow's, the
predictions database with its ``reviews``) copied by SQLite's ``VACUUM INTO``, a transactionally
consistent snapshot that readers and writers do not have to stop for; MLflow's artifact folder;
Airflow's folder (its ``airflow.cfg`` with the Fernet and JWT secrets, the generated passwords)
without logs; the work folder's own files (the pseudonym key, the split ledger) without run
folders. Everything is taken under the promotion lock, so the registry and its artifacts match.
``manifest.json``, written last, lists every file with its size and sha256, and each table of each
database with its row count and a checksum of its rows.

The point in time: each database holds the rows committed before its snapshot. A nightly run in
flight has committed whole chunks (one transaction each, files seen and predictions together):
those are in the backup, the rest are not seen in the restored state, so the next night
classifies them once. The classify folder is backed up when it lies inside ``WBC_HOME`` (the
embedded default: the lab's images live there, and the predictions table points at them); one
elsewhere (a share) is the lab's to back up, and is only read. Not backed up: training runs' work
folders (intermediate data, rebuilt by a new run) and generated demo data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
#: Folders of ``WBC_HOME`` whose content is not part of a backup (see the module docstring); the
#: empty folders are made again on restore.
SKIPPED = ("airflow/logs", "work/runs", "work/locks")
_CHUNK = 1 << 20


class BackupError(PermanentError):
    """A backup cannot be made or restored; the message names the file and the problem."""


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, None for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).resolve()


def _databases(settings: Settings) -> dict[str, Path]:
    """Every database of the embedded state, by its path relative to ``WBC_HOME``."""
    found = {
        "airflow/airflow.db": settings.home.resolve() / "airflow" / "airflow.db",
    }
    for name, url in (("MLflow", settings.mlflow_tracking_uri), ("predictions", settings.predictions_db_url)):
        path = sqlite_path(url) if url.startswith("sqlite") else None
        if path is None:
            raise BackupError(
                f"the {name} database ({make_url(url).render_as_string(hide_password=True)}) is not an embedded "
                "SQLite file: back up the stack with stack/backup (docs/stack.md)"
            )
        found[_relative(path, settings.home.resolve())] = path
    return {relative: path for relative, path in found.items() if path.is_file()}


def _relative(path: Path, home: Path) -> str:
    try:
        return path.resolve().relative_to(home).as_posix()
    except ValueError as exc:
        raise BackupError(f"{path} lies outside WBC_HOME ({home}): a backup holds only what is under it") from exc


def _check_layout(settings: Settings) -> None:
    """The embedded layout a backup relies on: the work folder and MLflow's artifacts under
    ``WBC_HOME`` (where the embedded default puts them)."""
    for name, folder in (
        ("WBC_WORK_DIR", settings.work_dir),
        ("WBC_MLFLOW_ARTIFACT_ROOT", settings.mlflow_artifact_root),
    ):
        expected = settings.home.resolve() / ("work" if name == "WBC_WORK_DIR" else "mlflow/artifacts")
        if folder is not None and Path(folder).resolve() != expected:
            raise BackupError(f"{name} is {folder}, not {expected}: `wbc backup` covers the embedded layout only")


def _skipped(settings: Settings) -> tuple[str, ...]:
    """Relative folders left out: logs, run folders, locks and generated demo data."""
    outside = [settings.home.resolve() / "demo-data"]
    under = [
        p.resolve().relative_to(settings.home.resolve()).as_posix()
        for p in outside
        if p.resolve().is_relative_to(settings.home.resolve())
    ]
    return tuple(f"{s}/" for s in (*SKIPPED, *under))


def _files(settings: Settings, databases: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    """The plain files of the backup (relative path, source): everything under ``WBC_HOME`` except
    the databases, their journals and the skipped folders."""
    home = settings.home.resolve()
    skipped = _skipped(settings)
    journals = {f"{d}{suffix}" for d in databases for suffix in ("-wal", "-shm", "-journal")}
    for folder, dirs, names in os.walk(home):
        dirs.sort()
        for name in sorted(names):
            source = Path(folder) / name
            relative = source.relative_to(home).as_posix()
            if relative in databases or relative in journals or relative.startswith(skipped):
                continue
            if source.is_symlink() or not source.is_file():
                continue
            yield relative, source


def _copy_hashed(source: Path, target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as reading, target.open("wb") as writing:
        while chunk := reading.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            writing.write(chunk)
    shutil.copystat(source, target)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reading:
        while chunk := reading.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of the live database ``source`` (``VACUUM INTO``: one read transaction,
    so concurrent writers neither stop nor show half)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60)
    try:
        connection.execute("VACUUM INTO ?", (str(target),))
    finally:
        connection.close()


def table_checksums(database: Path) -> dict[str, dict[str, Any]]:
    """Each table of ``database`` (listed from its schema) with its row count and a sha256 of its
    rows in primary-key (or rowid) order."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        result: dict[str, dict[str, Any]] = {}
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            order = _order_by(connection, table)
            digest = hashlib.sha256()
            rows = 0
            for row in connection.execute(f"SELECT * FROM {quoted} ORDER BY {order}"):  # noqa: S608 - names from the schema
                digest.update(repr(row).encode())
                rows += 1
            result[table] = {"rows": rows, "sha256": digest.hexdigest()}
        return result
    finally:
        connection.close()


def _order_by(connection: sqlite3.Connection, table: str) -> str:
    columns = list(connection.execute("SELECT name, pk FROM pragma_table_info(?)", (table,)))
    keys = [name for name, pk in sorted(columns, key=lambda c: c[1]) if pk]
    without_rowid = connection.execute(
        "SELECT sql LIKE '%WITHOUT ROWID%' FROM sqlite_master WHERE name = ?", (table,)
    ).fetchone()[0]
    names = keys or ([] if not without_rowid else [c[0] for c in columns])
    if not names:
        return "rowid"
    return ", ".join('"' + n.replace('"', '""') + '"' for n in names)


def backup_embedded(settings: Settings, out: Path) -> dict[str, Any]:
    """Write a backup of the embedded state into the new or empty folder ``out``; returns the
    manifest. Safe while the nightly DAG, training or the lab's pages run."""
    from wbc_tasks.registry.promotion import promotion_lock

    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: a backup goes into a new or empty folder")
    if out == settings.home.resolve() or settings.home.resolve() in out.parents:
        raise BackupError(f"{out} lies inside WBC_HOME ({settings.home.resolve()}): put the backup elsewhere")
    started = time.monotonic()
    _check_layout(settings)
    databases = _databases(settings)
    entries: list[dict[str, Any]] = []
    tables: dict[str, Any] = {}
    with promotion_lock(settings):
        taken_at = datetime.now(UTC).isoformat(timespec="seconds")
        for relative, source in databases.items():
            target = out / relative
            snapshot_sqlite(source, target)
            tables[relative] = table_checksums(target)
            entries.append({"path": relative, "kind": "sqlite", "size": target.stat().st_size,
                            "sha256": file_sha256(target)})  # fmt: skip
        for relative, source in _files(settings, databases):
            try:
                digest, size = _copy_hashed(source, out / relative)
            except FileNotFoundError:
                continue  # removed while we walked (a temporary file): it was not part of the state
            entries.append({"path": relative, "kind": "file", "size": size, "sha256": digest})
    manifest = {
        "format": FORMAT,
        "kind": "embedded",
        "taken_at": taken_at,
        "home": str(settings.home.resolve()),
        "files": entries,
        "tables": tables,
        "seconds": round(time.monotonic() - started, 2),
    }
    temporary = out / f".{MANIFEST}.partial"
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(temporary, out / MANIFEST)  # last: a backup without it is incomplete
    log.info("backup of %s in %s: %d files, %d databases, %.1f s", settings.home.resolve(), out, len(entries),
             len(databases), manifest["seconds"])  # fmt: skip
    return manifest


def verify_backup(folder: Path) -> dict[str, Any]:
    """The backup's manifest, once every file it lists is there with its size and sha256 and each
    database's tables match their checksums; a BackupError naming the first problem otherwise."""
    manifest_path = folder / MANIFEST
    manifest: dict[str, Any]
    if not manifest_path.is_file():
        raise BackupError(f"{manifest_path} is missing: {folder} is not a finished backup (interrupted or partial)")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{manifest_path} is not a backup manifest: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("kind") != "embedded":
        raise BackupError(f"{manifest_path}: format {manifest.get('format')} / {manifest.get('kind')} is not "
                          f"an embedded backup of format {FORMAT}")  # fmt: skip
    for entry in entries:
        path = folder / entry["path"]
        if ".." in Path(entry["path"]).parts or Path(entry["path"]).is_absolute():
            raise BackupError(f"{manifest_path} names {entry['path']!r}, outside the backup")
        if not path.is_file():
            raise BackupError(f"{path} is missing from the backup")
        if path.stat().st_size != entry["size"]:
            raise BackupError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)")
        if file_sha256(path) != entry["sha256"]:
            raise BackupError(f"{path}: sha256 differs from the manifest (corrupted)")
    for relative, expected in manifest.get("tables", {}).items():
        if table_checksums(folder / relative) != expected:
            raise BackupError(f"{folder / relative}: its tables differ from the manifest's checksums")
    return manifest


def restore_embedded(folder: Path, settings: Settings, *, replace: bool = False) -> dict[str, Any]:
    """Restore the backup in ``folder`` into ``WBC_HOME``, which must be missing or empty unless
    ``replace`` (then the old one is moved aside, never deleted). Nothing is written before the
    whole backup has been checked; the restore is assembled beside ``WBC_HOME`` and moved into
    place last, so a failure leaves no half-restored state."""
    folder = folder.resolve()
    manifest = verify_backup(folder)
    home = settings.home.resolve()
    if str(home) != manifest["home"]:
        raise BackupError(
            f"the backup is of WBC_HOME {manifest['home']}, not {home}: MLflow records absolute artifact "
            f"paths, so restore it to {manifest['home']} (set WBC_HOME to it)"
        )
    occupied = home.exists() and any(home.iterdir())
    if occupied and not replace:
        raise BackupError(f"{home} is not empty: restore into an empty WBC_HOME, or pass --replace to move it aside")
    started = time.monotonic()
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = home.parent / f".{home.name}.restoring-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for entry in manifest["files"]:
            digest, _ = _copy_hashed(folder / entry["path"], staging / entry["path"])
            if digest != entry["sha256"]:
                raise BackupError(f"{folder / entry['path']} changed while it was restored")
        for skipped in SKIPPED:
            (staging / skipped).mkdir(parents=True, exist_ok=True)
        aside = None
        if home.exists():
            if occupied:
                aside = home.with_name(f"{home.name}.before-restore-{datetime.now(UTC):%Y%m%dT%H%M%S}")
                home.rename(aside)
            else:
                home.rmdir()
        staging.rename(home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _close_pooled_mlflow_connections()
    seconds = round(time.monotonic() - started, 2)
    log.info("restored %s from %s in %.1f s%s", home, folder, seconds, f"; the old one is {aside}" if aside else "")
    return {"home": str(home), "files": len(manifest["files"]), "taken_at": manifest["taken_at"],
            "seconds": seconds, "moved_aside": str(aside) if aside else None}  # fmt: skip


def _close_pooled_mlflow_connections() -> None:
    """MLflow keeps one SQLAlchemy engine per database URI for the life of the process; after a
    restore its pooled connections point at the replaced files ("readonly database"). Closing them
    makes the next call open the restored ones."""
    import sys

    if "mlflow" not in sys.modules:
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store in (TrackingStore, RegistryStore):
        for engine in store._engine_map.values():
            engine.dispose()
