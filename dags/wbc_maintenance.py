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

import pendulum
from airflow.sdk import ExceptionRetryPolicy, Param, RetryAction, RetryRule, dag, get_current_context, task

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import get_settings
from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import maintenance_param_specs

# Errors retrying cannot fix (bad input, param or configuration) fail a task at once; transient
# ones (MLflow or the database unreachable, a lost worker) keep their retries.
FAIL_AT_ONCE_ON_PERMANENT_ERRORS = ExceptionRetryPolicy(
    rules=[RetryRule(exception=PermanentError, action=RetryAction.FAIL, reason="retrying cannot fix this")]
)

SETTINGS = get_settings()

PARAMS = {name: Param(**spec) for name, spec in maintenance_param_specs(SETTINGS).items()}


@dag(
    dag_id="wbc_maintenance",
    schedule=SETTINGS.maintenance_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz=SETTINGS.timezone),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["wbc", "maintenance"],
    doc_md=__doc__,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(minutes=5),
        "retry_policy": FAIL_AT_ONCE_ON_PERMANENT_ERRORS,
        "on_failure_callback": alert_task_failure,
    },
    on_failure_callback=alert_dag_failure,
)
def wbc_maintenance() -> None:
    @task
    def cleanup_runs() -> dict:
        from wbc_tasks.ops.cleanup import cleanup_step

        params = get_current_context()["params"]
        return cleanup_step(get_settings(), dry_run=params["dry_run"], mlflow_artifacts=params["mlflow_artifacts"])

    cleanup_runs()


wbc_maintenance()
