"""When a lab has reviewed enough to learn from: the count of reviews since the last adaptation run
and the night's request for the next one (issue 30).

The watermark is the ``adaptation_requests`` table: the highest review id each request or
review-trained run accounts for. The night asks (:func:`request_adaptation`) when the reviews
after the watermark reach ``WBC_ADAPT_AFTER_REVIEWS``; asking moves the watermark at once, so

- at most one adaptation run is waiting for those reviews (the next night counts only newer ones),
- a refused candidate is not retried every night: the same reviews never ask twice, and
  ``WBC_ADAPT_AFTER_REVIEWS`` new ones are needed for the next try;
- a training run started by hand with the reviews included counts as an adaptation run
  (:func:`record_training_on_reviews`, called by its split step).

Airflow sees none of this: the nightly DAG's task that calls :func:`request_adaptation` has the
asset as its outlet and skips when nothing is requested (a skipped task emits no asset event).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings, env_variable
from wbc_tasks.serving.predictions import (
    adaptation_requests,
    insert_ignore,
    open_engine,
    read_with_retries,
    reviews,
    transaction,
    upgrade_database,
    utcnow,
    with_db_retries,
)

log = logging.getLogger(__name__)


class RequestKind(StrEnum):
    """Who moved the watermark: the night's request (an asset event) or a run trained on reviews."""

    ASSET = "asset"
    TRAINING = "training"


@dataclass(frozen=True)
class ReviewBacklog:
    """Reviews recorded after the watermark: how many, and the newest one's id."""

    reviews: int
    through_review_id: int


@dataclass(frozen=True)
class AdaptationRequest:
    """The night's answer: whether it asked for an adaptation run, why, and the backlog it saw."""

    requested: bool
    reason: str
    backlog: ReviewBacklog
    threshold: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backlog": asdict(self.backlog)}


def _backlog(connection: Connection) -> ReviewBacklog:
    watermark = connection.execute(select(func.max(adaptation_requests.c.through_review_id))).scalar() or 0
    count, newest = connection.execute(
        select(func.count(), func.max(reviews.c.id)).where(reviews.c.id > watermark)
    ).one()
    return ReviewBacklog(reviews=int(count), through_review_id=int(newest or watermark))


def _migrated(settings: Settings) -> None:
    # A database last migrated before this table existed gets it here (a no-op at head).
    with_db_retries(settings, lambda: upgrade_database(settings.predictions_db_url), what="migrating the schema")


def review_backlog(settings: Settings) -> ReviewBacklog:
    """The reviews recorded since the last adaptation request or review-trained run."""
    _migrated(settings)
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, _backlog, what="counting reviews since the last adaptation")


def _record(connection: Connection, backlog: ReviewBacklog, kind: RequestKind, run_id: str) -> None:
    row = {
        "through_review_id": backlog.through_review_id,
        "reviews": backlog.reviews,
        "kind": kind.value,
        "requested_at": utcnow(),
        "run_id": run_id,
    }
    insert_ignore(connection, adaptation_requests, [row])


def request_adaptation(settings: Settings, run_id: str) -> AdaptationRequest:
    """Ask for an adaptation run when ``WBC_ADAPT_AFTER_REVIEWS`` reviews or more were recorded
    since the last one, recording the request under ``run_id`` (the nightly DAG run). A retried
    task finds its own request and answers the same."""
    threshold = settings.adapt_after_reviews
    _migrated(settings)

    def work(connection: Connection) -> AdaptationRequest:
        own = connection.execute(
            select(adaptation_requests).where(adaptation_requests.c.run_id == run_id)
        ).mappings().first()  # fmt: skip
        if own is not None:
            backlog = ReviewBacklog(own["reviews"], own["through_review_id"])
            return AdaptationRequest(True, f"already requested by {run_id}", backlog, threshold)
        backlog = _backlog(connection)
        if threshold == 0:
            return AdaptationRequest(False, f"{env_variable('adapt_after_reviews')}=0: the trigger is off", backlog, 0)
        if backlog.reviews < threshold:
            why = f"{backlog.reviews} reviews since the last adaptation, {threshold} needed"
            return AdaptationRequest(False, why, backlog, threshold)
        _record(connection, backlog, RequestKind.ASSET, run_id)
        why = f"{backlog.reviews} reviews since the last adaptation (threshold {threshold})"
        return AdaptationRequest(True, why, backlog, threshold)

    with open_engine(settings.predictions_db_url) as engine:
        answer = transaction(settings, engine, work, what="requesting an adaptation run")
    log.info("adaptation %s: %s", "requested" if answer.requested else "not requested", answer.reason)
    return answer


def record_training_on_reviews(settings: Settings, run_id: str, seen: ReviewBacklog) -> None:
    """Move the watermark to ``seen`` (read before the run read the reviews): training run
    ``run_id`` learns every review up to it. Idempotent per run; nothing is recorded when no review
    is new (the watermark would not move, and the lab's page would list a run that learned none)."""
    if seen.reviews == 0:
        return
    _migrated(settings)
    with open_engine(settings.predictions_db_url) as engine:
        transaction(
            settings,
            engine,
            lambda connection: _record(connection, seen, RequestKind.TRAINING, run_id),
            what="recording a run trained on reviews",
        )
