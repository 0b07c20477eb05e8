"""Retention of training work folders: which ``<work dir>/runs/<run id>/`` folders may go, and
deleting one safely; also the retention settings' rules that MLflow artifact retention shares.

A training run leaves ``<work dir>/runs/<run id>/`` behind (image stores, checkpoints: several
hundred MB at 256 px). :func:`plan_retention` decides which of these folders go and
:func:`delete_run_folder` deletes one; :func:`wbc_tasks.ops.cleanup.apply_retention` runs both
(or, with ``dry_run``, only says what it would delete).

A folder is deleted only if ALL of these hold:

- it is older than ``WBC_RETENTION_DAYS`` (age = the newest modification time of anything in it,
  so a run that is still writing is never old; the setting cannot go below one day);
- it is not among the newest ``WBC_RETENTION_KEEP_RUNS`` folders;
- it is not the run of a registered model version holding an alias (``champion``,
  ``previous-champion``, ...), looked up in the MLflow registry: version -> its ``airflow_run_id``
  tag (or its MLflow run's tag) -> the folder (:func:`protected_run_folders`);
- its MLflow run is not still RUNNING (the DAG run may be going on, e.g. waiting for a GPU);
- it is a real folder directly inside the runs folder: symlinks are never followed (a symlink
  pointing elsewhere is reported and left alone, and a symlink inside a deleted folder is
  removed, not its target).

The registry is asked before anything is deleted; if MLflow cannot be reached, nothing is deleted.
Completion markers go first, so a folder whose deletion is interrupted reads as unfinished
steps, never as a finished run with missing files.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.settings import COMPLETE_MARKER, Settings

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400.0
#: Younger folders may belong to a run still in progress: the age setting cannot go below this.
MIN_RETENTION_DAYS = 1.0


@dataclass(frozen=True)
class RunFolder:
    """One entry of the runs folder that is a real folder."""

    name: str
    path: Path
    #: Newest modification time (epoch seconds) of the folder or anything inside it.
    last_activity: float
    #: Bytes of the regular files inside (symlinks count as nothing).
    size_bytes: int


@dataclass
class RetentionPlan:
    """What :func:`plan_retention` decided."""

    runs_root: Path
    cutoff: float
    delete: list[RunFolder] = field(default_factory=list)
    #: folder name -> why it is kept
    keep: dict[str, str] = field(default_factory=dict)
    #: entries of the runs folder that are not run folders (symlinks, files) -> why left alone
    skipped: dict[str, str] = field(default_factory=dict)


def human_bytes(n: float) -> str:
    """``n`` bytes as people read them: ``512 B``, ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def utc_iso(epoch: float) -> str:
    """Epoch seconds as an ISO 8601 UTC time, to the second (for reports and logs)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def runs_root(settings: Settings) -> Path:
    """The folder holding one work folder per training run."""
    return settings.work_dir / "runs"


def check_settings(settings: Settings) -> None:
    """Refuse retention settings that could delete a run in progress."""
    if not settings.retention_days >= MIN_RETENTION_DAYS:
        raise ValueError(
            f"WBC_RETENTION_DAYS={settings.retention_days:g} is below {MIN_RETENTION_DAYS:g}: "
            "younger work folders may belong to a training run still in progress"
        )
    if settings.retention_keep_runs < 0:
        raise ValueError(f"WBC_RETENTION_KEEP_RUNS={settings.retention_keep_runs} is negative")


def folder_stats(path: Path) -> tuple[float, int]:
    """(newest modification time, bytes of regular files) of a folder, not following symlinks.

    Raises ``OSError`` if part of it cannot be read (its age would be a guess).
    """
    newest = path.lstat().st_mtime
    total = 0

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(path, onerror=fail, followlinks=False):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # removed while we looked
                continue
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return newest, total


def scan_run_folders(
    settings: Settings,
) -> tuple[Path, list[RunFolder], dict[str, str]]:
    """(resolved runs folder, its run folders, entries left alone with the reason)."""
    root = runs_root(settings)
    if not root.is_dir():
        return root, [], {}
    real_root = root.resolve(strict=True)
    folders: list[RunFolder] = []
    skipped: dict[str, str] = {}
    with os.scandir(real_root) as entries:
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                skipped[entry.name] = f"symlink to {os.readlink(path)}: not followed, left alone"
                continue
            if not entry.is_dir(follow_symlinks=False):
                skipped[entry.name] = "not a folder: left alone"
                continue
            if path.resolve().parent != real_root:  # pragma: no cover - defensive
                skipped[entry.name] = f"resolves outside {real_root}: left alone"
                continue
            try:
                newest, size = folder_stats(path)
            except OSError as exc:
                skipped[entry.name] = f"cannot be read completely ({exc}): left alone"
                continue
            folders.append(RunFolder(entry.name, path, newest, size))
    return real_root, folders, skipped


def plan_retention(
    settings: Settings,
    *,
    protected: Mapping[str, str] | None = None,
    now: float | None = None,
) -> RetentionPlan:
    """Which run folders to delete and why the others stay. Deletes nothing.

    ``protected`` maps folder names (``safe_name`` of Airflow run ids) to the reason they must
    stay (see :func:`protected_run_folders`); ``now`` is epoch seconds (default: now).
    """
    check_settings(settings)
    protected = dict(protected or {})
    now = time.time() if now is None else now
    cutoff = now - settings.retention_days * DAY_SECONDS
    root, folders, skipped = scan_run_folders(settings)
    plan = RetentionPlan(runs_root=root, cutoff=cutoff, skipped=skipped)
    newest_first = sorted(folders, key=lambda f: (f.last_activity, f.name), reverse=True)
    keep_n = settings.retention_keep_runs
    for rank, folder in enumerate(newest_first):
        if folder.name in protected:
            plan.keep[folder.name] = protected[folder.name]
        elif rank < keep_n:
            plan.keep[folder.name] = f"one of the newest {keep_n} run folders (WBC_RETENTION_KEEP_RUNS)"
        elif folder.last_activity >= cutoff:
            plan.keep[folder.name] = f"modified within the last {settings.retention_days:g} days (WBC_RETENTION_DAYS)"
        else:
            plan.delete.append(folder)
    return plan


def protected_run_folders(settings: Settings) -> tuple[dict[str, str], set[str]]:
    """Folders that must stay whatever their age, from the MLflow registry and tracking server.

    Returns ``({folder name: reason}, {folder names kept only because their MLflow run is still
    RUNNING})``. Raises if MLflow cannot be asked: then nothing may be deleted.
    """
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.client import all_pages, call_with_retries, configure_mlflow
    from wbc_tasks.registry.tags import TAG_AIRFLOW_RUN_ID
    from wbc_tasks.registry.versions import current_aliases

    client = configure_mlflow(settings)
    protected: dict[str, str] = {}
    by_version: dict[str, list[str]] = {}
    for alias, version in current_aliases(settings).items():
        by_version.setdefault(version, []).append(alias)
    for version, aliases in sorted(by_version.items()):
        mv = call_with_retries(settings, client.get_model_version, settings.model_name, version)
        dag_run_id = (mv.tags or {}).get(TAG_AIRFLOW_RUN_ID)
        if not dag_run_id and mv.run_id:
            try:
                run = call_with_retries(settings, client.get_run, mv.run_id)
                dag_run_id = run.data.tags.get(TAG_AIRFLOW_RUN_ID)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        labels = ", ".join(f"@{a}" for a in sorted(aliases))
        if not dag_run_id:
            log.info(
                "%s version %s (%s) names no Airflow run: no work folder to keep for it",
                settings.model_name,
                version,
                labels,
            )
            continue
        protected[safe_name(dag_run_id)] = f"run of {settings.model_name} version {version} ({labels})"

    running: set[str] = set()
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is not None:
        for run in all_pages(
            client.search_runs,
            [experiment.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
        ):
            dag_run_id = run.data.tags.get(TAG_AIRFLOW_RUN_ID)
            if dag_run_id and safe_name(dag_run_id) not in protected:
                name = safe_name(dag_run_id)
                protected[name] = f"its MLflow run {run.info.run_id} is still RUNNING"
                running.add(name)
    return protected, running


def delete_run_folder(folder: RunFolder, real_root: Path) -> int:
    """Delete one run folder (completion markers first); return the bytes freed.

    Refuses anything that is a symlink or does not sit directly in ``real_root``, and a folder
    that changed since it was planned (a run picked up again).
    """
    path = folder.path
    if path.is_symlink() or not path.is_dir():
        raise RuntimeError(f"refusing to delete {path}: not a real folder")
    if path.resolve().parent != real_root or path.parent.resolve() != real_root:
        raise RuntimeError(f"refusing to delete {path}: not directly inside {real_root}")
    newest, size = folder_stats(path)
    if newest > folder.last_activity:
        raise RuntimeError(f"{path} changed since it was planned for deletion (in use again?): kept")
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        if COMPLETE_MARKER in filenames:
            os.unlink(os.path.join(dirpath, COMPLETE_MARKER))
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux/macOS have it
        log.warning("this platform's rmtree may follow symlinks swapped in while deleting")
    shutil.rmtree(path)
    return size
