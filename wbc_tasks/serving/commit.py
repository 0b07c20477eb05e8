"""The rows a classification writes and the chunk task that commits them: one chunk file's
images are classified and their predictions, rejections and ``files_seen`` rows go into the
database in one transaction (all or none), after which the chunk's files may be archived. Safe
to retry.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import drop_summaries, queries
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.archive import archive_files
from wbc_tasks.serving.infer import Outcome, predict_images, prediction_fields
from wbc_tasks.serving.model import load_model, model_ref_from_dict
from wbc_tasks.serving.scan import FoundFile

log = logging.getLogger(__name__)

#: The fields of a prediction that :func:`wbc_tasks.serving.infer.prediction_fields` gives.
PREDICTION_FIELDS = (
    "predicted_class",
    "confidence",
    "probabilities",
    "needs_review",
    "review_reasons",
    "unfamiliar_score",
    "image_check",
)


def seen_row(found: FoundFile, run_id: str, seen_at: datetime) -> dict[str, Any]:
    """The ``files_seen`` row of one file."""
    return {
        "path": found.path,
        "drop": found.drop,
        "sha256": found.sha256,
        "size": found.size,
        "mtime": found.mtime,
        "seen_at": seen_at,
        "dag_run_id": run_id,
    }


def rejection_row(path: str, sha256: str, reason: str, run_id: str, created_at: datetime) -> dict[str, Any]:
    """The ``rejections`` row of one file."""
    return {
        "path": path,
        "sha256": sha256,
        "reason": reason,
        "created_at": created_at,
        "dag_run_id": run_id,
    }


def prediction_row(
    sha256: str,
    fields: Mapping[str, Any],
    ref: ModelRef,
    run_id: str,
    created_at: datetime,
) -> dict[str, Any]:
    """The ``predictions`` row of one image, from its :data:`PREDICTION_FIELDS`."""
    return {
        "sha256": sha256,
        **{key: fields[key] for key in PREDICTION_FIELDS},
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "dag_run_id": run_id,
        "created_at": created_at,
    }


def write_rows(
    connection: Connection,
    *,
    predictions: Sequence[dict[str, Any]] = (),
    rejections: Sequence[dict[str, Any]] = (),
    seen: Sequence[dict[str, Any]] = (),
) -> None:
    """Insert the rows (existing ones kept), predictions before the files that point to them,
    and recount the drops they touch (in the same transaction: all of it or none)."""
    db.insert_ignore(connection, db.predictions, predictions)
    db.insert_ignore(connection, db.rejections, rejections)
    db.insert_ignore(connection, db.files_seen, seen)
    drop_summaries.refresh_after_write(
        connection,
        seen=seen,
        rejected_paths=[r["path"] for r in rejections],
        hashes=[p["sha256"] for p in predictions],
    )


def empty_stats() -> dict[str, Any]:
    """The counters of a chunk, all zero."""
    return {
        "images_classified": 0,
        "images_already_classified": 0,
        "files_rejected": 0,
        "files_recorded": 0,
        "files_changed": 0,
        "needs_review": 0,
        "review_reasons": {},
        "unfamiliar_score_sum": 0.0,
        "confidence_sum": 0.0,
        "per_class": {},
        "classify_seconds": 0.0,
    }


@dataclass
class _ChunkRows:
    """What a chunk commits, gathered while its images are classified, and its counters."""

    run_id: str
    now: datetime
    stats: dict[str, Any] = field(default_factory=empty_stats)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    committed_paths: list[str] = field(default_factory=list)
    per_class: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    #: Drops with a file that changed or vanished while classified: the next night reads them again.
    unfinished_drops: set[str] = field(default_factory=set)

    def add_seen(self, files: Sequence[FoundFile]) -> None:
        """``files_seen`` rows of ``files``, whose content is now classified or rejected."""
        self.seen.extend(seen_row(f, self.run_id, self.now) for f in files)
        self.committed_paths.extend(f.path for f in files)

    def add_rejected(self, settings: Settings, files: Sequence[FoundFile], reason: str) -> None:
        for f in files:
            self.rejections.append(rejection_row(f.path, f.sha256, reason, self.run_id, self.now))
            names = pseudonymiser(settings)
            log.warning("rejected %s: %s", names.path(f.path), names.text(reason, [f.path]))
        self.stats["files_rejected"] += len(files)

    def add_prediction(self, sha256: str, fields: Mapping[str, Any], ref: ModelRef) -> None:
        self.predictions.append(prediction_row(sha256, fields, ref, self.run_id, self.now))
        self.per_class[fields["predicted_class"]] += 1
        self.stats["confidence_sum"] += fields["confidence"]
        self.stats["needs_review"] += int(fields["needs_review"])
        self.reasons.update(fields["review_reasons"])
        self.stats["unfamiliar_score_sum"] += fields["unfamiliar_score"] or 0.0

    def add_outcome(self, settings: Settings, item: dict[str, Any], outcome: Outcome, ref: ModelRef) -> None:
        """One image's outcome: its prediction or rejection and its files' rows; nothing for a
        file whose content changed since it was found (new content, found by the next run)."""
        files = [FoundFile(**f) for f in item["files"]]
        if outcome.probabilities is None and outcome.reason is None:
            self.stats["files_changed"] += len(files)
            self.unfinished_drops.update(f.drop for f in files)
            return
        if outcome.reason is not None:
            if not outcome.sha256:
                self.unfinished_drops.update(f.drop for f in files)
                # Only the first file was tried and could not be read (e.g. it vanished):
                # that says nothing about the other copies, which wait for the next run.
                self.stats["files_changed"] += len(files) - 1
                files = [replace(files[0], sha256=outcome.sha256)]
            self.add_rejected(settings, files, outcome.reason)
        else:
            assert outcome.probabilities is not None  # no reason: it was predicted
            self.add_prediction(item["sha256"], prediction_fields(outcome, ref), ref)
        self.add_seen(files)

    def write(self, connection: Connection) -> None:
        write_rows(connection, predictions=self.predictions, rejections=self.rejections, seen=self.seen)


def _already_classified(
    settings: Settings, engine: Engine, items: list[dict[str, Any]], ref: ModelRef, name: str
) -> set[str]:
    """The content hashes of ``items`` this model version classified before (an earlier attempt)."""
    return db.read_with_retries(
        settings,
        engine,
        lambda connection: queries.predicted_hashes(
            connection,
            [i["sha256"] for i in items],
            model_name=ref.name,
            model_version=ref.version,
        ),
        what=f"reading earlier predictions of chunk {name}",
    )


def _classify(
    settings: Settings, ref: ModelRef, todo: list[dict[str, Any]], threshold: float | None, rows: _ChunkRows
) -> None:
    """Classify the images of ``todo`` (one file of each) with the model, adding their outcomes to ``rows``."""
    keras_model = load_model(settings, ref)
    jobs = [
        (index, settings.classify_dir / item["files"][0]["path"], item["sha256"]) for index, item in enumerate(todo)
    ]
    predict_started = time.perf_counter()
    for outcome in predict_images(settings, keras_model, ref, jobs, review_threshold=threshold):
        rows.add_outcome(settings, todo[outcome.key], outcome, ref)
    rows.stats["classify_seconds"] = time.perf_counter() - predict_started


def _log_chunk(stats: dict[str, Any]) -> None:
    log.info(
        "chunk %s: %d images classified (%s), %d flagged for review, %d files rejected, "
        "%d already classified by this version, %.1f s",
        stats["chunk"],
        stats["images_classified"],
        ", ".join(f"{k} {v}" for k, v in stats["per_class"].items()) or "none",
        stats["needs_review"],
        stats["files_rejected"],
        stats["images_already_classified"],
        stats["seconds"],
    )


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
    chunk_file = Path(chunk_file)
    done_file = chunk_file.with_suffix(".done.json")
    if done_file.is_file():
        log.info("chunk %s already committed; reusing its summary", chunk_file.name)
        return json.loads(done_file.read_text())
    chunk = json.loads(chunk_file.read_text())
    ref = model_ref_from_dict(model if model is not None else chunk["model"])
    threshold = None if threshold is None else float(threshold)
    items = chunk["items"]
    started = time.perf_counter()

    with db.open_engine(settings.predictions_db_url) as engine:
        already = _already_classified(settings, engine, items, ref, chunk_file.name)
        todo = [i for i in items if i["sha256"] not in already]
        rows = _ChunkRows(run_id, db.utcnow())
        rows.stats["images_already_classified"] = len(items) - len(todo)
        for item in items:
            if item["sha256"] in already:
                rows.add_seen([FoundFile(**f) for f in item["files"]])
        if todo:
            _classify(settings, ref, todo, threshold, rows)
        # One transaction, retried whole if the connection fails: all the chunk's rows or none.
        db.transaction(settings, engine, rows.write, what=f"committing chunk {chunk_file.name}")
    stats = rows.stats
    stats.update(
        chunk=chunk_file.name,
        images_classified=len(rows.predictions),
        files_recorded=len(rows.seen),
        per_class=dict(sorted(rows.per_class.items())),
        review_reasons=dict(sorted(rows.reasons.items())),
        seconds=time.perf_counter() - started,
        unfinished_drops=sorted(rows.unfinished_drops),
    )
    write_json_atomic(done_file, stats)
    _log_chunk(stats)
    stats["files_archived"] = archive_files(settings, rows.committed_paths)
    return stats
