"""How the predictions table's streamed rows are written (:mod:`wbc_tasks.serving.export_stream`
reads them): CSV and Parquet from batches of columns, JSON from rows, each piece as it is ready;
and the helpers both sides share (the batch type, remembered conversions, the JSON columns).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC
from typing import Any

from wbc_tasks.core.spreadsheet import FORMULA_STARTS
from wbc_tasks.serving.export import EXPORT_COLUMNS, TIME_COLUMNS
from wbc_tasks.serving.queries import in_batches

#: A batch of the export's rows: column name -> values, in the export's column order; the time
#: columns are Arrow arrays (:func:`utc_times`), the others lists.
Columns = dict[str, Any]
#: Columns read as their stored JSON text (:func:`wbc_tasks.serving.export_stream.stream_columns`).
JSON_TEXT_COLUMNS = ("review_reasons", "probabilities")
_FORMULA_FIRST = frozenset(FORMULA_STARTS)


def utc_times(values: Sequence[Any]) -> Any:
    """A column of times read from the database as an Arrow array of UTC microseconds (naive
    times are UTC, as SQLite stores them; aware ones are converted), built in C rather than a
    conversion per value (a busy lab's rows each carry their own times)."""
    import pyarrow as pa

    return pa.array(values, pa.timestamp("us", tz="UTC"))


def python_times(times: Any) -> list[Any]:
    """An array of :func:`utc_times` as aware UTC datetimes (None where missing)."""
    import pyarrow as pa

    # Read as naive and tagged here: Arrow's aware conversion looks the zone up per value (3x slower).
    return [None if v is None else v.replace(tzinfo=UTC) for v in times.view(pa.timestamp("us")).to_pylist()]


def parsed_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


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


def _csv_times(times: Any) -> Any:
    """An array of :func:`utc_times` as the CSV's text, ISO 8601 with microseconds and +0000, by
    numpy (Arrow's own ``strftime`` first loads its compute functions: 0.15 s, the time of a
    drop's whole export)."""
    import numpy as np
    import pyarrow as pa

    instants = times.to_numpy(zero_copy_only=False)
    text = np.char.add(np.datetime_as_string(instants, unit="us"), "+0000")
    return pa.array(text, pa.string(), mask=np.isnat(instants))


def _spreadsheet_safe_column(values: Sequence[Any]) -> list[Any]:
    """:func:`~wbc_tasks.core.spreadsheet.spreadsheet_safe` on a column of text (a comprehension:
    importing ``pyarrow.compute`` costs a second, more than a whole export of a drop)."""
    return [v if not v or v[0] not in _FORMULA_FIRST else "'" + v for v in values]


def _csv_batch(columns: Columns, classes: Sequence[str]) -> Any:
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
            arrays.append(_csv_times(values))
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
    """The wide CSV of ``batches`` (header first), a piece per batch, written by Arrow's CSV
    writer (text quoted; a third of the time of Python's ``csv`` per row)."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(_wide_columns(classes))
    yield header.getvalue().encode()
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    for columns in batches:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(_csv_batch(columns, classes), sink, options)
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
            table[name] = [parsed_json(v) for v in values]
        elif name != "probabilities":
            table[name] = values if name in typed else [None if v is None else str(v) for v in values]
    probabilities = _probability_arrays(columns["probabilities"], classes)
    table.update({f"prob_{name}": array for name, array in zip(classes, probabilities, strict=True)})
    return pa.table(table, schema=schema)


def stream_parquet(batches: Iterable[Columns], classes: Sequence[str]) -> Iterator[bytes]:
    """The wide table of ``batches`` as Parquet, one row group per batch, each sent once written."""
    import pyarrow.parquet as pq

    schema, typed = _parquet_schema(classes)
    sink = _Drain()
    with pq.ParquetWriter(sink, schema) as writer:
        for columns in batches:
            writer.write_table(_parquet_batch(columns, classes, schema, typed))
            yield sink.take()
    yield sink.take()
