"""The few lines ``wbc train`` (and so ``make demo``) ends with: how the run ended, the model
version and its test metrics, whether it became champion and why, and where to look next.

Read from what the run left behind: the embedded Airflow database (the run and its task states)
and the steps' completion markers in the run's work folder.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wbc_tasks.core.settings import COMPLETE_MARKER, Settings
from wbc_tasks.core.vocabulary import DagId, Step

DAG_ID = DagId.TRAINING.value
#: Test metrics shown, in this order.
SHOWN_METRICS = ("balanced_accuracy", "accuracy", "macro_f1")


@dataclass
class TrainingRun:
    """What one ``wbc_training`` run left behind."""

    run_id: str
    state: str
    task_states: dict[str, str] = field(default_factory=dict)
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)


def latest_training_run(airflow_db: Path, started_after: datetime) -> TrainingRun | None:
    """The newest ``wbc_training`` run in the embedded Airflow database that started at or after
    ``started_after`` (None when there is none: the run never started)."""
    if not airflow_db.is_file():
        return None
    with sqlite3.connect(f"file:{airflow_db}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT run_id, state, start_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
            (DAG_ID,),
        ).fetchone()
        if row is None:
            return None
        run_id, state, start = row
        if start is not None and _utc(start) < started_after.replace(microsecond=0):
            return None
        tasks = dict(
            db.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
            ).fetchall()
        )
    return TrainingRun(run_id=run_id, state=state or "unknown", task_states={k: v or "none" for k, v in tasks.items()})


def _utc(text: str) -> datetime:
    value = datetime.fromisoformat(str(text))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def read_markers(settings: Settings, run: TrainingRun) -> TrainingRun:
    """``run`` with the completion markers of its finished steps."""
    folder = settings.run_dir(run.run_id)
    for step in (Step.SPLIT, Step.EVALUATE, Step.REGISTER, Step.PROMOTE):
        marker = folder / step / COMPLETE_MARKER
        if marker.is_file():
            run.markers[step.value] = json.loads(marker.read_text())
    return run


def mlflow_run_url(settings: Settings, mlflow_run_id: str, ui: str) -> str | None:
    """The MLflow UI's page of one run (None if the tracking store cannot be read)."""
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(settings.mlflow_tracking_uri).get_run(mlflow_run_id).info.experiment_id
    except Exception:  # the summary must never fail the command
        return None
    return f"{ui}/#/experiments/{experiment}/runs/{mlflow_run_id}"


def format_summary(
    settings: Settings,
    run: TrainingRun | None,
    *,
    exit_code: int,
    airflow_ui: str = "http://localhost:8080",
    mlflow_ui: str = "http://127.0.0.1:5000",
    mlflow_url: str | None = None,
) -> str:
    """The summary block, as printed."""
    lines = ["", "=" * 72]
    if run is None:
        lines.append(f"{DAG_ID} did not start (exit status {exit_code}); the reason is above.")
        lines.append("=" * 72)
        return "\n".join(lines)
    failed = sorted(t for t, s in run.task_states.items() if s in ("failed", "upstream_failed"))
    outcome = "succeeded" if run.state == "success" and exit_code == 0 else f"ended {run.state}"
    lines.append(f"{DAG_ID} run {run.run_id}: {outcome}")
    if failed:
        first = [t for t in failed if run.task_states[t] == "failed"]
        lines.append(f"  failed task: {', '.join(first or failed)} (its error is above, and in the Airflow UI)")
    split = run.markers.get("split")
    if split:
        lines.append(
            f"  data: {split['images']} images from {split['data_dir']} ({split['rejected']} files rejected: "
            f"{settings.run_dir(run.run_id) / Step.SPLIT / 'rejected.csv'})"
        )
    evaluated = run.markers.get("evaluate")
    registered = run.markers.get("register")
    if registered:
        lines.append(f"  model: {registered['model_name']} version {registered['version']} ({registered['uri']})")
    if evaluated:
        metrics = evaluated.get("metrics", evaluated)
        shown = ", ".join(f"{m} {metrics[m]:.3f}" for m in SHOWN_METRICS if m in metrics)
        lines.append(f"  test metrics ({metrics.get('n_images', '?')} held-out images): {shown}")
    promoted = run.markers.get("promote")
    if promoted:
        verdict = "became the champion" if promoted.get("promote") else "did NOT become the champion"
        lines.append(
            f"  champion: version {registered['version'] if registered else '?'} {verdict}: {promoted['reason']}"
        )
        for name, group in (promoted.get("groups") or {}).items():
            lines.append(
                f"  vs the champion on the {group['images']} {name.replace('_', ' ')} images: right "
                f"{group['candidate_accuracy']:.3f} vs {group['champion_accuracy']:.3f}, balanced accuracy "
                f"{group['candidate_balanced_accuracy']:.3f} vs {group['champion_balanced_accuracy']:.3f}"
            )
        lines.append(f"  champion now: version {promoted.get('champion') or 'none'}")
    lines.append("  look next:")
    lines.append(f"    .venv/bin/wbc airflow-ui   -> {airflow_ui}/dags/{DAG_ID}/runs/{quote(run.run_id, safe='')}")
    if mlflow_url:
        lines.append(f"    .venv/bin/wbc mlflow-ui    -> {mlflow_url}")
    else:
        lines.append(f"    .venv/bin/wbc mlflow-ui    -> {mlflow_ui} (experiment {settings.mlflow_experiment})")
    lines.append(f"    work folder: {settings.run_dir(run.run_id)}")
    lines.append("=" * 72)
    return "\n".join(lines)


def summarise_training(settings: Settings, airflow_home: Path, started: datetime, exit_code: int) -> tuple[str, bool]:
    """The summary of the ``wbc_training`` run that started at or after ``started``, and
    whether that run succeeded."""
    run = latest_training_run(airflow_home / "airflow.db", started)
    if run is None:
        return format_summary(settings, None, exit_code=exit_code), False
    read_markers(settings, run)
    registered = run.markers.get("register")
    url = mlflow_run_url(settings, registered["mlflow_run_id"], "http://127.0.0.1:5000") if registered else None
    return format_summary(settings, run, exit_code=exit_code, mlflow_url=url), run.state == "success"
