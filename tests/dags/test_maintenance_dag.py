"""The maintenance DAG: it parses quickly with the documented configuration, keeps heavy imports
out of parsing, and a ``dag.test()`` run deletes an old work folder and keeps the champion's."""

from __future__ import annotations

from tests.conftest import parse_dag

DAG_ID = "wbc_maintenance"


def test_dag_parses_with_schedule_limits_and_params(settings):
    dag = parse_dag(DAG_ID)
    assert dag.schedule == "30 3 * * *" and dag.timezone.name == "UTC"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.params.dump() == {"dry_run": False, "mlflow_artifacts": False}
    assert [t.task_id for t in dag.tasks] == ["cleanup_runs"]


def test_schedule_timezone_and_artifact_default_come_from_settings(settings, monkeypatch):
    monkeypatch.setenv("WBC_MAINTENANCE_SCHEDULE", "0 5 * * 0")
    monkeypatch.setenv("WBC_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("WBC_RETENTION_MLFLOW_ARTIFACTS", "yes")
    dag = parse_dag(DAG_ID)
    assert dag.schedule == "0 5 * * 0" and dag.timezone.name == "Europe/Berlin"
    assert dag.params.dump()["mlflow_artifacts"] is True


def test_dag_test_deletes_old_folders_but_not_the_champions(airflow_db, settings, monkeypatch, tmp_path):
    from airflow.utils.state import DagRunState

    from tests.ops.conftest import make_run_folder, register_version
    from wbc_tasks.core.settings import get_settings

    for name, value in {
        "WBC_WORK_DIR": tmp_path / "work",
        "WBC_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "WBC_MLFLOW_ARTIFACT_ROOT": tmp_path / "artifacts",
        "WBC_RETENTION_KEEP_RUNS": 1,
    }.items():
        monkeypatch.setenv(name, str(value))
    s = get_settings()
    champion = make_run_folder(s, "manual__champion", age_days=400)
    old = make_run_folder(s, "manual__old", age_days=40)
    newest = make_run_folder(s, "manual__newest", age_days=35)
    register_version(s, "manual__champion", alias=s.champion_alias)

    dry = parse_dag(DAG_ID).test(run_conf={"dry_run": True})
    assert dry.state == DagRunState.SUCCESS and old.is_dir()

    # A freshly parsed DAG: an in-process dag.test() leaves the previous run's conf in the
    # task's params.
    run = parse_dag(DAG_ID).test()
    assert run.state == DagRunState.SUCCESS
    assert champion.is_dir() and newest.is_dir() and not old.exists()
