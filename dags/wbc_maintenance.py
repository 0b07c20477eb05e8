"""Daily housekeeping: delete old training work folders (and, when asked, MLflow artifacts).

cleanup_runs

One task, one call of ``wbc_tasks.ops.cleanup.cleanup_step``. A training run's work folder
(``$WBC_WORK_DIR/runs/<run id>/``, several hundred MB) is deleted once it is older than
``WBC_RETENTION_DAYS`` and not among the newest ``WBC_RETENTION_KEEP_RUNS``; the folders of model
versions holding an alias (champion, previous-champion) and of runs still RUNNING in MLflow are
never deleted. With the ``mlflow_artifacts`` param (default ``WBC_RETENTION_MLFLOW_ARTIFACTS``),
old runs that never registered a version also lose their MLflow artifacts. Runs daily
(``WBC_MAINTENANCE_SCHEDULE``, in ``WBC_TIMEZONE``); ``dry_run`` only reports. The same from a
shell: ``wbc cleanup [--dry-run]``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from wbc_airflow.dag_helpers import default_args, form, run_id_and_params, schedule, start_date
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.ops.alerts import alert_dag_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import maintenance_param_specs


@dag(
    dag_id=DagId.MAINTENANCE.value,
    schedule=schedule("maintenance_schedule"),
    start_date=start_date(),
    catchup=False,
    max_active_runs=1,
    params=form(maintenance_param_specs()),
    tags=["wbc", "maintenance"],
    doc_md=__doc__,
    default_args=default_args(retries=1, retry_delay=timedelta(minutes=5)),
    on_failure_callback=alert_dag_failure,
)
def wbc_maintenance() -> None:
    @task
    def cleanup_runs() -> dict:
        from wbc_tasks.ops.cleanup import cleanup_step

        _, params = run_id_and_params()
        return cleanup_step(get_settings(), dry_run=params["dry_run"], mlflow_artifacts=params["mlflow_artifacts"])

    cleanup_runs()


wbc_maintenance()
