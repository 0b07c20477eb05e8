"""The orders a drop's review queue can be read in.

``urgent`` (the default) is the queue as :func:`wbc_tasks.serving.review_queue.review_queue` sorts
it: suspected blasts first, then the least confident. ``onboarding`` is for a lab the model has
not learned yet (most of its cells unfamiliar): suspected blasts still first, then the least
confident cell and a cell drawn at random in turn. The least confident cells of a foreign lab are
mostly of a few kinds, so reviews taken only from the top of the queue teach the next version
little of the lab's common cells; the random half spans what the lab sees. Measured on three folds
of a third lab's cells (``bench/bench_learning_curve.py --order interleaved``, docs/benchmarks.md,
issue 30): after 100 reviews the version trained on them reached balanced accuracy 0.820 on the
lab's unseen cells against 0.757 in queue order, ahead on every fold, and left 71 % of them
unflagged against 53 %, as often right. After 50 reviews neither order was ahead on every fold.

The random half is a fixed draw: cells sorted by their content hash, which is as good as random
for what a cell shows and gives the same order on every visit and page, whatever the files are
named, with nothing stored.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from enum import StrEnum
from typing import Any, TypeVar

Item = TypeVar("Item", bound=Hashable)


class ReviewOrder(StrEnum):
    """How a review queue is ordered."""

    #: Suspected blasts first, then the least confident.
    URGENT = "urgent"
    #: Suspected blasts first, then the least confident and a random cell in turn.
    ONBOARDING = "onboarding"


def interleave(*orders: Sequence[Item]) -> list[Item]:
    """Every item of ``orders`` once: each order's first item not taken yet, order after order in
    turn, until all are taken."""
    taken: set[Item] = set()
    out: list[Item] = []
    positions = [0] * len(orders)
    every = set().union(*orders)
    while len(out) < len(every):
        for k, order in enumerate(orders):
            while positions[k] < len(order) and order[positions[k]] in taken:
                positions[k] += 1
            if positions[k] < len(order):
                taken.add(order[positions[k]])
                out.append(order[positions[k]])
    return out


def in_order(queue: list[dict[str, Any]], order: ReviewOrder) -> list[dict[str, Any]]:
    """``queue`` (entries with ``path``, ``sha256`` and ``blast_suspected``, in ``urgent`` order)
    in ``order``."""
    if order is ReviewOrder.URGENT:
        return list(queue)
    blasts = [q for q in queue if q["blast_suspected"]]
    rest = [q for q in queue if not q["blast_suspected"]]
    drawn = sorted(rest, key=lambda q: (q["sha256"], q["path"]))
    by_path = {q["path"]: q for q in rest}
    paths = interleave([q["path"] for q in rest], [q["path"] for q in drawn])
    return blasts + [by_path[p] for p in paths]
