"""The predictions table users fetch (``wbc predictions`` and the lab's HTTP endpoint): every file
seen with each prediction of its content, the rows a :class:`PredictionFilter` selects, its
columns and its one SELECT. Reading and writing it, row batch by row batch in CSV, JSON or
Parquet, is :mod:`wbc_tasks.serving.export_stream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Text, and_, cast, or_, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.vocabulary import CLASS_NAMES, REVIEW_REASONS
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    predictions,
    rejections,
)

EXPORT_FORMATS = ("csv", "parquet", "json")
#: Columns of an export, in order (csv/parquet add one ``prob_<class>`` column per class).
EXPORT_COLUMNS = (
    "path",
    "drop",
    "status",
    "predicted_class",
    "confidence",
    "needs_review",
    "review_reasons",
    "unfamiliar_score",
    "image_check",
    "model_name",
    "model_version",
    "model_run_id",
    "predicted_at",
    "prediction_dag_run_id",
    "rejection_reason",
    "rejected_at",
    "sha256",
    "size",
    "seen_at",
    "probabilities",
)
#: The columns holding times (UTC).
TIME_COLUMNS = ("seen_at", "predicted_at", "rejected_at")


@dataclass(frozen=True)
class PredictionFilter:
    """Which rows of the predictions table a read returns; every condition given must hold.

    ``since`` keeps rows whose file was first seen, or whose prediction or rejection was made, at
    or after that time (naive times are UTC). ``latest`` keeps only each file's newest
    prediction. A prediction condition (class, review, version) leaves out rejected and pending
    files. ``review_reason`` must be one of ``REVIEW_REASONS`` (checked here, before any read).
    """

    drop: str | None = None
    since: datetime | str | None = None
    predicted_class: str | None = None
    needs_review: bool | None = None
    review_reason: str | None = None
    model_version: str | int | None = None
    latest: bool = False

    def __post_init__(self) -> None:
        if self.review_reason is not None and self.review_reason not in REVIEW_REASONS:
            raise ValueError(f"unknown review reason {self.review_reason!r}; choose one of {', '.join(REVIEW_REASONS)}")


#: Every row of the table.
ALL_ROWS = PredictionFilter()


def export_query(where: PredictionFilter, *, json_as_text: bool = False) -> Select[Any]:
    """The export's SELECT with the filters of ``where``, ordered by path, content and prediction
    time (``since`` is added per connection by :func:`since_clause`: SQLite compares naive times).
    ``json_as_text``: ``review_reasons`` and ``probabilities`` as their stored JSON text, not
    decoded row by row (a streamed export parses them a batch at a time)."""
    fs, p, r = files_seen, predictions, rejections

    def json_column(column: Any) -> Any:
        return cast(column, Text).label(column.name) if json_as_text else column

    query = (
        select(
            fs.c.path,
            fs.c.drop,
            fs.c.sha256,
            fs.c.size,
            fs.c.seen_at,
            p.c.predicted_class,
            p.c.confidence,
            p.c.needs_review,
            json_column(p.c.review_reasons),
            p.c.unfamiliar_score,
            p.c.image_check,
            json_column(p.c.probabilities),
            p.c.model_name,
            p.c.model_version,
            p.c.model_run_id,
            p.c.created_at.label("predicted_at"),
            p.c.dag_run_id.label("prediction_dag_run_id"),
            r.c.reason.label("rejection_reason"),
            r.c.created_at.label("rejected_at"),
        )
        .select_from(fs)
        .outerjoin(p, and_(p.c.sha256 == fs.c.sha256, fs.c.sha256 != UNREADABLE_SHA))
        .outerjoin(r, and_(r.c.path == fs.c.path, r.c.sha256 == fs.c.sha256))
        .order_by(fs.c.path, fs.c.sha256, p.c.created_at, p.c.model_version)
    )
    if where.drop is not None:
        query = query.where(fs.c.drop == where.drop)
    if where.predicted_class is not None:
        query = query.where(p.c.predicted_class == where.predicted_class)
    if where.needs_review is not None:
        query = query.where(p.c.needs_review == bool(where.needs_review))
    if where.review_reason is not None:
        # The JSON list as text on both SQLite and PostgreSQL: '["low_confidence", "unfamiliar"]'.
        query = query.where(cast(p.c.review_reasons, Text).like(f'%"{where.review_reason}"%'))
    if where.model_version is not None:
        query = query.where(p.c.model_version == str(where.model_version))
    return query


def since_clause(query: Select[Any], since_utc: datetime | None, connection: Connection) -> Select[Any]:
    """Rows whose file was first seen, or whose prediction or rejection was made, at or after ``since_utc``."""
    if since_utc is None:
        return query
    # SQLite stores naive UTC text; compare like with like.
    bound = since_utc.replace(tzinfo=None) if connection.dialect.name == "sqlite" else since_utc
    return query.where(
        or_(files_seen.c.seen_at >= bound, predictions.c.created_at >= bound, rejections.c.created_at >= bound)
    )


def ordered_classes(seen: set[str]) -> list[str]:
    """Class names: the project's order first, then any other class a model gave, sorted."""
    known = [c for c in CLASS_NAMES if c in seen]
    return known + sorted(seen - set(known))
