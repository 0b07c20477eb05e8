"""The predictions table read and written (``wbc predictions`` and the lab's HTTP endpoint): the
rows of :func:`wbc_tasks.serving.export.export_query` read in batches from a server-side cursor
and written as CSV, JSON or Parquet piece by piece, never all in memory (a year of a busy lab's
rows is millions).
"""

from __future__ import annotations

import io
import json
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
from wbc_tasks.core.spreadsheet import FORMULA_STARTS
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


Columns = dict[str, list[Any]]
#: Columns read as their stored JSON text (:func:`stream_columns`).
JSON_TEXT_COLUMNS = ("review_reasons", "probabilities")
_FORMULA_FIRST = frozenset(FORMULA_STARTS)


#: Distinct values a :class:`_Remembered` keeps (then it starts again): a few per night in real
#: tables; a table whose every row has its own time gains nothing, and a large memory would cost
#: tens of MB (measured: 100,000 kept times and their texts, 110 MB more).
_REMEMBERED = 5_000


class _Remembered:
    """``convert`` applied to whole columns (None stays None), remembering what it converted: a
    night's rows share few distinct times, so most values become a look-up."""

    def __init__(self, convert: Any) -> None:
        self._convert = convert
        self._seen: dict[Any, Any] = {None: None}

    def column(self, values: Sequence[Any]) -> list[Any]:
        new = set(values).difference(self._seen)
        if len(self._seen) + len(new) > _REMEMBERED:
            self._seen = {None: None}
        self._seen.update((value, self._convert(value)) for value in new)
        seen = self._seen
        return [seen[value] for value in values]


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
    server without holding the GIL, so the next batch is read while this one is written. Stops
    the thread when the reader stops early (a client that hung up)."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def fetch() -> None:
        try:
            for part in parts:
                while not stop.is_set():
                    try:
                        handoff.put(part, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(done)
        except BaseException as exc:  # handed to the reader, raised there
            handoff.put(exc)

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


def _export_columns(names: Sequence[str], rows: Sequence[Any], to_utc: _Remembered) -> Columns:
    """One batch of the SELECT's rows as the export's columns, in order: times UTC, ``status`` added."""
    read = dict(zip(names, (list(values) for values in zip(*rows, strict=True)), strict=True))
    for column in TIME_COLUMNS:
        read[column] = to_utc.column(read[column])
    read["status"] = [
        "classified" if predicted is not None else "pending" if rejected is None else "rejected"
        for predicted, rejected in zip(read["predicted_class"], read["rejection_reason"], strict=True)
    ]
    return {column: read[column] for column in EXPORT_COLUMNS}


def stream_columns(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[Columns]:
    """The rows ``where`` selects (:func:`~wbc_tasks.serving.export.export_query`: its filter,
    order and columns, with ``status``; times UTC) in batches of ``batch_size``, each a dict of
    column lists in the export's order; ``review_reasons`` and ``probabilities`` are their JSON
    text (None where missing). A server-side cursor on PostgreSQL, SQLite's own cursor.
    ``where.latest`` keeps each file's last row: the query is ordered by path, content and
    prediction time, so a file's rows arrive together. Not retried: a lost connection ends the
    stream with the error (the client sees a cut-off download and asks again)."""
    query = export_query(where, json_as_text=True)
    since_utc = as_utc(where.since)
    to_utc = _Remembered(as_utc)
    with open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
            since_clause(query, since_utc, connection)
        )
        names = list(result.keys())
        parts: Iterable[Sequence[Any]] = result.partitions(batch_size)
        if where.latest:
            rows = (row for part in parts for row in part)
            parts = in_batches(_last_per_file(rows, names.index("path"), names.index("sha256")), batch_size)
        if connection.dialect.name == "postgresql":  # measured: +10-30 % there, nothing on SQLite
            parts = _read_ahead(parts)
        for part in parts:
            yield _export_columns(names, part, to_utc)


def _parsed_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def stream_predictions(
    settings: Settings, where: PredictionFilter = ALL_ROWS, *, batch_size: int = STREAM_BATCH
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`stream_columns`, one dict at a time, ``review_reasons`` and
    ``probabilities`` decoded (a list and a dict)."""
    for columns in stream_columns(settings, where, batch_size=batch_size):
        names = list(columns)
        for values in zip(*columns.values(), strict=True):
            row = dict(zip(names, values, strict=True))
            for column in JSON_TEXT_COLUMNS:
                row[column] = _parsed_json(row[column])
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


def _wide_columns(classes: Sequence[str]) -> list[str]:
    return [c for c in EXPORT_COLUMNS if c != "probabilities"] + [f"prob_{name}" for name in classes]


def _probability_arrays(texts: Sequence[str | None], classes: Sequence[str]) -> list[Any]:
    """Each class's probabilities in a batch (null where a row has none), parsed from the rows'
    JSON text by Arrow's JSON reader in one call rather than row by row."""
    import pyarrow as pa
    import pyarrow.json as pajson

    if not classes:
        return []
    # json.dumps, which wrote them, escapes line breaks: one object per line.
    lines = "\n".join("{}" if text is None or text == "null" else text for text in texts).encode()
    options = pajson.ParseOptions(
        explicit_schema=pa.schema([(name, pa.float64()) for name in classes]), unexpected_field_behavior="ignore"
    )
    table = pajson.read_json(io.BytesIO(lines), parse_options=options)
    return [table.column(name) for name in classes]


def _csv_time(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f%z")


def _spreadsheet_safe_column(values: Sequence[Any]) -> list[Any]:
    """:func:`~wbc_tasks.core.spreadsheet.spreadsheet_safe` on a column of text (a comprehension:
    importing ``pyarrow.compute`` costs a second, more than a whole export of a drop)."""
    return [v if not v or v[0] not in _FORMULA_FIRST else "'" + v for v in values]


def _csv_batch(columns: Columns, classes: Sequence[str], times: _Remembered) -> Any:
    """One batch as an Arrow table of the wide CSV's columns, each cell as the CSV shows it:
    ISO times with microseconds and +0000, lists as JSON, ``True``/``False``, missing values
    empty, text that a spreadsheet would run as a formula neutralised (numbers cannot be one)."""
    import pyarrow as pa

    arrays = []
    for name in EXPORT_COLUMNS:
        values = columns[name]
        if name == "probabilities":
            continue
        if name in TIME_COLUMNS:
            arrays.append(pa.array(times.column(values), pa.string()))
        elif name == "review_reasons":
            arrays.append(pa.array([None if v == "null" else v for v in values], pa.string()))
        elif name == "needs_review":
            arrays.append(pa.array([None if v is None else str(bool(v)) for v in values], pa.string()))
        elif name in ("confidence", "unfamiliar_score"):
            arrays.append(pa.array(values, pa.float64()))
        elif name == "size":
            arrays.append(pa.array(values, pa.int64()))
        else:
            arrays.append(pa.array(_spreadsheet_safe_column(values), pa.string()))
    arrays.extend(_probability_arrays(columns["probabilities"], classes))
    return pa.Table.from_arrays(arrays, names=_wide_columns(classes))


def stream_csv(batches: Iterable[Columns], classes: Sequence[str]) -> Iterator[bytes]:
    """The wide CSV of :func:`stream_columns`' ``batches`` (header first), a piece per batch,
    written by Arrow's CSV writer (text quoted; a third of the time of Python's ``csv`` per row)."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(_wide_columns(classes))
    yield header.getvalue().encode()
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    times = _Remembered(_csv_time)
    for columns in batches:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(_csv_batch(columns, classes, times), sink, options)
        yield sink.getvalue().to_pybytes()


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


def _parquet_batch(columns: Columns, classes: Sequence[str], schema: Any, typed: set[str]) -> Any:
    import pyarrow as pa

    table: dict[str, Any] = {}
    for name in EXPORT_COLUMNS:
        values = columns[name]
        if name == "review_reasons":
            table[name] = [_parsed_json(v) for v in values]
        elif name != "probabilities":
            table[name] = values if name in typed else [None if v is None else str(v) for v in values]
    probabilities = _probability_arrays(columns["probabilities"], classes)
    table.update({f"prob_{name}": array for name, array in zip(classes, probabilities, strict=True)})
    return pa.table(table, schema=schema)


def stream_parquet(batches: Iterable[Columns], classes: Sequence[str]) -> Iterator[bytes]:
    """The wide table of :func:`stream_columns`' ``batches`` as Parquet, one row group per
    batch, each sent once written."""
    import pyarrow.parquet as pq

    schema, typed = _parquet_schema(classes)
    sink = _Drain()
    with pq.ParquetWriter(sink, schema) as writer:
        for columns in batches:
            writer.write_table(_parquet_batch(columns, classes, schema, typed))
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
