"""Train, evaluate and (maybe) promote the white-blood-cell classifier.

split → preprocess → augment → balance (SMOTE) → train (queue ``gpu``) → calibrate (queue ``gpu``: temperature,
review threshold, blast flag, unfamiliar score, drift limits) → evaluate → export the CPU engine (checked against
Keras) → register → promote

Each task is one call of one ``wbc_tasks.pipelines.training`` function. Tasks pass only small dicts; the data
moves through the run's work folder (``$WBC_WORK_DIR/runs/<run id>/<step>/``). Trigger it from
the Airflow UI: the form shows every param with its description.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import chain, dag, task

from wbc_airflow.dag_helpers import close_mlflow_run, default_args, form, run_id_and_params, start_date
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import training_param_specs


@dag(
    dag_id=DagId.TRAINING.value,
    schedule=None,
    start_date=start_date(),
    catchup=False,
    params=form(training_param_specs()),
    default_args=default_args(
        retries=2,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        # Alert first: closing the MLflow run may wait on an unreachable tracking server.
        on_failure_callback=[alert_task_failure, close_mlflow_run],
    ),
    tags=["wbc", "training"],
    doc_md=__doc__,
    # The backstop for a task killed without its callback; alert first, as above.
    on_failure_callback=[alert_dag_failure, close_mlflow_run],
)
def wbc_training() -> None:
    # Each task imports its step when it runs: TensorFlow and MLflow stay out of DAG parsing.
    @task
    def split() -> dict:
        from wbc_tasks.pipelines.training import split_step

        return split_step(*run_id_and_params())

    @task
    def preprocess() -> dict:
        from wbc_tasks.pipelines.training import preprocess_step

        return preprocess_step(*run_id_and_params())

    @task
    def augment() -> dict:
        from wbc_tasks.pipelines.training import augment_step

        return augment_step(*run_id_and_params())

    @task
    def balance() -> dict:
        from wbc_tasks.pipelines.training import balance_step

        return balance_step(*run_id_and_params())

    @task(queue="gpu", retry_delay=timedelta(seconds=10))
    def train_model() -> dict:
        from wbc_tasks.pipelines.training import train_step

        return train_step(*run_id_and_params())

    @task(queue="gpu")
    def calibrate() -> dict:
        from wbc_tasks.pipelines.training import calibrate_step

        return calibrate_step(*run_id_and_params())

    @task
    def evaluate() -> dict:
        from wbc_tasks.pipelines.training import evaluate_step

        return evaluate_step(*run_id_and_params())

    @task
    def export_engine() -> dict:
        from wbc_tasks.pipelines.training import export_step

        return export_step(*run_id_and_params())

    @task
    def register() -> dict:
        from wbc_tasks.pipelines.training import register_step

        return register_step(*run_id_and_params())

    @task
    def promote() -> dict:
        from wbc_tasks.pipelines.training import promote_step

        return promote_step(*run_id_and_params())

    chain(
        split(),
        preprocess(),
        augment(),
        balance(),
        train_model(),
        calibrate(),
        evaluate(),
        export_engine(),
        register(),
        promote(),
    )


wbc_training()
