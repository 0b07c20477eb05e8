"""Train, evaluate and (maybe) promote the white-blood-cell classifier.

split → preprocess → augment → balance (SMOTE) → train (queue ``gpu``) → calibrate (queue ``gpu``: temperature,
review threshold, blast flag, unfamiliar score, drift limits) → evaluate → register → promote

Each task is one call of one ``wbc_tasks.pipelines.training`` function. Tasks pass only small dicts; the data
moves through the run's work folder (``$WBC_WORK_DIR/runs/<run id>/<step>/``). Trigger it from
the Airflow UI: the form shows every param with its description.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import ExceptionRetryPolicy, Param, RetryAction, RetryRule, chain, dag, get_current_context, task

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import training_param_specs

# Errors retrying cannot fix (bad input, param or configuration) fail a task at once; transient
# ones (MLflow or the database unreachable, a lost worker) keep their retries.
FAIL_AT_ONCE_ON_PERMANENT_ERRORS = ExceptionRetryPolicy(
    rules=[RetryRule(exception=PermanentError, action=RetryAction.FAIL, reason="retrying cannot fix this")]
)


def _close_mlflow_run(context) -> None:
    """A task failed for good: close the run's MLflow run as FAILED from the worker, where no
    time limit cuts it short while MLflow is slow to answer (the DAG-level callback below runs in
    the dag-processor, killed after 50 s; it stays as the backstop for a task killed outright)."""
    from wbc_tasks.pipelines import training as steps

    steps.mark_run_failed(context["run_id"])


DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "retry_policy": FAIL_AT_ONCE_ON_PERMANENT_ERRORS,
    # Alert first: closing the MLflow run may wait on an unreachable tracking server.
    "on_failure_callback": [alert_task_failure, _close_mlflow_run],
}


PARAMS = {name: Param(**spec) for name, spec in training_param_specs().items()}


def _run_id_and_params() -> tuple[str, dict]:
    context = get_current_context()
    return context["run_id"], dict(context["params"])


def _on_failure(context) -> None:
    """Close the run's MLflow run as FAILED so the UI shows it did not finish."""
    from wbc_tasks.pipelines import training as steps

    steps.mark_run_failed(context["run_id"])


@dag(
    dag_id="wbc_training",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=PARAMS,
    default_args=DEFAULT_ARGS,
    tags=["wbc", "training"],
    doc_md=__doc__,
    # Alert first: marking the MLflow run FAILED may wait on an unreachable tracking server.
    on_failure_callback=[alert_dag_failure, _on_failure],
)
def wbc_training() -> None:
    # Each task imports its step when it runs: TensorFlow and MLflow stay out of DAG parsing.
    @task
    def split() -> dict:
        from wbc_tasks.pipelines.training import split_step

        return split_step(*_run_id_and_params())

    @task
    def preprocess() -> dict:
        from wbc_tasks.pipelines.training import preprocess_step

        return preprocess_step(*_run_id_and_params())

    @task
    def augment() -> dict:
        from wbc_tasks.pipelines.training import augment_step

        return augment_step(*_run_id_and_params())

    @task
    def balance() -> dict:
        from wbc_tasks.pipelines.training import balance_step

        return balance_step(*_run_id_and_params())

    @task(queue="gpu", retry_delay=timedelta(seconds=10))
    def train_model() -> dict:
        from wbc_tasks.pipelines.training import train_step

        return train_step(*_run_id_and_params())

    @task(queue="gpu")
    def calibrate() -> dict:
        from wbc_tasks.pipelines.training import calibrate_step

        return calibrate_step(*_run_id_and_params())

    @task
    def evaluate() -> dict:
        from wbc_tasks.pipelines.training import evaluate_step

        return evaluate_step(*_run_id_and_params())

    @task
    def register() -> dict:
        from wbc_tasks.pipelines.training import register_step

        return register_step(*_run_id_and_params())

    @task
    def promote() -> dict:
        from wbc_tasks.pipelines.training import promote_step

        return promote_step(*_run_id_and_params())

    chain(split(), preprocess(), augment(), balance(), train_model(), calibrate(), evaluate(), register(), promote())


wbc_training()
