"""Train, evaluate and (maybe) promote the white-blood-cell classifier.

split → preprocess → augment → balance (SMOTE) → train (queue ``gpu``) → calibrate (queue ``gpu``: temperature,
review threshold, blast flag, unfamiliar score, drift limits) → evaluate → export the CPU engine (checked against
Keras) → register → promote

Each task is one call of one ``wbc_tasks.pipelines.training`` function (wired in
``wbc_airflow.training_chain``, shared with ``wbc_adaptation``). Tasks pass only small dicts; the data
moves through the run's work folder (``$WBC_WORK_DIR/runs/<run id>/<step>/``). Trigger it from
the Airflow UI: the form shows every param with its description.
"""

from __future__ import annotations

from airflow.sdk import dag

from wbc_airflow.dag_helpers import close_mlflow_run, form, start_date
from wbc_airflow.training_chain import training_chain, training_default_args
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.ops.alerts import alert_dag_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import training_param_specs


@dag(
    dag_id=DagId.TRAINING.value,
    schedule=None,
    start_date=start_date(),
    catchup=False,
    params=form(training_param_specs()),
    default_args=training_default_args(),
    tags=["wbc", "training"],
    doc_md=__doc__,
    # The backstop for a task killed without its callback; alert first, as above.
    on_failure_callback=[alert_dag_failure, close_mlflow_run],
)
def wbc_training() -> None:
    training_chain()


wbc_training()
