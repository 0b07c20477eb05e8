"""The candidate and the champion compared image by image on the same images (issue 30): on the
labelled test split and on the lab's reviewed test images. Pure: per-image labels in, figures out.

- Better on the reviewed images: the exact McNemar test (two-sided binomial test on the images
  exactly one of the two gets right; scipy's ``binomtest``), at ``alpha``.
- Not worse on the labelled test split: the paired bootstrap interval (images resampled, both
  models' answers kept together) of the difference in balanced accuracy; its lower end must not
  fall below minus the non-inferiority margin. A point estimate would refuse a better model on a
  0.7-point difference that is noise on 544 images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Paired bootstrap resamples and the interval's level (one-sided 95 %: the 5th percentile).
BOOTSTRAP_DRAWS = 2000
INTERVAL_LEVEL = 0.90


@dataclass(frozen=True)
class PairedGroup:
    """Two models' answers on one group of images, and what a paired comparison says of them."""

    name: str
    images: int
    candidate_accuracy: float
    champion_accuracy: float
    candidate_balanced_accuracy: float
    champion_balanced_accuracy: float
    #: Images only the candidate / only the champion gets right (McNemar's discordant pairs).
    candidate_only: int
    champion_only: int
    mcnemar_p: float
    #: Interval of candidate minus champion balanced accuracy (paired bootstrap, INTERVAL_LEVEL).
    difference_low: float
    difference_high: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def exact_mcnemar(candidate_only: int, champion_only: int) -> float:
    """Two-sided p-value of the exact McNemar test (1.0 when no image tells them apart)."""
    from scipy.stats import binomtest

    discordant = candidate_only + champion_only
    if discordant == 0:
        return 1.0
    return float(binomtest(candidate_only, discordant, 0.5, alternative="two-sided").pvalue)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition)."""
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes])) if len(classes) else float("nan")


def _bootstrap_difference(
    y_true: np.ndarray, candidate: np.ndarray, champion: np.ndarray, seed: int
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(y_true)
    differences = np.empty(BOOTSTRAP_DRAWS)
    for i in range(BOOTSTRAP_DRAWS):
        pick = rng.integers(0, n, n)
        truth = y_true[pick]
        differences[i] = balanced_accuracy(truth, candidate[pick]) - balanced_accuracy(truth, champion[pick])
    tail = (1 - INTERVAL_LEVEL) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return float(low), float(high)


def compare_paired(
    name: str, y_true: list[str], candidate: list[str], champion: list[str], *, seed: int = 0
) -> PairedGroup:
    """The two models' answers (class names, in the same image order) on one group of images."""
    if not (len(y_true) == len(candidate) == len(champion)) or not y_true:
        raise ValueError(f"{name}: {len(y_true)} labels, {len(candidate)} and {len(champion)} answers")
    names = sorted(set(y_true) | set(candidate) | set(champion))
    index = {n: i for i, n in enumerate(names)}
    truth = np.array([index[c] for c in y_true])
    ours = np.array([index[c] for c in candidate])
    theirs = np.array([index[c] for c in champion])
    right, right_before = ours == truth, theirs == truth
    low, high = _bootstrap_difference(truth, ours, theirs, seed)
    candidate_only, champion_only = int(np.sum(right & ~right_before)), int(np.sum(~right & right_before))
    return PairedGroup(
        name=name,
        images=len(truth),
        candidate_accuracy=float(right.mean()),
        champion_accuracy=float(right_before.mean()),
        candidate_balanced_accuracy=balanced_accuracy(truth, ours),
        champion_balanced_accuracy=balanced_accuracy(truth, theirs),
        candidate_only=candidate_only,
        champion_only=champion_only,
        mcnemar_p=exact_mcnemar(candidate_only, champion_only),
        difference_low=low,
        difference_high=high,
    )
