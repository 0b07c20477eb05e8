"""Drift of a drop against the training labs: the class-mix measure (Jensen-Shannon divergence)
and quantile that serving checks drops with, and the limits each version carries, fitted on
simulated drops of validation images."""

from __future__ import annotations

import numpy as np

#: Drift limits are fitted on draws of this many validation images (a typical small drop).
DRIFT_DRAW_SIZE = 100
DRIFT_DRAWS = 2000
#: A drop of the training labs passes each drift limit this often (one false alert in about a
#: thousand nights per measure).
DRIFT_QUANTILE = 0.999


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, 0..1) between two class mixes."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p, q, base=2) ** 2)


def fit_drift_limits(
    labels: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    unfamiliar: np.ndarray,
    mix: np.ndarray,
    concentration: float,
    seed: int,
) -> dict[str, float]:
    """Limits a familiar drop stays within 999 times in 1000, from simulated drops of validation
    images. Each simulated drop is one specimen: its class mix is drawn from a Dirichlet around the
    training mix (``concentration``: specimens' differentials vary between patients), then its
    images from the validation images of each class; the drop is judged by the model's
    predictions on them, as a real drop is."""
    rng = np.random.default_rng(seed)
    n_classes = len(mix)
    size = min(DRIFT_DRAW_SIZE, len(predicted))
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    present = np.array([len(members) > 0 for members in by_class])
    alpha = concentration * np.where(present, mix, 0.0) + 1e-6 * present
    divergences, confidences, shares = [], [], []
    for _ in range(DRIFT_DRAWS):
        counts_true = rng.multinomial(size, rng.dirichlet(alpha[present]))
        pick = np.concatenate([rng.choice(by_class[c], n) for c, n in zip(np.flatnonzero(present), counts_true) if n])
        counts = np.bincount(predicted[pick], minlength=n_classes)
        divergences.append(jensen_shannon(counts / counts.sum(), mix))
        confidences.append(confidence[pick].mean())
        shares.append(unfamiliar[pick].mean())
    return {
        "draw_size": float(size),
        "class_mix_concentration": float(concentration),
        "max_class_mix_divergence": float(np.quantile(divergences, DRIFT_QUANTILE)),
        "min_mean_confidence": float(np.quantile(confidences, 1 - DRIFT_QUANTILE)),
        # The share of a 100-image drop; serving's drift.py scales the limit to each drop's size.
        "max_unfamiliar_share": float(np.quantile(shares, DRIFT_QUANTILE)),
        "validation_unfamiliar_share": float(np.mean(unfamiliar)),
    }
