"""Where the review threshold and the blast flag probability are fitted: from the validation
split's calibrated confidences and right answers, the lowest confidence threshold meeting a
target accuracy (and the counting rule it replaced), the risk-coverage curve, and the blast
probability that meets a target blast recall."""

from __future__ import annotations

import numpy as np

#: Fewest validation images a review threshold is chosen over (fewer: nothing is trusted).
_MIN_COVERED = 20
#: A review threshold is refused when its validation images' right answers fall short of the
#: target accuracy by more than chance would at this one-sided level.
REVIEW_TARGET_SIGNIFICANCE = 0.05


def _cumulative(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidences from the highest down, the right answers among the first n, and n."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    return conf, np.cumsum(np.asarray(correct)[order]), np.arange(1, len(conf) + 1)


def _lowest_threshold(conf: np.ndarray, ok: np.ndarray) -> float:
    """The lowest of the descending ``conf`` where ``ok`` holds with at least 20 images kept
    (1.0, flag all, when there is none); cuts fall only between distinct confidences, so ties
    are all kept or all flagged."""
    ok = ok & (np.arange(1, len(conf) + 1) >= min(_MIN_COVERED, len(conf)))
    candidates = np.flatnonzero(ok & np.r_[conf[1:] < conf[:-1], True])
    return float(conf[candidates.max()]) if len(candidates) else 1.0


def review_threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest confidence threshold whose unflagged images (confidence >= it, at least 20 of
    them) are expected to be right at least ``target`` of the time; 1.0 (flag all) when none is.

    Expected by their calibrated confidences: a calibrated model is right as often as its mean
    confidence says, and a mean of ~300 confidences varies far less than a count of ~300 right
    answers (counting alone set one version's threshold at 0.83 where 0.77 served; see
    docs/trust.md). The count keeps a veto: a threshold is refused when its images' right answers
    fall short of ``target`` by more than chance would (one-sided binomial test at
    ``REVIEW_TARGET_SIGNIFICANCE``), so a model too sure of itself at the top cannot pass on its
    own word.
    """
    from scipy.stats import binom

    conf, hits, n = _cumulative(confidence, correct)
    plausible = binom.cdf(hits, n, target) >= REVIEW_TARGET_SIGNIFICANCE
    return _lowest_threshold(conf, (np.cumsum(conf) / n >= target) & plausible)


def review_threshold_by_count(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The rule :func:`review_threshold_for_accuracy` replaced, kept for the report: the lowest
    threshold whose unflagged validation images are right at least ``target`` of the time, counted."""
    conf, hits, n = _cumulative(confidence, correct)
    return _lowest_threshold(conf, hits / n >= target)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    """Coverage (share unflagged) and accuracy among the unflagged for every threshold."""
    conf, hits, n = _cumulative(confidence, correct)
    return {
        "threshold": conf.tolist(),
        "coverage": (n / len(conf)).tolist(),
        "accuracy": (hits / n).tolist(),
    }


def blast_probability_for_recall(
    p_blast: np.ndarray, predicted_blast: np.ndarray, is_blast: np.ndarray, target: float
) -> float:
    """The highest blast probability such that at least ``target`` of the true blasts are
    predicted blasts or have at least that probability (1.0 when there are no blasts)."""
    is_blast = np.asarray(is_blast, bool)
    if not is_blast.any():
        return 1.0
    missed = np.asarray(p_blast)[is_blast & ~np.asarray(predicted_blast, bool)]
    allowed_misses = int(np.floor((1 - target) * is_blast.sum()))
    if len(missed) <= allowed_misses:
        return 1.0
    # Flag the blasts the model missed, from the most likely down, until few enough remain.
    return float(np.sort(missed)[::-1][len(missed) - allowed_misses - 1])
