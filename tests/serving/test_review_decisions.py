"""Recording decisions on classified cells: kept, never overwritten, the latest counts; what
cannot be recorded says why and records nothing; every class and unusable is a label. On known
rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.serving.conftest import KNOWN_DROP, add_known_drop, known_sha, table_rows
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.review_decisions import REVIEW_LABELS, ReviewError, record_review
from wbc_tasks.serving.review_queue import latest_reviews, review_queue

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _path(name: str) -> str:
    return f"{KNOWN_DROP}/{name}"


def test_reviews_are_kept_and_the_latest_counts(db_settings):
    add_known_drop(db_settings)
    first = record_review(db_settings, _path("x1.jpg"), "lymphocytes", reviewer="alice", reviewed_at=T0)
    second = record_review(
        db_settings, _path("x1.jpg"), "blasts", reviewer="bob", note="nucleoli visible", reviewed_at=T0 + timedelta(1)
    )

    assert second["id"] != first["id"]
    assert second["sha256"] == known_sha(_path("x1.jpg")) and second["drop"] == KNOWN_DROP
    assert (second["model_name"], second["model_version"], second["predicted_class"]) == (
        "wbc-classifier",
        "1",
        "blasts",
    )
    stored = table_rows(db_settings, db.reviews)
    assert [(r["reviewer"], r["label"], r["note"]) for r in stored] == [
        ("alice", "lymphocytes", None),
        ("bob", "blasts", "nucleoli visible"),
    ]
    assert stored[1]["reviewed_at"].replace(tzinfo=UTC) == T0 + timedelta(1)
    latest = latest_reviews(db_settings, drop=KNOWN_DROP)
    assert [(r["path"], r["reviewer"], r["label"]) for r in latest] == [(_path("x1.jpg"), "bob", "blasts")]
    queued = {q["path"]: q for q in review_queue(db_settings, KNOWN_DROP)}
    assert queued[_path("x1.jpg")]["latest_review"]["reviewer"] == "bob"

    # An earlier time recorded later does not win; the same time is decided by the order recorded.
    record_review(db_settings, _path("x1.jpg"), "monocytes", reviewer="carol", reviewed_at=T0)
    record_review(db_settings, _path("x1.jpg"), "eosinophils", reviewer="dave", reviewed_at=T0 + timedelta(1))
    assert [r["reviewer"] for r in latest_reviews(db_settings, drop=KNOWN_DROP)] == ["dave"]
    assert len(table_rows(db_settings, db.reviews)) == 4
    assert latest_reviews(db_settings, drop="2026-12-02") == []


@pytest.mark.parametrize(
    ("path", "label", "reviewer", "message"),
    [
        ("x1.jpg", "skip", "alice", "not a review"),
        ("x1.jpg", "smudge", "alice", "not one of"),
        ("x1.jpg", "Blasts ", "alice", "not one of"),
        ("x1.jpg", "blasts", " ", "reviewer"),
        ("late.jpg", "blasts", "alice", "no prediction"),
        ("empty.png", "unusable", "alice", "no readable file"),
        ("missing.jpg", "blasts", "alice", "no readable file"),
        ("../../etc/passwd", "blasts", "alice", "without '..'"),
    ],
)
def test_a_review_that_cannot_be_recorded_says_why_and_records_nothing(db_settings, path, label, reviewer, message):
    add_known_drop(db_settings)
    with pytest.raises(ReviewError, match=message):
        record_review(db_settings, _path(path), label, reviewer=reviewer)
    with pytest.raises(ReviewError, match="relative"):
        record_review(db_settings, "/" + _path("x1.jpg"), "blasts", reviewer="alice")
    assert table_rows(db_settings, db.reviews) == []


def test_every_class_and_unusable_is_a_label(db_settings):
    add_known_drop(db_settings)
    assert (*CLASS_NAMES, "unusable") == REVIEW_LABELS
    for label in REVIEW_LABELS:
        record_review(db_settings, _path("n1.jpg"), label, reviewer="alice")
    assert [r["label"] for r in table_rows(db_settings, db.reviews)] == list(REVIEW_LABELS)
