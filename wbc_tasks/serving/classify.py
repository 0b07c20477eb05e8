"""Nightly batch classification: find new images, classify them in chunks, summarise the run.

The flow (the ``wbc_batch_classification`` DAG wires these functions; :func:`classify_new_images`
runs the same flow in one process for the CLI and tests):

1. :func:`resolve_run_model`: the alias (default: champion) becomes one fixed model version, so
   every chunk uses the same model even if a promotion happens mid-run. Resolved first, because
   what counts as "new" depends on the version when ``reclassify`` is set.
2. :func:`find_new_images`: lists ``settings.classify_dir`` (loose files and dated sub-folders;
   a file's *drop* is its first-level folder, ``""`` for loose files), hashes what changed, and
   splits the files into: already done (nothing to do), byte-identical to an image already
   classified (recorded in ``files_seen`` now, linked to that prediction by its hash), not
   classifiable (rejection now) and new (written to chunk files in the run's work folder, at
   most ``settings.max_chunks`` of them).
3. :func:`classify_chunk`: one mapped task per chunk file; the model is loaded once, images are
   decoded in a thread pool one batch ahead of the model, and the chunk's predictions,
   rejections and ``files_seen`` rows are committed in one transaction.
4. :func:`summarise_run`: counts per class, mean confidence, flagged for review, rejected,
   images per second: logged, and logged to MLflow (experiment ``settings.classify_experiment``)
   tagged with the model name, version and run.

Rules:
- An image (by content hash) is classified at most once per model version. Without
  ``reclassify`` an image that any version of the model already classified is not classified
  again; with it, images without a prediction by *this* version are (older rows are kept).
- Files modified (mtime or ctime) within ``settings.settle_minutes`` may still be copying: they
  are not recorded at all and are picked up by a later run (the count is in the summary).
- Sub-folders of a drop are scanned. Symlinks are followed only into the classify folder or
  ``settings.allowed_roots``; anything else (a link out, a broken link, a symlink loop, a second
  link to a folder already scanned) becomes a rejection. A file that vanishes between listing and
  reading (a drop folder renamed mid-run) is rejected with
  :data:`~wbc_tasks.data.images.DISAPPEARED` and no content hash, so a later night classifies it if
  it comes back. Nothing in the classify folder is modified, unless
  ``settings.archive_dir`` is set: then a file is moved there (same relative path) once its rows
  are committed.
- A file's sha256 is reused from ``files_seen`` when its size and mtime are unchanged (as make
  and rsync do), so a nightly scan does not re-read the whole archive of drops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from stat import S_ISREG
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import IMAGE_EXTENSIONS, Settings
from wbc_tasks.core.paths import safe_name
from wbc_tasks.data.images import DISAPPEARED, ImageError, load_image, resolve_within, sha256_of_file
from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.registry.tracking import ModelRef

log = logging.getLogger(__name__)

CHUNK_PREFIX = "chunk-"
SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------------------------
# Model reference (travels through XCom as a small dict)
# --------------------------------------------------------------------------------------------

def model_ref_to_dict(ref: ModelRef) -> dict[str, Any]:
    """A JSON-able form of ``ref`` for XCom."""
    data = asdict(ref)
    data["class_names"] = list(ref.class_names)
    return data


def model_ref_from_dict(data: ModelRef | dict[str, Any]) -> ModelRef:
    """Back from :func:`model_ref_to_dict` (a ModelRef passes through)."""
    if isinstance(data, ModelRef):
        return data
    return ModelRef(
        name=str(data["name"]),
        version=str(data["version"]),
        run_id=str(data.get("run_id") or ""),
        uri=str(data["uri"]),
        image_size=int(data["image_size"]),
        class_names=tuple(data["class_names"]),
    )


def resolve_run_model(settings: Settings, ref: str | None = None) -> dict[str, Any]:
    """Resolve an alias or version (default: the champion) to one fixed version, as a dict.

    Raises :class:`wbc_tasks.registry.tracking.NoModelError` (whose message says how to get a model)
    when there is none.
    """
    from wbc_tasks.registry import tracking as registry

    model = registry.resolve_model(settings, ref)
    log.info(
        "classifying with %s version %s (asked for %r; run %s; %d px; classes %s)",
        model.name, model.version, ref or settings.champion_alias, model.run_id,
        model.image_size, ", ".join(model.class_names),
    )
    return model_ref_to_dict(model)


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------

@dataclass
class FoundFile:
    """A file under the classify folder (``path`` relative to it, as recorded)."""

    path: str
    drop: str
    size: int | None = None
    mtime: float | None = None
    sha256: str = ""


@dataclass
class Listing:
    """What a scan of the classify folder found."""

    files: list[FoundFile] = field(default_factory=list)
    #: (relative path, reason): entries that cannot be read as files at all.
    rejected: list[tuple[str, str]] = field(default_factory=list)
    #: Files left for a later run because they changed within the settle time.
    settling: list[str] = field(default_factory=list)


def _drop_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _inside(target: Path, roots: Sequence[Path]) -> bool:
    return any(target == root or target.is_relative_to(root) for root in roots)


def _allowed_roots(settings: Settings) -> tuple[Path, ...]:
    return (settings.classify_dir.resolve(), *settings.allowed_roots)


def _scan_root(settings: Settings, drop: str | None) -> Path:
    base = settings.classify_dir
    if not base.is_dir():
        raise FileNotFoundError(
            f"classify folder {base} does not exist; set WBC_CLASSIFY_DIR to the folder lab "
            f"staff drop images into"
        )
    if not drop:
        return base
    if Path(drop).name != drop or drop in (".", ".."):
        raise ValueError(f"drop {drop!r} must be the name of a folder directly in {base}")
    root = base / drop
    if not root.is_dir():
        raise FileNotFoundError(f"drop folder {root} does not exist")
    if not _inside(root.resolve(), _allowed_roots(settings)):
        raise ValueError(f"drop folder {root} points outside the allowed folders")
    return root


def list_files(settings: Settings, *, drop: str | None = None, now: float | None = None) -> Listing:
    """Every file under the classify folder (or one drop), with symlinks checked and settling
    files set aside. Paths are recorded as found (a link's own path), relative to the folder."""
    base = settings.classify_dir
    root = _scan_root(settings, drop)
    roots = _allowed_roots(settings)
    archive = settings.archive_dir.resolve() if settings.archive_dir else None
    settle_seconds = settings.settle_minutes * 60.0
    now = time.time() if now is None else now
    listing = Listing()
    visited = {root.resolve()}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            # Real entries before links, so a real folder is scanned under its own path.
            entries = sorted(os.scandir(folder), key=lambda e: (e.is_symlink(), e.name))
        except OSError as exc:  # e.g. the drop folder was renamed since it was listed
            listing.rejected.append((str(folder.relative_to(base)), f"cannot list folder: {exc}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(base)
            try:
                # Outside the roots, broken, a loop (path.resolve() used to raise on one and
                # crash the run) or gone since scandir: a rejection with the reason.
                target = resolve_within(path, roots)
            except ImageError as exc:
                listing.rejected.append((str(rel), exc.reason))
                continue
            if archive is not None and (target == archive or target.is_relative_to(archive)):
                continue
            if target.is_dir():
                if target in visited:
                    # Recorded, not skipped silently: a link back up the tree, or a second link.
                    listing.rejected.append(
                        (str(rel), f"symlink loop or second path to folder {target} (already scanned)")
                    )
                    continue
                visited.add(target)
                stack.append(path)
                continue
            try:
                stat = target.stat()
            except FileNotFoundError:
                listing.rejected.append((str(rel), DISAPPEARED))
                continue
            except OSError as exc:
                listing.rejected.append((str(rel), f"cannot read file: {exc}"))
                continue
            if not S_ISREG(stat.st_mode):
                listing.rejected.append((str(rel), "not a regular file"))
                continue
            # ctime too: `cp -p` / `rsync -t` give a fresh copy an old mtime.
            if now - max(stat.st_mtime, stat.st_ctime) < settle_seconds:
                listing.settling.append(str(rel))
                continue
            listing.files.append(FoundFile(str(rel), _drop_of(rel), stat.st_size, stat.st_mtime))
    listing.files.sort(key=lambda f: f.path)
    return listing


def _hash(path: Path) -> tuple[str, str | None]:
    try:
        return sha256_of_file(path), None
    except FileNotFoundError:
        return "", DISAPPEARED
    except OSError as exc:
        return "", f"cannot read file: {exc}"


def _hash_files(
    settings: Settings, files: Sequence[FoundFile], known: dict[str, list[dict[str, Any]]]
) -> list[tuple[FoundFile, str]]:
    """Set each file's sha256: reused from ``files_seen`` when size and mtime are unchanged,
    else read (in threads: this is I/O). Returns the files that could not be read."""
    to_hash = []
    for found in files:
        same = [
            row for row in known.get(found.path, [])
            if row["sha256"] and row["size"] == found.size and row["mtime"] == found.mtime
        ]
        if same:
            found.sha256 = same[0]["sha256"]
        else:
            to_hash.append(found)
    unreadable = []
    with ThreadPoolExecutor(max_workers=settings.worker_count()) as pool:
        results = pool.map(lambda f: _hash(settings.classify_dir / f.path), to_hash)
        for found, (digest, error) in zip(to_hash, results, strict=True):
            found.sha256 = digest
            if error:
                unreadable.append((found, error))
    return unreadable


def _unsupported(path: str) -> str:
    suffix = Path(path).suffix or "(none)"
    return f"unsupported file type '{suffix}'; accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}"


def plan_chunks(n_items: int, chunk_size: int, max_chunks: int) -> list[tuple[int, int]]:
    """(start, stop) bounds of chunks over ``n_items``: ``chunk_size`` each, grown so that there
    are never more than ``max_chunks`` (a 50,000-image backlog must not become 50,000 tasks)."""
    if chunk_size < 1 or max_chunks < 1:
        raise ValueError(f"chunk size ({chunk_size}) and max chunks ({max_chunks}) must be >= 1")
    if n_items == 0:
        return []
    size = max(chunk_size, math.ceil(n_items / max_chunks))
    return [(start, min(start + size, n_items)) for start in range(0, n_items, size)]


def run_work_dir(settings: Settings, run_id: str) -> Path:
    """The work folder of one classification run (chunk files and the summary)."""
    return settings.work_dir / "classify" / safe_name(run_id)


def _seen_row(found: FoundFile, run_id: str, seen_at) -> dict[str, Any]:
    return {
        "path": found.path, "drop": found.drop, "sha256": found.sha256, "size": found.size,
        "mtime": found.mtime, "seen_at": seen_at, "dag_run_id": run_id,
    }


def _rejection_row(path: str, sha256: str, reason: str, run_id: str, created_at) -> dict[str, Any]:
    return {"path": path, "sha256": sha256, "reason": reason, "created_at": created_at, "dag_run_id": run_id}


def find_new_images(
    settings: Settings,
    *,
    run_id: str,
    model: ModelRef | dict[str, Any],
    drop: str | None = None,
    reclassify: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Sort the classify folder's files into done / linked / rejected / new; write chunk files.

    Rejections and links to existing predictions are committed here (one transaction); new
    images go to chunk files ``<work dir>/classify/<run id>/chunk-NNNN.json``, each a list of
    distinct images (by hash) with every file holding that image. Returns a small summary with
    ``chunks`` (the chunk file paths).
    """
    from wbc_tasks.serving import predictions as db
    from wbc_tasks.serving import queries

    ref = model_ref_from_dict(model)
    db.with_db_retries(
        settings, lambda: db.upgrade_database(settings.predictions_db_url), what="migrating the schema"
    )
    listing = list_files(settings, drop=drop)
    now = db.utcnow()
    with db.open_engine(settings.predictions_db_url) as engine:
        known = db.read_with_retries(
            settings, engine, lambda connection: queries.seen_files(connection, [f.path for f in listing.files]),
            what="reading the files seen",
        )
        rejected = _hash_files(settings, listing.files, known)
        unreadable = {id(f) for f, _ in rejected}
        rejected += [
            (f, _unsupported(f.path)) for f in listing.files
            if id(f) not in unreadable and Path(f.path).suffix.lower() not in IMAGE_EXTENSIONS
        ]
        for rel, reason in listing.rejected:
            rejected.append((FoundFile(rel, _drop_of(Path(rel))), reason))

        paths = [f.path for f in listing.files] + [f.path for f, _ in rejected]
        candidates = [f for f in listing.files if f.sha256]

        def lookups(connection):
            return (
                queries.rejected_files(connection, paths),
                {(p, row["sha256"]) for p, rows in queries.seen_files(connection, paths).items() for row in rows},
                queries.predicted_hashes(
                    connection, [f.sha256 for f in candidates], model_name=ref.name,
                    model_version=ref.version if reclassify else None,
                ),
            )

        already_rejected, seen_pairs, predicted = db.read_with_retries(
            settings, engine, lookups, what="reading earlier rejections and predictions"
        )

        rejected_ids = {id(f) for f, _ in rejected}
        new_rejections = [(f, r) for f, r in rejected if (f.path, f.sha256) not in already_rejected]
        done, linked, new = [], [], []
        for found in listing.files:
            if id(found) in rejected_ids:
                continue
            key = (found.path, found.sha256)
            if key in already_rejected:
                done.append(found)  # could not be decoded on an earlier night
            elif found.sha256 in predicted:
                (done if key in seen_pairs else linked).append(found)
            else:
                new.append(found)

        def commit(connection) -> None:
            db.insert_ignore(connection, db.rejections, [
                _rejection_row(f.path, f.sha256, r, run_id, now) for f, r in new_rejections
            ])
            db.insert_ignore(connection, db.files_seen, [
                _seen_row(f, run_id, now) for f, _ in new_rejections
            ] + [_seen_row(f, run_id, now) for f in linked])

        db.transaction(settings, engine, commit, what="recording rejections and files seen")
    names = pseudonymiser(settings)  # pseudonyms in log lines when WBC_PSEUDONYMISE_NAMES is on
    for found, reason in new_rejections:
        log.warning("rejected %s: %s", names.path(found.path), names.text(reason, [found.path]))
    already_rejected_files = [f for f, r in rejected if (f.path, f.sha256) in already_rejected]
    archived = _archive(settings, [f.path for f in done + linked + [f for f, _ in rejected]])

    by_hash: dict[str, list[FoundFile]] = {}
    for found in new:
        by_hash.setdefault(found.sha256, []).append(found)
    items = [
        {"sha256": digest, "files": [asdict(f) for f in files]} for digest, files in by_hash.items()
    ]
    size = chunk_size or settings.classify_chunk_size
    bounds = plan_chunks(len(items), size, settings.max_chunks)
    work = run_work_dir(settings, run_id)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(f"{CHUNK_PREFIX}*.json"):
        stale.unlink()  # a retried find step replans from scratch
    chunks = []
    for number, (start, stop) in enumerate(bounds):
        path = work / f"{CHUNK_PREFIX}{number:04d}.json"
        _write_json(path, {"run_id": run_id, "model": model_ref_to_dict(ref), "items": items[start:stop]})
        chunks.append(str(path))
    summary = {
        "run_id": run_id,
        "drop": drop or "",
        "reclassify": bool(reclassify),
        "files_found": len(listing.files) + len(listing.rejected),
        "files_settling": len(listing.settling),
        "files_already_done": len(done) + len(already_rejected_files),
        "files_linked_to_existing_predictions": len(linked),
        "files_rejected": len(new_rejections),
        "files_new": len(new),
        "images_new": len(items),
        "files_archived": archived,
        "chunk_size": (bounds[0][1] - bounds[0][0]) if bounds else size,
        "chunks": chunks,
        "work_dir": str(work),
    }
    log.info(
        "found %d files in %s: %d new (%d distinct images, %d chunks), %d linked to existing "
        "predictions by hash, %d rejected, %d already done, %d still being written (next run)",
        summary["files_found"], settings.classify_dir / (drop or ""), len(new), len(items),
        len(chunks), len(linked), len(new_rejections), summary["files_already_done"],
        len(listing.settling),
    )
    return summary


def _write_json(path: Path, payload: Any) -> None:
    from wbc_tasks.core.workdir import write_json_atomic

    write_json_atomic(path, payload)


def _archive(settings: Settings, rel_paths: Sequence[str]) -> int:
    """Move committed files into ``settings.archive_dir`` (no-op unless it is set)."""
    if settings.archive_dir is None or not rel_paths:
        return 0
    moved = 0
    for rel in sorted(set(rel_paths)):
        source = settings.classify_dir / rel
        target = settings.archive_dir / rel
        if not os.path.lexists(source):
            continue
        if os.path.lexists(target):
            names = pseudonymiser(settings)
            log.warning("not archiving %s: %s already exists", names.under(settings.classify_dir, rel),
                        names.under(settings.archive_dir, rel))
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
            moved += 1
        except OSError as exc:
            names = pseudonymiser(settings)
            log.warning("could not archive %s to %s: %s (its rows are committed)",
                        names.under(settings.classify_dir, rel), names.under(settings.archive_dir, rel),
                        names.text(str(exc), [rel]))
    log.info("archived %d files to %s", moved, settings.archive_dir)
    return moved


# --------------------------------------------------------------------------------------------
# Classifying
# --------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One image's result: probabilities, or the reason it was rejected."""

    key: Any
    sha256: str
    probabilities: list[float] | None = None
    reason: str | None = None


def _decode(path: Path, size: int, settings: Settings, expected_sha: str | None) -> tuple[str, Any]:
    """("ok", (sha, array)), ("rejected", (sha, reason)) or ("changed", sha)."""
    # A file not read is rejected with no content hash (""): a (path, sha256) rejection is final,
    # and the expected hash here would have kept a vanished file that comes back (a drop folder
    # renamed mid-run and renamed back) from ever being classified.
    try:
        resolve_within(path, _allowed_roots(settings))  # links out, broken links, loops, gone
        digest = sha256_of_file(path)
    except ImageError as exc:
        return "rejected", ("", exc.reason)
    except FileNotFoundError:
        return "rejected", ("", DISAPPEARED)
    except OSError as exc:
        return "rejected", ("", f"cannot read file: {exc}")
    if expected_sha is not None and digest != expected_sha:
        return "changed", digest
    try:
        array = load_image(
            path, size, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side
        )
    except ImageError as exc:
        return "rejected", ("" if exc.reason == DISAPPEARED else digest, exc.reason)
    return "ok", (digest, array)


def predict_images(
    settings: Settings,
    model: Any,
    ref: ModelRef,
    jobs: Sequence[tuple[Any, Path, str | None]],
) -> Iterator[Outcome]:
    """Classify ``jobs`` (key, path, expected sha256 or None) in batches.

    Decoding runs in a thread pool (Pillow releases the GIL) one batch ahead of the model, so
    the CPU decodes the next batch while the model predicts this one. A file whose content no
    longer matches ``expected sha256`` is skipped (key yielded with neither result nor reason):
    it is new content, found by the next run.
    """
    import numpy as np

    batch_size = max(1, settings.classify_batch_size)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    n_classes = len(ref.class_names)
    with ThreadPoolExecutor(max_workers=settings.worker_count()) as pool:
        pending: deque[list[tuple[Any, Future]]] = deque()

        def submit(batch):
            return [
                (key, pool.submit(_decode, Path(path), ref.image_size, settings, sha))
                for key, path, sha in batch
            ]

        queue = iter(batches)
        for batch in (next(queue, None), next(queue, None)):
            if batch is not None:
                pending.append(submit(batch))
        while pending:
            decoded = [(key, future.result()) for key, future in pending.popleft()]
            upcoming = next(queue, None)
            if upcoming is not None:
                pending.append(submit(upcoming))
            arrays, owners = [], []
            for key, (status, value) in decoded:
                if status == "ok":
                    owners.append((key, value[0]))
                    arrays.append(value[1])
                elif status == "rejected":
                    yield Outcome(key, value[0], reason=value[1])
                else:
                    log.warning("%s changed since it was found; left for the next run", key)
                    yield Outcome(key, value)
            if not arrays:
                continue
            batch = np.stack(arrays)
            if len(arrays) < batch_size:
                # Pad to the usual batch shape: a new shape would make TensorFlow retrace the model.
                batch = np.concatenate([batch, np.zeros((batch_size - len(arrays), *batch.shape[1:]), batch.dtype)])
            output = np.asarray(model.predict_on_batch(batch), dtype=np.float64)[: len(arrays)]
            if output.ndim != 2 or output.shape[1] != n_classes:
                raise ValueError(
                    f"model {ref.name} version {ref.version} returned shape {output.shape}, "
                    f"expected (batch, {n_classes}) for classes {ref.class_names}"
                )
            for (key, digest), row in zip(owners, output, strict=True):
                yield Outcome(key, digest, probabilities=[float(p) for p in row])


def prediction_fields(probabilities: Sequence[float], ref: ModelRef, threshold: float) -> dict[str, Any]:
    """Class, confidence, probabilities by class and the review flag of one output row."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    confidence = float(probabilities[best])
    return {
        "predicted_class": ref.class_names[best],
        "confidence": confidence,
        "probabilities": {name: float(p) for name, p in zip(ref.class_names, probabilities, strict=True)},
        "needs_review": confidence < threshold,
    }


def load_model(settings: Settings, ref: ModelRef) -> Any:
    """The Keras model of ``ref`` (from the configured registry)."""
    from wbc_tasks.registry import tracking as registry

    started = time.perf_counter()
    model = registry.load_keras_model(settings, ref)
    log.info("loaded %s version %s in %.1f s", ref.name, ref.version, time.perf_counter() - started)
    return model


def _empty_stats() -> dict[str, Any]:
    return {
        "images_classified": 0, "images_already_classified": 0, "files_rejected": 0,
        "files_recorded": 0, "files_changed": 0, "needs_review": 0, "confidence_sum": 0.0,
        "per_class": {}, "classify_seconds": 0.0,
    }


def classify_chunk(
    settings: Settings,
    chunk_file: str | Path,
    model: ModelRef | dict[str, Any] | None = None,
    *,
    run_id: str,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Classify one chunk file and commit its rows in one transaction; return its counts.

    Safe to retry: images this model version already classified (an earlier attempt) are not
    run again, every insert ignores existing rows, and a chunk whose summary file exists (it
    committed before) returns that summary.
    """
    from wbc_tasks.serving import predictions as db
    from wbc_tasks.serving import queries

    chunk_file = Path(chunk_file)
    done_file = chunk_file.with_suffix(".done.json")
    if done_file.is_file():
        log.info("chunk %s already committed; reusing its summary", chunk_file.name)
        return json.loads(done_file.read_text())
    chunk = json.loads(chunk_file.read_text())
    ref = model_ref_from_dict(model if model is not None else chunk["model"])
    threshold = settings.review_threshold if threshold is None else float(threshold)
    items = chunk["items"]
    stats = _empty_stats()
    started = time.perf_counter()

    with db.open_engine(settings.predictions_db_url) as engine:
        already = db.read_with_retries(
            settings, engine,
            lambda connection: queries.predicted_hashes(
                connection, [i["sha256"] for i in items], model_name=ref.name, model_version=ref.version
            ),
            what=f"reading earlier predictions of chunk {chunk_file.name}",
        )
        todo = [i for i in items if i["sha256"] not in already]
        stats["images_already_classified"] = len(items) - len(todo)
        per_class: Counter[str] = Counter()
        prediction_rows, rejection_rows, seen_rows, committed_paths = [], [], [], []
        now = db.utcnow()
        for item in items:
            if item["sha256"] in already:
                for f in item["files"]:
                    seen_rows.append(_seen_row(FoundFile(**f), run_id, now))
                    committed_paths.append(f["path"])
        if todo:
            keras_model = load_model(settings, ref)
            jobs = [
                (index, settings.classify_dir / item["files"][0]["path"], item["sha256"])
                for index, item in enumerate(todo)
            ]
            predict_started = time.perf_counter()
            for outcome in predict_images(settings, keras_model, ref, jobs):
                item = todo[outcome.key]
                files = [FoundFile(**f) for f in item["files"]]
                if outcome.probabilities is None and outcome.reason is None:
                    stats["files_changed"] += len(files)
                    continue
                if outcome.reason is not None:
                    if not outcome.sha256:
                        # Only the first file was tried and could not be read (e.g. it vanished):
                        # that says nothing about the other copies, which wait for the next run.
                        stats["files_changed"] += len(files) - 1
                        files = [replace(files[0], sha256=outcome.sha256)]
                    for f in files:
                        rejection_rows.append(_rejection_row(f.path, f.sha256, outcome.reason, run_id, now))
                        names = pseudonymiser(settings)
                        log.warning("rejected %s: %s", names.path(f.path), names.text(outcome.reason, [f.path]))
                    stats["files_rejected"] += len(files)
                else:
                    fields_ = prediction_fields(outcome.probabilities, ref, threshold)
                    prediction_rows.append({
                        "sha256": item["sha256"], **fields_, "model_name": ref.name,
                        "model_version": ref.version, "model_run_id": ref.run_id,
                        "dag_run_id": run_id, "created_at": now,
                    })
                    per_class[fields_["predicted_class"]] += 1
                    stats["confidence_sum"] += fields_["confidence"]
                    stats["needs_review"] += int(fields_["needs_review"])
                seen_rows.extend(_seen_row(f, run_id, now) for f in files)
                committed_paths.extend(f.path for f in files)
            stats["classify_seconds"] = time.perf_counter() - predict_started

        def commit(connection) -> None:
            db.insert_ignore(connection, db.predictions, prediction_rows)
            db.insert_ignore(connection, db.rejections, rejection_rows)
            db.insert_ignore(connection, db.files_seen, seen_rows)

        # One transaction, retried whole if the connection fails: all the chunk's rows or none.
        db.transaction(settings, engine, commit, what=f"committing chunk {chunk_file.name}")
    stats.update(
        chunk=chunk_file.name,
        images_classified=len(prediction_rows),
        files_recorded=len(seen_rows),
        per_class=dict(sorted(per_class.items())),
        seconds=time.perf_counter() - started,
    )
    _write_json(done_file, stats)
    log.info(
        "chunk %s: %d images classified (%s), %d flagged for review, %d files rejected, "
        "%d already classified by this version, %.1f s",
        chunk_file.name, stats["images_classified"],
        ", ".join(f"{k} {v}" for k, v in stats["per_class"].items()) or "none",
        stats["needs_review"], stats["files_rejected"], stats["images_already_classified"],
        stats["seconds"],
    )
    stats["files_archived"] = _archive(settings, committed_paths)
    return stats


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

def summarise_run(
    settings: Settings,
    *,
    run_id: str,
    model: ModelRef | dict[str, Any],
    found: dict[str, Any],
    chunk_summaries: Sequence[dict[str, Any]] | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Totals of one run, logged and recorded as an MLflow run tagged with the model version."""
    ref = model_ref_from_dict(model)
    chunk_summaries = [c for c in (chunk_summaries or []) if c]
    per_class: Counter[str] = Counter()
    totals = _empty_stats()
    for chunk in chunk_summaries:
        per_class.update(chunk.get("per_class", {}))
        for key in ("images_classified", "images_already_classified", "files_rejected",
                    "files_recorded", "files_changed", "needs_review", "confidence_sum",
                    "classify_seconds"):
            totals[key] += chunk.get(key, 0)
    classified = totals["images_classified"]
    summary = {
        "run_id": run_id,
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "chunks": len(chunk_summaries),
        "files_found": found.get("files_found", 0),
        "files_settling": found.get("files_settling", 0),
        "files_linked_to_existing_predictions": found.get("files_linked_to_existing_predictions", 0),
        "files_already_done": found.get("files_already_done", 0),
        "images_classified": classified,
        "per_class": dict(sorted(per_class.items())),
        "mean_confidence": totals["confidence_sum"] / classified if classified else None,
        "needs_review": totals["needs_review"],
        "files_rejected": found.get("files_rejected", 0) + totals["files_rejected"],
        "files_changed_during_run": totals["files_changed"],
        "classify_seconds": totals["classify_seconds"],
        "images_per_second": classified / totals["classify_seconds"] if totals["classify_seconds"] else None,
    }
    log.info(
        "run %s with %s v%s: %d images classified (%s), mean confidence %s, %d for review, "
        "%d files rejected, %d linked to earlier predictions, %d waiting to settle, %s images/s",
        run_id, ref.name, ref.version, classified,
        ", ".join(f"{k} {v}" for k, v in summary["per_class"].items()) or "none",
        "n/a" if summary["mean_confidence"] is None else f"{summary['mean_confidence']:.3f}",
        summary["needs_review"], summary["files_rejected"],
        summary["files_linked_to_existing_predictions"], summary["files_settling"],
        "n/a" if summary["images_per_second"] is None else f"{summary['images_per_second']:.1f}",
    )
    summary["mlflow_run_id"] = _log_summary_to_mlflow(settings, ref, summary, params or {})
    work = Path(found["work_dir"]) if found.get("work_dir") else run_work_dir(settings, run_id)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / SUMMARY_FILE, summary)
    return summary


def _log_summary_to_mlflow(settings: Settings, ref: ModelRef, summary: dict, params: dict) -> str:
    """One MLflow run per classification run (client API: no process-global active run)."""
    from mlflow.entities import Metric, Param

    from wbc_tasks.registry import tracking as registry

    client = registry.configure_mlflow(settings)
    experiment_id = registry.ensure_experiment(
        settings.with_overrides(mlflow_experiment=settings.classify_experiment)
    )
    tags = {
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "model_uri": ref.uri,
        "dag_run_id": summary["run_id"],
    }
    metrics = {
        key: float(summary[key])
        for key in ("images_classified", "mean_confidence", "needs_review", "files_rejected",
                    "files_linked_to_existing_predictions", "files_settling", "images_per_second")
        if summary[key] is not None
    }
    metrics.update({f"count_{name}": float(n) for name, n in summary["per_class"].items()})
    run = client.create_run(experiment_id, run_name=f"classify {summary['run_id']}", tags=tags)
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, stamp, 0) for key, value in metrics.items()],
        params=[Param(key, str(value)) for key, value in params.items()],
    )
    client.log_dict(run_id, summary, "summary.json")
    client.set_terminated(run_id)
    return run_id


# --------------------------------------------------------------------------------------------
# Without Airflow
# --------------------------------------------------------------------------------------------

def new_run_id(prefix: str = "cli") -> str:
    """A run id for runs started outside Airflow."""
    return f"{prefix}__{time.strftime('%Y-%m-%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"


def classify_new_images(
    settings: Settings,
    *,
    model: str | None = None,
    drop: str | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
    reclassify: bool = False,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One nightly run in this process (what the DAG does, chunk after chunk); returns the summary."""
    run_id = run_id or new_run_id()
    ref = resolve_run_model(settings, model)
    found = find_new_images(
        settings, run_id=run_id, model=ref, drop=drop, reclassify=reclassify, chunk_size=chunk_size
    )
    chunks = [
        classify_chunk(settings, chunk, ref, run_id=run_id, threshold=threshold)
        for chunk in found["chunks"]
    ]
    params = {
        "model": model or settings.champion_alias, "drop": drop or "", "reclassify": reclassify,
        "threshold": settings.review_threshold if threshold is None else threshold,
        "chunk_size": found["chunk_size"],
    }
    return summarise_run(
        settings, run_id=run_id, model=ref, found=found, chunk_summaries=chunks, params=params
    )


def classify_paths(
    settings: Settings,
    paths: Sequence[str | Path],
    *,
    model_ref: ModelRef | str | None = None,
    threshold: float | None = None,
    record: bool = False,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Classify a few image files now, without Airflow; one dict per path, in order.

    ``model_ref``: a :class:`ModelRef`, an alias or version string, or None for the champion.
    Each dict has ``path``, ``sha256`` and either the prediction (``predicted_class``,
    ``confidence``, ``probabilities``, ``needs_review``, ``model_name``, ``model_version``) or
    ``rejected`` (the reason). Nothing is written unless ``record`` is set: then predictions,
    rejections and ``files_seen`` rows are stored (:func:`recorded_location`), so the files
    appear in ``wbc predictions`` at once.
    """
    from wbc_tasks.registry.tracking import resolve_model

    ref = model_ref if isinstance(model_ref, ModelRef) else resolve_model(settings, model_ref)
    threshold = settings.review_threshold if threshold is None else float(threshold)
    model = load_model(settings, ref)
    absolute = [Path(p).expanduser().absolute() for p in paths]
    # Each file is checked like a drop folder's files, against every configured folder: one
    # outside them (or a link leading out) is rejected with its reason, the others still run.
    one_shot = settings.with_overrides(allowed_roots=settings.input_roots())
    results: list[dict[str, Any]] = [{"path": str(p)} for p in absolute]
    for outcome in predict_images(one_shot, model, ref, [(i, p, None) for i, p in enumerate(absolute)]):
        result = results[outcome.key]
        result["sha256"] = outcome.sha256
        if outcome.reason is not None:
            result["rejected"] = outcome.reason
        else:
            result.update(prediction_fields(outcome.probabilities, ref, threshold))
            result.update(model_name=ref.name, model_version=ref.version)
    if record:
        _record_paths(settings, ref, results, run_id or new_run_id("classify-paths"))
    return results


#: The drop under which ``wbc classify --record`` files outside the classify folder are listed.
CLI_DROP = "cli"


def recorded_location(settings: Settings, path: Path) -> tuple[str, str]:
    """(path, drop) a file given on the command line is recorded under: inside the classify
    folder, its path relative to that folder and its drop, exactly as the nightly run records it
    (so the nightly run adds no second row); elsewhere, its absolute path under drop ``cli``."""
    base = settings.classify_dir.resolve()
    candidates = [path]
    try:
        candidates.append(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: recorded by its own path
        pass
    for candidate in candidates:
        if candidate.is_relative_to(base):
            rel = candidate.relative_to(base)
            return str(rel), _drop_of(rel)
    return str(path), CLI_DROP


def _record_paths(settings: Settings, ref: ModelRef, results: list[dict[str, Any]], run_id: str) -> None:
    """Store ``classify_paths`` results: predictions, rejections and the ``files_seen`` rows that
    make them appear in ``wbc predictions`` at once, in one transaction."""
    from wbc_tasks.serving import predictions as db

    now = db.utcnow()
    prediction_rows, rejection_rows, seen_rows = [], [], []
    for r in results:
        path = Path(r["path"])
        rel, drop = recorded_location(settings, path)
        sha = r.get("sha256") or db.UNREADABLE_SHA
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime
        except OSError:
            size = mtime = None
        seen_rows.append(_seen_row(FoundFile(rel, drop, size, mtime, sha), run_id, now))
        if "rejected" in r:
            rejection_rows.append(_rejection_row(rel, sha, r["rejected"], run_id, now))
        elif "predicted_class" in r:
            prediction_rows.append({
                "sha256": sha, "predicted_class": r["predicted_class"], "confidence": r["confidence"],
                "probabilities": r["probabilities"], "needs_review": r["needs_review"],
                "model_name": ref.name, "model_version": ref.version, "model_run_id": ref.run_id,
                "dag_run_id": run_id, "created_at": now,
            })

    def commit(connection) -> None:
        db.insert_ignore(connection, db.predictions, prediction_rows)
        db.insert_ignore(connection, db.rejections, rejection_rows)
        db.insert_ignore(connection, db.files_seen, seen_rows)

    db.upgrade_database(settings.predictions_db_url)
    with db.open_engine(settings.predictions_db_url) as engine:
        db.transaction(settings, engine, commit, what="recording classified files")
    log.info("recorded %d predictions and %d rejections (run %s)", len(prediction_rows), len(rejection_rows), run_id)
