"""The training DAG: it parses, wires the steps in order with training on the gpu queue, and
runs for real under ``dag.test()``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from airflow.sdk.definitions.param import ParamValidationError

from tests.conftest import REPO_ROOT, free_port, parse_dag, write_image
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.training.params import TRAINING_PARAM_SPECS

ORDER = [
    "split",
    "preprocess",
    "augment",
    "balance",
    "train_model",
    "calibrate",
    "evaluate",
    "export_engine",
    "register",
    "promote",
]
HEAVY = {
    "tensorflow",
    "keras",
    "mlflow",
    "pandas",
    "sqlalchemy",
    "numpy",
    "PIL",
    "sklearn",
    "imblearn",
    "alembic",
    "filelock",
}


def test_every_dag_file_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=REPO_ROOT / "dags")
    assert bag.import_errors == {}
    assert {d.value for d in DagId} <= set(bag.dag_ids)


def test_tasks_chained_in_order_with_training_on_gpu_queue():
    dag = parse_dag("wbc_training")
    for upstream, downstream in zip(ORDER, ORDER[1:]):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    # The two steps that run the network (training, then calibration's passes over the images).
    on_gpu = {"train_model", "calibrate"}
    assert {t.task_id for t in dag.tasks if t.queue == "gpu"} == on_gpu
    assert {t.queue for t in dag.tasks if t.task_id not in on_gpu} == {"default"}
    assert dag.schedule is None and dag.catchup is False


def test_every_task_fails_at_once_on_permanent_errors_and_alerts_and_training_closes_its_mlflow_run():
    """The DAGs share one retry policy and one alert callback (wbc_airflow.dag_helpers); the two
    training DAGs' one MLflow-closing callback runs after the alert, for a task and for the run."""
    from wbc_airflow.dag_helpers import FAIL_AT_ONCE_ON_PERMANENT_ERRORS, close_mlflow_run
    from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure

    for dag_id in DagId:
        dag = parse_dag(dag_id)
        trains = dag_id in (DagId.TRAINING, DagId.ADAPTATION)
        for task in dag.tasks:
            kwargs = getattr(task, "partial_kwargs", None) or vars(task)
            assert kwargs["retry_policy"] is FAIL_AT_ONCE_ON_PERMANENT_ERRORS, (dag_id, task.task_id)
            callbacks = kwargs["on_failure_callback"]
            expected = [alert_task_failure, close_mlflow_run] if trains else [alert_task_failure]
            assert (callbacks if isinstance(callbacks, list) else [callbacks]) == expected, (dag_id, task.task_id)
        expected_dag = [alert_dag_failure, close_mlflow_run] if trains else [alert_dag_failure]
        callbacks = dag.on_failure_callback
        assert (callbacks if isinstance(callbacks, list) else [callbacks]) == expected_dag, dag_id


def test_trigger_form_has_every_param_described_and_validated():
    dag = parse_dag("wbc_training")
    form = dag.params
    assert set(form.keys()) == set(TRAINING_PARAM_SPECS)
    for name, spec in TRAINING_PARAM_SPECS.items():
        param = form.get_param(name)
        assert param.description == spec["description"]
        assert param.schema["type"] == spec["type"]
    with pytest.raises(ParamValidationError, match="minimum"):
        form.get_param("image_size").resolve(8)  # below the minimum: the form refuses it


def test_parsing_the_dag_files_imports_nothing_heavy():
    """What the scheduler's parser pays: each DAG file, run in a fresh interpreter after Airflow's
    own imports, must not pull in TensorFlow, MLflow, pandas, SQLAlchemy, ... (tasks import them)."""
    script = (
        "import json, runpy, sys\n"
        "import airflow.sdk, pendulum\n"
        "before = set(sys.modules)\n"
        "added = {}\n"
        "for path in sys.argv[1:]:\n"
        "    runpy.run_path(path)\n"
        "    added[path] = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "print(json.dumps(added))\n"
    )
    files = sorted(str(p) for p in (REPO_ROOT / "dags").glob("wbc_*.py"))
    assert len(files) == len(DagId)
    done = subprocess.run(
        [sys.executable, "-c", script, *files],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    added = json.loads(done.stdout.strip().splitlines()[-1])
    for path, modules in added.items():
        assert not set(modules) & HEAVY, f"{path} imports {sorted(set(modules) & HEAVY)} while parsing"


@pytest.fixture
def small_labelled_set(seed_shaped, tmp_path):
    """Five real images per class (all of them for the rarest): a fast, still imbalanced set."""
    data = tmp_path / "WBC"
    for folder in sorted(seed_shaped.iterdir()):
        for image in sorted(folder.iterdir())[: 5 if folder.name != "neutrophils" else 9]:
            (data / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, data / folder.name / image.name)
    return data


def isolate(monkeypatch, tmp_path):
    from wbc_tasks.core.settings import get_settings

    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORKERS", "1")
    monkeypatch.setenv("WBC_ALLOWED_ROOTS", str(tmp_path))  # the data_dir param's folder
    return get_settings()


def test_data_stages_run_under_dag_test(airflow_db, small_labelled_set, monkeypatch, tmp_path):
    from airflow.utils.state import DagRunState

    from wbc_tasks.data.store import open_store

    settings = isolate(monkeypatch, tmp_path)
    dag = parse_dag("wbc_training").partial_subset(task_ids=ORDER[:4], include_upstream=True, include_downstream=False)
    assert sorted(dag.task_ids) == sorted(ORDER[:4])
    run = dag.test(
        run_conf={
            "data_dir": str(small_labelled_set),
            "image_size": 32,
            "augment_per_class": 12,
            "smote_k": 3,
            "weights": "none",
        }
    )
    assert run.state == DagRunState.SUCCESS
    folder = settings.run_dir(run.run_id)
    for step in ORDER[:4]:
        assert (folder / step / "_COMPLETE.json").is_file(), f"{step} did not mark its output complete"
    balanced = open_store(folder / "balance")
    counts = balanced.class_counts(tuple(sorted(p.name for p in small_labelled_set.iterdir())))
    assert len(set(counts.values())) == 1, f"classes not balanced: {counts}"
    assert balanced.images.dtype.name == "uint8" and balanced.image_size == 32
    test_shas = set(open_store(folder / "preprocess" / "test").records["sha256"])
    assert not test_shas & set(balanced.records["parents"].str.split("+").explode()), "test images leaked into training"


def _split_only(retry_delay_seconds: float = 0.0):
    """The training DAG cut to its first task, retried without waiting (the policy under test
    decides whether a retry happens at all, not when)."""
    from datetime import timedelta

    dag = parse_dag("wbc_training").partial_subset(task_ids=["split"], include_upstream=False, include_downstream=False)
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=retry_delay_seconds)
        task.retry_exponential_backoff = False
    return dag


def _split_tries(run) -> tuple[str, int]:
    ti = next(t for t in run.get_task_instances() if t.task_id == "split")
    return ti.state, ti.try_number


def test_an_error_retrying_cannot_fix_fails_the_task_in_one_try(airflow_db, monkeypatch, tmp_path):
    """A data folder one level too high: the split fails at once, with no retries (the DAG
    declares two), and its error says which folder holds the class folders."""
    from airflow.utils.state import DagRunState

    isolate(monkeypatch, tmp_path)
    top = tmp_path / "bench"
    for label in ("blasts", "bands"):
        write_image(top / "WBC" / label / "a.png", seed=len(label))
    (top / "classify-images").mkdir()
    assert parse_dag("wbc_training").get_task("split").retries == 2
    run = _split_only().test(run_conf={"data_dir": str(top), "weights": "none"})
    assert run.state == DagRunState.FAILED
    assert _split_tries(run) == ("failed", 1)


def test_a_transient_error_keeps_its_retries(airflow_db, monkeypatch, tmp_path, small_labelled_set):
    """MLflow unreachable is transient: the split is tried 1 + retries times before failing."""
    from airflow.utils.state import DagRunState

    isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WBC_MLFLOW_RETRIES", "0")
    monkeypatch.setenv("WBC_MLFLOW_HTTP_RETRIES", "0")
    monkeypatch.setenv("WBC_MLFLOW_HTTP_TIMEOUT", "2")
    run = _split_only().test(run_conf={"data_dir": str(small_labelled_set), "image_size": 32, "weights": "none"})
    assert run.state == DagRunState.FAILED
    assert _split_tries(run) == ("failed", 3)
