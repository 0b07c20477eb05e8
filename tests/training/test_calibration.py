"""Temperature scaling: fitted, measured, folded into the model's last Dense layer."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_tasks.training.calibration import (
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    negative_log_likelihood,
    softmax,
)


def _overconfident(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): a model over-confident by true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, 9))
    p = softmax(logits, true_t)
    y = np.array([rng.choice(9, p=row) for row in p])
    return logits, y


def test_temperature_recovers_the_overconfidence_and_lowers_ece_and_nll():
    logits, y = _overconfident(4000, true_t=2.5)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.1)
    before, after = calibration_metrics(softmax(logits), y), calibration_metrics(softmax(logits, t), y)
    assert after["ece"] < before["ece"] / 2
    assert after["nll"] < before["nll"]
    assert after["brier"] < before["brier"]
    # Calibration never changes the top class.
    assert (softmax(logits).argmax(1) == softmax(logits, t).argmax(1)).all()


def test_ece_nll_brier_on_hand_computed_cases():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # Bin (0.8667, 0.9333]: conf 0.9, acc 0.5; bin (0.5333, 0.6]: conf 0.6, acc 1.0.
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert negative_log_likelihood(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.6, 0.6])))
    assert brier_score(p, y) == pytest.approx(np.mean([0.02, 1.62, 0.32, 0.32]))


def test_folding_the_temperature_calibrates_the_saved_model_with_stock_layers(tmp_path):
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.training.model import build_model
    from wbc_tasks.training.outputs import outputs_model

    model = build_model(32, 9, weights="none", settings=get_settings())
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    _, logits, _, _ = outputs_model(model).predict(images, verbose=0)
    fold_temperature(model, 3.0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert {type(layer).__module__.split(".")[0] for layer in reloaded.layers} == {"keras"}
    # Compared as logits: an untrained net on raw pixels has logits near 100, its softmax is
    # saturated, and probabilities would hide a temperature (and show float32 rounding instead).
    probabilities, folded, _, _ = outputs_model(reloaded).predict(images, verbose=0)
    np.testing.assert_allclose(folded, logits / 3.0, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probabilities, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(folded), atol=1e-5)


def test_temperature_is_kept_only_when_it_beats_its_noise():
    from wbc_tasks.training.calibration import fit_temperature, temperature_worth_keeping

    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 300)
    honest = rng.normal(size=(300, 4))
    honest[np.arange(300), y] += 1.5
    # Labels drawn from the model's own probabilities: calibrated as it stands.
    p = np.exp(honest) / np.exp(honest).sum(axis=1, keepdims=True)
    y_honest = np.array([rng.choice(4, p=row) for row in p])
    t_honest = fit_temperature(honest, y_honest)
    verdict = temperature_worth_keeping(honest, y_honest, t_honest)
    assert not verdict["keep"] and verdict["nll_gain"] >= 0
    # The same logits made three times over-confident: T ~ 3 is far beyond noise.
    t_sharp = fit_temperature(3 * honest, y_honest)
    sharp = temperature_worth_keeping(3 * honest, y_honest, t_sharp)
    assert sharp["keep"] and t_sharp == pytest.approx(3, rel=0.25)
    assert sharp["nll_gain"] > 2 * sharp["nll_gain_standard_error"]
