"""What a nightly run has to do: the scanned files sorted against the database into already
done, linked to an earlier prediction by content hash, rejected, and new; the first three
recorded at once, the new ones grouped by content and written to chunk files in the run's work
folder (at most ``settings.max_chunks``, each classified by one mapped task). Also a run's id
and work folder.

An image (by content hash) is classified at most once per model version. Without
``reclassify`` an image that any version of the model already classified is not classified
again; with it, images without a prediction by *this* version are (older rows are kept).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import IMAGE_EXTENSIONS, Settings
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.images import DISAPPEARED
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving import queries
from wbc_tasks.serving.archive import archive_files
from wbc_tasks.serving.commit import rejection_row, seen_row, write_rows
from wbc_tasks.serving.drop_scans import fingerprint_drops, unchanged_finished_drops, write_finished
from wbc_tasks.serving.model import model_ref_from_dict, model_ref_to_dict
from wbc_tasks.serving.scan import (
    FoundFile,
    Listing,
    drop_fingerprint,
    drop_of,
    hash_files,
    list_files,
    unsupported_reason,
)

log = logging.getLogger(__name__)

CHUNK_PREFIX = "chunk-"


def new_run_id(prefix: str = "cli") -> str:
    """A run id for runs started outside Airflow."""
    return f"{prefix}__{time.strftime('%Y-%m-%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"


def run_work_dir(settings: Settings, run_id: str) -> Path:
    """The work folder of one classification run (chunk files and the summary)."""
    return settings.work_dir / "classify" / safe_name(run_id)


def plan_chunks(n_items: int, chunk_size: int, max_chunks: int) -> list[tuple[int, int]]:
    """(start, stop) bounds of chunks over ``n_items``: ``chunk_size`` each, grown so that there
    are never more than ``max_chunks`` (a 50,000-image backlog must not become 50,000 tasks)."""
    if chunk_size < 1 or max_chunks < 1:
        raise ValueError(f"chunk size ({chunk_size}) and max chunks ({max_chunks}) must be >= 1")
    if n_items == 0:
        return []
    size = max(chunk_size, math.ceil(n_items / max_chunks))
    return [(start, min(start + size, n_items)) for start in range(0, n_items, size)]


@dataclass
class SortedFiles:
    """The files of a scan sorted against the database."""

    #: Nothing to do: classified, or rejected for this content, on an earlier night.
    done: list[FoundFile] = field(default_factory=list)
    #: Byte-identical to an image already classified: recorded now, pointing to that prediction.
    linked: list[FoundFile] = field(default_factory=list)
    #: To classify.
    new: list[FoundFile] = field(default_factory=list)
    #: (file, reason) of files that cannot be classified and have no rejection row yet (those
    #: with one, for this content, are done).
    new_rejections: list[tuple[FoundFile, str]] = field(default_factory=list)


def sort_files(
    settings: Settings,
    engine: Engine,
    listing: Listing,
    ref: ModelRef,
    *,
    reclassify: bool,
) -> SortedFiles:
    """Hash the listed files and sort them into done / linked / new / rejected (reads only)."""
    known = db.read_with_retries(
        settings,
        engine,
        lambda connection: queries.seen_files(connection, [f.path for f in listing.files]),
        what="reading the files seen",
    )
    rejected = hash_files(settings, listing.files, known)
    unreadable = {id(f) for f, _ in rejected}
    rejected += [
        (f, unsupported_reason(f.path))
        for f in listing.files
        if id(f) not in unreadable and Path(f.path).suffix.lower() not in IMAGE_EXTENSIONS
    ]
    for rel, reason in listing.rejected:
        rejected.append((FoundFile(rel, drop_of(Path(rel))), reason))

    paths = [f.path for f in listing.files] + [f.path for f, _ in rejected]
    candidates = [f for f in listing.files if f.sha256]

    def lookups(connection: Connection):
        return (
            queries.rejected_files(connection, paths),
            {(p, row["sha256"]) for p, rows in queries.seen_files(connection, paths).items() for row in rows},
            queries.predicted_hashes(
                connection,
                [f.sha256 for f in candidates],
                model_name=ref.name,
                model_version=ref.version if reclassify else None,
            ),
        )

    already_rejected, seen_pairs, predicted = db.read_with_retries(
        settings, engine, lookups, what="reading earlier rejections and predictions"
    )

    result = SortedFiles()
    rejected_ids = {id(f) for f, _ in rejected}
    for found, reason in rejected:
        if (found.path, found.sha256) in already_rejected:
            result.done.append(found)
        else:
            result.new_rejections.append((found, reason))
    for found in listing.files:
        if id(found) in rejected_ids:
            continue
        key = (found.path, found.sha256)
        if key in already_rejected:
            result.done.append(found)  # could not be decoded on an earlier night
        elif found.sha256 in predicted:
            (result.done if key in seen_pairs else result.linked).append(found)
        else:
            result.new.append(found)
    return result


def find_new_images(
    settings: Settings,
    *,
    run_id: str,
    model: ModelRef | dict[str, Any],
    drop: str | None = None,
    reclassify: bool = False,
    chunk_size: int | None = None,
    full_scan: bool = False,
) -> dict[str, Any]:
    """Sort the classify folder's files into done / linked / rejected / new; write chunk files.

    Drops an earlier night finished and that have not changed since are skipped
    (:mod:`wbc_tasks.serving.drop_scans`), unless ``full_scan``, ``reclassify`` or ``drop`` is given.

    Rejections and links to existing predictions are committed here (one transaction); new
    images go to chunk files ``<work dir>/classify/<run id>/chunk-NNNN.json``, each a list of
    distinct images (by hash) with every file holding that image. Returns a small summary with
    ``chunks`` (the chunk file paths).
    """
    ref = model_ref_from_dict(model)
    db.with_db_retries(
        settings,
        lambda: db.upgrade_database(settings.predictions_db_url),
        what="migrating the schema",
    )
    fingerprints = fingerprint_drops(settings) if drop is None else {drop: drop_fingerprint(settings, drop)}
    now = db.utcnow()
    with db.open_engine(settings.predictions_db_url) as engine:
        skipped = set()
        if not (full_scan or reclassify or drop):
            skipped = unchanged_finished_drops(settings, engine, fingerprints)
        listing = list_files(settings, drop=drop, skip_drops=frozenset(skipped))
        files = sort_files(settings, engine, listing, ref, reclassify=reclassify)

        def commit(connection: Connection) -> None:
            write_rows(
                connection,
                rejections=[rejection_row(f.path, f.sha256, r, run_id, now) for f, r in files.new_rejections],
                seen=[seen_row(f, run_id, now) for f, _ in files.new_rejections]
                + [seen_row(f, run_id, now) for f in files.linked],
            )

        db.transaction(settings, engine, commit, what="recording rejections and files seen")
    # Pseudonyms in log lines when WBC_PSEUDONYMISE_NAMES is on.
    names = pseudonymiser(settings)
    for found, reason in files.new_rejections:
        log.warning("rejected %s: %s", names.path(found.path), names.text(reason, [found.path]))
    archived = archive_files(
        settings,
        [f.path for f in files.done + files.linked + [f for f, _ in files.new_rejections]],
    )

    work = run_work_dir(settings, run_id)
    scanned = {d: fp for d, fp in fingerprints.items() if d not in skipped}
    vanished = {f.drop for f, reason in files.new_rejections if reason == DISAPPEARED}
    finished_file = write_finished(work, listing, scanned, vanished)
    items = _distinct_images(files.new)
    size = chunk_size or settings.classify_chunk_size
    bounds = plan_chunks(len(items), size, settings.max_chunks)
    chunks = _write_chunks(work, run_id, ref, items, bounds)
    summary = {
        "run_id": run_id,
        "drop": drop or "",
        "reclassify": bool(reclassify),
        "files_found": len(listing.files) + len(listing.rejected),
        "files_settling": len(listing.settling),
        "files_already_done": len(files.done),
        "files_linked_to_existing_predictions": len(files.linked),
        "files_rejected": len(files.new_rejections),
        "files_new": len(files.new),
        "images_new": len(items),
        "files_archived": archived,
        "chunk_size": (bounds[0][1] - bounds[0][0]) if bounds else size,
        "chunks": chunks,
        "work_dir": str(work),
        "full_scan": bool(full_scan),
        "drops_scanned": len(scanned),
        "drops_skipped_unchanged": len(skipped),
        "drops_finished_file": str(finished_file),
    }
    log.info(
        "found %d files in %s (%d drops scanned, %d finished and unchanged skipped): %d new (%d distinct images, "
        "%d chunks), %d linked to existing predictions by hash, %d rejected, %d already done, %d still being "
        "written (next run)",
        summary["files_found"],
        settings.classify_dir / (drop or ""),
        len(scanned),
        len(skipped),
        len(files.new),
        len(items),
        len(chunks),
        len(files.linked),
        len(files.new_rejections),
        summary["files_already_done"],
        len(listing.settling),
    )
    return summary


def _distinct_images(new: list[FoundFile]) -> list[dict[str, Any]]:
    """One item per content hash, with every file holding that content."""
    by_hash: dict[str, list[FoundFile]] = {}
    for found in new:
        by_hash.setdefault(found.sha256, []).append(found)
    return [{"sha256": digest, "files": [asdict(f) for f in files]} for digest, files in by_hash.items()]


def _write_chunks(
    work: Path,
    run_id: str,
    ref: ModelRef,
    items: list[dict[str, Any]],
    bounds: list[tuple[int, int]],
) -> list[str]:
    """Write ``items`` to one chunk file per bounds; returns their paths."""
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(f"{CHUNK_PREFIX}*.json"):
        stale.unlink()  # a retried find step replans from scratch
    chunks = []
    for number, (start, stop) in enumerate(bounds):
        path = work / f"{CHUNK_PREFIX}{number:04d}.json"
        payload = {
            "run_id": run_id,
            "model": model_ref_to_dict(ref),
            "items": items[start:stop],
        }
        write_json_atomic(path, payload)
        chunks.append(str(path))
    return chunks
