"""Nightly classification of the images lab staff drop into the classify folder.

resolve the model (alias → one fixed version) → find new images → classify (one mapped task per
chunk file) → summarise

Every task is one call of one ``wbc_tasks.serving`` function. The model is resolved once, at
the start, so every chunk uses the same version even if a promotion happens mid-run. Tasks pass
only small dicts and chunk-file paths; the images stay on disk. Results land in the predictions
database (``WBC_PREDICTIONS_DB_URL``); fetch them with ``wbc predictions``. Runs nightly
(``WBC_CLASSIFY_SCHEDULE``, in ``WBC_TIMEZONE``) and by hand with the params below.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import ExceptionRetryPolicy, Param, RetryAction, RetryRule, dag, get_current_context, task

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import get_settings
from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import classification_param_specs

# Errors retrying cannot fix (bad input, param or configuration) fail a task at once; transient
# ones (MLflow or the database unreachable, a lost worker) keep their retries.
FAIL_AT_ONCE_ON_PERMANENT_ERRORS = ExceptionRetryPolicy(
    rules=[RetryRule(exception=PermanentError, action=RetryAction.FAIL, reason="retrying cannot fix this")]
)

SETTINGS = get_settings()

PARAMS = {name: Param(**spec) for name, spec in classification_param_specs(SETTINGS).items()}


def _run_id_and_params() -> tuple[str, dict]:
    context = get_current_context()
    return context["run_id"], dict(context["params"])


@dag(
    dag_id="wbc_batch_classification",
    schedule=SETTINGS.classify_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz=SETTINGS.timezone),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["wbc", "classification"],
    doc_md=__doc__,
    default_args={"retry_policy": FAIL_AT_ONCE_ON_PERMANENT_ERRORS, "on_failure_callback": alert_task_failure},
    on_failure_callback=alert_dag_failure,
)
def wbc_batch_classification() -> None:
    @task
    def resolve_model() -> dict:
        from wbc_tasks.serving.model import resolve_run_model

        _, params = _run_id_and_params()
        return resolve_run_model(get_settings(), params["model"])

    @task
    def find_new_images(model: dict) -> dict:
        from wbc_tasks.serving.plan import find_new_images as find

        run_id, params = _run_id_and_params()
        return find(
            get_settings(),
            run_id=run_id,
            model=model,
            drop=params["drop"] or None,
            reclassify=params["reclassify"],
            chunk_size=params["chunk_size"],
        )

    # Airflow maps only over a whole XCom value, not one key of a dict.
    @task
    def chunk_files(found: dict) -> list[str]:
        return found["chunks"]

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def classify_chunk(chunk: str, model: dict) -> dict:
        from wbc_tasks.serving.commit import classify_chunk as classify

        run_id, params = _run_id_and_params()
        return classify(get_settings(), chunk, model, run_id=run_id, threshold=params["threshold"])

    # none_failed: a night with nothing new maps zero chunks (skipped) and still gets a summary.
    @task(trigger_rule="none_failed")
    def summarise(model: dict, found: dict, chunks: list[dict] | None) -> dict:
        from wbc_tasks.serving.summary import summarise_run

        run_id, params = _run_id_and_params()
        return summarise_run(
            get_settings(),
            run_id=run_id,
            model=model,
            found=found,
            chunk_summaries=list(chunks or []),
            params=params,
        )

    model = resolve_model()
    found = find_new_images(model)
    chunks = classify_chunk.partial(model=model).expand(chunk=chunk_files(found))
    summarise(model, found, chunks)


wbc_batch_classification()
