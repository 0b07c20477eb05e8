"""The nightly batch classification, task by task: the functions the ``wbc_batch_classification``
DAG's tasks call (each task one call, named like its task), and :func:`classify_new_images`, which
composes the same functions in the DAG's order in this process, for scripts that want a whole
night without Airflow, and the tests.

The flow (:data:`TASKS`, the DAG's order; each step the function of its own module):

1. :func:`resolve_model` (:func:`wbc_tasks.serving.model.resolve_run_model`): the alias
   (default: champion) becomes one fixed model version, so every chunk uses the same model even
   if a promotion happens mid-run. Resolved first, because what counts as "new" depends on the
   version when ``reclassify`` is set.
2. :func:`find_new_images` (:func:`wbc_tasks.serving.plan.find_new_images`): lists the classify
   folder (:mod:`~wbc_tasks.serving.scan`), hashes what changed, records what is already done,
   linked by hash to an earlier prediction or not classifiable, and writes the new images to
   chunk files in the run's work folder; :func:`chunk_files` lists them (Airflow maps over a
   whole value, not one key of a dict).
3. :func:`classify_chunk` (:func:`wbc_tasks.serving.commit.classify_chunk`): one mapped task per
   chunk file; the model is loaded once, images are decoded in a thread pool one batch ahead of
   the model (:mod:`~wbc_tasks.serving.infer`), and the chunk's predictions, rejections and
   ``files_seen`` rows are committed in one transaction, then its files archived when
   ``settings.archive_dir`` is set (:mod:`~wbc_tasks.serving.archive`).
4. :func:`summarise` (:func:`wbc_tasks.serving.summary.summarise_run`): the night's totals, logged
   and logged to MLflow.
5. :func:`request_adaptation` (:mod:`wbc_tasks.serving.adaptation_requests`): whether enough
   reviews wait to be learned; the DAG's task updates the ``wbc_reviews_to_learn`` asset when so.

Each task function takes the settings, the run id and the run's params (the trigger form's
values, :func:`wbc_tasks.pipelines.params.classification_param_specs`), then what its upstream
tasks returned, and imports its module when called (a task loads only what it runs). Nothing in
the classify folder is modified, unless ``settings.archive_dir`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from wbc_tasks.core.settings import Settings


def resolve_model(settings: Settings, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """The run's model: the ``model`` param (alias or version) as one fixed version."""
    from wbc_tasks.serving.model import resolve_run_model

    return resolve_run_model(settings, params["model"])


def find_new_images(settings: Settings, run_id: str, params: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Sort the classify folder (or the ``drop`` param's sub-folder) and write the chunk files."""
    from wbc_tasks.serving.plan import find_new_images as find

    return find(
        settings,
        run_id=run_id,
        model=model,
        drop=params["drop"] or None,
        reclassify=params["reclassify"],
        chunk_size=params["chunk_size"],
        # A run triggered with the form of an earlier version has no full_scan param.
        full_scan=params.get("full_scan", False),
    )


def chunk_files(found: dict[str, Any]) -> list[str]:
    """The chunk files :func:`find_new_images` wrote (one classify task each)."""
    chunks: list[str] = found["chunks"]
    return chunks


def classify_chunk(
    settings: Settings, run_id: str, params: dict[str, Any], chunk: str, model: dict[str, Any]
) -> dict[str, Any]:
    """Classify one chunk file with the run's model and commit its rows."""
    from wbc_tasks.serving.commit import classify_chunk as classify

    return classify(settings, chunk, model, run_id=run_id, threshold=params["threshold"])


def summarise(
    settings: Settings,
    run_id: str,
    params: dict[str, Any],
    model: dict[str, Any],
    found: dict[str, Any],
    chunks: Sequence[dict[str, Any]] | None,
) -> dict[str, Any]:
    """The night's totals, drift per drop and its MLflow record (the run's params with it)."""
    from wbc_tasks.serving.summary import summarise_run

    return summarise_run(
        settings, run_id=run_id, model=model, found=found, chunk_summaries=list(chunks or []), params=params
    )


def request_adaptation(settings: Settings, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Whether enough reviews wait to be learned: ask for one adaptation run when the reviews since
    the last one reach ``WBC_ADAPT_AFTER_REVIEWS`` (:mod:`wbc_tasks.serving.adaptation_requests`).
    The DAG's task turns a request into an asset event and skips otherwise."""
    from wbc_tasks.serving.adaptation_requests import request_adaptation as ask

    return ask(settings, run_id).as_dict()


#: The DAG's tasks in its order, by task id: the function each calls.
TASKS: dict[str, Callable[..., Any]] = {
    "resolve_model": resolve_model,
    "find_new_images": find_new_images,
    "chunk_files": chunk_files,
    "classify_chunk": classify_chunk,
    "summarise": summarise,
    "request_adaptation": request_adaptation,
}


def night_params(
    settings: Settings,
    *,
    model: str | None = None,
    drop: str | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
    reclassify: bool = False,
    full_scan: bool = False,
) -> dict[str, Any]:
    """The params a triggered run would have: these values, the trigger form's defaults
    (:func:`wbc_tasks.pipelines.params.classification_param_specs`) for the others."""
    return {
        "drop": drop or "",
        "model": model or settings.champion_alias,
        "threshold": settings.review_threshold if threshold is None else threshold,
        "chunk_size": settings.classify_chunk_size if chunk_size is None else chunk_size,
        "reclassify": reclassify,
        "full_scan": full_scan,
    }


def classify_new_images(
    settings: Settings,
    *,
    model: str | None = None,
    drop: str | None = None,
    threshold: float | None = None,
    chunk_size: int | None = None,
    reclassify: bool = False,
    run_id: str | None = None,
    full_scan: bool = False,
) -> dict[str, Any]:
    """One nightly run in this process: the DAG's task functions in its order, chunk after
    chunk; returns the summary. Without Airflow nothing would start an adaptation run, so the
    last task (:func:`request_adaptation`) is not called: no request is recorded."""
    from wbc_tasks.serving.plan import new_run_id

    run_id = run_id or new_run_id()
    params = night_params(
        settings,
        model=model,
        drop=drop,
        threshold=threshold,
        chunk_size=chunk_size,
        reclassify=reclassify,
        full_scan=full_scan,
    )
    ref = resolve_model(settings, run_id, params)
    found = find_new_images(settings, run_id, params, ref)
    chunks = [classify_chunk(settings, run_id, params, chunk, ref) for chunk in chunk_files(found)]
    return summarise(settings, run_id, params, ref, found, chunks)
