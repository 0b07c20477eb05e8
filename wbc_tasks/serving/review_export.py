"""The reviewed images as files: where a reviewed file lies now (the classify folder or the
archive, checked against the allowed folders before anyone reads it), every image's latest
review matched to a file whose content is still the one reviewed (for training), and
``wbc reviews export`` (each usable image linked or copied under its label's folder).

Files are read only after their path passed the allowed-folder checks of :mod:`.scan` (the
classify folder, ``WBC_ARCHIVE_DIR`` where archived files now lie, and ``WBC_ALLOWED_ROOTS``);
nothing here writes to a drop folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from wbc_tasks.core.paths import is_inside
from wbc_tasks.core.settings import Settings
from wbc_tasks.data.images import ImageError, resolve_within, sha256_of_file
from wbc_tasks.serving.predictions import files_seen, open_engine, read_with_retries
from wbc_tasks.serving.queries import in_batches
from wbc_tasks.serving.review_decisions import UNUSABLE, ReviewError, checked_relative
from wbc_tasks.serving.review_queue import latest_reviews
from wbc_tasks.serving.scan import allowed_roots

log = logging.getLogger(__name__)


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
    or ``WBC_ALLOWED_ROOTS``, links followed) before anyone reads it. :class:`ImageError` if none;
    :class:`~wbc_tasks.serving.review_decisions.ReviewError` for an absolute path or one with ``..``."""
    rel = checked_relative(relative_path)
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
    for part in in_batches(sorted(set(hashes))):
        query = select(files_seen.c.sha256, files_seen.c.path).where(files_seen.c.sha256.in_(part))
        for sha, path in connection.execute(query):
            found.setdefault(sha, []).append(path)
    return found


def _locate(settings: Settings, review: dict[str, Any], candidates: list[str]) -> ReviewedImage | str:
    """The first of ``candidates`` (paths) that holds the reviewed content, or why none does."""
    problems = []
    for rel in candidates:
        try:
            file = review_image_path(settings, rel)
            if sha256_of_file(file) != review["sha256"]:
                problems.append(f"{rel}: the file changed since it was reviewed")
                continue
        except (ImageError, OSError, ReviewError) as exc:
            problems.append(f"{rel}: {getattr(exc, 'reason', exc)}")
            continue
        return ReviewedImage(file, review["label"], review["sha256"], review["drop"], rel, review["reviewer"])
    return "; ".join(problems)


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
        candidates = [review["path"], *sorted(set(paths.get(review["sha256"], [])) - {review["path"]})]
        found = _locate(settings, review, candidates)
        if isinstance(found, ReviewedImage):
            result.images.append(found)
        else:
            result.missing.append({"drop": review["drop"], "path": review["path"], "reason": found})
    return result


def _export_one(image: ReviewedImage, out: Path, summary: dict[str, Any]) -> None:
    """Link or copy ``image`` to ``out/<label>/``, counted in ``summary``."""
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
        _export_one(image, out, summary)
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
