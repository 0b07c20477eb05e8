"""The trust policy: review threshold for a target accuracy, blast flag for a target recall,
the unfamiliar score, drift limits, and the whole fit on a trained model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import shared_set
from tests.demo_stores import train_and_calibrate
from wbc_tasks.data.image_checks import check_image, generated_non_cells
from wbc_tasks.training import unfamiliar as uf
from wbc_tasks.training.trust import (
    assess,
    blast_probability_for_recall,
    load_trust,
    review_threshold_by_count,
    review_threshold_for_accuracy,
)


def test_review_threshold_is_the_lowest_whose_calibrated_confidence_expects_the_target_accuracy():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence  # calibrated: right as often as it says
    t = review_threshold_for_accuracy(confidence, correct, 0.9)
    kept = confidence >= t
    assert confidence[kept].mean() >= 0.9
    # One step lower (the next confidence below t) would expect less than the target ...
    lower = confidence[confidence < t].max()
    assert confidence[confidence >= lower].mean() < 0.9
    # ... and the kept images are right about as often as the target (calibrated: by chance only).
    assert correct[kept].mean() == pytest.approx(0.9, abs=0.03)
    assert review_threshold_for_accuracy(confidence, np.zeros(2000, bool), 0.9) == 1.0


def test_review_threshold_refuses_confidence_the_right_answers_do_not_bear_out():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.9, 1.0, 300)  # sure of everything ...
    correct = rng.uniform(size=300) < 0.8  # ... and right 80 % of the time
    by_confidence_alone = (confidence >= np.quantile(confidence, 0.5)).mean()  # mean 0.975: would pass
    kept = (confidence >= review_threshold_for_accuracy(confidence, correct, 0.95)).mean()
    assert kept < 0.15 < by_confidence_alone  # counting vetoes all but a lucky top sliver
    # Right at the top only: the threshold moves up to where the count agrees.
    correct = confidence > 0.97
    t = review_threshold_for_accuracy(confidence, correct, 0.95)
    assert 0.965 < t < 1.0 and correct[confidence >= t].mean() >= 0.9


def test_review_threshold_by_count_is_the_lowest_that_reaches_the_target_accuracy():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence
    t = review_threshold_by_count(confidence, correct, 0.9)
    assert correct[confidence >= t].mean() >= 0.9
    assert correct[confidence >= confidence[confidence < t].max()].mean() < 0.9


def test_blast_flag_probability_reaches_the_recall_target_on_missed_blasts():
    is_blast = np.array([True] * 20 + [False] * 5)
    predicted_blast = np.array([True] * 10 + [False] * 10 + [False] * 5)
    p_blast = np.r_[np.full(10, 0.9), np.linspace(0.05, 0.5, 10), np.full(5, 0.01)]
    p = blast_probability_for_recall(p_blast, predicted_blast, is_blast, 0.95)
    caught = predicted_blast[is_blast] | (p_blast[is_blast] >= p)
    assert caught.mean() >= 0.95
    assert p == pytest.approx(p_blast[11])  # one blast (the least likely) may be missed: 19/20


def test_min_mahalanobis_matches_scipy():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    stats = uf.fit_feature_statistics(features, features[:, :3], labels, 4)  # class 3 has no images
    points = rng.normal(size=(7, 5))
    got = uf.min_mahalanobis(points, stats.means_top, stats.precision_top)
    want = [min(mahalanobis(x, stats.means_top[c], stats.precision_top) ** 2 for c in range(3)) for x in points]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_image_checks_flag_every_generated_non_cell_frame_but_the_real_cells(settings):
    from wbc_tasks.data.images import load_image

    frames = generated_non_cells(64, 5)
    for kind in ("black", "white", "uniform", "noise"):
        assert all(check_image(f, settings) for f in frames[kind]), kind
    paths = sorted((shared_set("wbc-bench") / "WBC").glob("*/*"))[::20]
    assert len(paths) > 100
    cells = [load_image(p, 64, max_pixels=10**8) for p in paths]
    assert [check_image(c, settings) for c in cells].count(None) == len(cells)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny model trained on demo images, then calibrated with its trust policy fitted."""
    root = tmp_path_factory.mktemp("trust")
    _, trained, summary = train_and_calibrate(root, splits={"train": 6, "val": 6})
    return root, trained, summary


def test_calibrated_model_and_policy_are_saved_and_agree(calibrated, settings):
    import keras

    from wbc_tasks.training.calibration import softmax
    from wbc_tasks.training.trust import outputs_model, predict_all

    root, trained, summary = calibrated
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


def test_assess_gives_every_generated_non_cell_a_reason(calibrated, settings):
    import keras

    from wbc_tasks.training.trust import outputs_model, predict_all

    root, _, summary = calibrated
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


def test_cell_free_score_is_high_nearer_the_cell_free_crops_than_any_class():
    rng = np.random.default_rng(2)
    centres = np.array([[4.0, 0, 0], [-4.0, 0, 0], [0, 4.0, 0]])
    free_centre = np.array([3.0, 0, 0])  # between the classes, nearest to class 0: a distance alone barely sees it
    labels = rng.integers(0, 3, 600)
    features = centres[labels] + rng.normal(scale=0.5, size=(600, 3))
    free = free_centre + rng.normal(scale=0.5, size=(200, 3))
    stats = uf.fit_feature_statistics(features, features, labels, 3, cell_free_top=free)
    np.testing.assert_allclose(stats.cell_free_top, free.mean(axis=0))
    cells = centres[rng.integers(0, 3, 50)] + rng.normal(scale=0.5, size=(50, 3))
    crops = free_centre + rng.normal(scale=0.5, size=(50, 3))
    outputs = {"logits": np.zeros((100, 3)), "top": np.r_[cells, crops], "low": np.r_[cells, crops]}
    raw = uf.raw_scores(outputs, stats)
    by_cell_free = uf.auroc(raw["cell_free"][:50], raw["cell_free"][50:])
    by_distance = uf.auroc(raw["mahalanobis"][:50], raw["mahalanobis"][50:])
    assert by_cell_free > 0.9 and by_cell_free > by_distance + 0.05, (by_cell_free, by_distance)
    standard = uf.fit_standardiser(uf.raw_scores({k: v[:50] for k, v in outputs.items()}, stats))
    scored = uf.scores(outputs, stats, standard)
    assert set(scored) == set(uf.METHODS)
    np.testing.assert_allclose(scored["any_of"], np.max([scored[m] for m in uf.ANY_OF], axis=0))


def test_feature_statistics_of_a_version_fitted_before_cell_free_still_load_and_score(tmp_path):
    rng = np.random.default_rng(4)
    features, labels = rng.normal(size=(90, 4)), rng.integers(0, 3, 90)
    old = uf.fit_feature_statistics(features, features, labels, 3)
    old.save(tmp_path / "old.npz")
    loaded = uf.FeatureStatistics.load(tmp_path / "old.npz")
    assert loaded.cell_free_top is None
    outputs = {"logits": rng.normal(size=(5, 3)), "top": features[:5], "low": features[:5]}
    # A standardiser from before cell_free knows only the first three scores.
    every = {"logits": rng.normal(size=(90, 3)), "top": features, "low": features}
    standard = uf.fit_standardiser(uf.raw_scores(every, loaded))
    assert set(standard.centre) == set(uf.COMBINED)
    assert set(uf.scores(outputs, loaded, standard)) == {*uf.COMBINED, "combined"}
    new = uf.fit_feature_statistics(features, features, labels, 3, cell_free_top=features[:10])
    new.save(tmp_path / "new.npz")
    reloaded = uf.FeatureStatistics.load(tmp_path / "new.npz")
    np.testing.assert_allclose(reloaded.cell_free_top, features[:10].mean(axis=0))
