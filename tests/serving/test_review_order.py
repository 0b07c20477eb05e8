"""The review queue's orders: by confidence, and spanning what the model sees (a lab's first reviews)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.conftest import KNOWN_DROP, add_known_drop
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import review_order
from wbc_tasks.serving.review_order import ordered, spanning_order
from wbc_tasks.serving.review_queue import review_queue


def _entry(name: str, probabilities: dict[str, float], blast: bool = False) -> dict:
    full = {c: 0.0 for c in CLASS_NAMES} | probabilities
    rest = (1.0 - sum(probabilities.values())) / (len(full) - len(probabilities))
    full = {c: (p if c in probabilities else rest) for c, p in full.items()}
    return {"path": name, "blast_suspected": blast, "confidence": max(full.values()), "probabilities": full}


def _new_lab_drop() -> list[dict]:
    """Twelve cells a model finds strange (near-uniform, least confident), four it calls
    lymphocytes, four neutrophils, and one suspected blast."""
    strange = [_entry(f"strange-{i:02d}", {"bands": 0.12 + i / 1000}) for i in range(12)]
    lymph = [_entry(f"lymph-{i}", {"lymphocytes": 0.55 + i / 100}) for i in range(4)]
    neut = [_entry(f"neut-{i}", {"neutrophils": 0.6 + i / 100}) for i in range(4)]
    return [*lymph, *strange, *neut, _entry("blast", {"blasts": 0.9}, blast=True)]


def test_farthest_first_on_a_line():
    points = np.array([[0.0], [1.0], [2.0], [10.0], [9.0]])
    assert spanning_order(points, first=0, choices=5) == [0, 3, 2, 1, 4]  # 1 and 4 tie: the lower index
    assert spanning_order(points, first=1, choices=2) == [1, 3]
    assert spanning_order(np.empty((0, 1)), first=0, choices=3) == []


def test_confidence_order_reviews_one_kind_first_spanning_reviews_every_kind():
    cells = _new_lab_drop()
    by_confidence = [c["path"] for c in ordered(cells, "confidence")]
    spanning = [c["path"] for c in ordered(cells, "spanning")]
    assert by_confidence[0] == spanning[0] == "blast"  # an emergency comes first in both
    assert {p.split("-")[0] for p in by_confidence[1:4]} == {"strange"}
    assert {p.split("-")[0] for p in spanning[1:4]} == {"strange", "lymph", "neut"}
    assert spanning[1] == "strange-00"  # the least confident starts the spanning
    assert sorted(spanning) == sorted(by_confidence)  # the same cells, none lost


def test_spanning_chooses_up_to_its_limit_then_follows_confidence(monkeypatch):
    monkeypatch.setattr(review_order, "SPANNING_CHOICES", 2)
    cells = _new_lab_drop()
    spanning = [c["path"] for c in ordered(cells, "spanning")]
    by_confidence = [c["path"] for c in ordered(cells, "confidence")]
    chosen = spanning[1:3]
    assert spanning[3:] == [p for p in by_confidence[1:] if p not in chosen]


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="unknown review order 'newest'"):
        ordered([], "newest")


def test_the_queue_in_spanning_order_holds_the_same_cells_blasts_first(db_settings):
    add_known_drop(db_settings)
    by_confidence = review_queue(db_settings, KNOWN_DROP)
    spanning = review_queue(db_settings, KNOWN_DROP, order="spanning")
    assert sorted(q["path"] for q in spanning) == sorted(q["path"] for q in by_confidence)
    blasts = [q["blast_suspected"] for q in spanning]
    assert blasts == sorted(blasts, reverse=True)
    assert set(spanning[0]["probabilities"]) >= {t["class"] for t in spanning[0]["top_classes"]}
