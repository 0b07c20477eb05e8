"""The predictions table users fetch (``wbc predictions``): every file seen with each prediction
of its content, the rows a :class:`PredictionFilter` selects, read whole into pandas and written
as CSV, Parquet or JSON. The same SELECT, streamed for the lab's HTTP endpoint, is
:mod:`wbc_tasks.serving.export_stream`. Reads only; every read retries like
:mod:`wbc_tasks.serving.predictions`.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Select, Text, and_, cast, or_, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.spreadsheet import spreadsheet_safe_frame
from wbc_tasks.core.vocabulary import CLASS_NAMES, REVIEW_REASONS
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    open_engine,
    predictions,
    read_with_retries,
    rejections,
)
from wbc_tasks.serving.queries import as_utc

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

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


def export_query(where: PredictionFilter) -> Select[Any]:
    """The export's SELECT with the filters of ``where``, ordered by path, content and prediction
    time (``since`` is added per connection by :func:`since_clause`: SQLite compares naive times)."""
    fs, p, r = files_seen, predictions, rejections
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
            p.c.review_reasons,
            p.c.unfamiliar_score,
            p.c.image_check,
            p.c.probabilities,
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


def query_predictions(settings: Settings, where: PredictionFilter = ALL_ROWS) -> pd.DataFrame:
    """One row per file seen and prediction of its content (long form: ``probabilities`` dict),
    the rows ``where`` selects.

    A file whose content was classified by two model versions has two rows (``where.latest``
    keeps only the newest prediction per file). Rejected files appear with ``status``
    ``rejected`` and their ``rejection_reason``.
    """
    import pandas as pd

    query = export_query(where)
    since_utc = as_utc(where.since)

    def fetch(connection: Connection) -> list[dict[str, Any]]:
        return [dict(row) for row in connection.execute(since_clause(query, since_utc, connection)).mappings()]

    with open_engine(settings.predictions_db_url) as engine:
        rows = read_with_retries(settings, engine, fetch, what="reading predictions")
    table = pd.DataFrame(rows, columns=list(query.selected_columns.keys()))
    for column in TIME_COLUMNS:
        table[column] = pd.to_datetime(table[column], utc=True)
    table["status"] = "pending"
    table.loc[table["rejection_reason"].notna(), "status"] = "rejected"
    table.loc[table["predicted_class"].notna(), "status"] = "classified"
    table = table[[c for c in EXPORT_COLUMNS if c in table.columns]]
    if where.latest and len(table):
        table = (
            table.sort_values(["path", "sha256", "predicted_at"], na_position="first")
            .groupby(["path", "sha256"], sort=False)
            .tail(1)
            .sort_values(["path", "sha256"])
        )
    return table.reset_index(drop=True)


def ordered_classes(seen: set[str]) -> list[str]:
    """Class names: the project's order first, then any other class a model gave, sorted."""
    known = [c for c in CLASS_NAMES if c in seen]
    return known + sorted(seen - set(known))


def probability_columns(table: pd.DataFrame) -> list[str]:
    """Class names across every prediction in ``table``: the project's order first, then others."""
    seen: set[str] = set()
    for probs in table["probabilities"].dropna():
        seen.update(probs)
    return ordered_classes(seen)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """``probabilities`` spread into one column per class, ``prob_<class>`` (NaN where absent)."""
    classes = probability_columns(table)
    wide = table.drop(columns=["probabilities"]).copy()
    for name in classes:
        wide[f"prob_{name}"] = [
            probs.get(name) if isinstance(probs, dict) else None for probs in table["probabilities"]
        ]
    return wide


def _iso_or_none(value: Any) -> Any:
    """A timestamp as ISO 8601 text for JSON; None for a missing one."""
    return value.isoformat() if hasattr(value, "isoformat") and not _is_null(value) else None


def _is_null(value: Any) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, dict | list) and bool(pd.isna(value)))


def _json_value(column: str, value: Any) -> Any:
    if column in TIME_COLUMNS:
        return _iso_or_none(value)
    if isinstance(value, dict | list):
        return value
    if _is_null(value):
        return None
    if hasattr(value, "item"):
        return value.item()  # numpy scalar
    return value


def _json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {str(column): _json_value(str(column), value) for column, value in row.items()}
        for row in table.to_dict("records")
    ]


def _payload(table: pd.DataFrame, fmt: str) -> bytes | str:
    """``table`` as the bytes or text of an export in ``fmt``."""
    if fmt == "json":
        return json.dumps(_json_records(table), indent=1, ensure_ascii=False) + "\n"
    if fmt == "csv":
        wide = wide_table(table)
        # A list cell as JSON text (pandas would write Python's repr).
        wide["review_reasons"] = [json.dumps(v) if isinstance(v, list) else v for v in wide["review_reasons"]]
        return spreadsheet_safe_frame(wide).to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z")
    buffer = io.BytesIO()
    wide_table(table).to_parquet(buffer, index=False)
    return buffer.getvalue()


def export_predictions(
    settings: Settings,
    where: PredictionFilter = ALL_ROWS,
    *,
    fmt: str = "csv",
    out: Path | str | IO | None = None,
) -> int:
    """Write the predictions of the files seen that ``where`` selects (as :func:`query_predictions`).

    ``fmt``: ``csv`` and ``parquet`` are wide (one ``prob_<class>`` column per class); ``json``
    is a list of records with ``probabilities`` as an object. ``out``: a file path, an open
    file, or None for stdout. Returns the number of rows written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    table = query_predictions(settings, where)
    _write(_payload(table, fmt), out)
    log.info("exported %d rows as %s to %s", len(table), fmt, out or "stdout")
    return len(table)


def _write(payload: bytes | str, out: Path | str | IO | None) -> None:
    data = payload.encode() if isinstance(payload, str) else payload
    if out is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif isinstance(out, (str, Path)):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    elif isinstance(out, io.TextIOBase):
        out.write(data.decode())
    else:
        out.write(data)
