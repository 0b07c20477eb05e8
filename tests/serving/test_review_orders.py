"""The review queue's orders (issue 30, item 5): ``onboarding`` keeps suspected blasts first, then
takes the least confident cell and a cell of the fixed random draw (by content hash) in turn,
losing and repeating nothing, the same on every call whatever the files are named."""

from __future__ import annotations

import hashlib
import random

from wbc_tasks.serving.review_orders import ReviewOrder, in_order, interleave


def test_interleave_takes_each_orders_next_new_item_in_turn_and_every_item_once():
    assert interleave([1, 2, 3, 4], [4, 3, 2, 1]) == [1, 4, 2, 3]
    assert interleave(["a", "b"], ["b", "c", "d"]) == ["a", "b", "c", "d"]
    assert interleave([5, 6], []) == [5, 6]
    assert interleave() == []


def _queue(n: int, blasts: int, seed: int) -> list[dict]:
    """``n`` queue entries in urgent order (``blasts`` suspected blasts first, then rising
    confidence), their contents' hashes unrelated to their names or confidence."""
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        entries.append(
            {
                "path": f"drop/cell-{rng.randrange(10**6):06d}-{i}.jpg",
                "sha256": hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
                "blast_suspected": i < blasts,
                "confidence": i / n,
            }
        )
    return entries


def test_onboarding_keeps_blasts_first_then_alternates_least_confident_and_lowest_hash_not_yet_shown():
    queue = _queue(41, blasts=3, seed=7)
    ordered = in_order(queue, ReviewOrder.ONBOARDING)

    assert sorted(e["path"] for e in ordered) == sorted(e["path"] for e in queue)  # nothing lost or repeated
    assert [e["blast_suspected"] for e in ordered[:3]] == [True] * 3
    assert not any(e["blast_suspected"] for e in ordered[3:])
    shown = {e["path"] for e in ordered[:3]}
    for k, entry in enumerate(ordered[3:]):
        left = [e for e in queue if e["path"] not in shown]
        expected = left[0] if k % 2 == 0 else min(left, key=lambda e: e["sha256"])
        assert entry is expected, k
        shown.add(entry["path"])
    # Not the urgent order: the random half brings confident cells forward.
    assert ordered != queue and max(e["confidence"] for e in ordered[:13]) > 0.5


def test_onboarding_order_is_the_same_on_every_call_and_under_other_file_names():
    queue = _queue(30, blasts=0, seed=3)
    names = random.Random(11).sample(range(10**6), len(queue))  # another order of the names
    renamed = [{**e, "path": f"drop/{name:06d}.jpg"} for e, name in zip(queue, names, strict=True)]

    first = [e["sha256"] for e in in_order(queue, ReviewOrder.ONBOARDING)]
    assert first == [e["sha256"] for e in in_order(list(queue), ReviewOrder.ONBOARDING)]
    assert first == [e["sha256"] for e in in_order(renamed, ReviewOrder.ONBOARDING)]
    assert in_order(queue, ReviewOrder.URGENT) == queue
