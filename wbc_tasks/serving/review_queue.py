"""What people review, read from the predictions database: the files of a drop with their
status, prediction and latest review; a drop's review queue; the latest review of each image.
Also the blast rule and the reasons a prediction needs review, which the queue, the drops'
counts (:mod:`wbc_tasks.serving.drop_summaries`) and the report share.

A review is a row of ``reviews`` (migration 0003) and is never updated: a second opinion is a new
row, and the latest one (by ``reviewed_at``, then id) counts. Reads only: recording a decision is
:mod:`wbc_tasks.serving.review_decisions`, the reviewed images as files
:mod:`wbc_tasks.serving.review_export`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, make_url

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import BLAST_CLASS, ReviewReason
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    open_engine,
    predictions,
    read_with_retries,
    rejections,
    reviews,
)
from wbc_tasks.serving.queries import as_utc, in_batches


def reasons_of(prediction: dict[str, Any]) -> list[str]:
    """Why a prediction needs review: its recorded reasons, or, for a row flagged before reasons
    were recorded (an empty list), low confidence: the fixed confidence threshold was then the
    only way to be flagged (migration 0002 gives old rows the same reason)."""
    recorded = [str(r) for r in (prediction.get("review_reasons") or [])]
    if not recorded and prediction.get("needs_review"):
        return [ReviewReason.LOW_CONFIDENCE.value]
    return recorded


def is_blast_suspected(prediction: dict[str, Any]) -> bool:
    """The blast rule: predicted blasts, or a recorded ``blast_suspected`` reason."""
    return prediction.get("predicted_class") == BLAST_CLASS or ReviewReason.BLAST_SUSPECTED in reasons_of(prediction)


# --------------------------------------------------------------------------------------------
# The cells of a drop with their prediction and latest review
# --------------------------------------------------------------------------------------------


def _reviews_table_exists(connection: Connection) -> bool:
    return inspect(connection).has_table(reviews.name)


def newest_by(rows: Iterable[dict[str, Any]], key: str, when: str) -> dict[Any, dict[str, Any]]:
    """``row[key]`` -> the row with the latest ``(row[when], row["id"])`` (``when`` read as UTC)."""
    newest: dict[Any, dict[str, Any]] = {}
    for row in rows:
        row = {**row, when: as_utc(row[when])}
        current = newest.get(row[key])
        if current is None or (row[when], row["id"]) > (current[when], current["id"]):
            newest[row[key]] = row
    return newest


def _reviews_of(connection: Connection, hashes: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """sha256 -> its latest review (every image with a review when ``hashes`` is None)."""
    if hashes is None:
        return newest_by((dict(r) for r in connection.execute(select(reviews)).mappings()), "sha256", "reviewed_at")
    rows: list[dict[str, Any]] = []
    for part in in_batches(sorted(set(hashes))):
        rows.extend(dict(r) for r in connection.execute(select(reviews).where(reviews.c.sha256.in_(part))).mappings())
    return newest_by(rows, "sha256", "reviewed_at")


#: A prediction's columns but its probabilities: what the report reads of every cell (it never
#: shows them, so it need not fetch and decode each cell's JSON).
_WITHOUT_PROBABILITIES = [c for c in predictions.columns if c.name != "probabilities"]


def predictions_of(
    connection: Connection,
    hashes: Sequence[str] | None,
    model_version: str | None,
    *,
    with_probabilities: bool = True,
) -> dict[str, dict[str, Any]]:
    """sha256 -> the prediction a report or review uses: ``model_version``'s, else the newest
    (of every image when ``hashes`` is None); without ``probabilities`` unless asked."""
    query = select(predictions) if with_probabilities else select(*_WITHOUT_PROBABILITIES)
    if model_version is not None:
        query = query.where(predictions.c.model_version == str(model_version))
    found: list[dict[str, Any]] = []
    if hashes is None:
        found = [dict(r) for r in connection.execute(query).mappings()]
    else:
        for part in in_batches(sorted(set(hashes) - {UNREADABLE_SHA})):
            found.extend(dict(r) for r in connection.execute(query.where(predictions.c.sha256.in_(part))).mappings())
    return newest_by(found, "sha256", "created_at")


def _rejected(connection: Connection, paths: list[str] | None) -> dict[tuple[str, str], str]:
    """(path, sha256) -> the rejection reason, of ``paths`` (every file when None)."""
    query = select(rejections.c.path, rejections.c.sha256, rejections.c.reason)
    if paths is None:
        return {(p, s): reason for p, s, reason in connection.execute(query)}
    rejected: dict[tuple[str, str], str] = {}
    for part in in_batches(paths):
        for p, s, reason in connection.execute(query.where(rejections.c.path.in_(part))):
            rejected[(p, s)] = reason
    return rejected


def _cells(
    connection: Connection, drop: str | None, model_version: str | None, *, with_probabilities: bool = True
) -> list[dict[str, Any]]:
    """One dict per file of ``drop`` (every drop when None) as it is now (a file that changed
    counts with its newest content): status ``classified``, ``rejected`` or ``pending``."""
    query = select(files_seen.c.path, files_seen.c.drop, files_seen.c.sha256, files_seen.c.seen_at, files_seen.c.id)
    if drop is not None:
        query = query.where(files_seen.c.drop == drop)
    newest = newest_by((dict(r) for r in connection.execute(query).mappings()), "path", "seen_at")
    files = sorted(newest.values(), key=lambda f: f["path"])
    hashes = None if drop is None else [f["sha256"] for f in files]
    rejected = _rejected(connection, None if drop is None else [f["path"] for f in files])
    chosen = predictions_of(connection, hashes, model_version, with_probabilities=with_probabilities)
    latest = _reviews_of(connection, hashes) if _reviews_table_exists(connection) else {}
    cells = []
    for f in files:
        key = (f["path"], f["sha256"])
        prediction = chosen.get(f["sha256"]) if f["sha256"] != UNREADABLE_SHA else None
        if key in rejected:
            status = "rejected"
        elif prediction is not None:
            status = "classified"
        else:
            status = "pending"
        cell: dict[str, Any] = {
            "path": f["path"],
            "drop": f["drop"],
            "sha256": f["sha256"],
            "status": status,
            "rejection_reason": rejected.get(key),
            "prediction": prediction if status == "classified" else None,
            "review": latest.get(f["sha256"]) if status == "classified" else None,
        }
        cells.append(cell)
    return cells


def drop_cells(
    settings: Settings,
    drop: str | None,
    *,
    model_version: str | int | None = None,
    with_probabilities: bool = True,
) -> list[dict[str, Any]]:
    """The files of ``drop`` (every drop when None) with status, prediction and latest review.

    Each dict: ``path`` (relative to the classify folder), ``drop``, ``sha256``, ``status``
    (``classified``, ``rejected``, ``pending``), ``rejection_reason``, ``prediction`` (the row of
    ``model_version``, else the newest, its ``probabilities`` left out unless
    ``with_probabilities``; None unless classified) and ``review`` (the latest review of the
    image's content, or None).
    """
    version = None if model_version is None else str(model_version)
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(
            settings,
            engine,
            lambda c: _cells(c, drop, version, with_probabilities=with_probabilities),
            what=f"reading the cells of drop {drop!r}",
        )


# --------------------------------------------------------------------------------------------
# The queue and the latest reviews
# --------------------------------------------------------------------------------------------


def _top_classes(probabilities: dict[str, float], n: int = 3) -> list[dict[str, Any]]:
    ranked = sorted(probabilities.items(), key=lambda item: (-float(item[1]), item[0]))
    return [{"class": name, "probability": float(p)} for name, p in ranked[:n]]


def _public_review(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: row[key] for key in (c.name for c in reviews.columns)}


def _queue_entry(cell: dict[str, Any], blast: bool) -> dict[str, Any]:
    prediction = cell["prediction"]
    return {
        "path": cell["path"],
        "drop": cell["drop"],
        "sha256": cell["sha256"],
        "predicted_class": prediction["predicted_class"],
        "confidence": float(prediction["confidence"]),
        "top_classes": _top_classes(prediction["probabilities"]),
        "reasons": reasons_of(prediction),
        "blast_suspected": blast,
        "model_name": prediction["model_name"],
        "model_version": prediction["model_version"],
        "latest_review": _public_review(cell["review"]),
    }


def review_queue(settings: Settings, drop: str) -> list[dict[str, Any]]:
    """The cells of ``drop`` to review: flagged ones and every suspected blast (a blast is an
    emergency even when the model is sure), suspected blasts first, then lowest confidence.

    Each dict: ``path``, ``drop``, ``sha256``, ``predicted_class``, ``confidence``,
    ``top_classes`` (three ``{class, probability}``), ``reasons``, ``blast_suspected``,
    ``model_name``, ``model_version`` and ``latest_review`` (None when not reviewed yet).
    """
    queue = []
    for cell in drop_cells(settings, drop):
        prediction = cell["prediction"]
        if prediction is None:
            continue
        blast = is_blast_suspected(prediction)
        if prediction["needs_review"] or blast:
            queue.append(_queue_entry(cell, blast))
    queue.sort(key=lambda q: (not q["blast_suspected"], q["confidence"], q["path"]))
    return queue


def latest_reviews(settings: Settings, *, drop: str | None = None) -> list[dict[str, Any]]:
    """The latest review of each image (of ``drop``'s files when given), oldest image path
    first. An image reviewed under two paths or drops has one latest review, its newest."""

    def read(connection: Connection) -> list[dict[str, Any]]:
        if not _reviews_table_exists(connection):
            return []
        if drop is None:
            latest = _reviews_of(connection, None)
        else:
            hashes = connection.execute(select(files_seen.c.sha256).where(files_seen.c.drop == drop)).scalars()
            latest = _reviews_of(connection, list(hashes))
        return sorted(latest.values(), key=lambda r: (r["drop"], r["path"], r["id"]))

    if not database_exists(settings):
        return []
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, read, what="reading the latest reviews")


def database_exists(settings: Settings) -> bool:
    """False for a SQLite file not made yet (reading must not create an empty one)."""
    url = make_url(settings.predictions_db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return True
    return Path(url.database).expanduser().is_file()
