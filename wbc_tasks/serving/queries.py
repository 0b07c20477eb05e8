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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Select, Text, and_, cast, func, or_, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES, REVIEW_REASONS
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


def _export_query(where: PredictionFilter) -> Select[Any]:
    """The export's SELECT with its filters (``since`` is added per connection: SQLite compares
    naive times)."""
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


def _since(query: Select[Any], since_utc: datetime | None, connection: Connection) -> Select[Any]:
    """Rows whose file was first seen, or whose prediction or rejection was made, at or after ``since_utc``."""
    if since_utc is None:
        return query
    bound = _for_db(since_utc, connection)
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

    query = _export_query(where)
    since_utc = _as_utc(where.since)

    def fetch(connection: Connection) -> list[dict[str, Any]]:
        return [dict(row) for row in connection.execute(_since(query, since_utc, connection)).mappings()]

    with open_engine(settings.predictions_db_url) as engine:
        rows = read_with_retries(settings, engine, fetch, what="reading predictions")
    table = pd.DataFrame(rows, columns=list(query.selected_columns.keys()))
    for column in ("seen_at", "predicted_at", "rejected_at"):
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


# --------------------------------------------------------------------------------------------
# The export, streamed (the lab's HTTP endpoint): rows read in batches, never all in memory
# --------------------------------------------------------------------------------------------

#: Rows fetched from the database per round trip, and rows per written chunk (a Parquet row group).
STREAM_BATCH = 5000
_TIME_COLUMNS = ("seen_at", "predicted_at", "rejected_at")


def _status(row: dict[str, Any]) -> str:
    if row["predicted_class"] is not None:
        return "classified"
    return "rejected" if row["rejection_reason"] is not None else "pending"


def stream_predictions(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`query_predictions` (same filter, order and columns; times UTC), one
    dict at a time: a server-side cursor on PostgreSQL, SQLite's own cursor, ``batch_size``
    rows per fetch. ``where.latest`` keeps each file's last row: the query is ordered by path,
    content and prediction time, so a file's rows arrive together. Not retried: a lost
    connection ends the stream with the error (the client sees a cut-off download and asks
    again)."""
    query = _export_query(where)
    since_utc = _as_utc(where.since)
    with open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
            _since(query, since_utc, connection)
        )
        held: dict[str, Any] | None = None
        for mapping in result.mappings():
            row = dict(mapping)
            for column in _TIME_COLUMNS:
                row[column] = _as_utc(row[column])
            row["status"] = _status(row)
            row = {c: row[c] for c in EXPORT_COLUMNS}
            if not where.latest:
                yield row
                continue
            if held is not None and (held["path"], held["sha256"]) != (row["path"], row["sha256"]):
                yield held
            held = row
        if held is not None:
            yield held


def stream_probability_columns(settings: Settings, *, model_version: str | int | None = None) -> list[str]:
    """The class names of every model version with predictions (of ``model_version`` only when
    given), the project's order first: the ``prob_<class>`` columns a streamed CSV or Parquet
    carries, known before the first row (one prediction read per version)."""

    def read(connection: Connection) -> list[str]:
        first = select(func.min(predictions.c.id)).group_by(predictions.c.model_name, predictions.c.model_version)
        if model_version is not None:
            first = first.where(predictions.c.model_version == str(model_version))
        seen: set[str] = set()
        query = select(predictions.c.probabilities).where(predictions.c.id.in_(first))
        for probs in connection.execute(query).scalars():
            seen.update(probs or {})
        known = [c for c in CLASS_NAMES if c in seen]
        return known + sorted(seen - set(known))

    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, read, what="reading the class names of the predictions")


def _wide_row(row: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    probs = row["probabilities"] or {}
    wide = {k: v for k, v in row.items() if k != "probabilities"}
    wide.update({f"prob_{name}": probs.get(name) for name in classes})
    return wide


def _csv_cell(column: str, value: Any) -> Any:
    # As pandas writes the same table (`wbc predictions`): ISO times with microseconds and
    # +0000, lists as JSON, missing values empty.
    if value is None:
        return ""
    if column in _TIME_COLUMNS:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f%z")
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stream_csv(rows: Iterable[dict[str, Any]], classes: Sequence[str], *, chunk_rows: int = 1000) -> Iterator[bytes]:
    """The wide CSV of ``rows`` (header first), ``chunk_rows`` rows per piece of output."""
    import csv

    header = [c for c in EXPORT_COLUMNS if c != "probabilities"] + [f"prob_{name}" for name in classes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    yield buffer.getvalue().encode()
    for chunk in _chunks(rows, chunk_rows):
        buffer.seek(0)
        buffer.truncate()
        for row in chunk:
            wide = _wide_row(row, classes)
            writer.writerow([_csv_cell(c, wide[c]) for c in header])
        yield buffer.getvalue().encode()


def stream_json(rows: Iterable[dict[str, Any]], *, chunk_rows: int = 1000) -> Iterator[bytes]:
    """A JSON list of records (``probabilities`` an object, times ISO 8601), written as it is read."""
    yield b"["
    first = True
    for chunk in _chunks(rows, chunk_rows):
        parts = []
        for row in chunk:
            record = {k: (v.isoformat() if k in _TIME_COLUMNS and v is not None else v) for k, v in row.items()}
            parts.append(("\n" if first else ",\n") + json.dumps(record, ensure_ascii=False))
            first = False
        yield "".join(parts).encode()
    yield b"\n]\n"


class _Drain(io.RawIOBase):
    """A write-only file that keeps what was written until :meth:`take` (Parquet's sink)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def stream_parquet(
    rows: Iterable[dict[str, Any]], classes: Sequence[str], *, chunk_rows: int = STREAM_BATCH
) -> Iterator[bytes]:
    """The wide table as Parquet, one row group per ``chunk_rows`` rows, each sent once written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.string()
    types: dict[str, Any] = {
        "size": pa.int64(),
        "confidence": pa.float64(),
        "unfamiliar_score": pa.float64(),
        "needs_review": pa.bool_(),
        "review_reasons": pa.list_(text),
        **{c: pa.timestamp("us", tz="UTC") for c in _TIME_COLUMNS},
        **{f"prob_{name}": pa.float64() for name in classes},
    }
    names = [c for c in EXPORT_COLUMNS if c != "probabilities"] + [f"prob_{name}" for name in classes]
    schema = pa.schema([(name, types.get(name, text)) for name in names])
    sink = _Drain()
    with pq.ParquetWriter(sink, schema) as writer:
        for chunk in _chunks(rows, chunk_rows):
            wide = [_wide_row(row, classes) for row in chunk]
            columns = {
                name: [w[name] if name in types or w[name] is None else str(w[name]) for w in wide] for name in names
            }
            writer.write_table(pa.table(columns, schema=schema))
            yield sink.take()
    yield sink.take()
