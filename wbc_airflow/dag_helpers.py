"""What the DAG files share, so that each holds only its own wiring.

- Parse time: :func:`schedule`, :func:`start_date` and :func:`form` read only the settings
  parsing needs, each on its own (:func:`wbc_tasks.pipelines.parse_time.read_setting`). A
  malformed ``WBC_*`` variable that parsing does not read leaves every DAG loadable (the run that
  needs it fails, naming it); one that parsing reads is an import error naming it. One timezone
  rule for all of them: ``WBC_TIMEZONE``.
- Retries: :data:`FAIL_AT_ONCE_ON_PERMANENT_ERRORS` and :func:`default_args`.
- In a task: :func:`run_id_and_params`; the training DAG's failure callback
  :func:`close_mlflow_run`.

Light to import (Airflow's SDK, pendulum, the settings and the alerts, no TensorFlow or MLflow):
the scheduler parses the DAG files often.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pendulum
from airflow.sdk import (
    Asset,
    CronTriggerTimetable,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    get_current_context,
)
from airflow.sdk.exceptions import AirflowSkipException, AirflowTimetableInvalid
from pendulum.tz.exceptions import InvalidTimezone

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import SettingsError, env_variable
from wbc_tasks.ops.alerts import alert_task_failure  # stdlib only: cheap to parse
from wbc_tasks.pipelines.params import ParamSpecs
from wbc_tasks.pipelines.parse_time import read_setting

#: Errors retrying cannot fix (bad input, param or configuration) fail a task at once; transient
#: ones (MLflow or the database unreachable, a lost worker) keep their retries.
FAIL_AT_ONCE_ON_PERMANENT_ERRORS = ExceptionRetryPolicy(
    rules=[RetryRule(exception=PermanentError, action=RetryAction.FAIL, reason="retrying cannot fix this")]
)

#: Updated by the nightly DAG's ``request_adaptation`` task when enough reviews wait to be learned;
#: ``wbc_adaptation`` runs on it (Airflow's Assets view shows each event, with the count).
REVIEWS_TO_LEARN = Asset(name="wbc_reviews_to_learn", uri="wbc://reviews/to-learn", group="wbc")

#: The first date of every DAG (none catches up), in ``WBC_TIMEZONE``.
START = (2026, 1, 1)


def timezone() -> str:
    """``WBC_TIMEZONE``, checked: the zone schedules and start dates are read in."""
    name: str = read_setting("timezone")
    try:
        pendulum.timezone(name)
    except InvalidTimezone:
        raise SettingsError(f"setting {env_variable('timezone')}={name!r}: not a known timezone") from None
    return name


def start_date() -> pendulum.DateTime:
    """Every DAG's start date: :data:`START` in ``WBC_TIMEZONE``."""
    return pendulum.datetime(*START, tz=timezone())


def schedule(name: str) -> str:
    """The cron schedule held by setting ``name`` (``classify_schedule``, ...), checked as Airflow
    checks it."""
    cron: str = read_setting(name)
    try:
        CronTriggerTimetable(cron, timezone=timezone()).validate()
    except AirflowTimetableInvalid as exc:
        raise SettingsError(f"setting {env_variable(name)}={cron!r}: not a cron schedule ({exc})") from None
    return cron


def form(specs: ParamSpecs) -> dict[str, Param]:
    """A trigger form: one ``Param`` per spec of :mod:`wbc_tasks.pipelines.params`."""
    return {name: Param(**spec) for name, spec in specs.items()}


def default_args(**extra: Any) -> dict[str, Any]:
    """Every task's defaults: the retry policy and the task-failure alert, then ``extra``."""
    return {"retry_policy": FAIL_AT_ONCE_ON_PERMANENT_ERRORS, "on_failure_callback": alert_task_failure, **extra}


def run_id_and_params() -> tuple[str, dict[str, Any]]:
    """The running task's DAG run id and its params (the trigger form's values)."""
    context = get_current_context()
    return context["run_id"], dict(context["params"])


def asset_event_if_requested(answer: dict[str, Any]) -> dict[str, Any]:
    """The nightly ``request_adaptation`` task's ending: with a request, ``answer`` is returned (the
    task succeeds and updates :data:`REVIEWS_TO_LEARN`, the event carrying the review count);
    without one, the task is skipped with the reason (a skipped task emits no asset event)."""
    if not answer["requested"]:
        raise AirflowSkipException(answer["reason"])
    backlog = answer["backlog"]
    get_current_context()["outlet_events"][REVIEWS_TO_LEARN].extra = {
        "reviews": backlog["reviews"],
        "through_review_id": backlog["through_review_id"],
    }
    return answer


def close_mlflow_run(context: Mapping[str, Any]) -> None:
    """The training DAG's failure callback: close the DAG run's MLflow run as FAILED, so the UI
    shows it did not finish.

    As a task's callback it runs on the worker, where no time limit cuts it short while MLflow is
    slow to answer; as the DAG's it runs in the dag-processor (killed after 50 s), the backstop for
    a task killed outright. List it after the alert: it may wait on an unreachable tracking server.
    """
    from wbc_tasks.pipelines.training import mark_run_failed

    mark_run_failed(context["run_id"])
