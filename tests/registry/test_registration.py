"""Registration with a model card (wbc_tasks.registry.registration), against a real MLflow
(SQLite store in the module's tmp folder; one test against a real ``mlflow server``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.registry.conftest import sample_metrics
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.registry.client import configure_mlflow


def _tiny_model(image_size: int = 32, classes: int = len(CLASS_NAMES)):
    import keras

    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def _data_summary(data_dir: str) -> dict:
    return {
        "data_dir": data_dir,
        "rejected": 2,
        "counts": {
            "train": {"blasts": 3, "neutrophils": 150},
            "val": {"blasts": 0, "neutrophils": 20},
            "test": {"blasts": 1, "neutrophils": 40},
        },
        "sources": {
            "blasts": {"matek-aml-via-kaggle-bcicd": 4},
            "neutrophils": {"pbc": 180, "matek-aml-via-kaggle-bcicd": 30},
        },
    }


def test_register_model_writes_card_and_metric_tags(mlflow_settings):
    from wbc_tasks.registry.model_card import MAX_DESCRIPTION_CHARS
    from wbc_tasks.registry.registration import register_model
    from wbc_tasks.registry.runs import open_tracking_run
    from wbc_tasks.registry.versions import resolve_model, version_metrics

    dag_run_id = "manual__reg"
    params = {"image_size": 32, "smote": True, "epochs_finetune": 2}
    run_id = open_tracking_run(mlflow_settings, dag_run_id, params)
    metrics = sample_metrics({"blasts": 1.0, "neutrophils": 0.82}, 0.91)
    kwargs = {
        "image_size": 32,
        "class_names": CLASS_NAMES,
        "metrics": metrics,
        "data_summary": _data_summary("/data/WBC"),
        "params": params,
    }
    ref = register_model(mlflow_settings, dag_run_id, _tiny_model(), **kwargs)

    assert ref.run_id == run_id and ref.image_size == 32 and ref.class_names == CLASS_NAMES
    client = configure_mlflow(mlflow_settings)
    version = client.get_model_version(mlflow_settings.model_name, ref.version)
    card = version.description
    assert len(card) <= MAX_DESCRIPTION_CHARS
    for needed in (
        "Research use only",
        "Not a diagnostic device",
        "review by a qualified person",
        "## Training data",
        "| neutrophils | 150 | 20 | 40 | 210 |",
        "## Test metrics",
        "balanced_accuracy **0.910**",
        "| blasts | 1.000 | 0.500 | 10 |",
        "## Training params",
        "epochs_finetune=2",
        "## Limitations",
        "stain",
        "blasts (only matek-aml-via-kaggle-bcicd)",
        "Acevedo",
        "Matek",
        "SMOTE",
        f"`{dag_run_id}`",
    ):
        assert needed in card, f"model card lacks {needed!r}:\n{card}"
    model_description = client.get_registered_model(mlflow_settings.model_name).description
    assert f"Latest registered: version {ref.version}" in model_description and "Research use only" in model_description
    tags = version.tags
    assert float(tags["metric.balanced_accuracy"]) == 0.91
    assert float(tags["recall.blasts"]) == 1.0 and float(tags["support.neutrophils"]) == 10
    assert tags["airflow_run_id"] == dag_run_id
    assert version_metrics(mlflow_settings, ref.version)["recall"] == {
        "blasts": 1.0,
        "neutrophils": 0.82,
    }
    assert client.download_artifacts(run_id, "model_card.md") and resolve_model(mlflow_settings, ref.version) == ref
    import mlflow
    import tensorflow as tf

    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{ref.name}/{ref.version}")) / "requirements.txt"
    assert f"tensorflow=={tf.__version__}" in requirements.read_text().split()

    # A retried register task completes the same version instead of registering a second one.
    again = register_model(mlflow_settings, dag_run_id, _tiny_model(), **kwargs)
    assert again == ref
    assert len(client.search_model_versions(f"name='{mlflow_settings.model_name}'")) == 1


@pytest.mark.system
def test_http_tracking_server_works_the_same(settings, tmp_path, monkeypatch):
    """The stack's URI kind: a real ``mlflow server`` with proxied artifacts."""
    from wbc_tasks.registry.artifacts import log_split_manifest, log_stage_artifacts
    from wbc_tasks.registry.registration import register_model
    from wbc_tasks.registry.runs import open_tracking_run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{server_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(server_dir / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server's workers are stopped with it
    )
    try:
        import requests

        deadline = time.monotonic() + 300  # a loaded 2-core machine needed about 2 minutes
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
        http_settings = get_settings()

        run_id = open_tracking_run(http_settings, "manual__http", {"image_size": 32})
        assert open_tracking_run(http_settings, "manual__http") == run_id
        log_split_manifest(
            http_settings,
            "manual__http",
            pd.DataFrame({"path": ["a.jpg"], "class": ["blasts"]}),
            tmp_path,
        )
        step = tmp_path / "step"
        step.mkdir()
        (step / "counts.json").write_text("{}")
        log_stage_artifacts(http_settings, "manual__http", step, "split")
        ref = register_model(
            http_settings,
            "manual__http",
            _tiny_model(),
            image_size=32,
            class_names=CLASS_NAMES,
            metrics=sample_metrics({"blasts": 0.9}, 0.9),
            data_summary=_data_summary("/d"),
            params={"image_size": 32},
        )
        assert ref.run_id == run_id
        assert (server_dir / "artifacts").is_dir() and any((server_dir / "artifacts").rglob("counts.json"))
        assert (
            "Research use only" in configure_mlflow(http_settings).get_model_version(ref.name, ref.version).description
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
