"""The predictions table read and written (``wbc predictions`` and the lab's HTTP endpoint): the
rows of :func:`wbc_tasks.serving.export.export_query` read in batches from a server-side cursor
and written as CSV, JSON or Parquet piece by piece, never all in memory (a year of a busy lab's
rows is millions).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.spreadsheet import spreadsheet_safe
from wbc_tasks.serving.export import (
    ALL_ROWS,
    EXPORT_COLUMNS,
    EXPORT_FORMATS,
    TIME_COLUMNS,
    PredictionFilter,
    export_query,
    ordered_classes,
    since_clause,
)
from wbc_tasks.serving.predictions import open_engine, predictions, read_with_retries
from wbc_tasks.serving.queries import as_utc, in_batches

log = logging.getLogger(__name__)

#: Rows fetched from the database per round trip, and rows per written chunk (a Parquet row group).
STREAM_BATCH = 5000


def _status(row: dict[str, Any]) -> str:
    if row["predicted_class"] is not None:
        return "classified"
    return "rejected" if row["rejection_reason"] is not None else "pending"


def _export_row(mapping: Any) -> dict[str, Any]:
    """A row of the SELECT as the export has it: times UTC, its status, the export's columns in order."""
    row = dict(mapping)
    for column in TIME_COLUMNS:
        row[column] = as_utc(row[column])
    row["status"] = _status(row)
    return {c: row[c] for c in EXPORT_COLUMNS}


def _last_per_file(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The last of each file's consecutive rows (path and content)."""
    held: dict[str, Any] | None = None
    for row in rows:
        if held is not None and (held["path"], held["sha256"]) != (row["path"], row["sha256"]):
            yield held
        held = row
    if held is not None:
        yield held


def stream_predictions(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """The rows ``where`` selects (:func:`~wbc_tasks.serving.export.export_query`: its filter,
    order and columns, with ``status``; times UTC), one dict at a time: a server-side cursor on PostgreSQL, SQLite's own
    cursor, ``batch_size`` rows per fetch. ``where.latest`` keeps each file's last row: the query
    is ordered by path, content and prediction time, so a file's rows arrive together. Not
    retried: a lost connection ends the stream with the error (the client sees a cut-off
    download and asks again)."""
    query = export_query(where)
    since_utc = as_utc(where.since)
    with open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
            since_clause(query, since_utc, connection)
        )
        rows = (_export_row(mapping) for mapping in result.mappings())
        yield from _last_per_file(rows) if where.latest else rows


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
        return ordered_classes(seen)

    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, read, what="reading the class names of the predictions")


def _wide_columns(classes: Sequence[str]) -> list[str]:
    return [c for c in EXPORT_COLUMNS if c != "probabilities"] + [f"prob_{name}" for name in classes]


def _wide_row(row: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    probs = row["probabilities"] or {}
    wide = {k: v for k, v in row.items() if k != "probabilities"}
    wide.update({f"prob_{name}": probs.get(name) for name in classes})
    return wide


def _csv_time(value: Any) -> str:
    return "" if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f%z")


def _csv_list(value: Any) -> str:
    return "" if value is None else json.dumps(value)


def _csv_number(value: Any) -> Any:
    return "" if value is None else value


def _csv_text(value: Any) -> Any:
    return "" if value is None else spreadsheet_safe(value)


def _csv_formatter(column: str) -> Any:
    """How a column's cells are written, as pandas writes the same table: ISO times with
    microseconds and +0000, lists as JSON, missing values empty, text that a spreadsheet would
    run as a formula neutralised (numbers cannot be one). Chosen once per column, not per cell."""
    if column in TIME_COLUMNS:
        return _csv_time
    if column == "review_reasons":
        return _csv_list
    if column in ("confidence", "unfamiliar_score", "size", "needs_review") or column.startswith("prob_"):
        return _csv_number
    return _csv_text


def stream_csv(rows: Iterable[dict[str, Any]], classes: Sequence[str], *, chunk_rows: int = 1000) -> Iterator[bytes]:
    """The wide CSV of ``rows`` (header first), ``chunk_rows`` rows per piece of output."""
    import csv

    header = _wide_columns(classes)
    base = [c for c in header if not c.startswith("prob_")]
    formats = [_csv_formatter(c) for c in base]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    yield buffer.getvalue().encode()
    for chunk in in_batches(rows, chunk_rows):
        buffer.seek(0)
        buffer.truncate()
        for row in chunk:
            probs = row["probabilities"] or {}
            cells = [fmt(row[c]) for fmt, c in zip(formats, base, strict=True)]
            cells.extend("" if (p := probs.get(name)) is None else p for name in classes)
            writer.writerow(cells)
        yield buffer.getvalue().encode()


def stream_json(rows: Iterable[dict[str, Any]], *, chunk_rows: int = 1000) -> Iterator[bytes]:
    """A JSON list of records (``probabilities`` an object, times ISO 8601), written as it is read."""
    yield b"["
    first = True
    for chunk in in_batches(rows, chunk_rows):
        parts = []
        for row in chunk:
            record = {k: (v.isoformat() if k in TIME_COLUMNS and v is not None else v) for k, v in row.items()}
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


def _parquet_schema(classes: Sequence[str]) -> tuple[Any, set[str]]:
    """The wide table's Arrow schema, and the columns whose values keep their type (others become text)."""
    import pyarrow as pa

    text = pa.string()
    types: dict[str, Any] = {
        "size": pa.int64(),
        "confidence": pa.float64(),
        "unfamiliar_score": pa.float64(),
        "needs_review": pa.bool_(),
        "review_reasons": pa.list_(text),
        **{c: pa.timestamp("us", tz="UTC") for c in TIME_COLUMNS},
        **{f"prob_{name}": pa.float64() for name in classes},
    }
    return pa.schema([(name, types.get(name, text)) for name in _wide_columns(classes)]), set(types)


def stream_parquet(
    rows: Iterable[dict[str, Any]], classes: Sequence[str], *, chunk_rows: int = STREAM_BATCH
) -> Iterator[bytes]:
    """The wide table as Parquet, one row group per ``chunk_rows`` rows, each sent once written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, typed = _parquet_schema(classes)
    sink = _Drain()
    with pq.ParquetWriter(sink, schema) as writer:
        for chunk in in_batches(rows, chunk_rows):
            wide = [_wide_row(row, classes) for row in chunk]
            columns = {
                name: [w[name] if name in typed or w[name] is None else str(w[name]) for w in wide]
                for name in schema.names
            }
            writer.write_table(pa.table(columns, schema=schema))
            yield sink.take()
    yield sink.take()


def export_predictions(
    settings: Settings,
    where: PredictionFilter = ALL_ROWS,
    *,
    fmt: str = "csv",
    out: Path | str | IO | None = None,
) -> int:
    """Write the rows ``where`` selects (as :func:`stream_predictions`) and return how many.

    ``fmt``: ``csv`` and ``parquet`` are wide (one ``prob_<class>`` column per class of every model
    version with predictions, or of ``where.model_version``); ``json`` is a list of records with
    ``probabilities`` as an object. ``out``: a file path (written beside it and moved into place
    when whole: an export cut off by a lost connection leaves no partial file), an open file, or
    None for stdout. Read and written in batches, so memory does not grow with the table.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    counted = [0]

    def rows() -> Iterator[dict[str, Any]]:
        for row in stream_predictions(settings, where):
            counted[0] += 1
            yield row

    if fmt == "json":
        pieces = stream_json(rows())
    else:
        classes = stream_probability_columns(settings, model_version=where.model_version)
        pieces = stream_csv(rows(), classes) if fmt == "csv" else stream_parquet(rows(), classes)
    _write(pieces, out)
    log.info("exported %d rows as %s to %s", counted[0], fmt, out or "stdout")
    return counted[0]


def _write(pieces: Iterable[bytes], out: Path | str | IO | None) -> None:
    if out is None:
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
    elif isinstance(out, str | Path):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                for piece in pieces:
                    handle.write(piece)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    elif isinstance(out, io.TextIOBase):
        for piece in pieces:
            out.write(piece.decode())
    else:
        for piece in pieces:
            out.write(piece)
