"""Retention of MLflow artifacts: the artifacts of old training runs that never produced a
registered model version (off by default; ``WBC_RETENTION_MLFLOW_ARTIFACTS`` or
``wbc cleanup --mlflow-artifacts``).

A run of the training experiment loses its artifacts only if it is finished, older than the
retention age, beyond the newest N runs and no version of ANY registered model names it or points
into its artifacts or logged models; the run itself (params, metrics, tags) stays, tagged
``wbc.artifacts_deleted``. Follows the same settings rules as work-folder retention
(:mod:`wbc_tasks.ops.retention`). Owns which runs keep their artifacts and why, and
deleting the others' (:func:`purge_unregistered_artifacts`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
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
    from wbc_tasks.registry.client import call_with_retries, configure_mlflow

    check_settings(settings)
    now = time.time() if now is None else now
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

    judge = _RunJudge(
        settings=settings,
        client=client,
        experiment_id=experiment.experiment_id,
        cutoff_ms=(now - settings.retention_days * DAY_SECONDS) * 1000,
        registry=_registered_references(client),
        local_store=not settings.mlflow_tracking_uri.startswith(("http://", "https://", "databricks")),
    )
    listed = result["purged"]
    freed = 0
    for rank, run in enumerate(_runs_newest_first(client, experiment.experiment_id)):
        if ARTIFACTS_DELETED_TAG in run.data.tags:
            continue  # done on an earlier day
        reason, locations = judge.why_kept(run, rank)
        if reason:
            result["kept"][run.info.run_id] = reason
            continue
        try:
            freed += _delete_run_artifacts(settings, client, run, locations, dry_run=dry_run)
            listed.append(run.info.run_id)
        except Exception as exc:
            result["errors"][run.info.run_id] = str(exc)
            log.error("could not delete the MLflow artifacts of run %s: %s", run.info.run_id, exc)
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


@dataclass(frozen=True)
class _RegisteredReferences:
    """What the registry's versions (of every registered model) point at."""

    #: The MLflow runs versions were registered from.
    runs: frozenset[str]
    #: The versions' sources (artifact or logged-model URIs).
    sources: tuple[str, ...]


def _registered_references(client: Any) -> _RegisteredReferences:
    from wbc_tasks.registry.client import all_pages

    runs: set[str] = set()
    sources: list[str] = []
    for mv in all_pages(client.search_model_versions, None, max_results=1000):
        if mv.run_id:
            runs.add(mv.run_id)
        if mv.source:
            sources.append(str(mv.source))
    return _RegisteredReferences(frozenset(runs), tuple(sources))


def _runs_newest_first(client: Any, experiment_id: str) -> list[Any]:
    from wbc_tasks.registry.client import all_pages

    return sorted(
        all_pages(client.search_runs, [experiment_id], max_results=1000),
        key=lambda r: (r.info.start_time or 0, r.info.run_id),
        reverse=True,
    )


def _ended_ms(run: Any) -> int:
    """When a run ended (else started), in epoch milliseconds; 0 if MLflow knows neither."""
    return int(run.info.end_time or run.info.start_time or 0)


@dataclass(frozen=True)
class _RunJudge:
    """Decides, run by run, whether its artifacts stay and why."""

    settings: Settings
    client: Any
    experiment_id: str
    cutoff_ms: float
    registry: _RegisteredReferences
    #: A file or database store, whose artifact folders must lie inside WBC_MLFLOW_ARTIFACT_ROOT.
    local_store: bool

    def why_kept(self, run: Any, rank: int) -> tuple[str, list[str]]:
        """Why ``run`` (``rank``-th newest) keeps its artifacts ("" when it does not), and the
        artifact locations it has: its own and its logged models'."""
        reason = self._kept_by_policy(run, rank)
        logged_models: list[Any] = [] if reason else self._logged_models(run.info.run_id)
        if not reason and self._registry_points_into(run, logged_models):
            reason = "a registered model version points into its artifacts or models"
        locations = [run.info.artifact_uri] + [m.artifact_location for m in logged_models]
        if not reason and self.local_store:
            outside = self._outside_artifact_root(locations)
            if outside:
                reason = f"artifacts outside WBC_MLFLOW_ARTIFACT_ROOT ({', '.join(outside)})"
        return reason, locations

    def _kept_by_policy(self, run: Any, rank: int) -> str:
        """The retention rules that need nothing but the run: registered, running, new, recent."""
        keep_runs, days = self.settings.retention_keep_runs, self.settings.retention_days
        if run.info.run_id in self.registry.runs:
            return "produced a registered model version"
        if run.info.status not in FINISHED_RUN_STATUSES:
            return f"status {run.info.status}"
        if rank < keep_runs:
            return f"one of the newest {keep_runs} runs (WBC_RETENTION_KEEP_RUNS)"
        if _ended_ms(run) >= self.cutoff_ms:
            return f"ended within the last {days:g} days (WBC_RETENTION_DAYS)"
        return ""

    def _logged_models(self, run_id: str) -> list[Any]:
        from wbc_tasks.registry.client import all_pages

        return list(
            all_pages(
                self.client.search_logged_models,
                [self.experiment_id],
                filter_string=f"source_run_id = '{run_id}'",
                max_results=100,
            )
        )

    def _registry_points_into(self, run: Any, logged_models: list[Any]) -> bool:
        """Whether a version's source names the run, lies in its artifacts or names one of its models."""
        run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
        model_ids = [m.model_id for m in logged_models]
        return any(
            run_id in s or (artifact_uri and s.startswith(artifact_uri)) or any(mid in s for mid in model_ids)
            for s in self.registry.sources
        )

    def _outside_artifact_root(self, locations: list[str]) -> list[str]:
        root = self.settings.mlflow_artifact_root.resolve()
        return [
            u
            for u in locations
            if u and (local := _local_path(u)) is not None and not is_inside(local.resolve(), [root])
        ]


def _delete_run_artifacts(settings: Settings, client: Any, run: Any, locations: list[str], *, dry_run: bool) -> int:
    """Delete (or, dry, only measure) a run's artifacts at ``locations`` and tag the run; the bytes."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from wbc_tasks.registry.client import call_with_retries

    repos = [get_artifact_repository(u) for u in locations if u]
    size = sum(_artifact_bytes(repo) for repo in repos)
    if not dry_run:
        for repo in repos:
            repo.delete_artifacts()
        call_with_retries(
            settings,
            client.set_tag,
            run.info.run_id,
            ARTIFACTS_DELETED_TAG,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
    log.info(
        "%s MLflow artifacts of run %s (%s, %s, ended %s)",
        "dry run: would delete" if dry_run else "deleted",
        run.info.run_id,
        run.info.run_name,
        human_bytes(size),
        utc_iso(_ended_ms(run) / 1000),
    )
    return size
