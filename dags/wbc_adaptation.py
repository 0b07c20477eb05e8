"""Learn a new lab's reviewed cells: a training run from the champion with the reviews included
(the ``adapt`` profile), promoted only when it is better on the lab's own reviewed test images and
not worse on the labelled ones.

The same tasks as ``wbc_training`` (split → … → promote). Started by the ``wbc_reviews_to_learn``
asset, which the nightly DAG's ``request_adaptation`` task updates when ``WBC_ADAPT_AFTER_REVIEWS``
reviews were recorded since the last adaptation (off when 0, the embedded default; 50 in the
stack), or by hand from the form. One run at a time; a request is made once per set of reviews,
so a refused candidate is not retried every night (``wbc_tasks.serving.adaptation_requests``).
"""

from __future__ import annotations

from airflow.sdk import dag

from wbc_airflow.dag_helpers import REVIEWS_TO_LEARN, close_mlflow_run, form, start_date
from wbc_airflow.training_chain import training_chain, training_default_args
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.ops.alerts import alert_dag_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import adaptation_param_specs


@dag(
    dag_id=DagId.ADAPTATION.value,
    schedule=[REVIEWS_TO_LEARN],
    start_date=start_date(),
    catchup=False,
    max_active_runs=1,
    params=form(adaptation_param_specs()),
    default_args=training_default_args(),
    tags=["wbc", "training", "reviews"],
    doc_md=__doc__,
    on_failure_callback=[alert_dag_failure, close_mlflow_run],
)
def wbc_adaptation() -> None:
    training_chain()


wbc_adaptation()
