"""The unfamiliar score: how far an image lies from what the model was trained on, from the
model's own features, with the method chosen by measurement for each model version.

Candidates (higher = less familiar):

- ``mahalanobis``: the smallest Mahalanobis distance² from the pooled top features
  (``head_pool``) to a training class mean, with one shared covariance (Ledoit-Wolf shrinkage,
  scikit-learn: 512 dimensions from a few thousand images need it);
- ``mahalanobis_low``: the same on mid-level features (VGG16's ``block3_pool``, averaged over
  the image): stain and scanner shifts change colour and texture statistics there first;
- ``energy``: minus the log-sum-exp of the calibrated logits (low when some class fits well);
- ``combined``: the mean of the three, each standardised on the validation images;
- ``cell_free``: how much nearer the top features lie to the mean of cell-free crops of
  *training* images (recipe A) than to the nearest class mean: the distance scores above ask
  "how far from a white cell?", which a crop of red cells and background can pass when it sits
  between the classes; this one asks "nearer to no white cell than to any?";
- ``any_of``: the largest of the standardised ``mahalanobis``, ``mahalanobis_low`` and
  ``cell_free``: an image one of them finds unfamiliar is flagged (a stain shift moves
  everything; a crop without the cell moves towards the cell-free mean).

Each is standardised by the validation images' median and its distance to their 95th
percentile, so scores of different methods and versions read alike: 0 is a typical familiar
image, 1 the rarest twentieth of them. Scaling by the tail, not the spread, is what lets
``any_of`` take a maximum: the distance scores have far longer tails than ``cell_free``, and
with equal spreads their tails alone decided the maximum (measured: 0.4 % of recipe-B mosaics
flagged against 100 % by ``cell_free`` alone). The method kept is
the one separating validation images best (AUROC) from synthetic negatives made from training
data only (corner crops without the white cell, strong colour shifts: see
:mod:`wbc_tasks.data.image_checks`); the threshold is the validation quantile that flags the
training param ``unfamiliar_rate`` of familiar images. Another lab's images are measured, never
used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("mahalanobis", "mahalanobis_low", "energy", "combined", "cell_free", "any_of")
#: The raw scores ``combined`` averages (fixed: versions fitted before ``cell_free`` read alike).
COMBINED = ("mahalanobis", "mahalanobis_low", "energy")
#: The standardised scores ``any_of`` takes the largest of.
ANY_OF = ("mahalanobis", "mahalanobis_low", "cell_free")
#: The validation percentile a standardised score reads 1 at.
TAIL_PERCENTILE = 95
#: Mid-level VGG16 layer whose averaged output feeds ``mahalanobis_low``.
LOW_LAYER = "block3_pool"


@dataclass
class FeatureStatistics:
    """Class means and shared precision matrices of the top and mid-level features, and the
    mean top features of cell-free crops (None in versions fitted before ``cell_free``)."""

    means_top: np.ndarray
    precision_top: np.ndarray
    means_low: np.ndarray
    precision_low: np.ndarray
    cell_free_top: np.ndarray | None = None

    def save(self, path: Path) -> None:
        arrays = {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureStatistics:
        with np.load(path) as data:
            return cls(**{k: np.asarray(data[k]) for k in cls.__dataclass_fields__ if k in data.files})


@dataclass
class Standardiser:
    """Centre (validation median) and scale (median to 95th percentile) of each raw score."""

    centre: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)

    def apply(self, name: str, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.centre[name]) / self.scale[name]


def _class_stats(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    means = np.zeros((n_classes, features.shape[1]))
    centred = np.empty_like(features)
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            means[c] = features[mask].mean(axis=0)
            centred[mask] = features[mask] - means[c]
    present = np.isin(np.arange(n_classes), labels)
    # A class with no training image gets an unreachable mean (it can never be the nearest).
    means[~present] = np.inf
    return means, LedoitWolf(assume_centered=True).fit(centred).precision_


#: Reviewed training images of a class needed before they get a mean of their own.
MIN_REVIEWED_PER_MEAN = 5


def _reviewed_means(features: np.ndarray, labels: np.ndarray, reviewed: np.ndarray, n_classes: int) -> np.ndarray:
    """One mean per class with at least :data:`MIN_REVIEWED_PER_MEAN` reviewed rows."""
    features = np.asarray(features, dtype=np.float64)
    rows = [
        features[reviewed & (labels == c)].mean(axis=0)
        for c in range(n_classes)
        if (reviewed & (labels == c)).sum() >= MIN_REVIEWED_PER_MEAN
    ]
    return np.asarray(rows).reshape(len(rows), features.shape[1])


def fit_feature_statistics(
    top: np.ndarray,
    low: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    cell_free_top: np.ndarray | None = None,
    reviewed: np.ndarray | None = None,
) -> FeatureStatistics:
    """Class means and shared (shrunk) precision of training features by true class, and the
    mean of ``cell_free_top`` (top features of cell-free crops of training images) when given.

    With ``reviewed`` (a mask of the rows that are a lab's reviewed images), each class with enough
    of them gets a second mean of those alone: a few dozen of a new lab's cells barely move a
    class mean of hundreds, so without it the lab's cells the model has learned would stay far
    from every mean (``unfamiliar``), while cells of labs nobody reviewed stay as far as before.
    The scores take the nearest mean of any row, so the extra rows need no other change.
    """
    labels = np.asarray(labels)
    means_top, precision_top = _class_stats(top, labels, n_classes)
    means_low, precision_low = _class_stats(low, labels, n_classes)
    if reviewed is not None and np.asarray(reviewed).any():
        mask = np.asarray(reviewed, dtype=bool)
        means_top = np.vstack([means_top, _reviewed_means(top, labels, mask, n_classes)])
        means_low = np.vstack([means_low, _reviewed_means(low, labels, mask, n_classes)])
    free = None
    if cell_free_top is not None and len(cell_free_top):
        free = np.asarray(cell_free_top, dtype=np.float64).mean(axis=0)
    return FeatureStatistics(means_top, precision_top, means_low, precision_low, free)


def min_mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Smallest squared Mahalanobis distance of each row of ``features`` to a class mean."""
    f = np.asarray(features, dtype=np.float64)
    finite = np.isfinite(means).all(axis=1)
    m = means[finite]
    fp = f @ precision
    d = (fp * f).sum(axis=1)[:, None] - 2 * fp @ m.T + ((m @ precision) * m).sum(axis=1)[None, :]
    return np.maximum(d.min(axis=1), 0.0)


def energy(logits: np.ndarray) -> np.ndarray:
    """Minus the log-sum-exp of (calibrated) logits."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def raw_scores(outputs: dict[str, np.ndarray], stats: FeatureStatistics) -> dict[str, np.ndarray]:
    """The raw candidate scores from a batch's (calibrated) logits and features (``cell_free``
    only when the statistics hold the cell-free mean)."""
    nearest_class = min_mahalanobis(outputs["top"], stats.means_top, stats.precision_top)
    raw = {
        "mahalanobis": nearest_class,
        "mahalanobis_low": min_mahalanobis(outputs["low"], stats.means_low, stats.precision_low),
        "energy": energy(outputs["logits"]),
    }
    if stats.cell_free_top is not None:
        to_free = min_mahalanobis(outputs["top"], stats.cell_free_top[None, :], stats.precision_top)
        raw["cell_free"] = nearest_class - to_free
    return raw


def scores(outputs: dict[str, np.ndarray], stats: FeatureStatistics, standard: Standardiser) -> dict[str, np.ndarray]:
    """Every candidate's standardised score (``combined`` and, with ``cell_free``, ``any_of``)."""
    raw = raw_scores(outputs, stats)
    standardised = {name: standard.apply(name, value) for name, value in raw.items() if name in standard.centre}
    standardised["combined"] = np.mean([standardised[name] for name in COMBINED], axis=0)
    if "cell_free" in standardised:
        standardised["any_of"] = np.max([standardised[name] for name in ANY_OF], axis=0)
    return standardised


def fit_standardiser(val_raw: dict[str, np.ndarray]) -> Standardiser:
    """Centre each raw score on its validation median and scale it by the distance from there to
    the validation 95th percentile (the interquartile range, or 1, when that distance is 0)."""
    standard = Standardiser()
    for name, value in val_raw.items():
        q1, median, q3, tail = np.percentile(value, [25, 50, 75, TAIL_PERCENTILE])
        standard.centre[name] = float(median)
        standard.scale[name] = float(tail - median) or float(q3 - q1) or 1.0
    return standard


def auroc(familiar: np.ndarray, unfamiliar: np.ndarray) -> float:
    """Probability that an unfamiliar image scores above a familiar one (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(familiar)), np.ones(len(unfamiliar))]
    return float(roc_auc_score(y, np.r_[familiar, unfamiliar]))


def choose_method(
    val_scores: dict[str, np.ndarray], negative_scores: dict[str, dict[str, np.ndarray]]
) -> tuple[str, dict]:
    """The method with the best worst-case AUROC over the negative sets (ties: the simpler one,
    in ``METHODS`` order), and every method's AUROC per set."""
    methods = [m for m in METHODS if m in val_scores]
    table = {
        method: {kind: auroc(val_scores[method], scored[method]) for kind, scored in negative_scores.items()}
        for method in methods
    }
    best = max(methods, key=lambda m: (round(min(table[m].values()), 3), -METHODS.index(m)))
    log.info(
        "unfamiliar score: %s chosen; AUROC by method and negative set %s",
        best,
        {m: {k: round(v, 3) for k, v in t.items()} for m, t in table.items()},
    )
    return best, table


def threshold_for_rate(val_scores: np.ndarray, rate: float) -> float:
    """The score above which ``rate`` of the validation images lie."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), 1.0 - rate))


def to_json(standard: Standardiser) -> dict[str, Any]:
    return {"centre": standard.centre, "scale": standard.scale}


def standardiser_from_json(data: dict[str, Any]) -> Standardiser:
    return Standardiser(
        centre={k: float(v) for k, v in data["centre"].items()},
        scale={k: float(v) for k, v in data["scale"].items()},
    )
