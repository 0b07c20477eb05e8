"""A few image files classified now, without Airflow (``wbc classify``): each file is checked
against every configured folder like a drop's files, classified with the champion or a given
version, and, when asked, recorded (predictions, rejections and ``files_seen`` rows) so it
appears in ``wbc predictions`` at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import prediction_row, rejection_row, seen_row, write_rows
from wbc_tasks.serving.infer import predict_images, prediction_fields
from wbc_tasks.serving.model import load_model
from wbc_tasks.serving.plan import new_run_id
from wbc_tasks.serving.scan import FoundFile, drop_of

log = logging.getLogger(__name__)

#: The drop under which ``wbc classify --record`` files outside the classify folder are listed.
CLI_DROP = "cli"


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
    from wbc_tasks.registry.versions import resolve_model

    ref = model_ref if isinstance(model_ref, ModelRef) else resolve_model(settings, model_ref)
    model = load_model(settings, ref)
    absolute = [Path(p).expanduser().absolute() for p in paths]
    # Each file is checked like a drop folder's files, against every configured folder: one
    # outside them (or a link leading out) is rejected with its reason, the others still run.
    one_shot = settings.with_overrides(allowed_roots=settings.input_roots())
    results: list[dict[str, Any]] = [{"path": str(p)} for p in absolute]
    jobs = [(i, p, None) for i, p in enumerate(absolute)]
    for outcome in predict_images(one_shot, model, ref, jobs, review_threshold=threshold):
        result = results[outcome.key]
        result["sha256"] = outcome.sha256
        if outcome.reason is not None:
            result["rejected"] = outcome.reason
        else:
            assert outcome.probabilities is not None  # no reason: it was predicted
            result.update(prediction_fields(outcome, ref))
            result.update(model_name=ref.name, model_version=ref.version)
    if record:
        _record_paths(settings, ref, results, run_id or new_run_id("classify-paths"))
    return results


def recorded_location(settings: Settings, path: Path) -> tuple[str, str]:
    """(path, drop) a file given on the command line is recorded under: inside the classify
    folder, its path relative to that folder and its drop, exactly as the nightly run records it
    (so the nightly run adds no second row); elsewhere, its absolute path under drop ``cli``."""
    base = settings.classify_dir.resolve()
    candidates = [path]
    with contextlib.suppress(OSError, RuntimeError):  # a symlink loop: recorded by its own path
        candidates.append(path.resolve())
    for candidate in candidates:
        if candidate.is_relative_to(base):
            rel = candidate.relative_to(base)
            return str(rel), drop_of(rel)
    return str(path), CLI_DROP


def _record_paths(settings: Settings, ref: ModelRef, results: list[dict[str, Any]], run_id: str) -> None:
    """Store ``classify_paths`` results: predictions, rejections and the ``files_seen`` rows that
    make them appear in ``wbc predictions`` at once, in one transaction."""
    now = db.utcnow()
    prediction_rows, rejection_rows, seen_rows = [], [], []
    for r in results:
        path = Path(r["path"])
        rel, drop = recorded_location(settings, path)
        sha = r.get("sha256") or db.UNREADABLE_SHA
        size: int | None
        mtime: float | None
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime
        except OSError:
            size = mtime = None
        seen_rows.append(seen_row(FoundFile(rel, drop, size, mtime, sha), run_id, now))
        if "rejected" in r:
            rejection_rows.append(rejection_row(rel, sha, r["rejected"], run_id, now))
        elif "predicted_class" in r:
            prediction_rows.append(prediction_row(sha, r, ref, run_id, now))

    def commit(connection: Connection) -> None:
        write_rows(
            connection,
            predictions=prediction_rows,
            rejections=rejection_rows,
            seen=seen_rows,
        )

    db.upgrade_database(settings.predictions_db_url)
    with db.open_engine(settings.predictions_db_url) as engine:
        db.transaction(settings, engine, commit, what="recording classified files")
    log.info(
        "recorded %d predictions and %d rejections (run %s)",
        len(prediction_rows),
        len(rejection_rows),
        run_id,
    )
