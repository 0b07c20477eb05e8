"""People's reviews of classified cells: the review queue of a drop, recording a decision, the
latest decision per image, the drops with their counts, and the reviewed images as files (for
training and ``wbc reviews export``). Imports ``core``, ``data`` and :mod:`.predictions`,
:mod:`.queries` and :mod:`.scan`.

A review is a row of ``reviews`` (migration 0003) and is never updated: a second opinion is a new
row, and the latest one (by ``reviewed_at``, then id) counts. ``unusable`` (not a white cell, or
no image to judge) is a label like the nine classes; "skip" is no decision and records nothing.
Files are read only after their path passed the allowed-folder checks of :mod:`.scan` (the
classify folder, ``WBC_ARCHIVE_DIR`` where archived files now lie, and ``WBC_ALLOWED_ROOTS``);
nothing here writes to a drop folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, make_url

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.paths import is_inside
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.images import ImageError, resolve_within, sha256_of_file
from wbc_tasks.serving.predictions import (
    UNREADABLE_SHA,
    files_seen,
    open_engine,
    predictions,
    read_with_retries,
    rejections,
    reviews,
    transaction,
    upgrade_database,
    utcnow,
    with_db_retries,
)
from wbc_tasks.serving.queries import _as_utc, _batches
from wbc_tasks.serving.scan import allowed_roots

log = logging.getLogger(__name__)

#: The label of a cell that is not a white cell, or whose image cannot be judged.
UNUSABLE = "unusable"
#: Every label a review may give.
REVIEW_LABELS: tuple[str, ...] = (*CLASS_NAMES, UNUSABLE)
#: Rows flagged before reasons were recorded carry an empty list; the fixed confidence threshold
#: was then the only way to be flagged (migration 0002 gives old rows the same reason).
LEGACY_REASON = "low_confidence"
BLAST_CLASS = "blasts"
BLAST_REASON = "blast_suspected"


class ReviewError(PermanentError, ValueError):
    """A review that cannot be recorded as asked (unknown label or image, skip, no reviewer)."""


# --------------------------------------------------------------------------------------------
# Reading: the cells of a drop with their prediction and latest review
# --------------------------------------------------------------------------------------------


def reasons_of(prediction: dict[str, Any]) -> list[str]:
    """Why a prediction needs review: its recorded reasons, or the legacy reason for an old
    flagged row with none."""
    recorded = [str(r) for r in (prediction.get("review_reasons") or [])]
    if not recorded and prediction.get("needs_review"):
        return [LEGACY_REASON]
    return recorded


def is_blast_suspected(prediction: dict[str, Any]) -> bool:
    """The blast rule: predicted blasts, or a recorded ``blast_suspected`` reason."""
    return prediction.get("predicted_class") == BLAST_CLASS or BLAST_REASON in reasons_of(prediction)


def _utc(value: datetime | None) -> datetime | None:
    return _as_utc(value)


def _reviews_table_exists(connection: Connection) -> bool:
    return inspect(connection).has_table(reviews.name)


def _latest_by_sha(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        row = {**row, "reviewed_at": _utc(row["reviewed_at"])}
        current = latest.get(row["sha256"])
        if current is None or (row["reviewed_at"], row["id"]) > (current["reviewed_at"], current["id"]):
            latest[row["sha256"]] = row
    return latest


def _reviews_of(connection: Connection, hashes: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """sha256 -> its latest review (every image with a review when ``hashes`` is None)."""
    if hashes is None:
        return _latest_by_sha(dict(r) for r in connection.execute(select(reviews)).mappings())
    rows: list[dict[str, Any]] = []
    for part in _batches(sorted(set(hashes))):
        rows.extend(dict(r) for r in connection.execute(select(reviews).where(reviews.c.sha256.in_(part))).mappings())
    return _latest_by_sha(rows)


def _predictions_of(
    connection: Connection, hashes: Sequence[str] | None, model_version: str | None
) -> dict[str, dict[str, Any]]:
    """sha256 -> the prediction a report uses: ``model_version``'s, else the newest."""
    query = select(predictions)
    if model_version is not None:
        query = query.where(predictions.c.model_version == str(model_version))
    found: list[dict[str, Any]] = []
    if hashes is None:
        found = [dict(r) for r in connection.execute(query).mappings()]
    else:
        for part in _batches(sorted(set(hashes) - {UNREADABLE_SHA})):
            found.extend(dict(r) for r in connection.execute(query.where(predictions.c.sha256.in_(part))).mappings())
    chosen: dict[str, dict[str, Any]] = {}
    for row in found:
        row["created_at"] = _utc(row["created_at"])
        current = chosen.get(row["sha256"])
        if current is None or (row["created_at"], row["id"]) > (current["created_at"], current["id"]):
            chosen[row["sha256"]] = row
    return chosen


def _cells(connection: Connection, drop: str | None, model_version: str | None) -> list[dict[str, Any]]:
    """One dict per file of ``drop`` (every drop when None) as it is now (a file that changed
    counts with its newest content): status ``classified``, ``rejected`` or ``pending``."""
    query = select(files_seen.c.path, files_seen.c.drop, files_seen.c.sha256, files_seen.c.seen_at, files_seen.c.id)
    if drop is not None:
        query = query.where(files_seen.c.drop == drop)
    newest: dict[str, dict[str, Any]] = {}
    for row in connection.execute(query).mappings():
        item = {**row, "seen_at": _utc(row["seen_at"])}
        current = newest.get(item["path"])
        if current is None or (item["seen_at"], item["id"]) > (current["seen_at"], current["id"]):
            newest[item["path"]] = item
    files = sorted(newest.values(), key=lambda f: f["path"])
    hashes = None if drop is None else [f["sha256"] for f in files]
    rejected: dict[tuple[str, str], str] = {}
    rejection_query = select(rejections.c.path, rejections.c.sha256, rejections.c.reason)
    if drop is None:
        rejected = {(p, s): reason for p, s, reason in connection.execute(rejection_query)}
    else:
        for part in _batches([f["path"] for f in files]):
            for p, s, reason in connection.execute(rejection_query.where(rejections.c.path.in_(part))):
                rejected[(p, s)] = reason
    chosen = _predictions_of(connection, hashes, model_version)
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


def drop_cells(settings: Settings, drop: str | None, *, model_version: str | int | None = None) -> list[dict[str, Any]]:
    """The files of ``drop`` (every drop when None) with status, prediction and latest review.

    Each dict: ``path`` (relative to the classify folder), ``drop``, ``sha256``, ``status``
    (``classified``, ``rejected``, ``pending``), ``rejection_reason``, ``prediction`` (the row of
    ``model_version``, else the newest; None unless classified) and ``review`` (the latest
    review of the image's content, or None).
    """
    version = None if model_version is None else str(model_version)
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(
            settings, engine, lambda c: _cells(c, drop, version), what=f"reading the cells of drop {drop!r}"
        )


def _top_classes(probabilities: dict[str, float], n: int = 3) -> list[dict[str, Any]]:
    ranked = sorted(probabilities.items(), key=lambda item: (-float(item[1]), item[0]))
    return [{"class": name, "probability": float(p)} for name, p in ranked[:n]]


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
        if not (prediction["needs_review"] or blast):
            continue
        queue.append(
            {
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
        )
    queue.sort(key=lambda q: (not q["blast_suspected"], q["confidence"], q["path"]))
    return queue


def _public_review(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: row[key] for key in (c.name for c in reviews.columns)}


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

    if not _database_exists(settings):
        return []
    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, read, what="reading the latest reviews")


def _database_exists(settings: Settings) -> bool:
    """False for a SQLite file not made yet (reading must not create an empty one)."""
    url = make_url(settings.predictions_db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return True
    return Path(url.database).expanduser().is_file()


def list_drops(settings: Settings) -> list[dict[str, Any]]:
    """Every drop with its counts, newest drop name first: ``files``, ``cells`` (classified),
    ``rejected``, ``pending``, ``needs_review`` (flagged or blast suspected), ``reviewed``
    (cells with a review) and ``blast_suspected``."""
    by_drop: dict[str, dict[str, Any]] = {}
    for cell in drop_cells(settings, None):
        counts = by_drop.setdefault(
            cell["drop"],
            {
                "drop": cell["drop"],
                "files": 0,
                "cells": 0,
                "rejected": 0,
                "pending": 0,
                "needs_review": 0,
                "reviewed": 0,
                "blast_suspected": 0,
            },
        )
        counts["files"] += 1
        if cell["status"] != "classified":
            counts[cell["status"]] += 1
            continue
        counts["cells"] += 1
        prediction = cell["prediction"]
        blast = is_blast_suspected(prediction)
        counts["needs_review"] += int(bool(prediction["needs_review"]) or blast)
        counts["blast_suspected"] += int(blast)
        counts["reviewed"] += int(cell["review"] is not None)
    return sorted(by_drop.values(), key=lambda d: d["drop"], reverse=True)


# --------------------------------------------------------------------------------------------
# Recording a decision
# --------------------------------------------------------------------------------------------


def _checked_relative(path: str) -> str:
    """A path as ``files_seen`` records it: relative, no ``..``; anything else is refused."""
    posix = PurePosixPath(str(path).replace(os.sep, "/"))
    if not str(path) or posix.is_absolute() or ".." in posix.parts:
        raise ReviewError(f"path {path!r} must be relative to the classify folder, without '..'")
    return str(posix)


def record_review(
    settings: Settings,
    path: str,
    label: str,
    *,
    reviewer: str,
    note: str | None = None,
    sha256: str | None = None,
    model_version: str | int | None = None,
    reviewed_at: datetime | None = None,
) -> dict[str, Any]:
    """Record ``reviewer``'s ``label`` for the file ``path`` (relative to the classify folder, as
    in ``files_seen``) and return the new row. The image is the file's newest content unless
    ``sha256`` names one; the prediction recorded beside it is ``model_version``'s, else the
    newest. Raises :class:`ReviewError` for a label outside :data:`REVIEW_LABELS` ("skip" is no
    review), an empty reviewer, or a file that is unknown or not classified."""
    label = str(label).strip()
    if label.lower() == "skip":
        raise ReviewError("'skip' is not a review: nothing is recorded for a skipped cell")
    if label not in REVIEW_LABELS:
        raise ReviewError(f"label {label!r} is not one of {', '.join(REVIEW_LABELS)}")
    reviewer = str(reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a review needs the reviewer's user name")
    rel = _checked_relative(path)
    when = _utc(reviewed_at) or utcnow()

    def work(connection: Connection) -> dict[str, Any]:
        query = select(files_seen.c.sha256, files_seen.c.drop, files_seen.c.seen_at, files_seen.c.id).where(
            files_seen.c.path == rel, files_seen.c.sha256 != UNREADABLE_SHA
        )
        if sha256 is not None:
            query = query.where(files_seen.c.sha256 == sha256)
        seen = sorted(connection.execute(query).mappings(), key=lambda r: (_utc(r["seen_at"]), r["id"]))
        if not seen:
            raise ReviewError(f"no readable file {rel!r}{f' with sha256 {sha256}' if sha256 else ''} was classified")
        image = seen[-1]
        prediction = _predictions_of(
            connection, [image["sha256"]], None if model_version is None else str(model_version)
        )
        if image["sha256"] not in prediction:
            which = f"model version {model_version}" if model_version is not None else "any model"
            raise ReviewError(f"{rel!r} has no prediction by {which}: only classified cells are reviewed")
        chosen = prediction[image["sha256"]]
        row = {
            "sha256": image["sha256"],
            "drop": image["drop"],
            "path": rel,
            "reviewer": reviewer,
            "reviewed_at": when,
            "model_name": chosen["model_name"],
            "model_version": chosen["model_version"],
            "predicted_class": chosen["predicted_class"],
            "label": label,
            "note": note or None,
        }
        inserted = connection.execute(reviews.insert().values(**row)).inserted_primary_key
        assert inserted is not None  # both backends return the new id
        return {"id": int(inserted[0]), **row}

    # A database last migrated before reviews existed gets its table here (a no-op at head).
    with_db_retries(settings, lambda: upgrade_database(settings.predictions_db_url), what="migrating the schema")
    with open_engine(settings.predictions_db_url) as engine:
        recorded = transaction(settings, engine, work, what=f"recording a review of {rel}")
    log.info("review %d: %s labelled %s (model said %s)", recorded["id"], reviewer, label, recorded["predicted_class"])
    return recorded


# --------------------------------------------------------------------------------------------
# The reviewed images as files: training and export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedImage:
    """A reviewed image found on disk, its content checked against the review."""

    path: Path
    label: str
    sha256: str
    drop: str
    relative_path: str
    reviewer: str


@dataclass
class ReviewedSet:
    """The latest review of every image, sorted into what can be used and what cannot."""

    images: list[ReviewedImage] = field(default_factory=list)
    #: Reviewed ``unusable``: left out of training and export (dicts with drop, path, sha256, reviewer).
    unusable: list[dict[str, Any]] = field(default_factory=list)
    #: Reviewed, but the file is gone, changed or outside the allowed folders (with a reason).
    missing: list[dict[str, Any]] = field(default_factory=list)


def _readable_roots(settings: Settings) -> tuple[Path, ...]:
    roots = list(allowed_roots(settings))
    if settings.archive_dir is not None:
        roots.append(settings.archive_dir.resolve())
    return tuple(roots)


def review_image_path(settings: Settings, relative_path: str) -> Path:
    """Where the file ``relative_path`` (as in ``files_seen``) lies now: in the classify folder,
    else in ``WBC_ARCHIVE_DIR``; checked like every path (inside the classify folder, the archive
    or ``WBC_ALLOWED_ROOTS``, links followed) before anyone reads it. :class:`ImageError` if none."""
    rel = _checked_relative(relative_path)
    roots = _readable_roots(settings)
    bases = [settings.classify_dir, *([settings.archive_dir] if settings.archive_dir else [])]
    reasons = []
    for base in bases:
        candidate = base / rel
        try:
            return resolve_within(candidate, roots)
        except ImageError as exc:
            reasons.append(exc.reason)
    raise ImageError(rel, "; ".join(reasons))


def _other_paths(connection: Connection, hashes: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for part in _batches(sorted(set(hashes))):
        query = select(files_seen.c.sha256, files_seen.c.path).where(files_seen.c.sha256.in_(part))
        for sha, path in connection.execute(query):
            found.setdefault(sha, []).append(path)
    return found


def reviewed_images(settings: Settings) -> ReviewedSet:
    """Every image's latest review, with its file located and its content hash checked: the
    reviewed path first, then any other path the same content was seen under."""
    result = ReviewedSet()
    latest = latest_reviews(settings)
    if not latest:
        return result
    usable = [r for r in latest if r["label"] != UNUSABLE]
    result.unusable = [
        {"drop": r["drop"], "path": r["path"], "sha256": r["sha256"], "reviewer": r["reviewer"]}
        for r in latest
        if r["label"] == UNUSABLE
    ]
    with open_engine(settings.predictions_db_url) as engine:
        paths = read_with_retries(
            settings, engine, lambda c: _other_paths(c, [r["sha256"] for r in usable]), what="finding reviewed files"
        )
    for review in usable:
        problems = []
        candidates = [review["path"], *sorted(set(paths.get(review["sha256"], [])) - {review["path"]})]
        for rel in candidates:
            try:
                file = review_image_path(settings, rel)
                if sha256_of_file(file) != review["sha256"]:
                    problems.append(f"{rel}: the file changed since it was reviewed")
                    continue
            except (ImageError, OSError, ReviewError) as exc:
                problems.append(f"{rel}: {getattr(exc, 'reason', exc)}")
                continue
            result.images.append(
                ReviewedImage(file, review["label"], review["sha256"], review["drop"], rel, review["reviewer"])
            )
            break
        else:
            result.missing.append({"drop": review["drop"], "path": review["path"], "reason": "; ".join(problems)})
    return result


def export_reviewed(settings: Settings, out_dir: Path | str) -> dict[str, Any]:
    """Write every usable reviewed image as ``out_dir/<class>/<file name>``: a hard link where
    the file system allows, else a copy (the drop folders are only read). A name already taken
    by other content gets the content hash's first 12 digits (``cell-0a1b2c3d4e5f.jpg``); the
    same content exported before is left as it is. Returns counts and every renamed, unusable
    and missing image."""
    out = Path(out_dir).expanduser().resolve()
    forbidden = [settings.classify_dir.resolve(), *([settings.archive_dir.resolve()] if settings.archive_dir else [])]
    if is_inside(out, forbidden) or any(is_inside(root, [out]) for root in forbidden):
        raise ReviewError(f"--out {out} overlaps the classify or archive folder; export writes elsewhere only")
    reviewed = reviewed_images(settings)
    summary: dict[str, Any] = {
        "out": str(out),
        "exported": 0,
        "linked": 0,
        "copied": 0,
        "already_there": 0,
        "renamed": [],
        "unusable": reviewed.unusable,
        "missing": reviewed.missing,
        "per_class": {},
    }
    for image in sorted(reviewed.images, key=lambda i: (i.label, i.relative_path)):
        folder = out / image.label
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / image.path.name
        if target.exists() and sha256_of_file(target) != image.sha256:
            target = folder / f"{image.path.stem}-{image.sha256[:12]}{image.path.suffix}"
            summary["renamed"].append({"path": image.relative_path, "exported_as": str(target.relative_to(out))})
        if target.exists():
            summary["already_there"] += 1
        else:
            try:
                os.link(image.path, target)
                summary["linked"] += 1
            except OSError:  # another file system, or links not allowed there
                shutil.copyfile(image.path, target)
                summary["copied"] += 1
            summary["exported"] += 1
        summary["per_class"][image.label] = summary["per_class"].get(image.label, 0) + 1
    log.info(
        "exported %d reviewed images to %s (%d linked, %d copied, %d already there, %d renamed, "
        "%d unusable, %d missing)",
        summary["exported"],
        out,
        summary["linked"],
        summary["copied"],
        summary["already_there"],
        len(summary["renamed"]),
        len(reviewed.unusable),
        len(reviewed.missing),
    )
    return summary
