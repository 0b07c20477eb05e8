"""The whole stack, natively: Airflow (Celery, two workers), MLflow server, PostgreSQL, Redis.

Trains a tiny model through the ``wbc_training`` DAG over Airflow's REST API, checks where the
tasks ran, that the registry got a champion, that anonymous requests are refused, then classifies
a small drop with ``wbc_batch_classification`` and reads the predictions back from PostgreSQL.
Run with ``pytest -m system tests/system`` (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests

from .conftest import AirflowClient, NativeStack, assert_tasks_ran_on_their_queues

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(3600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: Images per class copied from the real set: enough for a train/val/test split, small enough
#: that the whole run takes minutes on 2 CPU cores.
IMAGES_PER_CLASS = 8
DROP_NAME = "2026-11-25"
DROP_SIZE = 6
RUN_TIMEOUT_S = 1800


def stack_settings(stack: NativeStack):
    """The pipeline's settings as the stack's workers see them."""
    from wbc_tasks.core.settings import get_settings

    with mock.patch.dict(os.environ, stack.env, clear=False):
        return get_settings()


@pytest.fixture(scope="module")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled folder: real images where ../shared/data exists, else generated ones."""
    out = tmp_path_factory.mktemp("training-data") / "WBC"
    source = SHARED_DATA / "wbc-seed-shaped" / "WBC"
    if source.is_dir():
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            (out / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:IMAGES_PER_CLASS]:
                shutil.copy2(image, out / class_dir.name / image.name)
    else:
        from wbc_tasks.data.demo import generate_demo_dataset

        generate_demo_dataset(out, per_class=IMAGES_PER_CLASS, size=64)
    return out


@pytest.fixture(scope="module")
def training_run(native_stack: NativeStack, airflow: AirflowClient, training_data: Path) -> dict[str, Any]:
    """One finished ``wbc_training`` run with tiny params; promotion floors at 0."""
    airflow.wait_for_dag("wbc_training")
    conf = {
        "data_dir": str(training_data),
        "image_size": 32,
        "weights": "none",
        "epochs_head": 0,
        "epochs_finetune": 2,
        "batch_size": 16,
        "augment_per_class": 12,
        "smote": True,
        "min_metric": 0,
        "min_class_recall": 0,
        "min_blast_recall": 0,
        "seed": 7,
    }
    run_id = airflow.trigger("wbc_training", conf)
    run = airflow.wait_for_run("wbc_training", run_id, timeout=RUN_TIMEOUT_S)
    return {"run_id": run_id, "run": run, "task_instances": airflow.task_instances("wbc_training", run_id)}


def test_status_reports_every_service_healthy(native_stack: NativeStack) -> None:
    """stack/status finds every process of the stack by its pid file and each answers its health check."""
    done = subprocess.run(
        [str(REPO_ROOT / "stack" / "status"), "--prefix", native_stack.prefix,
         "--state-dir", str(native_stack.state_dir), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {
        "mlflow",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
    }
    unhealthy = {name: info for name, info in services.items() if not (info["pid"] and info["healthy"])}
    assert not unhealthy


def test_anonymous_requests_are_refused(native_stack: NativeStack) -> None:
    """Neither the Airflow API nor the MLflow server answers without credentials."""
    assert requests.get(f"{native_stack.api_url}/api/v2/dags", timeout=30).status_code == 401
    wrong = requests.post(
        f"{native_stack.api_url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30
    )
    assert wrong.status_code == 401
    search = f"{native_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 401
    credentials = (native_stack.env["MLFLOW_TRACKING_USERNAME"], native_stack.env["MLFLOW_TRACKING_PASSWORD"])
    assert requests.get(search, auth=credentials, timeout=30).status_code == 200


def test_training_runs_train_model_on_the_gpu_worker(training_run: dict[str, Any]) -> None:
    """Every task succeeded; train_model and calibrate ran on the gpu worker, the rest on cpu."""
    assert_tasks_ran_on_their_queues(training_run)


def test_training_promotes_a_champion_on_the_mlflow_server(
    native_stack: NativeStack, training_run: dict[str, Any]
) -> None:
    """The registry on the server (not a local file) holds the new version under the champion alias."""
    settings = stack_settings(native_stack)
    response = requests.get(
        f"{native_stack.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": settings.model_name, "alias": settings.champion_alias},
        auth=(native_stack.env["MLFLOW_TRACKING_USERNAME"], native_stack.env["MLFLOW_TRACKING_PASSWORD"]),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    version = response.json()["model_version"]
    assert version["name"] == settings.model_name
    assert settings.champion_alias in version.get("aliases", [])
    # Artifacts went through the server (proxied), into the stack's artifact folder.
    artifacts = native_stack.state_dir / "mlflow" / "artifacts"
    assert any(path.is_file() for path in artifacts.rglob("*")), f"no artifact under {artifacts}"


def test_batch_classification_writes_predictions_to_postgresql(
    native_stack: NativeStack, airflow: AirflowClient, training_run: dict[str, Any], tmp_path: Path
) -> None:
    """A small drop is classified by the champion; every file has a row in the PostgreSQL table."""
    settings = stack_settings(native_stack)
    assert settings.predictions_db_url.startswith("postgresql")
    drop = settings.classify_dir / DROP_NAME
    drop.mkdir(parents=True)
    source = SHARED_DATA / "wbc-seed-shaped" / "classify-images"
    if source.is_dir():
        names = sorted(source.iterdir())[:DROP_SIZE]
        for image in names:
            shutil.copy2(image, drop / image.name)
    else:
        from wbc_tasks.data.demo import generate_demo_drop

        generate_demo_drop(drop, DROP_SIZE, seed=3)
    dropped = sorted(p.name for p in drop.iterdir())

    airflow.wait_for_dag("wbc_batch_classification")
    run_id = airflow.trigger("wbc_batch_classification", {"drop": DROP_NAME})
    airflow.wait_for_run("wbc_batch_classification", run_id, timeout=RUN_TIMEOUT_S)
    summary = airflow.xcom("wbc_batch_classification", run_id, "summarise")

    from wbc_tasks.serving.export import PredictionFilter
    from wbc_tasks.serving.export_stream import export_predictions

    out = tmp_path / "predictions.json"
    count = export_predictions(settings, PredictionFilter(drop=DROP_NAME), fmt="json", out=out)
    rows = json.loads(out.read_text())
    assert count == len(rows) == len(dropped), f"rows {rows}; run summary {summary}"
    assert sorted(Path(row["path"]).name for row in rows) == dropped
    assert {row["status"] for row in rows} == {"classified"}
    assert {str(row["model_version"]) for row in rows} == {str(training_run_champion(native_stack))}


def training_run_champion(stack: NativeStack) -> str:
    """The version the champion alias points at now."""
    settings = stack_settings(stack)
    response = requests.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": settings.model_name, "alias": settings.champion_alias},
        auth=(stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"]),
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["model_version"]["version"]
