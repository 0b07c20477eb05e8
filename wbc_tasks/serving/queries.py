"""The look-ups a nightly run sorts its files with: which images a model already classified,
which files were seen before and which were rejected. Also the two helpers every read of the
predictions database shares: IN lists in batches and times read back as UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection

from wbc_tasks.serving.predictions import files_seen, predictions, rejections

#: SQLite allows a limited number of bound parameters per statement; IN lists are split.
IN_BATCH = 500

Item = TypeVar("Item")


def in_batches(items: Iterable[Item], size: int = IN_BATCH) -> Iterator[list[Item]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily: IN lists of a query,
    rows of a streamed export."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def as_utc(value: datetime | str | None) -> datetime | None:
    """A time read from the database (or given by a user) as an aware UTC time; naive times are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def predicted_hashes(
    connection: Connection,
    hashes: Iterable[str],
    *,
    model_name: str,
    model_version: str | None = None,
) -> set[str]:
    """Which of ``hashes`` have a prediction by ``model_name`` (any version when None)."""
    found: set[str] = set()
    for part in in_batches(sorted(set(hashes))):
        query = select(predictions.c.sha256).where(
            predictions.c.sha256.in_(part), predictions.c.model_name == model_name
        )
        if model_version is not None:
            query = query.where(predictions.c.model_version == str(model_version))
        found.update(connection.execute(query).scalars())
    return found


def seen_files(connection: Connection, paths: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """``files_seen`` rows of ``paths``: path -> [{sha256, size, mtime, seen_at}, ...]."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for part in in_batches(sorted(set(paths))):
        query = select(
            files_seen.c.path,
            files_seen.c.sha256,
            files_seen.c.size,
            files_seen.c.mtime,
            files_seen.c.seen_at,
        ).where(files_seen.c.path.in_(part))
        for row in connection.execute(query).mappings():
            rows.setdefault(row["path"], []).append(dict(row))
    return rows


def rejected_files(connection: Connection, paths: Iterable[str]) -> set[tuple[str, str]]:
    """(path, sha256) pairs of ``paths`` that already have a rejection."""
    found: set[tuple[str, str]] = set()
    for part in in_batches(sorted(set(paths))):
        query = select(rejections.c.path, rejections.c.sha256).where(rejections.c.path.in_(part))
        found.update((p, s) for p, s in connection.execute(query))
    return found
