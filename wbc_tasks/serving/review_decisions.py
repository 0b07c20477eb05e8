"""Recording a person's decision on a classified cell: one new row of ``reviews`` per decision,
never an update (a second opinion is a new row and the latest counts). The labels a review may
give: the nine classes and ``unusable`` (not a white cell, or no image to judge); "skip" is no
decision and records nothing. Also the check every path a review names goes through (relative
to the classify folder, no ``..``) and the error of a review that cannot be done as asked.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving.drop_summaries import refresh_after_write
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    open_engine,
    reviews,
    transaction,
    upgrade_database,
    utcnow,
    with_db_retries,
)
from wbc_tasks.serving.queries import as_utc
from wbc_tasks.serving.review_queue import predictions_of

log = logging.getLogger(__name__)

#: The label of a cell that is not a white cell, or whose image cannot be judged.
UNUSABLE = "unusable"
#: Every label a review may give.
REVIEW_LABELS: tuple[str, ...] = (*CLASS_NAMES, UNUSABLE)


class ReviewError(PermanentError, ValueError):
    """A review that cannot be recorded as asked (unknown label or image, skip, no reviewer)."""


def checked_relative(path: str) -> str:
    """A path as ``files_seen`` records it: relative, no ``..``; anything else is refused."""
    posix = PurePosixPath(str(path).replace(os.sep, "/"))
    if not str(path) or posix.is_absolute() or ".." in posix.parts:
        raise ReviewError(f"path {path!r} must be relative to the classify folder, without '..'")
    return str(posix)


def _checked_decision(label: str, reviewer: str) -> tuple[str, str]:
    """The label and reviewer, stripped; :class:`ReviewError` for skip, an unknown label or no reviewer."""
    label = str(label).strip()
    if label.lower() == "skip":
        raise ReviewError("'skip' is not a review: nothing is recorded for a skipped cell")
    if label not in REVIEW_LABELS:
        raise ReviewError(f"label {label!r} is not one of {', '.join(REVIEW_LABELS)}")
    reviewer = str(reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a review needs the reviewer's user name")
    return label, reviewer


def _reviewed_image(connection: Connection, rel: str, sha256: str | None) -> Any:
    """The newest readable content of the file ``rel`` (``sha256``'s when given)."""
    query = select(files_seen.c.sha256, files_seen.c.drop, files_seen.c.seen_at, files_seen.c.id).where(
        files_seen.c.path == rel, files_seen.c.sha256 != UNREADABLE_SHA
    )
    if sha256 is not None:
        query = query.where(files_seen.c.sha256 == sha256)
    seen = sorted(connection.execute(query).mappings(), key=lambda r: (as_utc(r["seen_at"]), r["id"]))
    if not seen:
        raise ReviewError(f"no readable file {rel!r}{f' with sha256 {sha256}' if sha256 else ''} was classified")
    return seen[-1]


def record_review(
    settings: Settings,
    path: str,
    label: str,
    *,
    reviewer: str,
    note: str | None = None,
    sha256: str | None = None,
    model_version: str | int | None = None,
    reviewed_at: datetime | None = None,
) -> dict[str, Any]:
    """Record ``reviewer``'s ``label`` for the file ``path`` (relative to the classify folder, as
    in ``files_seen``) and return the new row. The image is the file's newest content unless
    ``sha256`` names one; the prediction recorded beside it is ``model_version``'s, else the
    newest. Raises :class:`ReviewError` for a label outside :data:`REVIEW_LABELS` ("skip" is no
    review), an empty reviewer, or a file that is unknown or not classified."""
    label, reviewer = _checked_decision(label, reviewer)
    rel = checked_relative(path)
    when = as_utc(reviewed_at) or utcnow()

    def work(connection: Connection) -> dict[str, Any]:
        image = _reviewed_image(connection, rel, sha256)
        prediction = predictions_of(
            connection, [image["sha256"]], None if model_version is None else str(model_version)
        )
        if image["sha256"] not in prediction:
            which = f"model version {model_version}" if model_version is not None else "any model"
            raise ReviewError(f"{rel!r} has no prediction by {which}: only classified cells are reviewed")
        chosen = prediction[image["sha256"]]
        row = {
            "sha256": image["sha256"],
            "drop": image["drop"],
            "path": rel,
            "reviewer": reviewer,
            "reviewed_at": when,
            "model_name": chosen["model_name"],
            "model_version": chosen["model_version"],
            "predicted_class": chosen["predicted_class"],
            "label": label,
            "note": note or None,
        }
        inserted = connection.execute(reviews.insert().values(**row)).inserted_primary_key
        assert inserted is not None  # both backends return the new id
        refresh_after_write(connection, hashes=[image["sha256"]])
        return {"id": int(inserted[0]), **row}

    # A database last migrated before reviews existed gets its table here (a no-op at head).
    with_db_retries(settings, lambda: upgrade_database(settings.predictions_db_url), what="migrating the schema")
    with open_engine(settings.predictions_db_url) as engine:
        recorded = transaction(settings, engine, work, what=f"recording a review of {rel}")
    log.info("review %d: %s labelled %s (model said %s)", recorded["id"], reviewer, label, recorded["predicted_class"])
    return recorded
