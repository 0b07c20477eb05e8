"""One cleanup: the maintenance DAG's task and ``wbc cleanup``.

:func:`apply_retention` deletes (or, with ``dry_run``, only reports) the training work folders
that :mod:`wbc_tasks.ops.retention` plans to delete and, when asked, the MLflow artifacts of old
unregistered runs (:mod:`wbc_tasks.ops.mlflow_retention`), one cleanup at a time under a file
lock, and returns a JSON-able summary; :func:`cleanup_step` fails on any error, so the DAG's
alerts fire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wbc_tasks.core.locks import file_lock
from wbc_tasks.core.settings import Settings
from wbc_tasks.ops.mlflow_retention import purge_unregistered_artifacts
from wbc_tasks.ops.retention import (
    check_settings,
    delete_run_folder,
    human_bytes,
    plan_retention,
    protected_run_folders,
    utc_iso,
)

log = logging.getLogger(__name__)

LOCK_FILE = "retention.lock"


@contextmanager
def _retention_lock(settings: Settings) -> Iterator[None]:
    """One cleanup at a time (the DAG and ``wbc cleanup`` may overlap)."""
    with file_lock(settings.work_dir / "locks" / LOCK_FILE, timeout=settings.lock_timeout, holder="another cleanup"):
        yield


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
                "over, mark that MLflow run FAILED (MLflow UI) and the next cleanup removes it",
                name,
            )
        deleted: list[str] = []
        freed = 0
        errors: dict[str, str] = {}
        for folder in plan.delete:
            if dry_run:
                log.info(
                    "dry run: would delete %s (%s, last modified %s)",
                    folder.path,
                    human_bytes(folder.size_bytes),
                    utc_iso(folder.last_activity),
                )
                deleted.append(folder.name)
                freed += folder.size_bytes
                continue
            try:
                freed += delete_run_folder(folder, plan.runs_root)
                deleted.append(folder.name)
                log.info(
                    "deleted %s (%s, last modified %s)",
                    folder.path,
                    human_bytes(folder.size_bytes),
                    utc_iso(folder.last_activity),
                )
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
            " (dry run)" if dry_run else "",
            "would delete" if dry_run else "deleted",
            len(deleted),
            summary["folders_scanned"],
            human_bytes(freed),
            len(plan.keep),
            len(plan.skipped),
            len(errors),
        )
        if mlflow_artifacts:
            summary["mlflow"] = purge_unregistered_artifacts(settings, dry_run=dry_run, now=now)
        return summary


def cleanup_step(settings: Settings, *, dry_run: bool = False, mlflow_artifacts: bool | None = None) -> dict[str, Any]:
    """The maintenance DAG's task: :func:`apply_retention`, failing (so alerts fire) on errors."""
    summary = apply_retention(settings, dry_run=dry_run, mlflow_artifacts=mlflow_artifacts)
    errors = {**summary["errors"], **summary.get("mlflow", {}).get("errors", {})}
    if errors:
        raise RuntimeError(f"retention could not delete {len(errors)} item(s): {errors}")
    return summary
