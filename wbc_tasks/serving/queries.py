"""Reading the predictions database: the look-ups a nightly run sorts its files with (which
images a model already classified, which files were seen or rejected) and the export users
fetch (``wbc predictions``: every file seen with each prediction of its content, as CSV, Parquet
or JSON). Reads only; every read retries like :mod:`wbc_tasks.serving.predictions`. Imports
``core`` and :mod:`.predictions`.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Text, and_, cast, or_, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import CLASS_NAMES, REVIEW_REASONS, Settings
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    open_engine,
    predictions,
    read_with_retries,
    rejections,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: SQLite allows a limited number of bound parameters per statement; IN lists are split.
_IN_BATCH = 500
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


# --------------------------------------------------------------------------------------------
# Look-ups of the nightly run
# --------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int = _IN_BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predicted_hashes(
    connection: Connection,
    hashes: Iterable[str],
    *,
    model_name: str,
    model_version: str | None = None,
) -> set[str]:
    """Which of ``hashes`` have a prediction by ``model_name`` (any version when None)."""
    hashes = sorted(set(hashes))
    found: set[str] = set()
    for part in _batches(hashes):
        query = select(predictions.c.sha256).where(
            predictions.c.sha256.in_(part), predictions.c.model_name == model_name
        )
        if model_version is not None:
            query = query.where(predictions.c.model_version == str(model_version))
        found.update(connection.execute(query).scalars())
    return found


def seen_files(connection: Connection, paths: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """``files_seen`` rows of ``paths``: path -> [{sha256, size, mtime}, ...]."""
    paths = sorted(set(paths))
    rows: dict[str, list[dict[str, Any]]] = {}
    for part in _batches(paths):
        query = select(
            files_seen.c.path,
            files_seen.c.sha256,
            files_seen.c.size,
            files_seen.c.mtime,
        ).where(files_seen.c.path.in_(part))
        for row in connection.execute(query).mappings():
            rows.setdefault(row["path"], []).append(dict(row))
    return rows


def rejected_files(connection: Connection, paths: Iterable[str]) -> set[tuple[str, str]]:
    """(path, sha256) pairs of ``paths`` that already have a rejection."""
    paths = sorted(set(paths))
    found: set[tuple[str, str]] = set()
    for part in _batches(paths):
        query = select(rejections.c.path, rejections.c.sha256).where(rejections.c.path.in_(part))
        found.update((p, s) for p, s in connection.execute(query))
    return found


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def _as_utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _for_db(value: datetime, connection: Connection) -> datetime:
    # SQLite stores naive UTC text; compare like with like.
    return value.replace(tzinfo=None) if connection.dialect.name == "sqlite" else value


def query_predictions(
    settings: Settings,
    *,
    drop: str | None = None,
    since: datetime | str | None = None,
    predicted_class: str | None = None,
    needs_review: bool | None = None,
    review_reason: str | None = None,
    model_version: str | int | None = None,
    latest: bool = False,
) -> pd.DataFrame:
    """One row per file seen and prediction of its content (long form: ``probabilities`` dict).

    A file whose content was classified by two model versions has two rows (``latest=True``
    keeps only the newest prediction per file). Rejected files appear with ``status``
    ``rejected`` and their ``reason`` unless a prediction filter (class, review, version) is
    given. ``since`` keeps rows whose file was first seen, or whose prediction or rejection was
    made, at or after that time (naive times are UTC).
    """
    import pandas as pd

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
    if drop is not None:
        query = query.where(fs.c.drop == drop)
    if predicted_class is not None:
        query = query.where(p.c.predicted_class == predicted_class)
    if needs_review is not None:
        query = query.where(p.c.needs_review == bool(needs_review))
    if review_reason is not None:
        if review_reason not in REVIEW_REASONS:
            raise ValueError(f"unknown review reason {review_reason!r}; choose one of {', '.join(REVIEW_REASONS)}")
        # The JSON list as text on both SQLite and PostgreSQL: '["low_confidence", "unfamiliar"]'.
        query = query.where(cast(p.c.review_reasons, Text).like(f'%"{review_reason}"%'))
    if model_version is not None:
        query = query.where(p.c.model_version == str(model_version))
    since_utc = _as_utc(since)

    def fetch(connection: Connection) -> list[dict[str, Any]]:
        selected = query
        if since_utc is not None:
            bound = _for_db(since_utc, connection)
            selected = selected.where(
                or_(
                    fs.c.seen_at >= bound,
                    p.c.created_at >= bound,
                    r.c.created_at >= bound,
                )
            )
        return [dict(row) for row in connection.execute(selected).mappings()]

    with open_engine(settings.predictions_db_url) as engine:
        rows = read_with_retries(settings, engine, fetch, what="reading predictions")
    table = pd.DataFrame(rows, columns=list(query.selected_columns.keys()))
    for column in ("seen_at", "predicted_at", "rejected_at"):
        table[column] = pd.to_datetime(table[column], utc=True)
    table["status"] = "pending"
    table.loc[table["rejection_reason"].notna(), "status"] = "rejected"
    table.loc[table["predicted_class"].notna(), "status"] = "classified"
    table = table[[c for c in EXPORT_COLUMNS if c in table.columns]]
    if latest and len(table):
        table = (
            table.sort_values(["path", "sha256", "predicted_at"], na_position="first")
            .groupby(["path", "sha256"], sort=False)
            .tail(1)
            .sort_values(["path", "sha256"])
        )
    return table.reset_index(drop=True)


def probability_columns(table: pd.DataFrame) -> list[str]:
    """Class names across every prediction in ``table``: the project's order first, then others."""
    seen: set[str] = set()
    for probs in table["probabilities"].dropna():
        seen.update(probs)
    known = [c for c in CLASS_NAMES if c in seen]
    return known + sorted(seen - set(known))


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


def _json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    records = []
    for row in table.to_dict("records"):
        record: dict[str, Any] = {}
        for column, value in row.items():
            key = str(column)
            if key in ("seen_at", "predicted_at", "rejected_at"):
                record[key] = _iso_or_none(value)
            elif isinstance(value, dict | list):
                record[key] = value
            elif _is_null(value):
                record[key] = None
            elif hasattr(value, "item"):
                record[key] = value.item()  # numpy scalar
            else:
                record[key] = value
        records.append(record)
    return records


def export_predictions(
    settings: Settings,
    *,
    drop: str | None = None,
    since: datetime | str | None = None,
    predicted_class: str | None = None,
    needs_review: bool | None = None,
    review_reason: str | None = None,
    model_version: str | int | None = None,
    latest: bool = False,
    fmt: str = "csv",
    out: Path | str | IO | None = None,
) -> int:
    """Write the predictions of the files seen (filters as :func:`query_predictions`).

    ``fmt``: ``csv`` and ``parquet`` are wide (one ``prob_<class>`` column per class); ``json``
    is a list of records with ``probabilities`` as an object. ``out``: a file path, an open
    file, or None for stdout. Returns the number of rows written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    table = query_predictions(
        settings,
        drop=drop,
        since=since,
        predicted_class=predicted_class,
        needs_review=needs_review,
        review_reason=review_reason,
        model_version=model_version,
        latest=latest,
    )
    if fmt == "json":
        payload: bytes | str = json.dumps(_json_records(table), indent=1, ensure_ascii=False) + "\n"
    elif fmt == "csv":
        wide = wide_table(table)
        # A list cell as JSON text (pandas would write Python's repr).
        wide["review_reasons"] = [json.dumps(v) if isinstance(v, list) else v for v in wide["review_reasons"]]
        payload = wide.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z")
    else:
        buffer = io.BytesIO()
        wide_table(table).to_parquet(buffer, index=False)
        payload = buffer.getvalue()
    _write(payload, out)
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
