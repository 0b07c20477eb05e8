"""Train, evaluate and (maybe) promote the white-blood-cell classifier.

split → preprocess → augment → balance (SMOTE) → train (queue ``gpu``) → evaluate → register → promote

Each task is one call of one ``wbc_tasks.pipelines.training`` function. Tasks pass only small dicts; the data
moves through the run's work folder (``$WBC_WORK_DIR/runs/<run id>/<step>/``). Trigger it from
the Airflow UI: the form shows every param with its description.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import ExceptionRetryPolicy, Param, RetryAction, RetryRule, chain, dag, get_current_context, task

from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.core.errors import PermanentError
from wbc_tasks.training.params import TRAINING_PARAM_SPECS

# Errors retrying cannot fix (bad input, param or configuration) fail a task at once; transient
# ones (MLflow or the database unreachable, a lost worker) keep their retries.
FAIL_AT_ONCE_ON_PERMANENT_ERRORS = ExceptionRetryPolicy(
    rules=[RetryRule(exception=PermanentError, action=RetryAction.FAIL, reason="retrying cannot fix this")]
)

DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "retry_policy": FAIL_AT_ONCE_ON_PERMANENT_ERRORS,
    "on_failure_callback": alert_task_failure,
}


def _form() -> dict[str, Param]:
    return {
        name: Param(spec["default"], **{k: v for k, v in spec.items() if k != "default"})
        for name, spec in TRAINING_PARAM_SPECS.items()
    }


def _run(step: str) -> dict:
    """Call ``wbc_tasks.pipelines.training.<step>`` for this DAG run (imported here: heavy modules stay out of parsing)."""
    from wbc_tasks.pipelines import training as steps

    context = get_current_context()
    return getattr(steps, step)(context["run_id"], dict(context["params"]))


def _on_failure(context) -> None:
    """Close the run's MLflow run as FAILED so the UI shows it did not finish."""
    from wbc_tasks.pipelines import training as steps

    steps.mark_run_failed(context["run_id"])


@dag(
    dag_id="wbc_training",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=_form(),
    default_args=DEFAULT_ARGS,
    tags=["wbc", "training"],
    doc_md=__doc__,
    # Alert first: marking the MLflow run FAILED may wait on an unreachable tracking server.
    on_failure_callback=[alert_dag_failure, _on_failure],
)
def wbc_training() -> None:
    @task
    def split() -> dict:
        return _run("split_step")

    @task
    def preprocess() -> dict:
        return _run("preprocess_step")

    @task
    def augment() -> dict:
        return _run("augment_step")

    @task
    def balance() -> dict:
        return _run("balance_step")

    @task(queue="gpu", retry_delay=timedelta(seconds=10))
    def train_model() -> dict:
        return _run("train_step")

    @task
    def evaluate() -> dict:
        return _run("evaluate_step")

    @task
    def register() -> dict:
        return _run("register_step")

    @task
    def promote() -> dict:
        return _run("promote_step")

    chain(split(), preprocess(), augment(), balance(), train_model(), evaluate(), register(), promote())


wbc_training()
