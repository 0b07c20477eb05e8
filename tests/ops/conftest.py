"""Fixtures of the retention tests: a real MLflow registry (SQLite store in the test module's
tmp folder), settings pointing at it, and run work folders of a chosen age. Registered versions
point at an empty folder, as in test_promotion: nothing is trained."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from wbc_tasks.core.settings import COMPLETE_MARKER, get_settings

DAY = 86_400.0


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    """One SQLite MLflow per module (creating its tables takes seconds); each test has its own
    experiment and registered model name."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def retention_settings(settings, mlflow_dir, tmp_path, monkeypatch, request):
    import mlflow

    name = request.node.name[:50]
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    monkeypatch.setenv("WBC_MLFLOW_ARTIFACT_ROOT", str(mlflow_dir / "artifacts"))
    monkeypatch.setenv("WBC_MLFLOW_EXPERIMENT", f"exp-{name}")
    monkeypatch.setenv("WBC_MODEL_NAME", f"wbc-{name}")
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_MLFLOW_RETRY_WAIT", "0")
    monkeypatch.setenv("WBC_RETENTION_DAYS", "30")
    monkeypatch.setenv("WBC_RETENTION_KEEP_RUNS", "0")
    yield get_settings()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def set_age(path: Path, days: float) -> None:
    """Make ``path`` and everything in it look last modified ``days`` ago."""
    stamp = time.time() - days * DAY
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def make_run_folder(settings, dag_run_id: str, *, age_days: float, size: int = 1000) -> Path:
    """A run work folder like a training run leaves (a finished step and a checkpoint)."""
    folder = settings.run_dir(dag_run_id)
    (folder / "split").mkdir(parents=True)
    (folder / "split" / "manifest.csv").write_bytes(b"x" * size)
    (folder / "split" / COMPLETE_MARKER).write_text("{}")
    (folder / "train_checkpoints").mkdir()
    (folder / "train_checkpoints" / "epoch-001.weights.h5").write_bytes(b"w" * size)
    set_age(folder, age_days)
    return folder


def register_version(settings, dag_run_id: str, *, alias: str | None = None, tag_version: bool = True) -> str:
    """A registered version made by ``dag_run_id``'s MLflow run (tagged like register_model
    does); the version points at an empty folder (retention never loads the model)."""
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import finish_tracking_run, open_tracking_run
    from wbc_tasks.registry.tags import TAG_AIRFLOW_RUN_ID

    run_id = open_tracking_run(settings, dag_run_id)
    finish_tracking_run(settings, dag_run_id, "FINISHED")
    client = configure_mlflow(settings)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(settings.model_name)
    source = settings.home / "fake-model"
    source.mkdir(parents=True, exist_ok=True)
    tags = {TAG_AIRFLOW_RUN_ID: dag_run_id} if tag_version else {}
    version = client.create_model_version(settings.model_name, source.as_uri(), run_id=run_id, tags=tags).version
    if alias:
        client.set_registered_model_alias(settings.model_name, alias, version)
    return str(version)
