"""One nightly batch classification in this process, as the ``wbc_batch_classification`` DAG
runs it task by task: for scripts that want a whole night without Airflow, and the tests; and
the map of how a night works. Imports the serving modules that own the steps.

The flow (each step one DAG task, each a function of its own module):

1. :func:`wbc_tasks.serving.model.resolve_run_model`: the alias (default: champion) becomes one
   fixed model version, so every chunk uses the same model even if a promotion happens mid-run.
   Resolved first, because what counts as "new" depends on the version when ``reclassify`` is set.
2. :func:`wbc_tasks.serving.plan.find_new_images`: lists the classify folder
   (:mod:`~wbc_tasks.serving.scan`), hashes what changed, records what is already done, linked
   by hash to an earlier prediction or not classifiable, and writes the new images to chunk
   files in the run's work folder.
3. :func:`wbc_tasks.serving.commit.classify_chunk`: one mapped task per chunk file; the model is
   loaded once, images are decoded in a thread pool one batch ahead of the model
   (:mod:`~wbc_tasks.serving.infer`), and the chunk's predictions, rejections and ``files_seen``
   rows are committed in one transaction, then its files archived when
   ``settings.archive_dir`` is set (:mod:`~wbc_tasks.serving.archive`).
4. :func:`wbc_tasks.serving.summary.summarise_run`: the night's totals, logged and logged to
   MLflow.

Nothing in the classify folder is modified, unless ``settings.archive_dir`` is set.
"""

from __future__ import annotations

from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.serving.commit import classify_chunk
from wbc_tasks.serving.model import resolve_run_model
from wbc_tasks.serving.plan import find_new_images, new_run_id
from wbc_tasks.serving.summary import summarise_run


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
        settings,
        run_id=run_id,
        model=ref,
        drop=drop,
        reclassify=reclassify,
        chunk_size=chunk_size,
    )
    chunks = [classify_chunk(settings, chunk, ref, run_id=run_id, threshold=threshold) for chunk in found["chunks"]]
    params = {
        "model": model or settings.champion_alias,
        "drop": drop or "",
        "reclassify": reclassify,
        "threshold": settings.review_threshold if threshold is None else threshold,
        "chunk_size": found["chunk_size"],
    }
    return summarise_run(
        settings,
        run_id=run_id,
        model=ref,
        found=found,
        chunk_summaries=chunks,
        params=params,
    )
