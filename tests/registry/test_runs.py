"""One MLflow run per DAG run (wbc_tasks.registry.runs): created once, found by its tag from any
process, resumed, left RUNNING and closed, against a real MLflow (SQLite store)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from wbc_tasks.registry.client import configure_mlflow, ensure_experiment


def _runs_tagged(settings, dag_run_id):
    return configure_mlflow(settings).search_runs(
        [ensure_experiment(settings)],
        filter_string=f"tags.airflow_run_id = '{dag_run_id}'",
    )


def test_tracking_run_created_once_then_found_by_tag_from_another_process(
    mlflow_settings,
):
    from wbc_tasks.registry.runs import open_tracking_run

    dag_run_id = "manual__2026-11-25T10:00:00+00:00"
    params = {
        "epochs_head": 5,
        "smote": True,
        "data_dir": None,
        "learning_rate_head": 0.001,
    }
    run_id = open_tracking_run(mlflow_settings, dag_run_id, params)

    # A task in another process has nothing in memory: it must find the run on the tracking server.
    code = (
        "from wbc_tasks.core.settings import get_settings\n"
        "from wbc_tasks.registry.runs import open_tracking_run\n"
        f"print('RUN', open_tracking_run(get_settings(), {dag_run_id!r}, {{'epochs_head': 7}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=REPO_ROOT,
        check=True,
    ).stdout
    assert f"RUN {run_id}" in out.splitlines()
    assert open_tracking_run(mlflow_settings, dag_run_id) == run_id

    runs = _runs_tagged(mlflow_settings, dag_run_id)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == dag_run_id
    # Params are logged once: the other process's different epochs_head did not change them.
    assert run.data.params == {
        "epochs_head": "5",
        "smote": "True",
        "data_dir": "None",
        "learning_rate_head": "0.001",
    }
    assert open_tracking_run(mlflow_settings, "manual__other") != run_id


def test_first_tasks_starting_together_share_one_run(mlflow_settings):
    import threading

    from wbc_tasks.registry.runs import open_tracking_run

    start, ids = threading.Barrier(3), []

    def first_task():
        start.wait()
        ids.append(open_tracking_run(mlflow_settings, "manual__together", {"seed": 1}))

    threads = [threading.Thread(target=first_task) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(ids) == 3 and len(set(ids)) == 1
    assert [r.info.run_id for r in _runs_tagged(mlflow_settings, "manual__together")] == ids[:1]


def test_tracking_run_resumes_and_stays_running_until_finished(mlflow_settings):
    import mlflow

    from wbc_tasks.registry.runs import (
        finish_tracking_run,
        open_tracking_run,
        tracking_run,
    )

    dag_run_id = "scheduled__2026-11-25T00:00:00+00:00"
    run_id = open_tracking_run(mlflow_settings, dag_run_id)
    with tracking_run(mlflow_settings, dag_run_id) as active_id:
        assert active_id == run_id and mlflow.active_run().info.run_id == run_id
        mlflow.log_metric("from_task_one", 1.0)
        with tracking_run(mlflow_settings, dag_run_id) as inner:  # nested use is harmless
            assert inner == run_id
        assert mlflow.active_run().info.run_id == run_id
    assert mlflow.active_run() is None
    assert configure_mlflow(mlflow_settings).get_run(run_id).info.status == "RUNNING"

    with pytest.raises(ZeroDivisionError), tracking_run(mlflow_settings, dag_run_id):
        mlflow.log_metric("from_task_two", 2.0)
        1 / 0  # noqa: B018 - a task failing: Airflow may retry it, so the run stays open
    assert mlflow.active_run() is None
    run = configure_mlflow(mlflow_settings).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.metrics == {"from_task_one": 1.0, "from_task_two": 2.0}

    assert finish_tracking_run(mlflow_settings, dag_run_id, "FINISHED") == run_id
    assert configure_mlflow(mlflow_settings).get_run(run_id).info.status == "FINISHED"
    assert finish_tracking_run(mlflow_settings, dag_run_id, "failed") == run_id
    assert configure_mlflow(mlflow_settings).get_run(run_id).info.status == "FAILED"
    assert finish_tracking_run(mlflow_settings, "never-started", "FAILED") is None
    with pytest.raises(ValueError, match="not one of"):
        finish_tracking_run(mlflow_settings, dag_run_id, "DONE")


def test_another_active_run_is_not_silently_replaced(mlflow_settings):
    import mlflow

    from wbc_tasks.registry.client import ensure_experiment
    from wbc_tasks.registry.runs import tracking_run

    with (
        mlflow.start_run(experiment_id=ensure_experiment(mlflow_settings)),
        pytest.raises(RuntimeError, match="already active"),
        tracking_run(mlflow_settings, "manual__x"),
    ):
        pass
