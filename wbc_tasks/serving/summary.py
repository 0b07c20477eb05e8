"""The end of a nightly run: its chunks' counts added up (per class, mean confidence, flagged for
review, rejected, images per second), logged, written to the run's work folder and recorded as
one MLflow run in ``settings.classify_experiment``, tagged with the model name, version and run.
The differential report of each drop the run classified goes with it (``reports/<drop>/``, HTML,
CSV and JSON).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import ReviewReason
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving.commit import empty_stats
from wbc_tasks.serving.drop_scans import record_finished
from wbc_tasks.serving.model import model_ref_from_dict
from wbc_tasks.serving.plan import run_work_dir

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
#: Chunk counters that add up across a run.
_CHUNK_TOTALS = (
    "images_classified",
    "images_already_classified",
    "files_rejected",
    "files_recorded",
    "files_changed",
    "needs_review",
    "confidence_sum",
    "classify_seconds",
)
#: Summary numbers logged to MLflow as metrics (when not None).
_METRICS = (
    "images_classified",
    "mean_confidence",
    "needs_review",
    "unfamiliar_share",
    "drops_drifted",
    "files_rejected",
    "files_linked_to_existing_predictions",
    "files_settling",
    "images_per_second",
)


def summarise_run(
    settings: Settings,
    *,
    run_id: str,
    model: ModelRef | dict[str, Any],
    found: dict[str, Any],
    chunk_summaries: Sequence[dict[str, Any]] | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Totals of one run, logged and recorded as an MLflow run tagged with the model version."""
    ref = model_ref_from_dict(model)
    chunk_summaries = [c for c in (chunk_summaries or []) if c]
    per_class: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    totals = empty_stats()
    for chunk in chunk_summaries:
        per_class.update(chunk.get("per_class", {}))
        reasons.update(chunk.get("review_reasons", {}))
        for key in _CHUNK_TOTALS:
            totals[key] += chunk.get(key, 0)
    classified = totals["images_classified"]
    summary = {
        "run_id": run_id,
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "chunks": len(chunk_summaries),
        "files_found": found.get("files_found", 0),
        "files_settling": found.get("files_settling", 0),
        "files_linked_to_existing_predictions": found.get("files_linked_to_existing_predictions", 0),
        "files_already_done": found.get("files_already_done", 0),
        "images_classified": classified,
        "per_class": dict(sorted(per_class.items())),
        "mean_confidence": totals["confidence_sum"] / classified if classified else None,
        "needs_review": totals["needs_review"],
        "review_reasons": dict(sorted(reasons.items())),
        "unfamiliar_share": reasons.get(ReviewReason.UNFAMILIAR, 0) / classified if classified else None,
        "files_rejected": found.get("files_rejected", 0) + totals["files_rejected"],
        "files_changed_during_run": totals["files_changed"],
        "classify_seconds": totals["classify_seconds"],
        "images_per_second": classified / totals["classify_seconds"] if totals["classify_seconds"] else None,
        "drops_scanned": found.get("drops_scanned"),
        "drops_skipped_unchanged": found.get("drops_skipped_unchanged", 0),
    }
    log.info(
        "run %s with %s v%s: %d images classified (%s), mean confidence %s, %d for review, "
        "%d files rejected, %d linked to earlier predictions, %d waiting to settle, %s images/s",
        run_id,
        ref.name,
        ref.version,
        classified,
        ", ".join(f"{k} {v}" for k, v in summary["per_class"].items()) or "none",
        "n/a" if summary["mean_confidence"] is None else f"{summary['mean_confidence']:.3f}",
        summary["needs_review"],
        summary["files_rejected"],
        summary["files_linked_to_existing_predictions"],
        summary["files_settling"],
        "n/a" if summary["images_per_second"] is None else f"{summary['images_per_second']:.1f}",
    )
    # Every chunk was committed (this step runs only then): the drops listed in full are finished.
    summary["drops_finished"] = record_finished(settings, run_id, found, chunk_summaries)
    summary["drift"] = _drift(settings, run_id, ref)
    summary["drops_drifted"] = sum(bool(d["alerts"]) for d in summary["drift"])
    summary["mlflow_run_id"] = _log_summary_to_mlflow(settings, ref, summary, params or {})
    work = Path(found["work_dir"]) if found.get("work_dir") else run_work_dir(settings, run_id)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / SUMMARY_FILE, summary)
    return summary


def _drift(settings: Settings, run_id: str, ref: ModelRef) -> list[dict[str, Any]]:
    """Drift per drop of this run; drifted drops are alerted on every configured channel."""
    from wbc_tasks.ops.alerts import send_alert
    from wbc_tasks.serving.drift import drift_alert_details, drift_by_drop
    from wbc_tasks.serving.model import load_policy

    policy, _ = load_policy(settings, ref)
    drops = drift_by_drop(settings, run_id, ref, policy)
    drifted = [d for d in drops if d["alerts"]]
    if drifted:
        send_alert(settings, drift_alert_details(run_id, drifted))
    return drops


def _log_summary_to_mlflow(settings: Settings, ref: ModelRef, summary: dict, params: dict) -> str:
    """One MLflow run per classification run (client API: no process-global active run)."""
    from mlflow.entities import Metric, Param

    from wbc_tasks.registry.client import configure_mlflow, ensure_experiment

    client = configure_mlflow(settings)
    experiment_id = ensure_experiment(settings.with_overrides(mlflow_experiment=settings.classify_experiment))
    tags = {
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "model_uri": ref.uri,
        "dag_run_id": summary["run_id"],
    }
    metrics = {key: float(summary[key]) for key in _METRICS if summary[key] is not None}
    metrics.update({f"count_{name}": float(n) for name, n in summary["per_class"].items()})
    metrics.update({f"review_{name}": float(n) for name, n in summary["review_reasons"].items()})
    for d in summary["drift"]:
        key = "drift." + drop_label(d["drop"])
        for name in ("class_mix_divergence", "mean_confidence", "unfamiliar_share", "rejected_share"):
            if d[name] is not None:
                metrics[f"{key}.{name}"] = float(d[name])
        metrics[f"{key}.alerts"] = float(len(d["alerts"]))
    run = client.create_run(experiment_id, run_name=f"classify {summary['run_id']}", tags=tags)
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, stamp, 0) for key, value in metrics.items()],
        params=[Param(key, str(value)) for key, value in params.items()],
    )
    reports = _log_drop_reports(settings, client, run_id, summary["run_id"])
    client.log_dict(run_id, {**summary, "reports": reports}, "summary.json")
    client.set_terminated(run_id)
    return run_id


#: Longest drop label in an MLflow metric key or artifact folder (MLflow caps keys at 250).
MAX_DROP_LABEL = 100


def drop_label(drop: str) -> str:
    """The drop's name as MLflow keys and folders may spell it: file-system-safe, and for a name
    that had to change (other characters, or longer than :data:`MAX_DROP_LABEL`) shortened and
    followed by 8 hex digits of its hash, so two drops never share a label."""
    if not drop:
        return "loose"
    safe = safe_name(drop)
    if safe == drop and len(safe) <= MAX_DROP_LABEL:
        return safe
    return f"{safe[:MAX_DROP_LABEL]}-{hashlib.sha256(drop.encode()).hexdigest()[:8]}"


def _log_drop_reports(settings: Settings, client: Any, mlflow_run_id: str, dag_run_id: str) -> list[str]:
    """Log the report of every drop ``dag_run_id`` classified; return the drops logged.

    A report is an extra: one that cannot be made or logged is a warning, never a failed night
    (the predictions are committed by then, and ``wbc report`` makes it again)."""
    import tempfile

    from wbc_tasks.serving.report import drops_of_run
    from wbc_tasks.serving.report_rendering import report_files

    try:
        drops = drops_of_run(settings, dag_run_id)
    except Exception as exc:  # a report never fails the night (docstring)
        log.warning("no drop reports for run %s: finding its drops failed: %s", dag_run_id, exc)
        return []
    logged = []
    for drop in drops:
        folder = f"reports/{drop_label(drop) if drop else '_loose'}"
        try:
            with tempfile.TemporaryDirectory(prefix="wbc-report-") as scratch:
                report_files(settings, drop, Path(scratch))
                client.log_artifacts(mlflow_run_id, scratch, folder)
        except Exception as exc:  # a report never fails the night (docstring)
            log.warning("the report of drop %r was not logged to MLflow: %s", drop, exc)
            continue
        logged.append(drop)
    log.info("logged the differential reports of %d drops under reports/", len(logged))
    return logged
