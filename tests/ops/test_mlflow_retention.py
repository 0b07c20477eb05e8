"""Retention of MLflow artifacts of old unregistered runs (wbc_tasks.ops.mlflow_retention),
against a real MLflow registry (SQLite store in the module's tmp folder)."""

from __future__ import annotations

import time

from tests.ops.conftest import DAY, register_version


def test_mlflow_artifacts_of_unregistered_runs_only_when_asked(retention_settings):
    from wbc_tasks.ops.cleanup import apply_retention
    from wbc_tasks.ops.mlflow_retention import ARTIFACTS_DELETED_TAG
    from wbc_tasks.registry.client import configure_mlflow, ensure_experiment
    from wbc_tasks.registry.runs import open_tracking_run

    s = retention_settings
    client = configure_mlflow(s)
    ensure_experiment(s)

    def run_with_artifact(dag_run_id: str, status: str | None) -> str:
        run_id = open_tracking_run(s, dag_run_id)
        client.log_text(run_id, "confusion matrix " * 100, "evaluation/report.txt")
        if status:
            client.set_terminated(run_id, status)
        return run_id

    champion = run_with_artifact("manual__champion", None)
    register_version(s, "manual__champion", alias=s.champion_alias)  # finishes it
    unregistered = run_with_artifact("manual__failed", "FAILED")
    running = run_with_artifact("manual__running", None)
    later = time.time() + 60 * DAY  # 60 days from now, every run above is old

    def has_artifacts(run_id: str) -> bool:
        return bool(client.list_artifacts(run_id, "evaluation"))

    # Off by default: folders only.
    assert "mlflow" not in apply_retention(s, now=later)
    assert has_artifacts(unregistered)

    dry = apply_retention(s, now=later, mlflow_artifacts=True, dry_run=True)["mlflow"]
    assert dry["purged"] == [unregistered] and dry["bytes_freed"] > 0 and has_artifacts(unregistered)

    result = apply_retention(s, now=later, mlflow_artifacts=True)["mlflow"]
    assert result["purged"] == [unregistered] and result["bytes_freed"] == dry["bytes_freed"]
    assert not has_artifacts(unregistered)
    assert ARTIFACTS_DELETED_TAG in client.get_run(unregistered).data.tags
    assert client.get_run(unregistered).info.lifecycle_stage == "active"  # the run record stays
    assert has_artifacts(champion) and "registered model version" in result["kept"][champion]
    assert has_artifacts(running) and "RUNNING" in result["kept"][running]
    # The newest N runs keep their artifacts too.
    again = apply_retention(s.with_overrides(retention_keep_runs=10), now=later, mlflow_artifacts=True)
    assert again["mlflow"]["purged"] == []
