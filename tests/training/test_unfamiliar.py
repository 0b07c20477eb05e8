"""The unfamiliar score: Mahalanobis distances, the cell-free score, and feature statistics of
versions fitted before it."""

from __future__ import annotations

import numpy as np

from wbc_tasks.training import unfamiliar as uf


def test_min_mahalanobis_matches_scipy():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    stats = uf.fit_feature_statistics(features, features[:, :3], labels, 4)  # class 3 has no images
    points = rng.normal(size=(7, 5))
    got = uf.min_mahalanobis(points, stats.means_top, stats.precision_top)
    want = [min(mahalanobis(x, stats.means_top[c], stats.precision_top) ** 2 for c in range(3)) for x in points]
    np.testing.assert_allclose(got, want, rtol=1e-8)


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


def test_a_labs_reviewed_cells_get_their_own_class_means_and_other_labs_stay_far(tmp_path):
    """Issue 30: a few reviewed cells of a new lab among many labelled ones. Their classes get a
    mean of their own, so that lab's cells come near one; a lab nobody reviewed stays as far as
    without reviews; a class with too few reviewed cells gets none; the statistics reload."""
    rng = np.random.default_rng(0)
    d, n_classes = 6, 3
    centres = np.eye(n_classes, d) * 4
    labelled = np.concatenate([centres[c] + rng.normal(size=(200, d)) for c in range(n_classes)])
    labels = np.repeat(np.arange(n_classes), 200)
    new_lab, other_lab = np.full(d, 12.0), np.full(d, -12.0)
    reviewed = np.concatenate([new_lab + centres[c] + rng.normal(size=(k, d)) for c, k in [(0, 8), (1, 8), (2, 3)]])
    top = np.concatenate([labelled, reviewed])
    all_labels = np.concatenate([labels, [0] * 8 + [1] * 8 + [2] * 3])
    mask = np.arange(len(top)) >= len(labelled)

    plain = uf.fit_feature_statistics(top, top, all_labels, n_classes)
    learned = uf.fit_feature_statistics(top, top, all_labels, n_classes, reviewed=mask)
    assert learned.means_top.shape == (n_classes + 2, d)  # classes 0 and 1; class 2 has 3 < 5
    assert uf.MIN_REVIEWED_PER_MEAN == 5

    new_cells = new_lab + centres[0] + rng.normal(size=(50, d))
    other_cells = other_lab + centres[0] + rng.normal(size=(50, d))

    def distance(stats, cells):
        return uf.min_mahalanobis(cells, stats.means_top, stats.precision_top)

    assert np.median(distance(learned, new_cells)) < np.median(distance(plain, new_cells)) / 5
    # ... as near as the training labs' own cells are to theirs.
    assert np.median(distance(learned, new_cells)) < 2 * np.median(distance(learned, labelled[:50]))
    np.testing.assert_allclose(distance(learned, other_cells), distance(plain, other_cells))
    familiar = labelled[:50]
    np.testing.assert_allclose(distance(learned, familiar), distance(plain, familiar))

    learned.save(tmp_path / "stats.npz")
    reloaded = uf.FeatureStatistics.load(tmp_path / "stats.npz")
    np.testing.assert_allclose(distance(reloaded, new_cells), distance(learned, new_cells))
