"""Every drop with its counts, for the drops page and ``/lab/api/drops``: one row per drop in
``drop_summaries`` (migration 0006), so a page costs its own rows whatever the history holds
(issue 31).

Kept right by every writer, in the writer's own transaction: :func:`refresh_after_write`
recounts the drops a write touched from their rows (the night's chunks and find step through
``commit.write_rows``, a review through ``record_review``). A write that fails rolls its
recount back with its rows, so a summary never counts half a night. On PostgreSQL the recounts
take one transaction-scoped advisory lock, so two writers cannot each count without the other's
rows and overwrite each other.

A drop's counts (the rule :func:`count_drop` applies to its rows): ``files`` (each path once,
with its newest content), ``cells`` (classified), ``rejected``, ``pending``, ``needs_review``
(flagged or blast suspected), ``reviewed`` (cells with a review) and ``blast_suspected``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Text, cast, func, inspect, select, text
from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import BLAST_CLASS, ReviewReason
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    drop_summaries,
    files_seen,
    open_engine,
    predictions,
    read_with_retries,
    rejections,
    reviews,
    upsert,
    utcnow,
)
from wbc_tasks.serving.queries import in_batches
from wbc_tasks.serving.review_queue import database_exists

log = logging.getLogger(__name__)
T = TypeVar("T")

COUNTS = ("files", "cells", "rejected", "pending", "needs_review", "reviewed", "blast_suspected")
#: Any constant: the key of the advisory lock that serialises recounts on PostgreSQL.
_RECOUNT_LOCK = 31_000_006
_BLAST_REASON = f'"{ReviewReason.BLAST_SUSPECTED.value}"'


def count_drop(connection: Connection, drop: str) -> dict[str, Any]:
    """``drop``'s counts, read from its rows: four queries joined on the drop's files, newest
    rows last (``ORDER BY`` time, id), so no time or JSON is parsed per row (a review recounts
    its drop, and a night each drop a chunk touched)."""
    in_drop = files_seen.c.drop == drop
    files: dict[str, str] = {}  # path -> the sha256 of its newest content
    paths = select(files_seen.c.path, files_seen.c.sha256).where(in_drop)
    for path, sha in connection.execute(paths.order_by(files_seen.c.seen_at, files_seen.c.id)):
        files[path] = sha
    rejected = set(
        connection.execute(
            select(rejections.c.path, rejections.c.sha256)
            .join(files_seen, (files_seen.c.path == rejections.c.path) & (files_seen.c.sha256 == rejections.c.sha256))
            .where(in_drop)
        ).all()
    )
    hashes_in_drop = select(files_seen.c.sha256).where(in_drop).distinct().subquery()
    newest: dict[str, tuple[str, bool, str]] = {}  # sha256 -> (class, needs_review, reasons as JSON text)
    chosen = (
        select(
            predictions.c.sha256,
            predictions.c.predicted_class,
            predictions.c.needs_review,
            cast(predictions.c.review_reasons, Text),
        )
        .join(hashes_in_drop, hashes_in_drop.c.sha256 == predictions.c.sha256)
        .order_by(predictions.c.created_at, predictions.c.id)
    )
    for sha, predicted_class, needs_review, reasons in connection.execute(chosen):
        newest[sha] = (predicted_class, bool(needs_review), reasons or "")
    with_review = select(reviews.c.sha256).join(hashes_in_drop, hashes_in_drop.c.sha256 == reviews.c.sha256)
    reviewed = set(connection.execute(with_review.distinct()).scalars())
    counts = dict.fromkeys(COUNTS, 0)
    for path, sha in files.items():
        counts["files"] += 1
        prediction = newest.get(sha) if sha != UNREADABLE_SHA else None
        if (path, sha) in rejected:
            counts["rejected"] += 1
        elif prediction is None:
            counts["pending"] += 1
        else:
            predicted_class, needs_review, reasons = prediction
            # The blast rule (review_queue.is_blast_suspected) on the reasons' JSON text.
            blast = predicted_class == BLAST_CLASS or _BLAST_REASON in reasons
            counts["cells"] += 1
            counts["needs_review"] += int(needs_review or blast)
            counts["blast_suspected"] += int(blast)
            counts["reviewed"] += int(sha in reviewed)
    return {"drop": drop, **counts}


def refresh(connection: Connection, drops: Iterable[str]) -> int:
    """Recount ``drops`` from their rows and store the counts; return how many were recounted."""
    names = sorted(set(drops))
    if not names:
        return 0
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _RECOUNT_LOCK})
    now = utcnow()
    upsert(connection, drop_summaries, [{**count_drop(connection, d), "counted_at": now} for d in names], ("drop",))
    return len(names)


def drops_holding(connection: Connection, *, paths: Collection[str] = (), hashes: Collection[str] = ()) -> set[str]:
    """The drops with a file at one of ``paths`` or with one of ``hashes``' content."""
    drops: set[str] = set()
    for part in in_batches(sorted(set(paths))):
        drops.update(connection.execute(select(files_seen.c.drop).where(files_seen.c.path.in_(part))).scalars())
    for part in in_batches(sorted(set(hashes) - {UNREADABLE_SHA})):
        drops.update(connection.execute(select(files_seen.c.drop).where(files_seen.c.sha256.in_(part))).scalars())
    return drops


def refresh_after_write(
    connection: Connection,
    *,
    seen: Sequence[dict[str, Any]] = (),
    rejected_paths: Collection[str] = (),
    hashes: Collection[str] = (),
) -> int:
    """Recount every drop a write touched: the drops of its ``files_seen`` rows, of its rejected
    paths, and every drop holding content whose newest prediction or review it changed
    (``hashes``: a copy of an image in an older drop counts with it)."""
    touched = {row["drop"] for row in seen} | drops_holding(connection, paths=rejected_paths, hashes=hashes)
    return refresh(connection, touched)


def recount_all(connection: Connection) -> int:
    """Recount every drop from its rows (filling the table for a database written before it
    existed, or repairing it); return how many drops."""
    names = list(connection.execute(select(files_seen.c.drop).distinct()).scalars())
    for part in in_batches(sorted(names), 50):  # bounded memory: a few drops' rows at a time
        refresh(connection, part)
    return len(names)


# --------------------------------------------------------------------------------------------
# Reading: what the drops page and the API show
# --------------------------------------------------------------------------------------------


def _public(row: Any) -> dict[str, Any]:
    return {"drop": row["drop"], **{name: int(row[name]) for name in COUNTS}}


def _summaries_exist(connection: Connection) -> bool:
    return inspect(connection).has_table(drop_summaries.name)


def _read(settings: Settings, work: Callable[[Connection], T], what: str) -> T:
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, work, what=what)


def list_drops(settings: Settings, *, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Drops with their counts, newest drop name first: every drop (``limit`` None, the
    default), or the page of ``limit`` drops after the first ``offset``."""
    if not database_exists(settings):
        return []

    def read(connection: Connection) -> list[dict[str, Any]]:
        if not _summaries_exist(connection):  # not migrated yet: counted from the rows
            names = sorted(connection.execute(select(files_seen.c.drop).distinct()).scalars(), reverse=True)
            return [count_drop(connection, d) for d in names[offset : None if limit is None else offset + limit]]
        query = select(drop_summaries).order_by(drop_summaries.c.drop.desc()).offset(offset).limit(limit)
        return [_public(r) for r in connection.execute(query).mappings()]

    return _read(settings, read, "listing drops")


def drop_names(settings: Settings, *, limit: int | None = None, offset: int = 0) -> list[str]:
    """The drops' names, newest first."""
    return [d["drop"] for d in list_drops(settings, limit=limit, offset=offset)]


def count_drops(settings: Settings) -> int:
    """How many drops there are."""
    if not database_exists(settings):
        return 0

    def read(connection: Connection) -> int:
        if not _summaries_exist(connection):
            return int(connection.execute(select(func.count(func.distinct(files_seen.c.drop)))).scalar() or 0)
        return int(connection.execute(select(func.count()).select_from(drop_summaries)).scalar() or 0)

    return _read(settings, read, "counting drops")


def drop_counts(settings: Settings, drops: Sequence[str]) -> list[dict[str, Any]]:
    """The counts of ``drops``, in that order (drops with no file are left out)."""
    if not database_exists(settings) or not drops:
        return []

    def read(connection: Connection) -> list[dict[str, Any]]:
        if not _summaries_exist(connection):
            found = {d: count_drop(connection, d) for d in drops}
            return [found[d] for d in drops if found[d]["files"]]
        rows: dict[str, dict[str, Any]] = {}
        for part in in_batches(sorted(set(drops))):
            query = select(drop_summaries).where(drop_summaries.c.drop.in_(part))
            rows.update((r["drop"], _public(r)) for r in connection.execute(query).mappings())
        return [rows[d] for d in drops if d in rows]

    return _read(settings, read, "reading drops' counts")
