"""Precision and XLA: the choice per hardware and param, and a bfloat16 training that
checkpoints, resumes and saves a float32 model predicting like the bfloat16 one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.demo_stores import build_demo_stores, tiny_training_params
from wbc_tasks.data.store import open_store
from wbc_tasks.training.checkpoints import CHECKPOINT_STATE_FILE
from wbc_tasks.training.params import ParamError, training_params
from wbc_tasks.training.precision import choose_precision
from wbc_tasks.training.train import train_model

SIZE = 32


@pytest.mark.parametrize(
    "precision, xla, gpu, native_bfloat16, policy, use_xla",
    [
        ("auto", "auto", True, True, "mixed_float16", True),
        ("auto", "auto", False, False, "float32", False),
        ("auto", "auto", False, True, "mixed_bfloat16", False),
        ("auto", "off", True, False, "mixed_float16", False),
        ("mixed_bfloat16", "auto", False, False, "mixed_bfloat16", False),
        ("float32", "on", False, True, "float32", True),
    ],
)
def test_the_choice_follows_the_params_and_the_hardware(
    precision, xla, gpu, native_bfloat16, policy, use_xla, monkeypatch
):
    import wbc_tasks.training.precision as module

    monkeypatch.setattr(module, "cpu_has_bfloat16", lambda: native_bfloat16)
    choice = choose_precision(precision, xla, gpu=gpu)
    assert (choice.policy, choice.xla) == (policy, use_xla)
    assert choice.reason.startswith("auto:") == (precision == "auto")


@pytest.mark.parametrize("native_bfloat16", [True, False])
def test_a_precision_this_machine_only_emulates_is_warned_about(native_bfloat16, monkeypatch):
    import wbc_tasks.training.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: native_bfloat16)
    bfloat16 = choose_precision("mixed_bfloat16", gpu=False)
    assert bfloat16.policy == "mixed_bfloat16"  # still what was asked for
    assert ("emulated" in bfloat16.warning) == (not native_bfloat16)
    assert "emulated" in choose_precision("mixed_float16", gpu=False).warning
    assert choose_precision("mixed_float16", gpu=True).warning == ""
    assert choose_precision("float32", gpu=False).warning == ""
    assert choose_precision("auto", gpu=False).warning == ""


def test_an_unknown_precision_is_refused_with_the_param_named():
    with pytest.raises(ParamError, match="param precision"):
        training_params({"precision": "float8"})


def _params(**overrides):
    return tiny_training_params(SIZE, **overrides)


@pytest.mark.slow  # three short trainings of VGG16 at 32 px
def test_bfloat16_training_resumes_and_saves_a_float32_model_that_predicts_alike(tmp_path, settings, caplog):
    import keras

    caplog.set_level(logging.INFO, logger="wbc_tasks.training")
    stores = build_demo_stores(tmp_path / "stores", splits={"train": 2, "val": 2}, size=SIZE, render_size=48)
    ckpt = tmp_path / "ckpt"
    kwargs = {"checkpoint_dir": ckpt, "dense_units": 16}

    first = train_model(
        stores["train"], stores["val"], tmp_path / "a", _params(precision="mixed_bfloat16"), settings, **kwargs
    )
    assert first["precision"] == "mixed_bfloat16" and first["epochs_total"] == 2
    # A retry asking for one more epoch resumes after the two done, in bfloat16.
    resumed = train_model(
        stores["train"],
        stores["val"],
        tmp_path / "b",
        _params(precision="mixed_bfloat16", epochs_finetune=3),
        settings,
        **kwargs,
    )
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_total"] == 3

    saved = keras.models.load_model(tmp_path / "b" / "model.keras")
    every_layer = [*saved.layers, *saved.get_layer("vgg16").layers]
    assert {layer.dtype_policy.name for layer in every_layer} == {"float32"}, "the saved model is float32"
    state = json.loads((ckpt / CHECKPOINT_STATE_FILE).read_text())
    trained = keras.models.load_model(ckpt / state["model_file"])  # the last epoch, as trained
    assert trained.get_layer("vgg16").get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"

    images = np.asarray(open_store(stores["val"]).images)
    as_trained = trained.predict(images, verbose=0).astype(np.float32)
    as_saved = saved.predict(images, verbose=0)
    assert (as_trained.argmax(1) == as_saved.argmax(1)).mean() >= 0.99
    # bfloat16 keeps 8 significant bits; through VGG16's 13 convolutions the probabilities of
    # this barely trained net differ by up to ~0.07 (measured): the top class stays the same.
    np.testing.assert_allclose(as_saved, as_trained, atol=0.1)

    # The same folder retried in float32: the bfloat16 checkpoints are not resumed.
    caplog.clear()
    again = train_model(
        stores["train"], stores["val"], tmp_path / "c", _params(precision="float32"), settings, **kwargs
    )
    assert again["resumed_from_epoch"] == 0 and again["precision"] == "float32"
    assert any("different setup" in r.getMessage() and "policy" in r.getMessage() for r in caplog.records)
