"""Fixtures of the registry tests: a real MLflow (SQLite store in the test module's tmp folder)
and settings pointing at it, plus the test metrics the tests log and register."""

from __future__ import annotations

from pathlib import Path

import pytest

from wbc_tasks.core.settings import get_settings


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    """One SQLite MLflow per test module (creating its tables takes seconds); tests keep apart
    by their own DAG run ids and model names."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def mlflow_settings(settings, mlflow_dir, tmp_path, monkeypatch, request):
    """Settings with the module's SQLite MLflow, this test's own model name and work folder, and
    no waiting between retries."""
    import mlflow

    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    monkeypatch.setenv("WBC_MLFLOW_ARTIFACT_ROOT", str(mlflow_dir / "artifacts"))
    monkeypatch.setenv("WBC_MODEL_NAME", f"wbc-{request.node.name}"[:60])
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_MLFLOW_RETRY_WAIT", "0")
    yield get_settings()
    while mlflow.active_run() is not None:  # never leak an active run into the next test
        mlflow.end_run()


def sample_metrics(recall: dict[str, float], balanced: float) -> dict:
    """Test metrics shaped like evaluation's: headline numbers, per-class dicts, a matrix."""
    return {
        "accuracy": balanced + 0.01,
        "balanced_accuracy": balanced,
        "recall": recall,
        "precision": {c: 0.5 for c in recall},
        "support": {c: 10 for c in recall},
        "confusion_matrix": [[1, 0], [0, 1]],
    }
