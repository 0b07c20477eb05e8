"""Applying a version's policy: every generated non-cell frame gets a review reason (the image
checks catch each kind, and no real cell), and a set threshold overrides the version's."""

from __future__ import annotations

import numpy as np

from tests.conftest import shared_set
from wbc_tasks.data.image_checks import check_image, generated_non_cells
from wbc_tasks.training.trust_policy import assess, load_trust


def test_image_checks_flag_every_generated_non_cell_frame_but_the_real_cells(settings):
    from wbc_tasks.data.images import load_image

    frames = generated_non_cells(64, 5)
    for kind in ("black", "white", "uniform", "noise"):
        assert all(check_image(f, settings) for f in frames[kind]), kind
    paths = sorted((shared_set("wbc-bench") / "WBC").glob("*/*"))[::20]
    assert len(paths) > 100
    cells = [load_image(p, 64, max_pixels=10**8) for p in paths]
    assert [check_image(c, settings) for c in cells].count(None) == len(cells)


def test_assess_gives_every_generated_non_cell_a_reason(fitted_trust, settings):
    import keras

    from wbc_tasks.training.outputs import outputs_model, predict_all

    root, _, summary = fitted_trust
    policy, stats = load_trust(root / "calibrate" / "trust")
    frames = generated_non_cells(32, 4)
    images = np.concatenate([frames[k] for k in ("black", "white", "uniform", "noise")])
    outputs = predict_all(outputs_model(keras.models.load_model(summary["model_path"])), images, 8)
    verdict = assess(outputs, [check_image(i, settings) for i in images], policy, stats, settings)
    assert all("image_check" in reasons for reasons in verdict.reasons)
    assert np.isfinite(verdict.unfamiliar_score).all()
    # A set threshold overrides the version's.
    forced = assess(outputs, [None] * len(images), policy, stats, settings.with_overrides(review_threshold=1.0))
    assert all("low_confidence" in reasons for reasons in forced.reasons)
