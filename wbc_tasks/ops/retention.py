"""Retention: delete old training work folders, and (when asked) old runs' MLflow artifacts.

A training run leaves ``<work dir>/runs/<run id>/`` behind (image stores, checkpoints: several
hundred MB at 256 px). :func:`plan_retention` decides which of these folders go and
:func:`apply_retention` deletes them (or, with ``dry_run``, only says what it would delete).

A folder is deleted only if ALL of these hold:

- it is older than ``WBC_RETENTION_DAYS`` (age = the newest modification time of anything in it,
  so a run that is still writing is never old; the setting cannot go below one day);
- it is not among the newest ``WBC_RETENTION_KEEP_RUNS`` folders;
- it is not the run of a registered model version holding an alias (``champion``,
  ``previous-champion``, ...), looked up in the MLflow registry: version -> its ``airflow_run_id``
  tag (or its MLflow run's tag) -> the folder;
- its MLflow run is not still RUNNING (the DAG run may be going on, e.g. waiting for a GPU);
- it is a real folder directly inside the runs folder: symlinks are never followed (a symlink
  pointing elsewhere is reported and left alone, and a symlink inside a deleted folder is
  removed, not its target).

The registry is asked before anything is deleted; if MLflow cannot be reached, nothing is deleted.
Completion markers go first, so a folder whose deletion is interrupted reads as unfinished
steps, never as a finished run with missing files.

With ``mlflow_artifacts`` (off by default), the artifacts of training-experiment runs that are
finished, older than the retention age, beyond the newest N and never produced a registered
model version (in any registered model) are deleted as well; the run itself (params, metrics,
tags) stays, tagged ``wbc.artifacts_deleted``.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import COMPLETE_MARKER, Settings
from wbc_tasks.core.paths import safe_name

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400.0
#: Younger folders may belong to a run still in progress: the age setting cannot go below this.
MIN_RETENTION_DAYS = 1.0
LOCK_FILE = "retention.lock"
#: Run tag set on an MLflow run whose artifacts retention deleted (the run record stays).
ARTIFACTS_DELETED_TAG = "wbc.artifacts_deleted"
FINISHED_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


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

    @property
    def bytes_to_free(self) -> int:
        return sum(f.size_bytes for f in self.delete)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def runs_root(settings: Settings) -> Path:
    """The folder holding one work folder per training run."""
    return settings.work_dir / "runs"


def check_settings(settings: Settings) -> None:
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


def scan_run_folders(settings: Settings) -> tuple[Path, list[RunFolder], dict[str, str]]:
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
    settings: Settings, *, protected: Mapping[str, str] | None = None, now: float | None = None
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
            plan.keep[folder.name] = (
                f"modified within the last {settings.retention_days:g} days (WBC_RETENTION_DAYS)"
            )
        else:
            plan.delete.append(folder)
    return plan


# --------------------------------------------------------------------------------------------
# What the registry says must stay


def _all_pages(fn: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    token = None
    while True:
        page = fn(*args, page_token=token, **kwargs)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def protected_run_folders(settings: Settings) -> tuple[dict[str, str], set[str]]:
    """Folders that must stay whatever their age, from the MLflow registry and tracking server.

    Returns ``({folder name: reason}, {folder names kept only because their MLflow run is still
    RUNNING})``. Raises if MLflow cannot be asked: then nothing may be deleted.
    """
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.client import call_with_retries, configure_mlflow
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
            log.info("%s version %s (%s) names no Airflow run: no work folder to keep for it",
                     settings.model_name, version, labels)
            continue
        protected[safe_name(dag_run_id)] = f"run of {settings.model_name} version {version} ({labels})"

    running: set[str] = set()
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is not None:
        for run in _all_pages(
            client.search_runs, [experiment.experiment_id],
            filter_string="attributes.status = 'RUNNING'", max_results=1000,
        ):
            dag_run_id = run.data.tags.get(TAG_AIRFLOW_RUN_ID)
            if dag_run_id and safe_name(dag_run_id) not in protected:
                name = safe_name(dag_run_id)
                protected[name] = f"its MLflow run {run.info.run_id} is still RUNNING"
                running.add(name)
    return protected, running


# --------------------------------------------------------------------------------------------
# Deleting


@contextmanager
def _retention_lock(settings: Settings) -> Iterator[None]:
    """One cleanup at a time (the DAG and ``wbc cleanup`` may overlap)."""
    import filelock

    path = settings.work_dir / "locks" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path, timeout=settings.lock_timeout):
        yield


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


def apply_retention(
    settings: Settings,
    *,
    dry_run: bool = False,
    mlflow_artifacts: bool | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Plan and delete (or, with ``dry_run``, only report) old run folders; a JSON-able summary.

    The summary's ``deleted`` and ``bytes_freed`` are what was deleted, or with ``dry_run`` what
    would have been; ``kept``, ``skipped`` and ``errors`` map folder names to the reason.

    ``mlflow_artifacts`` (default: ``WBC_RETENTION_MLFLOW_ARTIFACTS``) also deletes the MLflow
    artifacts of old unregistered training runs (:func:`purge_unregistered_artifacts`).
    A folder that cannot be deleted is reported under ``errors``; the others still go.
    """
    check_settings(settings)
    if mlflow_artifacts is None:
        mlflow_artifacts = settings.retention_mlflow_artifacts
    now = time.time() if now is None else now
    with _retention_lock(settings):
        plan = plan_retention(settings, now=now)
        running: set[str] = set()
        if plan.delete:
            # Only now ask the registry (no MLflow call on days with nothing to delete). If it
            # cannot be asked, this raises and nothing is deleted.
            protected, running = protected_run_folders(settings)
            plan = plan_retention(settings, protected=protected, now=now)
        for name in sorted(running):
            log.warning(
                "run folder %s is kept because its MLflow run is still RUNNING; if its DAG run is "
                "over, mark that MLflow run FAILED (MLflow UI) and the next cleanup removes it", name,
            )
        deleted: list[str] = []
        freed = 0
        errors: dict[str, str] = {}
        for folder in plan.delete:
            if dry_run:
                log.info("dry run: would delete %s (%s, last modified %s)", folder.path,
                         human_bytes(folder.size_bytes), _iso(folder.last_activity))
                deleted.append(folder.name)
                freed += folder.size_bytes
                continue
            try:
                freed += delete_run_folder(folder, plan.runs_root)
                deleted.append(folder.name)
                log.info("deleted %s (%s, last modified %s)", folder.path, human_bytes(folder.size_bytes),
                         _iso(folder.last_activity))
            except (OSError, RuntimeError) as exc:
                errors[folder.name] = str(exc)
                log.error("could not delete %s: %s", folder.path, exc)
        for name, reason in sorted(plan.skipped.items()):
            log.warning("left alone in %s: %s (%s)", plan.runs_root, name, reason)
        summary: dict[str, Any] = {
            "dry_run": dry_run,
            "runs_root": str(plan.runs_root),
            "retention_days": settings.retention_days,
            "keep_runs": settings.retention_keep_runs,
            "folders_scanned": len(plan.delete) + len(plan.keep),
            "deleted": deleted,
            "bytes_freed": freed,
            "kept": dict(sorted(plan.keep.items())),
            "skipped": dict(sorted(plan.skipped.items())),
            "errors": errors,
        }
        log.info(
            "retention%s: %s %d of %d run folders (%s), kept %d, left alone %d, errors %d",
            " (dry run)" if dry_run else "", "would delete" if dry_run else "deleted", len(deleted),
            summary["folders_scanned"], human_bytes(freed), len(plan.keep), len(plan.skipped), len(errors),
        )
        if mlflow_artifacts:
            summary["mlflow"] = purge_unregistered_artifacts(settings, dry_run=dry_run, now=now)
        return summary


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# MLflow artifacts of runs that never produced a registered version


def _artifact_bytes(repo: Any, path: str | None = None) -> int:
    total = 0
    for info in repo.list_artifacts(path):
        total += _artifact_bytes(repo, info.path) if info.is_dir else int(info.file_size or 0)
    return total


def _local_path(uri: str) -> Path | None:
    """The local path of a ``file:`` URI or plain path; None for remote artifact stores."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def purge_unregistered_artifacts(
    settings: Settings, *, dry_run: bool = False, now: float | None = None
) -> dict[str, Any]:
    """Delete the artifacts of old training runs that never produced a registered model version.

    A run of the training experiment is purged only if it is FINISHED, FAILED or KILLED, ended
    more than ``WBC_RETENTION_DAYS`` ago, is not among the newest ``WBC_RETENTION_KEEP_RUNS``
    runs, no version of ANY registered model names it as its run or points into its artifacts
    or its logged models, and (for a file store) its artifacts lie inside
    ``WBC_MLFLOW_ARTIFACT_ROOT``. Its run artifacts and the artifacts of its (unregistered)
    logged models are deleted; the run record stays, tagged ``wbc.artifacts_deleted``.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from wbc_tasks.registry.client import call_with_retries, configure_mlflow

    check_settings(settings)
    now = time.time() if now is None else now
    cutoff_ms = (now - settings.retention_days * DAY_SECONDS) * 1000
    client = configure_mlflow(settings)
    result: dict[str, Any] = {"dry_run": dry_run, "purged": [], "bytes_freed": 0, "kept": {}, "errors": {}}
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is None:
        return result

    registered_runs: set[str] = set()
    sources: list[str] = []
    for mv in _all_pages(client.search_model_versions, None, max_results=1000):
        if mv.run_id:
            registered_runs.add(mv.run_id)
        if mv.source:
            sources.append(str(mv.source))

    runs = sorted(
        _all_pages(client.search_runs, [experiment.experiment_id], max_results=1000),
        key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True,
    )
    local_store = not settings.mlflow_tracking_uri.startswith(("http://", "https://", "databricks"))
    listed = result["purged"]
    freed = 0
    for rank, run in enumerate(runs):
        info = run.info
        run_id = info.run_id
        ended = info.end_time or info.start_time or 0
        if ARTIFACTS_DELETED_TAG in run.data.tags:
            continue  # done on an earlier day
        if run_id in registered_runs:
            reason = "produced a registered model version"
        elif info.status not in FINISHED_RUN_STATUSES:
            reason = f"status {info.status}"
        elif rank < settings.retention_keep_runs:
            reason = f"one of the newest {settings.retention_keep_runs} runs (WBC_RETENTION_KEEP_RUNS)"
        elif ended >= cutoff_ms:
            reason = f"ended within the last {settings.retention_days:g} days (WBC_RETENTION_DAYS)"
        else:
            reason = ""
        logged_models: list[Any] = []
        if not reason:
            logged_models = list(_all_pages(
                client.search_logged_models, [experiment.experiment_id],
                filter_string=f"source_run_id = '{run_id}'", max_results=100,
            ))
            model_ids = [m.model_id for m in logged_models]
            if any(run_id in s or (info.artifact_uri and s.startswith(info.artifact_uri))
                   or any(mid in s for mid in model_ids) for s in sources):
                reason = "a registered model version points into its artifacts or models"
        locations = [info.artifact_uri] + [m.artifact_location for m in logged_models]
        if not reason and local_store:
            outside = [u for u in locations if u and (local := _local_path(u)) is not None
                       and not _inside(local, settings.mlflow_artifact_root)]
            if outside:
                reason = f"artifacts outside WBC_MLFLOW_ARTIFACT_ROOT ({', '.join(outside)})"
        if reason:
            result["kept"][run_id] = reason
            continue
        try:
            repos = [get_artifact_repository(u) for u in locations if u]
            size = sum(_artifact_bytes(repo) for repo in repos)
            if not dry_run:
                for repo in repos:
                    repo.delete_artifacts()
                call_with_retries(settings, client.set_tag, run_id, ARTIFACTS_DELETED_TAG,
                                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
            freed += size
            listed.append(run_id)
            log.info("%s MLflow artifacts of run %s (%s, %s, ended %s)",
                     "dry run: would delete" if dry_run else "deleted", run_id, run.info.run_name,
                     human_bytes(size), _iso(ended / 1000))
        except Exception as exc:  # one run's store trouble must not stop the others
            result["errors"][run_id] = str(exc)
            log.error("could not delete the MLflow artifacts of run %s: %s", run_id, exc)
    result["bytes_freed"] = freed
    log.info("retention%s: %s the MLflow artifacts of %d unregistered runs (%s), kept %d runs",
             " (dry run)" if dry_run else "", "would delete" if dry_run else "deleted", len(listed),
             human_bytes(freed), len(result["kept"]))
    return result


def cleanup_step(settings: Settings, *, dry_run: bool = False, mlflow_artifacts: bool | None = None) -> dict:
    """The maintenance DAG's task: :func:`apply_retention`, failing (so alerts fire) on errors."""
    summary = apply_retention(settings, dry_run=dry_run, mlflow_artifacts=mlflow_artifacts)
    errors = {**summary["errors"], **summary.get("mlflow", {}).get("errors", {})}
    if errors:
        raise RuntimeError(f"retention could not delete {len(errors)} item(s): {errors}")
    return summary
