"""Training: outputs, per-epoch logging (Python log and MLflow), phases, checkpoints and resume."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pandas as pd
import pytest

from tests.demo_stores import build_demo_stores, tiny_training_params
from tests.killed_worker import kill_train_step_after_an_epoch
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.store import create_store, finish_store, open_store
from wbc_tasks.training.checkpoints import CHECKPOINT_STATE_FILE
from wbc_tasks.training.train import train_model

SIZE = 32
#: Small and fast: a tiny head; VGG16 itself is the cost.
FAST = {"dense_units": 16}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Generated demo images: 2 per class to train on, 1 per class to validate on."""
    root = tmp_path_factory.mktemp("train-stores")
    return build_demo_stores(root, splits={"train": 2, "val": 1}, size=SIZE, render_size=48)


def _params(**overrides):
    return tiny_training_params(SIZE, **overrides)


def _epoch_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "wbc_tasks.training.checkpoints" and r.getMessage().startswith("epoch ")
    ]


def test_train_writes_model_history_checkpoints_logs_and_mlflow_metrics(stores, tmp_path, settings, caplog):
    import mlflow

    caplog.set_level(logging.INFO, logger="wbc_tasks.training")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            summary = train_model(
                stores["train"],
                stores["val"],
                tmp_path / "train",
                _params(class_weights=True),
                settings,
                checkpoint_dir=tmp_path / "ckpt",
                **FAST,
            )
        client = mlflow.MlflowClient()
        val_loss = client.get_metric_history(run.info.run_id, "val_loss")
        images_per_s = client.get_metric_history(run.info.run_id, "images_per_s")
    finally:
        mlflow.set_tracking_uri(None)

    model = keras.models.load_model(tmp_path / "train" / "model.keras")
    probabilities = model.predict(np.asarray(open_store(stores["val"]).images), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    history = pd.read_csv(tmp_path / "train" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert list(history["phase"]) == ["scratch", "scratch"]
    assert (
        history[["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_s"]].notna().all().all()
    )
    assert history["learning_rate"].tolist() == pytest.approx([1e-4, 1e-4])

    lines = _epoch_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2 [scratch] loss=") and "val_accuracy=" in lines[0] and "images/s=" in lines[0]

    assert sorted((m.step, m.value) for m in val_loss) == sorted(zip([1, 2], history["val_loss"]))
    assert [m.step for m in images_per_s] == [1, 2]

    state = json.loads((tmp_path / "ckpt" / CHECKPOINT_STATE_FILE).read_text())
    assert state["epochs_done"] == 2
    assert (tmp_path / "ckpt" / "epoch-0002.keras").is_file()
    assert not (tmp_path / "ckpt" / "epoch-0001.keras").exists()  # only the latest is kept

    assert summary["epochs"] == {"scratch": 2}
    assert summary["resumed_from_epoch"] == 0
    assert summary["monitor"] == "val_loss"
    assert summary["best_value"] == pytest.approx(history["val_loss"].min())
    assert summary["class_weights"] == {name: pytest.approx(1.0) for name in CLASS_NAMES}  # balanced store
    assert summary["model_path"] == str(tmp_path / "train" / "model.keras")


def test_a_retry_resumes_after_the_last_finished_epoch_of_the_same_setup(stores, tmp_path, settings, caplog):
    caplog.set_level(logging.INFO, logger="wbc_tasks.training")
    checkpoints = tmp_path / "train_checkpoints"  # outside the step folder a retry wipes
    first = train_model(
        stores["train"],
        stores["val"],
        tmp_path / "try1" / "train",
        _params(epochs_finetune=1),
        settings,
        checkpoint_dir=checkpoints,
        **FAST,
    )
    assert first["resumed_from_epoch"] == 0
    history_before = pd.read_csv(tmp_path / "try1" / "train" / "history.csv")
    caplog.clear()

    second = train_model(
        stores["train"],
        stores["val"],
        tmp_path / "try2" / "train",
        _params(epochs_finetune=2),
        settings,
        checkpoint_dir=checkpoints,
        **FAST,
    )

    assert second["resumed_from_epoch"] == 1
    assert [line.split(" [")[0] for line in _epoch_lines(caplog)] == ["epoch 2/2"]  # epoch 1 not redone
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    history = pd.read_csv(tmp_path / "try2" / "train" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert history.iloc[0]["loss"] == pytest.approx(history_before.iloc[0]["loss"])  # carried over
    assert second["epochs"] == {"scratch": 2}

    # checkpoints of a different setup are not resumed: a new learning rate starts afresh
    caplog.clear()
    third = train_model(
        stores["train"],
        stores["val"],
        tmp_path / "try3" / "train",
        _params(epochs_finetune=1, learning_rate_finetune=3e-4),
        settings,
        checkpoint_dir=checkpoints,
        **FAST,
    )
    assert third["resumed_from_epoch"] == 0
    assert any("learning_rate_finetune" in r.getMessage() and "afresh" in r.getMessage() for r in caplog.records)
    assert list(pd.read_csv(tmp_path / "try3" / "train" / "history.csv")["epoch"]) == [1]


def test_weight_averaging_validates_and_keeps_the_averaged_weights(stores, tmp_path, settings):
    from wbc_tasks.training.checkpoints import validated_weights
    from wbc_tasks.training.input import make_dataset

    # float32: the kept model is evaluated again below and must match its validation exactly.
    params = _params(weight_averaging="ema", epochs_finetune=3, early_stopping_patience=3, precision="float32")
    summary = train_model(
        stores["train"], stores["val"], tmp_path / "train", params, settings, checkpoint_dir=tmp_path / "ckpt", **FAST
    )

    kept = keras.models.load_model(tmp_path / "train" / "model.keras")
    val = make_dataset(open_store(stores["val"]), 8, len(CLASS_NAMES), shuffle=False, seed=1)
    # What was validated is what is kept: the best epoch's recorded val_loss is the kept model's.
    assert kept.evaluate(val, verbose=0, return_dict=True)["loss"] == pytest.approx(summary["best_value"], rel=1e-4)
    # ... and it is the average, not the weights the optimizer last stepped to (the checkpoint's).
    state = json.loads((tmp_path / "ckpt" / CHECKPOINT_STATE_FILE).read_text())
    last = keras.models.load_model(tmp_path / "ckpt" / state["model_file"])
    assert any(not np.allclose(a, b) for a, b in zip(kept.get_weights(), last.get_weights()))
    # The average survives the checkpoint a retry resumes from: loaded back, it is what the last
    # epoch validated.
    last.set_weights(validated_weights(last))
    last_val_loss = pd.read_csv(tmp_path / "train" / "history.csv")["val_loss"].iloc[-1]
    assert last.evaluate(val, verbose=0, return_dict=True)["loss"] == pytest.approx(last_val_loss, rel=1e-4)


def test_pretrained_weights_train_head_then_top_conv_layers(stores, tmp_path, settings):
    keras.utils.set_random_seed(11)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights_file = tmp_path / "vgg16.weights.h5"
    source.save_weights(weights_file)
    before = {layer.name: layer.get_weights()[0] for layer in source.layers if layer.get_weights()}
    settings = settings.with_overrides(vgg16_weights_path=weights_file)
    params = _params(
        weights="imagenet",
        epochs_head=1,
        epochs_finetune=1,
        unfreeze_layers=2,
        learning_rate_head=1e-3,
        learning_rate_finetune=1e-4,
    )

    summary = train_model(
        stores["train"], stores["val"], tmp_path / "train", params, settings, checkpoint_dir=tmp_path / "ckpt", **FAST
    )

    history = pd.read_csv(tmp_path / "train" / "history.csv")
    assert list(history["phase"]) == ["head", "finetune"]
    assert history["learning_rate"].tolist() == pytest.approx([1e-3, 1e-4])
    assert summary["epochs"] == {"head": 1, "finetune": 1}
    base = keras.models.load_model(tmp_path / "train" / "model.keras").get_layer("vgg16")
    after = {layer.name: layer.get_weights()[0] for layer in base.layers if layer.get_weights()}
    frozen = [name for name in before if name not in ("block5_conv2", "block5_conv3")]
    for name in frozen:  # never unfrozen: still exactly the pretrained weights
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.array_equal(after["block5_conv3"], before["block5_conv3"])  # fine-tuned


def test_missing_pretrained_weights_fail_before_training(stores, tmp_path, settings):
    from wbc_tasks.training.model import MissingWeightsError

    settings = settings.with_overrides(keras_home=tmp_path / "empty-keras-home", vgg16_weights_path=None)
    with pytest.raises(MissingWeightsError, match="weights=none"):
        train_model(
            stores["train"],
            stores["val"],
            tmp_path / "train",
            _params(weights="imagenet"),
            settings,
            checkpoint_dir=tmp_path / "ckpt",
        )
    assert not (tmp_path / "train" / "model.keras").exists()
    assert not list((tmp_path / "ckpt").iterdir())


def test_empty_validation_store_monitors_training_loss(stores, tmp_path, settings, caplog):
    empty = tmp_path / "empty-val"
    images = create_store(empty, 0, SIZE)
    finish_store(empty, images, np.zeros(0, dtype=np.int16), pd.DataFrame(columns=["path", "class", "sha256"]))
    caplog.set_level(logging.INFO, logger="wbc_tasks.training")

    summary = train_model(
        stores["train"],
        empty,
        tmp_path / "train",
        _params(epochs_finetune=1, early_stopping_patience=2),
        settings,
        checkpoint_dir=tmp_path / "ckpt",
        **FAST,
    )

    assert summary["monitor"] == "loss"
    assert any("empty" in r.getMessage() and "training loss" in r.getMessage() for r in caplog.records)
    assert pd.read_csv(tmp_path / "train" / "history.csv")["val_loss"].isna().all()


def test_image_size_mismatch_is_refused(stores, tmp_path, settings):
    with pytest.raises(ValueError, match="32 px"):
        train_model(stores["train"], stores["val"], tmp_path / "t", _params(image_size=64), settings)


@pytest.mark.slow  # a second process imports TensorFlow and trains
def test_train_task_killed_after_an_epoch_resumes_from_its_checkpoint(stores, tmp_path, settings, monkeypatch, caplog):
    """The worker running the train task is SIGKILLed once an epoch is checkpointed; the retried
    task (same run, same params) resumes after that epoch and ends with each epoch once, in its
    history and in MLflow."""
    import shutil

    import mlflow

    from wbc_tasks.core.settings import COMPLETE_MARKER, get_settings
    from wbc_tasks.core.workdir import mark_complete
    from wbc_tasks.pipelines import training as steps
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import find_tracking_run

    run_id = "manual__killed-worker"
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WBC_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    run = get_settings().run_dir(run_id)
    shutil.copytree(stores["train"], run / "balance")  # the upstream steps' outputs
    shutil.copytree(stores["val"], run / "preprocess" / "val")
    mark_complete(run / "balance", {"counts": {}})
    params = {
        "image_size": SIZE,
        "weights": "none",
        "epochs_head": 0,
        "epochs_finetune": 5,
        "batch_size": 8,
        "learning_rate_finetune": 1e-4,
        "learning_rate_schedule": "cosine",
        "early_stopping_patience": 0,
        "seed": 1,
    }
    state_file = run / "train_checkpoints" / CHECKPOINT_STATE_FILE

    done_before = kill_train_step_after_an_epoch(run_id, params, state_file, tmp_path / "worker.log")
    assert 1 <= done_before < 5
    assert not (run / "train" / COMPLETE_MARKER).exists()

    caplog.set_level(logging.INFO, logger="wbc_tasks.training")
    summary = steps.train_step(run_id, params)  # Airflow's retry of the task

    assert summary["resumed_from_epoch"] == done_before, "the retry did not resume from the checkpoint"
    epochs_run = [int(line.split("/")[0].removeprefix("epoch ")) for line in _epoch_lines(caplog)]
    assert epochs_run == list(range(done_before + 1, 6)), "the retry redid finished epochs"
    history = pd.read_csv(run / "train" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    # The cosine schedule continues across the kill: after epoch e of 5 the rate is
    # 1e-4 * (1 + cos(pi e / 5)) / 2, ending at 0.
    want = [1e-4 * (1 + np.cos(np.pi * e / 5)) / 2 for e in range(1, 6)]
    np.testing.assert_allclose(history["learning_rate"], want, atol=1e-9)
    assert summary["epochs"] == {"scratch": 5} and (run / "train" / "model.keras").is_file()
    assert (run / "train" / COMPLETE_MARKER).is_file()

    settings_now = get_settings()
    steps_logged = [
        m.step
        for m in configure_mlflow(settings_now).get_metric_history(find_tracking_run(settings_now, run_id), "val_loss")
    ]
    mlflow.set_tracking_uri(None)
    assert len(steps_logged) == len(set(steps_logged)), f"epochs logged twice: {sorted(steps_logged)}"
    assert set(range(done_before + 1, 6)) <= set(steps_logged) <= set(range(1, 6))
