"""What a lab sees of its model learning from its own reviews (issue 30), read only: the reviews
recorded, how many came after the last adaptation run and when the nightly run asks for the next
one, the requests and review-trained runs so far, and the newest registered versions with what
each learned (the lab's reviewed images, the version it started from) and its promotion record:
the candidate against the champion it was compared with, image by image on the labelled test
split and on the lab's reviewed test images, and the reason for the decision.

The predictions database answers the review half, the model registry the version half; when the
registry cannot be read the review half is still shown, with the registry's error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.serving.adaptation_requests import review_backlog
from wbc_tasks.serving.predictions import adaptation_requests, open_engine, read_with_retries, reviews

if TYPE_CHECKING:
    from wbc_tasks.registry.versions import VersionRecord

log = logging.getLogger(__name__)

#: The newest versions and adaptation requests shown: a lab's recent history, not its archive.
VERSIONS_SHOWN = 10
REQUESTS_SHOWN = 10


@dataclass(frozen=True)
class LearningStatus:
    """The lab's reviews and the versions that learned (or may learn) from them."""

    #: Decisions recorded (a cell reviewed twice counts twice), cells reviewed, reviewers.
    reviews: int
    reviewed_cells: int
    reviewers: int
    #: Reviews recorded after the last adaptation request or review-trained run.
    since_last_adaptation: int
    #: ``WBC_ADAPT_AFTER_REVIEWS``: the backlog at which the night asks for a run (0: never).
    adapt_after_reviews: int
    #: The newest adaptation requests and review-trained runs, newest first.
    requests: list[dict[str, Any]]
    #: The newest registered versions, newest first (see :func:`_version_entry`).
    versions: list[dict[str, Any]]
    #: Why the versions could not be read (None: they were).
    registry_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _review_counts(connection: Connection, requests_shown: int) -> tuple[tuple[int, int, int], list[dict[str, Any]]]:
    counts = connection.execute(
        select(func.count(), func.count(distinct(reviews.c.sha256)), func.count(distinct(reviews.c.reviewer)))
    ).one()
    rows = connection.execute(
        select(
            adaptation_requests.c.kind,
            adaptation_requests.c.reviews,
            adaptation_requests.c.requested_at,
            adaptation_requests.c.run_id,
        )
        .order_by(adaptation_requests.c.id.desc())
        .limit(requests_shown)
    ).mappings()
    return (int(counts[0]), int(counts[1]), int(counts[2])), [dict(r) for r in rows]


def _version_entry(record: VersionRecord) -> dict[str, Any]:
    """One version as the page lists it: when, aliases, its run, what it learned, its decision."""
    from wbc_tasks.registry.decision import recorded_decision
    from wbc_tasks.registry.tags import TAG_AIRFLOW_RUN_ID, TAG_INIT_FROM_VERSION, TAG_REVIEWED_IMAGES

    reviewed = record.tags.get(TAG_REVIEWED_IMAGES)
    return {
        "version": record.version,
        "registered_at": record.registered_at,
        "aliases": list(record.aliases),
        "airflow_run_id": record.tags.get(TAG_AIRFLOW_RUN_ID),
        "reviewed_images": json.loads(reviewed) if reviewed else None,
        "init_from_version": record.tags.get(TAG_INIT_FROM_VERSION),
        "decision": recorded_decision(record.tags),
    }


def learning_status(
    settings: Settings, *, versions: int = VERSIONS_SHOWN, requests: int = REQUESTS_SHOWN
) -> LearningStatus:
    """The lab's learning status: review counts and the ``requests`` newest adaptation requests
    from the predictions database, the ``versions`` newest versions from the registry."""
    from wbc_tasks.registry.versions import recent_versions

    backlog = review_backlog(settings)  # also migrates a database older than the requests table
    with open_engine(settings.predictions_db_url) as engine:
        (total, cells, reviewers), recent = read_with_retries(
            settings, engine, lambda c: _review_counts(c, requests), what="counting the lab's reviews"
        )
    found: list[dict[str, Any]] = []
    error = None
    try:
        found = [_version_entry(v) for v in recent_versions(settings, versions)]
    except Exception as exc:  # the registry is down or refuses: the review half still answers
        log.warning("the model registry at %s could not be read: %s", settings.mlflow_tracking_uri, exc)
        error = f"the model registry could not be read ({type(exc).__name__}: {exc})"
    return LearningStatus(
        reviews=total,
        reviewed_cells=cells,
        reviewers=reviewers,
        since_last_adaptation=backlog.reviews,
        adapt_after_reviews=settings.adapt_after_reviews,
        requests=recent,
        versions=found,
        registry_error=error,
    )
