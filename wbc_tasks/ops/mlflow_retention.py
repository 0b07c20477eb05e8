"""Retention of MLflow artifacts: the artifacts of old training runs that never produced a
registered model version (off by default; ``WBC_RETENTION_MLFLOW_ARTIFACTS`` or
``wbc cleanup --mlflow-artifacts``).

A run of the training experiment loses its artifacts only if it is finished, older than the
retention age, beyond the newest N runs and no version of ANY registered model names it or points
into its artifacts or logged models; the run itself (params, metrics, tags) stays, tagged
``wbc.artifacts_deleted``. Follows the same settings rules as work-folder retention
(:mod:`wbc_tasks.ops.retention`). Imports ``core``, ``registry`` and ``ops.retention``.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wbc_tasks.core.paths import is_inside
from wbc_tasks.core.settings import Settings
from wbc_tasks.ops.retention import DAY_SECONDS, check_settings, human_bytes, utc_iso

log = logging.getLogger(__name__)

#: Run tag set on an MLflow run whose artifacts retention deleted (the run record stays).
ARTIFACTS_DELETED_TAG = "wbc.artifacts_deleted"
FINISHED_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


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
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    from wbc_tasks.registry.client import all_pages, call_with_retries, configure_mlflow

    check_settings(settings)
    now = time.time() if now is None else now
    cutoff_ms = (now - settings.retention_days * DAY_SECONDS) * 1000
    client = configure_mlflow(settings)
    result: dict[str, Any] = {
        "dry_run": dry_run,
        "purged": [],
        "bytes_freed": 0,
        "kept": {},
        "errors": {},
    }
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is None:
        return result

    registered_runs: set[str] = set()
    sources: list[str] = []
    for mv in all_pages(client.search_model_versions, None, max_results=1000):
        if mv.run_id:
            registered_runs.add(mv.run_id)
        if mv.source:
            sources.append(str(mv.source))

    runs = sorted(
        all_pages(client.search_runs, [experiment.experiment_id], max_results=1000),
        key=lambda r: (r.info.start_time or 0, r.info.run_id),
        reverse=True,
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
            logged_models = list(
                all_pages(
                    client.search_logged_models,
                    [experiment.experiment_id],
                    filter_string=f"source_run_id = '{run_id}'",
                    max_results=100,
                )
            )
            model_ids = [m.model_id for m in logged_models]
            if any(
                run_id in s
                or (info.artifact_uri and s.startswith(info.artifact_uri))
                or any(mid in s for mid in model_ids)
                for s in sources
            ):
                reason = "a registered model version points into its artifacts or models"
        locations = [info.artifact_uri] + [m.artifact_location for m in logged_models]
        if not reason and local_store:
            outside = [
                u
                for u in locations
                if u
                and (local := _local_path(u)) is not None
                and not is_inside(local.resolve(), [settings.mlflow_artifact_root.resolve()])
            ]
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
                call_with_retries(
                    settings,
                    client.set_tag,
                    run_id,
                    ARTIFACTS_DELETED_TAG,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                )
            freed += size
            listed.append(run_id)
            log.info(
                "%s MLflow artifacts of run %s (%s, %s, ended %s)",
                "dry run: would delete" if dry_run else "deleted",
                run_id,
                run.info.run_name,
                human_bytes(size),
                utc_iso(ended / 1000),
            )
        except Exception as exc:
            result["errors"][run_id] = str(exc)
            log.error("could not delete the MLflow artifacts of run %s: %s", run_id, exc)
    result["bytes_freed"] = freed
    log.info(
        "retention%s: %s the MLflow artifacts of %d unregistered runs (%s), kept %d runs",
        " (dry run)" if dry_run else "",
        "would delete" if dry_run else "deleted",
        len(listed),
        human_bytes(freed),
        len(result["kept"]),
    )
    return result
