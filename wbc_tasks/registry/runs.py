"""One MLflow run per Airflow DAG run: created once, found again by any task, closed at the end.

A DAG run's tasks run in different processes (or hosts), so each finds the run again through
the tracking server by its ``airflow_run_id`` tag (:func:`open_tracking_run`, which creates it
under a file lock on the first call and logs the training params once), resumes it for its own
logging (:func:`tracking_run`) and leaves it RUNNING; the DAG's last task, or its failure path,
closes it (:func:`finish_tracking_run`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from wbc_tasks.core.locks import file_lock
from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.client import (
    call_with_retries,
    configure_mlflow,
    ensure_experiment,
)
from wbc_tasks.registry.tags import TAG_AIRFLOW_RUN_ID, param_text

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _tag_filter(key: str, value: str) -> str:
    """An MLflow search filter ``tags.key = 'value'``, quoted safely."""
    if "'" not in value:
        return f"tags.{key} = '{value}'"
    if '"' not in value:
        return f'tags.{key} = "{value}"'
    raise ValueError(f"cannot search MLflow for a tag value holding both quote kinds: {value!r}")


def find_tracking_run(settings: Settings, dag_run_id: str) -> str | None:
    """The MLflow run id of a DAG run, looked up on the tracking server; None if there is none."""
    client = configure_mlflow(settings)
    experiment_id = ensure_experiment(settings)
    runs = call_with_retries(
        settings,
        client.search_runs,
        [experiment_id],
        filter_string=_tag_filter(TAG_AIRFLOW_RUN_ID, dag_run_id),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    if not runs:
        return None
    runs = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    if len(runs) > 1:
        # A create retried after a lost reply; every task settles on the same (oldest) one.
        log.warning(
            "DAG run %s has %d MLflow runs (%s); using the oldest, %s",
            dag_run_id,
            len(runs),
            ", ".join(r.info.run_id for r in runs),
            runs[0].info.run_id,
        )
    return str(runs[0].info.run_id)


def _log_params_once(settings: Settings, client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks; a param already logged keeps its first value."""
    from mlflow.entities import Param

    logged = call_with_retries(settings, client.get_run, run_id).data.params
    missing = []
    for key, value in params.items():
        text = param_text(value)
        if key not in logged:
            missing.append(Param(key, text))
        elif logged[key] != text:
            log.warning(
                "param %s is already %r in MLflow run %s; not changed to %r",
                key,
                logged[key],
                run_id,
                text,
            )
    for start in range(0, len(missing), 100):  # log_batch takes at most 100 params
        call_with_retries(settings, client.log_batch, run_id, params=missing[start : start + 100])


def open_tracking_run(settings: Settings, dag_run_id: str, params: Mapping[str, Any] | None = None) -> str:
    """The MLflow run id of DAG run ``dag_run_id``, creating the run on the first call.

    The run is named after the DAG run and tagged ``airflow_run_id``; later calls, from any
    process or host, find it by that tag on the tracking server. ``params`` (every training
    param) are logged once; a param already logged is not changed.
    """
    client = configure_mlflow(settings)
    experiment_id = ensure_experiment(settings)
    # Finding or creating the run and logging its first params are one step among tasks sharing
    # the work folder: two first tasks of one DAG run must not create two MLflow runs, nor both
    # insert the same param (the tracking store's unique key on (run, param) fails the second).
    lock_path = settings.work_dir / "locks" / f"tracking-{safe_name(dag_run_id)}.lock"
    with file_lock(lock_path, timeout=settings.lock_timeout, holder=f"another task of DAG run {dag_run_id}"):
        run_id = find_tracking_run(settings, dag_run_id)
        if run_id is None:
            run = call_with_retries(
                settings,
                client.create_run,
                experiment_id,
                run_name=dag_run_id,
                tags={TAG_AIRFLOW_RUN_ID: dag_run_id},
            )
            run_id = find_tracking_run(settings, dag_run_id) or run.info.run_id
            log.info("created MLflow run %s for DAG run %s", run_id, dag_run_id)
        if params:
            _log_params_once(settings, client, run_id, params)
    return run_id


@contextmanager
def tracking_run(settings: Settings, dag_run_id: str) -> Iterator[str]:
    """Resume the DAG run's MLflow run as the active run; yield its id.

    On leaving, the run is detached but stays RUNNING (the DAG's other tasks still log to it):
    :func:`finish_tracking_run` sets its final status. Nested use for the same DAG run is a no-op.
    """
    import mlflow

    run_id = open_tracking_run(settings, dag_run_id)
    active = mlflow.active_run()
    if active is not None:
        if active.info.run_id == run_id:
            yield run_id
            return
        raise RuntimeError(
            f"MLflow run {active.info.run_id} is already active in this thread; end it before "
            f"resuming the run {run_id} of DAG run {dag_run_id}"
        )
    call_with_retries(settings, mlflow.start_run, run_id=run_id)
    try:
        yield run_id
    finally:
        try:
            # end_run pops the active run first, then records the status: RUNNING keeps it open.
            mlflow.end_run(status="RUNNING")
        except Exception as exc:
            log.warning("could not detach from MLflow run %s: %s", run_id, exc)


def finish_tracking_run(settings: Settings, dag_run_id: str, status: str = "FINISHED") -> str | None:
    """Mark the DAG run's MLflow run FINISHED, FAILED or KILLED; None if it never had one."""
    import mlflow

    status = status.upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    run_id = find_tracking_run(settings, dag_run_id)
    if run_id is None:
        log.warning("DAG run %s has no MLflow run to mark %s", dag_run_id, status)
        return None
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)
    else:
        call_with_retries(settings, configure_mlflow(settings).set_terminated, run_id, status)
    log.info("MLflow run %s of DAG run %s marked %s", run_id, dag_run_id, status)
    return run_id
