"""The predictions table read and written (``wbc predictions`` and the lab's HTTP endpoint): the
rows of :func:`wbc_tasks.serving.export.export_query` read in batches from a server-side cursor
and written as CSV, JSON or Parquet (:mod:`wbc_tasks.serving.export_formats`) piece by piece,
never all in memory (a year of a busy lab's rows is millions).
"""

from __future__ import annotations

import io
import logging
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
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
from wbc_tasks.serving.export_formats import (
    JSON_TEXT_COLUMNS,
    Columns,
    parsed_json,
    python_times,
    stream_csv,
    stream_json,
    stream_parquet,
    utc_times,
)
from wbc_tasks.serving.predictions import open_engine, predictions, read_with_retries
from wbc_tasks.serving.queries import as_utc, in_batches

log = logging.getLogger(__name__)

#: Rows fetched from the database per round trip, and rows per written chunk (a Parquet row group).
STREAM_BATCH = 5000


def _last_per_file(rows: Iterable[Any], path: int, sha256: int) -> Iterator[Any]:
    """The last of each file's consecutive rows (same values at indices ``path`` and ``sha256``)."""
    held: Any = None
    for row in rows:
        if held is not None and (held[path], held[sha256]) != (row[path], row[sha256]):
            yield held
        held = row
    if held is not None:
        yield held


def _read_ahead(parts: Iterable[Sequence[Any]], depth: int = 2) -> Iterator[Sequence[Any]]:
    """``parts``, fetched by a thread up to ``depth`` batches ahead: the driver waits for the
    server (SQLite: steps its pages) without holding the GIL, so the next batch is read while this
    one is written. Stops the thread when the reader stops early (a client that hung up)."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item: Any) -> bool:
        """Hand ``item`` over, unless the reader stops first (then nobody would take it)."""
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def fetch() -> None:
        try:
            for part in parts:
                if not offer(part):
                    return
            offer(done)
        except BaseException as exc:  # handed to the reader, raised there
            offer(exc)

    fetcher = threading.Thread(target=fetch, name="export-read-ahead", daemon=True)
    fetcher.start()
    try:
        while (item := handoff.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        fetcher.join()


def _export_columns(names: Sequence[str], rows: Sequence[Any]) -> Columns:
    """One batch of the SELECT's rows as the export's columns, in order: times UTC, ``status`` added."""
    read = dict(zip(names, (list(values) for values in zip(*rows, strict=True)), strict=True))
    for column in TIME_COLUMNS:
        read[column] = utc_times(read[column])
    read["status"] = [
        "classified" if predicted is not None else "pending" if rejected is None else "rejected"
        for predicted, rejected in zip(read["predicted_class"], read["rejection_reason"], strict=True)
    ]
    return {column: read[column] for column in EXPORT_COLUMNS}


def stream_columns(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[Columns]:
    """The rows ``where`` selects (:func:`~wbc_tasks.serving.export.export_query`: its filter,
    order and columns, with ``status``) in batches of ``batch_size``, each a dict of columns in
    the export's order: times as Arrow arrays of UTC instants, the rest lists; ``review_reasons``
    and ``probabilities`` are their JSON text (None where missing).
    A server-side cursor on PostgreSQL, SQLite's own cursor.
    ``where.latest`` keeps each file's last row: the query is ordered by path, content and
    prediction time, so a file's rows arrive together. Not retried: a lost connection ends the
    stream with the error (the client sees a cut-off download and asks again)."""
    query = export_query(where, json_as_text=True)
    since_utc = as_utc(where.since)
    with open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
            since_clause(query, since_utc, connection)
        )
        names = list(result.keys())
        parts: Iterable[Sequence[Any]] = result.partitions(batch_size)
        if where.latest:
            rows = (row for part in parts for row in part)
            parts = in_batches(_last_per_file(rows, names.index("path"), names.index("sha256")), batch_size)
        # Measured: +10-30 % on PostgreSQL, +10 % on SQLite (its engine steps without the GIL
        # while Arrow writes). An in-memory SQLite connection belongs to its thread.
        if connection.dialect.name != "sqlite" or engine.url.database not in (None, "", ":memory:"):
            parts = _read_ahead(parts)
        for part in parts:
            yield _export_columns(names, part)


def stream_predictions(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`stream_columns`, one dict at a time, ``review_reasons`` and
    ``probabilities`` decoded (a list and a dict)."""
    for columns in stream_columns(settings, where, batch_size=batch_size):
        for column in TIME_COLUMNS:
            columns[column] = python_times(columns[column])
        names = list(columns)
        for values in zip(*columns.values(), strict=True):
            row = dict(zip(names, values, strict=True))
            for column in JSON_TEXT_COLUMNS:
                row[column] = parsed_json(row[column])
            yield row


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

    def batches() -> Iterator[Columns]:
        for columns in stream_columns(settings, where):
            counted[0] += len(columns["path"])
            yield columns

    def rows() -> Iterator[dict[str, Any]]:
        for row in stream_predictions(settings, where):
            counted[0] += 1
            yield row

    if fmt == "json":
        pieces = stream_json(rows())
    else:
        classes = stream_probability_columns(settings, model_version=where.model_version)
        pieces = stream_csv(batches(), classes) if fmt == "csv" else stream_parquet(batches(), classes)
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
