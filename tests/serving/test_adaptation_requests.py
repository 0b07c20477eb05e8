"""When enough reviews wait to be learned, the night asks for one adaptation run: once per set of
reviews (a retried task gets its own answer, the next night does not ask again, a refused
candidate does not make it ask again), again after as many new reviews, never when the trigger is
off; a run trained on the reviews by hand counts as an adaptation. SQLite and PostgreSQL."""

from __future__ import annotations

from tests.serving.conftest import KNOWN_DROP, add_known_drop, table_rows
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.adaptation_requests import (
    record_training_on_reviews,
    request_adaptation,
    review_backlog,
)
from wbc_tasks.serving.review_decisions import record_review

CELLS = ("b1.jpg", "l1.jpg", "x1.jpg", "o1.jpg", "o2.jpg")


def _review(settings, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        record_review(settings, f"{KNOWN_DROP}/{CELLS[i % len(CELLS)]}", "monocytes", reviewer=f"tech{i}")


def test_the_night_asks_once_per_set_of_reviews_and_not_again_after_a_refusal(db_settings):
    settings = db_settings.with_overrides(adapt_after_reviews=3)
    add_known_drop(settings)
    _review(settings, 2)
    below = request_adaptation(settings, "night-1")
    assert not below.requested and below.backlog.reviews == 2
    assert "2 reviews since the last adaptation, 3 needed" in below.reason

    _review(settings, 1, start=2)
    asked = request_adaptation(settings, "night-2")
    assert asked.requested and asked.backlog.reviews == 3
    # The task retried (its first try's answer lost) gets the same answer, not a second request.
    again = request_adaptation(settings, "night-2")
    assert again.requested and again.backlog.through_review_id == asked.backlog.through_review_id
    # The next night, the adaptation run still queued or refused: those reviews do not ask again.
    _review(settings, 1, start=3)
    assert not request_adaptation(settings, "night-3").requested
    # The adaptation run reads the reviews (the fourth included); its candidate is refused.
    record_training_on_reviews(settings, "adaptation-run", review_backlog(settings))
    assert review_backlog(settings).reviews == 0
    assert not request_adaptation(settings, "night-4").requested

    _review(settings, 3, start=4)
    assert request_adaptation(settings, "night-5").requested
    kinds = [(r["run_id"], r["kind"], r["reviews"]) for r in table_rows(settings, db.adaptation_requests)]
    assert kinds == [("night-2", "asset", 3), ("adaptation-run", "training", 1), ("night-5", "asset", 3)]


def test_off_when_the_setting_is_zero_and_nothing_is_recorded(db_settings):
    settings = db_settings.with_overrides(adapt_after_reviews=0)
    add_known_drop(settings)
    _review(settings, 5)
    answer = request_adaptation(settings, "night-1")
    assert not answer.requested and "WBC_ADAPT_AFTER_REVIEWS=0" in answer.reason
    assert answer.backlog.reviews == 5
    assert table_rows(settings, db.adaptation_requests) == []


def test_a_run_trained_on_the_reviews_by_hand_counts_as_an_adaptation(db_settings):
    settings = db_settings.with_overrides(adapt_after_reviews=2)
    add_known_drop(settings)
    _review(settings, 4)
    seen = review_backlog(settings)
    _review(settings, 1, start=4)  # recorded while the run reads the reviews: counts for the next one
    record_training_on_reviews(settings, "manual__training", seen)
    record_training_on_reviews(settings, "manual__training", review_backlog(settings))  # a retried step
    assert review_backlog(settings).reviews == 1
    assert not request_adaptation(settings, "night-1").requested
    _review(settings, 1, start=5)
    assert request_adaptation(settings, "night-2").requested


def test_a_run_that_found_no_new_review_records_nothing(db_settings):
    settings = db_settings.with_overrides(adapt_after_reviews=2)
    add_known_drop(settings)
    record_training_on_reviews(settings, "manual__before-any-review", review_backlog(settings))
    _review(settings, 2)
    record_training_on_reviews(settings, "manual__learned-two", review_backlog(settings))
    record_training_on_reviews(settings, "manual__nothing-new", review_backlog(settings))
    rows = [(r["run_id"], r["reviews"]) for r in table_rows(settings, db.adaptation_requests)]
    assert rows == [("manual__learned-two", 2)]
