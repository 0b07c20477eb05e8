"""What people review: the queue's order and contents and the drops list with its counts, on
known rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.serving.conftest import KNOWN_DROP, add_known_drop, known_sha, make_prediction
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.drop_summaries import count_drops, drop_names, list_drops
from wbc_tasks.serving.review_decisions import record_review
from wbc_tasks.serving.review_queue import review_queue


def _path(name: str) -> str:
    return f"{KNOWN_DROP}/{name}"


def test_queue_lists_flagged_cells_and_every_suspected_blast_blasts_first_then_least_confident(db_settings):
    add_known_drop(db_settings)
    queue = review_queue(db_settings, KNOWN_DROP)

    assert [q["path"] for q in queue] == [_path(n) for n in ("o2.jpg", "x1.jpg", "l2.jpg", "o1.jpg", "n4.jpg")]
    first = queue[0]
    assert first["blast_suspected"] and first["reasons"] == ["blast_suspected", "low_confidence"]
    assert first["predicted_class"] == "monocytes" and first["model_version"] == "1"
    assert [t["class"] for t in first["top_classes"]][0] == "monocytes" and len(first["top_classes"]) == 3
    assert first["top_classes"][0]["probability"] == pytest.approx(0.6)
    assert sum(t["probability"] for t in first["top_classes"]) < 1.0
    # A confident blast needs a person too; an old flagged row with no reasons reads as low confidence.
    assert queue[1]["reasons"] == [] and queue[1]["blast_suspected"]
    assert queue[3]["reasons"] == ["low_confidence"]
    assert all(q["latest_review"] is None for q in queue)
    assert review_queue(db_settings, "no-such-drop") == []


def test_a_cell_classified_again_is_queued_with_its_newest_prediction_and_that_ones_probabilities(db_settings):
    add_known_drop(db_settings)
    sha = known_sha(_path("n1.jpg"))  # confident (0.9, not queued) under version 1
    later = db.utcnow() + timedelta(hours=1)
    again = make_prediction(
        sha, "2", best=CLASS_NAMES.index("eosinophils"), confidence=0.4, created_at=later, review=True
    )
    with db.open_engine(db_settings.predictions_db_url) as engine, engine.begin() as connection:
        db.insert_ignore(connection, db.predictions, [again])

    entry = next(q for q in review_queue(db_settings, KNOWN_DROP) if q["path"] == _path("n1.jpg"))

    assert (entry["model_version"], entry["predicted_class"]) == ("2", "eosinophils")
    assert entry["reasons"] == ["low_confidence"]
    assert entry["top_classes"][0] == {"class": "eosinophils", "probability": pytest.approx(0.4)}


def test_drops_list_counts_cells_flagged_and_reviewed(db_settings):
    add_known_drop(db_settings)
    record_review(db_settings, _path("x1.jpg"), "blasts", reviewer="alice")
    record_review(db_settings, _path("x1.jpg"), "blasts", reviewer="bob")
    record_review(db_settings, _path("n1.jpg"), "unusable", reviewer="alice")

    drops = list_drops(db_settings)
    assert [d["drop"] for d in drops] == ["2026-12-02", KNOWN_DROP]
    assert drops[1] == {
        "drop": KNOWN_DROP,
        "files": 14,
        "cells": 11,
        "rejected": 2,
        "pending": 1,
        "needs_review": 5,
        "reviewed": 2,
        "blast_suspected": 2,
    }
    assert drops[0]["cells"] == 1 and drops[0]["blast_suspected"] == 1 and drops[0]["reviewed"] == 0


def test_a_page_of_drops_counts_exactly_what_the_whole_list_counts(db_settings):
    """Issue 31: a page reads only its drops' rows; its counts equal the whole list's, in order."""
    add_known_drop(db_settings)
    add_known_drop(db_settings, drop="2026-12-03")
    add_known_drop(db_settings, drop="2026-11-30")
    record_review(db_settings, _path("x1.jpg"), "blasts", reviewer="alice")
    every = list_drops(db_settings)
    assert len(every) == 4 == count_drops(db_settings)
    assert drop_names(db_settings) == [d["drop"] for d in every]
    pages = [list_drops(db_settings, limit=3, offset=0), list_drops(db_settings, limit=3, offset=3)]
    assert [len(p) for p in pages] == [3, 1]
    assert pages[0] + pages[1] == every
    assert list_drops(db_settings, limit=3, offset=4) == []
    assert list_drops(db_settings, limit=10) == every  # one page holds them all: read in one pass
