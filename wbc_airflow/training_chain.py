"""The training run's tasks, wired once for the two DAGs that train: ``wbc_training`` (by hand,
from its form) and ``wbc_adaptation`` (a new lab's reviews, started by the ``wbc_reviews_to_learn``
asset or by hand).

split → preprocess → augment → balance (SMOTE) → train (queue ``gpu``) → calibrate (queue ``gpu``)
→ evaluate → export the CPU engine → register → promote. Each task is one call of one
``wbc_tasks.pipelines.training`` function, imported when it runs (TensorFlow and MLflow stay out of
DAG parsing); tasks pass small dicts, the data moves through the run's work folder.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import chain, task

from wbc_airflow.dag_helpers import close_mlflow_run, default_args, run_id_and_params
from wbc_tasks.ops.alerts import alert_task_failure  # stdlib only: cheap to parse


def training_default_args() -> dict[str, Any]:
    """Retries with backoff; a failed task alerts, then closes the run's MLflow run as FAILED
    (alert first: closing may wait on an unreachable tracking server)."""
    return default_args(
        retries=2,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        on_failure_callback=[alert_task_failure, close_mlflow_run],
    )


def training_chain() -> None:
    """The ten training tasks, chained in order, in the DAG being defined."""

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
