"""Nightly classification of the images lab staff drop into the classify folder.

resolve the model (alias → one fixed version) → find new images → classify (one mapped task per
chunk file) → summarise → request adaptation (updates the ``wbc_reviews_to_learn`` asset, which
starts ``wbc_adaptation``, when ``WBC_ADAPT_AFTER_REVIEWS`` reviews wait to be learned; skipped
otherwise)

Every task is one call of the ``wbc_tasks.serving.nightly`` function of its name (which
``classify_new_images`` composes in the same order, without Airflow). The model is resolved once,
at the start, so every chunk uses the same version even if a promotion happens mid-run. Tasks
pass only small dicts and chunk-file paths; the images stay on disk. Results land in the
predictions database (``WBC_PREDICTIONS_DB_URL``); fetch them with ``wbc predictions``. Runs
nightly (``WBC_CLASSIFY_SCHEDULE``, in ``WBC_TIMEZONE``) and by hand with the params below.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from wbc_airflow.dag_helpers import (
    REVIEWS_TO_LEARN,
    asset_event_if_requested,
    default_args,
    form,
    run_id_and_params,
    schedule,
    start_date,
)
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.ops.alerts import alert_dag_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import classification_param_specs


@dag(
    dag_id=DagId.NIGHTLY.value,
    schedule=schedule("classify_schedule"),
    start_date=start_date(),
    catchup=False,
    max_active_runs=1,
    params=form(classification_param_specs()),
    tags=["wbc", "classification"],
    doc_md=__doc__,
    default_args=default_args(),
    on_failure_callback=alert_dag_failure,
)
def wbc_batch_classification() -> None:
    # Each task imports its module when it runs: SQLAlchemy, MLflow and Keras stay out of parsing.
    @task
    def resolve_model() -> dict:
        from wbc_tasks.serving import nightly

        return nightly.resolve_model(get_settings(), *run_id_and_params())

    @task
    def find_new_images(model: dict) -> dict:
        from wbc_tasks.serving import nightly

        return nightly.find_new_images(get_settings(), *run_id_and_params(), model)

    @task
    def chunk_files(found: dict) -> list[str]:
        from wbc_tasks.serving import nightly

        return nightly.chunk_files(found)

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def classify_chunk(chunk: str, model: dict) -> dict:
        from wbc_tasks.serving import nightly

        return nightly.classify_chunk(get_settings(), *run_id_and_params(), chunk, model)

    # none_failed: a night with nothing new maps zero chunks (skipped) and still gets a summary.
    @task(trigger_rule="none_failed")
    def summarise(model: dict, found: dict, chunks: list[dict] | None) -> dict:
        from wbc_tasks.serving import nightly

        return nightly.summarise(get_settings(), *run_id_and_params(), model, found, chunks)

    # none_failed (the default rule would skip it after a night with nothing new): a failed night
    # asks nothing and stays failed (the last task decides the run's state); the next one asks.
    @task(outlets=[REVIEWS_TO_LEARN], trigger_rule="none_failed")
    def request_adaptation() -> dict:
        from wbc_tasks.serving import nightly

        return asset_event_if_requested(nightly.request_adaptation(get_settings(), *run_id_and_params()))

    model = resolve_model()
    found = find_new_images(model)
    chunks = classify_chunk.partial(model=model).expand(chunk=chunk_files(found))
    summarise(model, found, chunks) >> request_adaptation()


wbc_batch_classification()
