"""The MLflow client: where it points, how its calls are retried, the experiment runs go to.

:func:`configure_mlflow` points MLflow (its fluent API and an ``MlflowClient``) at the
configured tracking and registry URI and hands MLflow's own HTTP retry settings to it;
:func:`call_with_retries` retries a call that failed for a passing reason (server unreachable
or busy) and ends with :class:`MlflowUnavailableError` naming the server; :func:`ensure_experiment`
finds or creates the training experiment. Every other ``registry`` module reaches MLflow through
here.

The tracking and registry URI are passed to MLflow explicitly (``MlflowClient(tracking_uri=...,
registry_uri=...)``, and ``mlflow.set_tracking_uri`` for the fluent API). MLflow's HTTP retries,
backoff and timeout cannot be: MLflow 3.17 reads them only from ``MLFLOW_HTTP_REQUEST_*`` at every
request (``mlflow.utils.rest_utils.http_request`` takes them when its caller passes none, and its
REST stores and HTTP artifact repository never pass them), so :func:`export_http_settings` writes
those three variables, only when they differ: the one place this package writes ``os.environ``.
Credentials stay MLflow's own (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN`` or
``~/.mlflow/credentials``), never written here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from wbc_tasks.core.retry import call_with_backoff
from wbc_tasks.core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: MLflow's own HTTP client settings (read by MLflow at every request) and where ours come from.
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "mlflow_http_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "mlflow_http_backoff",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "mlflow_http_timeout",
}
#: MLflow error codes that mean "try again soon" (a locked SQLite file, a throttling server).
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


class MlflowUnavailableError(ConnectionError):
    """MLflow stayed unreachable (or busy) through every retry of a call."""


def export_http_settings(settings: Settings) -> None:
    """Hand the settings' HTTP retries, backoff and timeout to MLflow's HTTP client.

    MLflow reads them from ``os.environ`` at every request, so that is where they must be; a
    variable is written only when it differs, so repeated set-up changes nothing (and tests that
    restore the environment get it written again).
    """
    for variable, name in MLFLOW_HTTP_ENV.items():
        value = str(getattr(settings, name))
        if os.environ.get(variable) != value:
            os.environ[variable] = value


def configure_mlflow(settings: Settings) -> Any:
    """Point MLflow at the configured tracking/registry URI; return an ``MlflowClient``.

    Also sets MLflow's HTTP client retries, backoff and timeout (``MLFLOW_HTTP_REQUEST_*``) from
    the settings: MLflow's defaults (7 retries, factor 2, 120 s) keep one call of an unreachable
    server hanging for about four minutes, before :func:`call_with_retries` even starts.
    """
    import mlflow
    from mlflow import MlflowClient

    export_http_settings(settings)
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_transient_error(exc: BaseException) -> bool:
    """Whether an MLflow call failed for a reason that may pass (server unreachable or busy)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowUnavailableError):
        return False  # its retries are spent already; retrying around it would multiply them
    if isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in TRANSIENT_ERROR_CODES:
            return True
        # MLflow's REST client reports a server it could not reach (after its own retries) as a
        # bare INTERNAL_ERROR whose message starts like this; genuine server errors do not.
        return exc.error_code == "INTERNAL_ERROR" and str(exc.message).startswith("API request to")
    return False


def call_with_retries(settings: Settings, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with exponential backoff while it fails transiently.

    ``settings.mlflow_retries`` retries, the first after ``settings.mlflow_retry_wait`` seconds,
    each wait doubled (tenacity), on top of MLflow's own HTTP retries of each request
    (``settings.mlflow_http_*``). Only calls that are safe to repeat go through here. When every
    try failed transiently, raises :class:`MlflowUnavailableError` naming the server and the call.
    """
    name = getattr(fn, "__name__", fn)

    def give_up(exc: BaseException, seconds: float) -> Exception:
        return MlflowUnavailableError(
            f"MLflow at {settings.mlflow_tracking_uri} is unreachable or busy: {name} failed "
            f"{settings.mlflow_retries + 1} times over {seconds:.0f} s (WBC_MLFLOW_RETRIES="
            f"{settings.mlflow_retries}, each try with up to {settings.mlflow_http_retries} HTTP retries, "
            f"WBC_MLFLOW_HTTP_RETRIES). Check that the tracking server is up; the task can be retried "
            f"safely. Last error: {exc}"
        )

    return call_with_backoff(
        lambda: fn(*args, **kwargs),
        retries=settings.mlflow_retries,
        first_wait=settings.mlflow_retry_wait,
        is_transient=is_transient_error,
        what=f"MLflow call {name}",
        give_up=give_up,
        log=log,
    )


def all_pages(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search (``search_runs``, ``search_model_versions``, ...)."""
    token = None
    while True:
        page = fn(*args, page_token=token, **kwargs)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def ensure_experiment(settings: Settings) -> str:
    """The experiment id, creating it (with the configured artifact root) if needed."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment '{settings.mlflow_experiment}' at {settings.mlflow_tracking_uri} "
                f"is deleted; restore it (`mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}`) or set WBC_MLFLOW_EXPERIMENT to another name"
            )
        return str(experiment.experiment_id)
    location = None
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.mlflow_artifact_root.as_uri()
    try:
        return str(client.create_experiment(settings.mlflow_experiment, artifact_location=location))
    except MlflowException as exc:
        # Two tasks starting together: the other one created it first.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(client.get_experiment_by_name(settings.mlflow_experiment).experiment_id)
