"""What the DAG files read while parsed (wbc_airflow.dag_helpers): only the settings parsing needs,
each on its own. A malformed ``WBC_*`` variable that parsing does not read leaves all four DAGs
loadable and fails the run that needs it, naming it; one that parsing reads is an import error
naming it. One timezone rule for the four DAGs."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT, parse_dag
from wbc_tasks.core.vocabulary import DagId


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=REPO_ROOT / "dags")


def test_a_malformed_setting_parsing_does_not_read_leaves_every_dag_loadable(settings, monkeypatch):
    monkeypatch.setenv("WBC_IMAGE_SIZE", "big")
    monkeypatch.setenv("WBC_LOCK_TIMEOUT", "soon")
    monkeypatch.setenv("WBC_PSEUDONYMISE_NAMES", "perhaps")
    bag = _bag()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) >= {d.value for d in DagId}


def test_the_run_that_needs_it_fails_at_once_naming_it(airflow_db, settings, monkeypatch, tmp_path, capfd):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_RETENTION_DAYS", "a month")
    dag = parse_dag(DagId.MAINTENANCE)  # loads: parsing does not read it
    run = dag.test()
    assert run.state == DagRunState.FAILED
    (ti,) = run.get_task_instances()
    assert (ti.state, ti.try_number) == ("failed", 1), "a malformed setting is not retried"
    logged = capfd.readouterr()
    assert "SettingsError: setting WBC_RETENTION_DAYS='a month'" in logged.out + logged.err


@pytest.mark.parametrize(
    ("variable", "value", "dags"),
    [
        ("WBC_TIMEZONE", "Mars/Olympus", set(DagId)),
        ("WBC_CLASSIFY_SCHEDULE", "every night", {DagId.NIGHTLY}),
        ("WBC_CLASSIFY_CHUNK_SIZE", "many", {DagId.NIGHTLY}),
        ("WBC_REVIEW_THRESHOLD", "high", {DagId.NIGHTLY}),
        ("WBC_MAINTENANCE_SCHEDULE", "61 * * * *", {DagId.MAINTENANCE}),
        ("WBC_RETENTION_MLFLOW_ARTIFACTS", "perhaps", {DagId.MAINTENANCE}),
    ],
)
def test_a_malformed_setting_parsing_reads_is_an_import_error_naming_it(settings, monkeypatch, variable, value, dags):
    monkeypatch.setenv(variable, value)
    bag = _bag()
    failed = {path.rsplit("/", 1)[-1].removesuffix(".py"): error for path, error in bag.import_errors.items()}
    assert set(failed) == {d.value for d in dags}
    for error in failed.values():
        assert f"{variable}={value!r}" in error
    assert set(bag.dag_ids) == {d.value for d in DagId} - {d.value for d in dags}


def test_one_timezone_rule_for_every_dag(settings, monkeypatch):
    monkeypatch.setenv("WBC_TIMEZONE", "Europe/Berlin")
    bag = _bag()
    assert bag.import_errors == {}
    for dag_id in DagId:
        dag = bag.dags[dag_id.value]
        assert dag.timezone.name == "Europe/Berlin", dag_id
        start = dag.start_date.in_timezone("Europe/Berlin")
        assert (start.year, start.month, start.day, start.hour) == (2026, 1, 1, 0), dag_id
