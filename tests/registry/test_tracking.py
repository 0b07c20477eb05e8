"""MLflow tracking per DAG run, stage logging and registration with a model card, against a real
MLflow (SQLite store in the test's tmp folder; one test against a real ``mlflow server``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from wbc_tasks.core.settings import CLASS_NAMES, COMPLETE_MARKER, get_settings

from tests.conftest import REPO_ROOT, skip_unless_required
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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


def _client(settings):
    from wbc_tasks.registry.tracking import configure_mlflow

    return configure_mlflow(settings)


def _runs_tagged(settings, dag_run_id):
    from wbc_tasks.registry.tracking import ensure_experiment

    return _client(settings).search_runs(
        [ensure_experiment(settings)], filter_string=f"tags.airflow_run_id = '{dag_run_id}'"
    )


def _metrics(recall: dict[str, float], balanced: float) -> dict:
    return {
        "accuracy": balanced + 0.01,
        "balanced_accuracy": balanced,
        "recall": recall,
        "precision": {c: 0.5 for c in recall},
        "support": {c: 10 for c in recall},
        "confusion_matrix": [[1, 0], [0, 1]],
    }


# ------------------------------------------------------------------ one run per DAG run


def test_tracking_run_created_once_then_found_by_tag_from_another_process(mlflow_settings):
    from wbc_tasks.registry.tracking import open_tracking_run

    dag_run_id = "manual__2026-11-25T10:00:00+00:00"
    params = {"epochs_head": 5, "smote": True, "data_dir": None, "learning_rate_head": 0.001}
    run_id = open_tracking_run(mlflow_settings, dag_run_id, params)

    # A task in another process has nothing in memory: it must find the run on the tracking server.
    code = (
        "from wbc_tasks.core.settings import get_settings\n"
        "from wbc_tasks.registry.tracking import open_tracking_run\n"
        f"print('RUN', open_tracking_run(get_settings(), {dag_run_id!r}, {{'epochs_head': 7}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                         cwd=REPO_ROOT, check=True).stdout
    assert f"RUN {run_id}" in out.splitlines()
    assert open_tracking_run(mlflow_settings, dag_run_id) == run_id

    runs = _runs_tagged(mlflow_settings, dag_run_id)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == dag_run_id
    # Params are logged once: the other process's different epochs_head did not change them.
    assert run.data.params == {"epochs_head": "5", "smote": "True", "data_dir": "None", "learning_rate_head": "0.001"}
    assert open_tracking_run(mlflow_settings, "manual__other") != run_id


def test_first_tasks_starting_together_share_one_run(mlflow_settings):
    import threading

    from wbc_tasks.registry.tracking import open_tracking_run

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

    from wbc_tasks.registry.tracking import finish_tracking_run, open_tracking_run, tracking_run

    dag_run_id = "scheduled__2026-11-25T00:00:00+00:00"
    run_id = open_tracking_run(mlflow_settings, dag_run_id)
    with tracking_run(mlflow_settings, dag_run_id) as active_id:
        assert active_id == run_id and mlflow.active_run().info.run_id == run_id
        mlflow.log_metric("from_task_one", 1.0)
        with tracking_run(mlflow_settings, dag_run_id) as inner:  # nested use is harmless
            assert inner == run_id
        assert mlflow.active_run().info.run_id == run_id
    assert mlflow.active_run() is None
    assert _client(mlflow_settings).get_run(run_id).info.status == "RUNNING"

    with pytest.raises(ZeroDivisionError):
        with tracking_run(mlflow_settings, dag_run_id):
            mlflow.log_metric("from_task_two", 2.0)
            1 / 0  # noqa: B018 - a task failing: Airflow may retry it, so the run stays open
    assert mlflow.active_run() is None
    run = _client(mlflow_settings).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.metrics == {"from_task_one": 1.0, "from_task_two": 2.0}

    assert finish_tracking_run(mlflow_settings, dag_run_id, "FINISHED") == run_id
    assert _client(mlflow_settings).get_run(run_id).info.status == "FINISHED"
    assert finish_tracking_run(mlflow_settings, dag_run_id, "failed") == run_id
    assert _client(mlflow_settings).get_run(run_id).info.status == "FAILED"
    assert finish_tracking_run(mlflow_settings, "never-started", "FAILED") is None
    with pytest.raises(ValueError, match="not one of"):
        finish_tracking_run(mlflow_settings, dag_run_id, "DONE")


def test_another_active_run_is_not_silently_replaced(mlflow_settings):
    import mlflow

    from wbc_tasks.registry.tracking import ensure_experiment, tracking_run

    with mlflow.start_run(experiment_id=ensure_experiment(mlflow_settings)):
        with pytest.raises(RuntimeError, match="already active"):
            with tracking_run(mlflow_settings, "manual__x"):
                pass


# ------------------------------------------------------------------ what the steps log


def test_split_manifest_logged_as_training_input(mlflow_settings, tmp_path):
    from wbc_tasks.registry.tracking import log_split_manifest, open_tracking_run

    data_dir = tmp_path / "WBC"
    data_dir.mkdir()
    manifest = pd.DataFrame({
        "path": ["blasts/a.jpg", "neutrophils/b.jpg", "neutrophils/c.jpg"],
        "class": ["blasts", "neutrophils", "neutrophils"],
        "sha256": ["a" * 64, "b" * 64, "c" * 64],
        "split": ["train", "train", "test"],
        "width": [400, 360, 360],
        "height": [400, 363, 363],
    })
    log_split_manifest(mlflow_settings, "manual__m", manifest, data_dir)
    run_id = open_tracking_run(mlflow_settings, "manual__m")
    inputs = _client(mlflow_settings).get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "split-manifest"
    assert json.loads(dataset.source) == {"uri": str(data_dir)}
    assert json.loads(dataset.profile)["num_rows"] == 3
    assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == list(manifest.columns)
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"


def test_stage_artifacts_metrics_and_figures(mlflow_settings, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wbc_tasks.registry.tracking import log_figure, log_metrics, log_stage_artifacts, open_tracking_run

    step = tmp_path / "split"
    step.mkdir()
    (step / "class_counts.json").write_text('{"train": {"blasts": 3}}')
    (step / "manifest.csv").write_text("path,class\n")
    (step / "samples.PNG").write_bytes(b"\x89PNG\r\n\x1a\n")
    (step / "images.npy").write_bytes(b"big store, stays out")
    (step / COMPLETE_MARKER).write_text("{}")
    (step / "nested").mkdir()
    (step / "nested" / "deep.csv").write_text("x\n")

    logged = log_stage_artifacts(mlflow_settings, "manual__a", step, "split")
    assert logged == ["class_counts.json", "manifest.csv", "samples.PNG"]
    run_id = open_tracking_run(mlflow_settings, "manual__a")
    client = _client(mlflow_settings)
    assert sorted(a.path for a in client.list_artifacts(run_id, "split")) == [f"split/{n}" for n in sorted(logged)]

    flat = log_metrics(mlflow_settings, "manual__a",
                       _metrics({"blasts": 0.9, "bands": 0.4}, 0.65), prefix="test")
    assert flat["test_recall_blasts"] == 0.9 and flat["test_balanced_accuracy"] == 0.65
    assert not any("confusion" in k for k in flat), "lists are not metrics"
    assert client.get_run(run_id).data.metrics["test_recall_bands"] == 0.4

    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    log_figure(mlflow_settings, "manual__a", figure, "evaluate/confusion_matrix.png")
    plt.close(figure)
    assert [a.path for a in client.list_artifacts(run_id, "evaluate")] == ["evaluate/confusion_matrix.png"]


def test_flatten_metrics_nested_and_numpy():
    import numpy as np

    from wbc_tasks.registry.tracking import flatten_metrics

    flat = flatten_metrics({"acc": np.float32(0.5), "per_class": {"blasts": {"recall": 1}}, "ok": True, "n": None})
    assert flat == {"acc": 0.5, "per_class_blasts_recall": 1.0}


# ------------------------------------------------------------------ retries


def test_retries_transient_failures_only(mlflow_settings):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from wbc_tasks.registry.tracking import MlflowUnavailableError, call_with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert call_with_retries(mlflow_settings, flaky) == "ok" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="no such model"):
        call_with_retries(mlflow_settings, missing)
    assert len(calls) == 1, "a real error is not retried"

    calls.clear()

    def down():
        calls.append(1)
        raise MlflowException("API request to http://mlflow:5000/api failed with exception Max retries exceeded")

    with pytest.raises(MlflowUnavailableError, match=r"MLflow at .* is unreachable or busy: down failed 4 times") as failed:
        call_with_retries(mlflow_settings, down)
    assert len(calls) == mlflow_settings.mlflow_retries + 1
    assert isinstance(failed.value.__cause__, MlflowException) and "Max retries exceeded" in str(failed.value)


# ------------------------------------------------------------------ registration and the model card


def _tiny_model(image_size: int = 32, classes: int = len(CLASS_NAMES)):
    import keras

    return keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Flatten(),
        keras.layers.Dense(classes, activation="softmax"),
    ])


def _data_summary(data_dir: str) -> dict:
    return {
        "data_dir": data_dir,
        "rejected": 2,
        "counts": {
            "train": {"blasts": 3, "neutrophils": 150},
            "val": {"blasts": 0, "neutrophils": 20},
            "test": {"blasts": 1, "neutrophils": 40},
        },
        "sources": {"blasts": {"matek-aml-via-kaggle-bcicd": 4}, "neutrophils": {"pbc": 180, "matek-aml-via-kaggle-bcicd": 30}},
    }


def test_register_model_writes_card_and_metric_tags(mlflow_settings):
    from wbc_tasks.registry.tracking import (
        MAX_DESCRIPTION_CHARS,
        open_tracking_run,
        register_model,
        resolve_model,
        version_metrics,
    )

    dag_run_id = "manual__reg"
    params = {"image_size": 32, "smote": True, "epochs_finetune": 2}
    run_id = open_tracking_run(mlflow_settings, dag_run_id, params)
    metrics = _metrics({"blasts": 1.0, "neutrophils": 0.82}, 0.91)
    kwargs = dict(image_size=32, class_names=CLASS_NAMES, metrics=metrics,
                  data_summary=_data_summary("/data/WBC"), params=params)
    ref = register_model(mlflow_settings, dag_run_id, _tiny_model(), **kwargs)

    assert ref.run_id == run_id and ref.image_size == 32 and ref.class_names == CLASS_NAMES
    client = _client(mlflow_settings)
    version = client.get_model_version(mlflow_settings.model_name, ref.version)
    card = version.description
    assert len(card) <= MAX_DESCRIPTION_CHARS
    for needed in ("Research use only", "Not a diagnostic device", "review by a qualified person",
                   "## Training data", "| neutrophils | 150 | 20 | 40 | 210 |", "## Test metrics",
                   "balanced_accuracy **0.910**", "| blasts | 1.000 | 0.500 | 10 |", "## Training params",
                   "epochs_finetune=2", "## Limitations", "stain", "blasts (only matek-aml-via-kaggle-bcicd)",
                   "Acevedo", "Matek", "SMOTE", f"`{dag_run_id}`"):
        assert needed in card, f"model card lacks {needed!r}:\n{card}"
    model_description = client.get_registered_model(mlflow_settings.model_name).description
    assert f"Latest registered: version {ref.version}" in model_description and "Research use only" in model_description
    tags = version.tags
    assert float(tags["metric.balanced_accuracy"]) == 0.91
    assert float(tags["recall.blasts"]) == 1.0 and float(tags["support.neutrophils"]) == 10
    assert tags["airflow_run_id"] == dag_run_id
    assert version_metrics(mlflow_settings, ref.version)["recall"] == {"blasts": 1.0, "neutrophils": 0.82}
    assert client.download_artifacts(run_id, "model_card.md") and resolve_model(mlflow_settings, ref.version) == ref
    import mlflow
    import tensorflow as tf

    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{ref.name}/{ref.version}")) / "requirements.txt"
    assert f"tensorflow=={tf.__version__}" in requirements.read_text().split()

    # A retried register task completes the same version instead of registering a second one.
    again = register_model(mlflow_settings, dag_run_id, _tiny_model(), **kwargs)
    assert again == ref
    assert len(client.search_model_versions(f"name='{mlflow_settings.model_name}'")) == 1


def test_source_counts_from_real_sources_file():
    from wbc_tasks.registry.tracking import model_card, source_counts

    sources_file = SHARED_DATA / "wbc-seed-shaped" / "SOURCES.csv"
    if not sources_file.is_file():
        skip_unless_required(f"real images absent: {sources_file} not found (../shared/data is not checked out here)")
    table = pd.read_csv(sources_file, dtype=str)
    manifest = table.rename(columns={"file": "path"})[["path", "class", "sha256"]]
    counts = source_counts(manifest, sources_file.parent / "WBC")
    expected = table.groupby(["class", "source"]).size()
    assert {(c, s): n for c, by in counts.items() for s, n in by.items()} == expected.to_dict()
    blast_sources = set(counts["blasts"])
    assert len(blast_sources) == 1, "the README says blasts come from one lab only"

    card = model_card(model_name="m", version="1", dag_run_id="d", mlflow_run_id="r", image_size=32,
                      class_names=CLASS_NAMES, metrics={"balanced_accuracy": 0.5, "recall": {"blasts": 0.9}},
                      data_summary={"counts": {"test": {"blasts": 1}}, "sources": counts}, params={})
    assert f"blasts (only {blast_sources.pop()})" in card and "Acevedo" in card
    assert "Few test images (under 30) for blasts" in card


@pytest.mark.system
def test_http_tracking_server_works_the_same(settings, tmp_path, monkeypatch):
    """The stack's URI kind: a real ``mlflow server`` with proxied artifacts."""
    from wbc_tasks.registry.tracking import log_split_manifest, log_stage_artifacts, open_tracking_run, register_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
         "--artifacts-destination", str(server_dir / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
        log_split_manifest(http_settings, "manual__http",
                           pd.DataFrame({"path": ["a.jpg"], "class": ["blasts"]}), tmp_path)
        step = tmp_path / "step"
        step.mkdir()
        (step / "counts.json").write_text("{}")
        log_stage_artifacts(http_settings, "manual__http", step, "split")
        ref = register_model(http_settings, "manual__http", _tiny_model(), image_size=32, class_names=CLASS_NAMES,
                             metrics=_metrics({"blasts": 0.9}, 0.9), data_summary=_data_summary("/d"),
                             params={"image_size": 32})
        assert ref.run_id == run_id
        assert (server_dir / "artifacts").is_dir() and any((server_dir / "artifacts").rglob("counts.json"))
        assert "Research use only" in _client(http_settings).get_model_version(ref.name, ref.version).description
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
