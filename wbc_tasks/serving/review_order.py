"""The order in which a drop's review queue is shown.

- ``confidence`` (the default): suspected blasts first (an emergency even when the model is sure),
  then the least confident cell first. Each review fixes a cell the model is most likely wrong on.
- ``spanning`` (for a lab's first reviews, when the model has not learned its cells yet): suspected
  blasts first, then cells chosen to span what the model sees in the drop. The first is the least
  confident; each next one is the cell farthest from every cell already chosen (greedy k-centre,
  the "core-set" selection of Sener & Savarese, ICLR 2018), distance measured between the model's
  class probabilities (Hellinger distance). The least confident cells of a new lab are often one
  kind of cell the model finds strange; spanning puts every kind the model tells apart among the
  first reviews, so the reviews teach every class of the lab (benchmark: docs/benchmarks.md,
  "A new lab learned from its own reviews").

Written here rather than taken from a library: the selection is twenty lines of numpy, and the
active-learning libraries that offer it (modAL, ALiPy) bring a model wrapper the queue has no use for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: The review queue's orders; the first is the default.
REVIEW_ORDERS = ("confidence", "spanning")
#: Cells chosen by spanning; the rest follow by confidence. Each choice costs a pass over the
#: drop (0.3 s for a thousand choices among 28,000 cells), and onboarding is a few hundred reviews.
SPANNING_CHOICES = 1000


def _by_confidence(entry: dict[str, Any]) -> tuple[bool, float, str]:
    return (not entry["blast_suspected"], entry["confidence"], entry["path"])


def _probability_matrix(entries: Sequence[dict[str, Any]]) -> np.ndarray:
    classes = sorted({name for entry in entries for name in entry["probabilities"]})
    return np.array([[float(entry["probabilities"].get(name, 0.0)) for name in classes] for entry in entries])


def spanning_order(points: np.ndarray, first: int, choices: int) -> list[int]:
    """Up to ``choices`` row indices of ``points``: ``first``, then each time the row farthest
    (Euclidean) from every row chosen so far; ties go to the lowest index."""
    n = len(points)
    if n == 0 or choices <= 0:
        return []
    chosen = [first]
    nearest = np.linalg.norm(points - points[first], axis=1)
    nearest[first] = -1.0
    for _ in range(min(n, choices) - 1):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
        nearest[chosen] = -1.0
    return chosen


def ordered(entries: list[dict[str, Any]], order: str = "confidence") -> list[dict[str, Any]]:
    """``entries`` (queue entries with ``blast_suspected``, ``confidence``, ``path`` and the full
    ``probabilities``) in ``order`` (one of :data:`REVIEW_ORDERS`)."""
    if order not in REVIEW_ORDERS:
        raise ValueError(f"unknown review order {order!r}; choose one of {', '.join(REVIEW_ORDERS)}")
    by_confidence = sorted(entries, key=_by_confidence)
    if order == "confidence":
        return by_confidence
    blasts = [e for e in by_confidence if e["blast_suspected"]]
    rest = [e for e in by_confidence if not e["blast_suspected"]]
    if len(rest) < 3:
        return blasts + rest
    # Hellinger distance is the Euclidean distance between square roots (over sqrt 2).
    points = np.sqrt(_probability_matrix(rest))
    chosen = spanning_order(points, first=0, choices=SPANNING_CHOICES)
    taken = set(chosen)
    return blasts + [rest[i] for i in chosen] + [e for i, e in enumerate(rest) if i not in taken]
