"""What the steps log (wbc_tasks.registry.artifacts): the split manifest as training input, step
files, metrics and figures, against a real MLflow (SQLite store)."""

from __future__ import annotations

import json

import pandas as pd

from tests.registry.conftest import sample_metrics
from wbc_tasks.core.settings import COMPLETE_MARKER
from wbc_tasks.registry.client import configure_mlflow


def test_split_manifest_logged_as_training_input(mlflow_settings, tmp_path):
    from wbc_tasks.registry.artifacts import log_split_manifest
    from wbc_tasks.registry.runs import open_tracking_run

    data_dir = tmp_path / "WBC"
    data_dir.mkdir()
    manifest = pd.DataFrame(
        {
            "path": ["blasts/a.jpg", "neutrophils/b.jpg", "neutrophils/c.jpg"],
            "class": ["blasts", "neutrophils", "neutrophils"],
            "sha256": ["a" * 64, "b" * 64, "c" * 64],
            "split": ["train", "train", "test"],
            "width": [400, 360, 360],
            "height": [400, 363, 363],
        }
    )
    log_split_manifest(mlflow_settings, "manual__m", manifest, data_dir)
    run_id = open_tracking_run(mlflow_settings, "manual__m")
    inputs = configure_mlflow(mlflow_settings).get_run(run_id).inputs.dataset_inputs
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

    from wbc_tasks.registry.artifacts import (
        log_figure,
        log_metrics,
        log_stage_artifacts,
    )
    from wbc_tasks.registry.runs import open_tracking_run

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
    client = configure_mlflow(mlflow_settings)
    assert sorted(a.path for a in client.list_artifacts(run_id, "split")) == [f"split/{n}" for n in sorted(logged)]

    flat = log_metrics(
        mlflow_settings,
        "manual__a",
        sample_metrics({"blasts": 0.9, "bands": 0.4}, 0.65),
        prefix="test",
    )
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

    from wbc_tasks.registry.artifacts import flatten_metrics

    flat = flatten_metrics(
        {
            "acc": np.float32(0.5),
            "per_class": {"blasts": {"recall": 1}},
            "ok": True,
            "n": None,
        }
    )
    assert flat == {"acc": 0.5, "per_class_blasts_recall": 1.0}
