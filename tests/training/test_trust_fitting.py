"""The whole trust fit on a trained model: the calibrated model and its policy are saved and agree."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_tasks.training import unfamiliar as uf
from wbc_tasks.training.trust_policy import load_trust


def test_calibrated_model_and_policy_are_saved_and_agree(fitted_trust, settings):
    import keras

    from wbc_tasks.training.calibration import softmax
    from wbc_tasks.training.outputs import outputs_model, predict_all

    root, trained, summary = fitted_trust
    policy, stats = load_trust(root / "calibrate" / "trust")
    assert policy is not None and stats is not None
    assert policy.temperature == pytest.approx(summary["temperature"])
    assert policy.unfamiliar_method in uf.METHODS
    assert 0 <= policy.review_threshold <= 1 and 0 <= policy.blast_flag_probability <= 1
    assert set(policy.drift) >= {"max_class_mix_divergence", "min_mean_confidence", "max_unfamiliar_share"}
    for name in ("reliability_validation.png", "risk_coverage_validation.png", "feature_stats.npz"):
        assert (root / "calibrate" / "trust" / name).stat().st_size > 0
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    raw = predict_all(outputs_model(keras.models.load_model(trained["model_path"])), images, 8)
    folded = predict_all(outputs_model(keras.models.load_model(summary["model_path"])), images, 8)
    np.testing.assert_allclose(folded["probabilities"], softmax(raw["logits"], policy.temperature), atol=1e-5)
