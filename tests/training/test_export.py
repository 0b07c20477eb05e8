"""The CPU inference engine: exported from a trained, calibrated model, checked against Keras,
accepted or refused with its reason; an accepted one predicts what Keras predicts, from its
float32 weights."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.demo_stores import train_and_calibrate
from wbc_tasks.data.image_checks import check_image
from wbc_tasks.data.store import open_store
from wbc_tasks.training.export import (
    ENGINE_INFO_FILE,
    ENGINE_MODEL_FILE,
    OpenVinoEngine,
    engine_precisions,
    export_engine,
    load_engine,
)
from wbc_tasks.training.outputs import outputs_model, predict_all
from wbc_tasks.training.trust_policy import assess, load_trust

pytestmark = pytest.mark.slow  # trains and calibrates a 32 px VGG16


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny model trained on demo images and calibrated, with a test split to check on."""
    stores, _, summary = train_and_calibrate(
        tmp_path_factory.mktemp("export"), splits={"train": 6, "val": 6, "test": 6}, epochs=3
    )
    return stores, summary


def test_an_engine_that_predicts_like_keras_is_accepted_with_float32_weights(calibrated, tmp_path, settings):
    import keras

    stores, summary = calibrated
    trust_dir = summary["trust_dir"]
    info = export_engine(
        summary["model_path"], stores["test"], tmp_path / "engine", trust_dir=trust_dir, settings=settings, batch_size=8
    )
    assert info["accepted"], info
    assert info == json.loads((tmp_path / "engine" / ENGINE_INFO_FILE).read_text())
    assert info["precision"] in engine_precisions() and info["check_images"] == len(open_store(stores["test"]))
    # Precisions are tried fastest first; each check is recorded, the accepted one last.
    assert [c["precision"] for c in info["checks"]] == list(engine_precisions()[: len(info["checks"])])
    assert info["checks"][-1]["accepted"] and not any(c["accepted"] for c in info["checks"][:-1])

    model = keras.models.load_model(summary["model_path"])
    weights = sum(int(np.prod(w.shape)) for w in model.weights)
    # float32 weights on disk (OpenVINO's default would have halved them to float16).
    assert (tmp_path / "engine" / "model.bin").stat().st_size >= 4 * weights * 0.99

    engine = load_engine(tmp_path / "engine")
    assert isinstance(engine, OpenVinoEngine) and engine.precision == info["precision"]
    images = np.asarray(open_store(stores["test"]).images)
    expected = predict_all(outputs_model(model), images, 8)
    got = predict_all(engine, images, 8)
    assert set(got) == set(expected) and all(got[k].shape == expected[k].shape for k in expected)
    policy, stats = load_trust(trust_dir)
    checks = [check_image(i, settings) for i in images]
    ours, theirs = (assess(o, checks, policy, stats, settings) for o in (expected, got))
    assert (ours.probabilities.argmax(1) == theirs.probabilities.argmax(1)).mean() >= settings.engine_min_agreement
    assert np.abs(ours.probabilities - theirs.probabilities).max() <= settings.engine_max_probability_difference
    assert np.mean([set(a) == set(b) for a, b in zip(ours.reasons, theirs.reasons, strict=True)]) >= 0.995
    # The recorded check is what comparing again gives.
    accepted = info["checks"][-1]
    assert accepted["max_probability_difference"] == pytest.approx(
        np.abs(ours.probabilities - theirs.probabilities).max(), abs=1e-6
    )


def test_an_engine_that_disagrees_is_refused_and_keras_is_used(calibrated, tmp_path, settings, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="wbc_tasks.training.export")
    stores, summary = calibrated
    predict = OpenVinoEngine.predict_on_batch

    def misbehaving(self, batch):
        # An engine whose logits come out shifted (a precision or conversion gone wrong).
        probabilities, logits, top, low = predict(self, batch)
        logits = logits + np.linspace(0, 3, logits.shape[1], dtype=np.float32)
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        return [shifted / shifted.sum(1, keepdims=True), logits, top, low]

    monkeypatch.setattr(OpenVinoEngine, "predict_on_batch", misbehaving)
    info = export_engine(
        summary["model_path"],
        stores["test"],
        tmp_path / "engine",
        trust_dir=summary["trust_dir"],
        settings=settings,
        batch_size=8,
    )
    assert not info["accepted"] and info["precision"] is None
    assert [c["precision"] for c in info["checks"]] == list(engine_precisions()), "every precision was tried"
    for precision in engine_precisions():
        assert f"{precision}: " in info["reason"] and "a probability differs by" in info["reason"]
    assert not (tmp_path / "engine" / ENGINE_MODEL_FILE).exists(), "a refused engine leaves no model files"
    assert not (tmp_path / "engine" / "model.bin").exists()
    assert load_engine(tmp_path / "engine") is None
    assert any("refused at registration" in r.getMessage() for r in caplog.records)


def test_a_broken_engine_file_falls_back_to_keras_loudly(calibrated, tmp_path, settings, caplog):
    stores, summary = calibrated
    info = export_engine(
        summary["model_path"],
        stores["test"],
        tmp_path / "engine",
        trust_dir=summary["trust_dir"],
        settings=settings,
        batch_size=8,
        precisions=("f32",),
    )
    assert info["accepted"]
    (tmp_path / "engine" / "model.bin").write_bytes(b"truncated")
    assert load_engine(tmp_path / "engine") is None
    assert any("cannot be loaded" in r.getMessage() and "using Keras" in r.getMessage() for r in caplog.records)
