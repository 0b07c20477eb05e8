"""The MLflow client (wbc_tasks.registry.client): retries of transient failures only, and
MLflow's HTTP settings handed over without rewriting the environment each time."""

from __future__ import annotations

import pytest


def test_retries_transient_failures_only(mlflow_settings):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )

    from wbc_tasks.registry.client import MlflowUnavailableError, call_with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert call_with_retries(mlflow_settings, flaky) == "ok" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="no such model"):
        call_with_retries(mlflow_settings, missing)
    assert len(calls) == 1, "a real error is not retried"

    calls.clear()

    def down():
        calls.append(1)
        raise MlflowException("API request to http://mlflow:5000/api failed with exception Max retries exceeded")

    with pytest.raises(
        MlflowUnavailableError,
        match=r"MLflow at .* is unreachable or busy: down failed 4 times",
    ) as failed:
        call_with_retries(mlflow_settings, down)
    assert len(calls) == mlflow_settings.mlflow_retries + 1
    assert isinstance(failed.value.__cause__, MlflowException) and "Max retries exceeded" in str(failed.value)


def test_http_settings_are_written_to_the_environment_only_when_they_change(settings, monkeypatch):
    import os

    from wbc_tasks.registry.client import MLFLOW_HTTP_ENV, export_http_settings

    written: list[str] = []

    class RecordingEnviron(dict):
        def __setitem__(self, key: str, value: str) -> None:
            written.append(key)
            super().__setitem__(key, value)

    environ = RecordingEnviron(os.environ)
    for variable in MLFLOW_HTTP_ENV:
        environ.pop(variable, None)
    monkeypatch.setattr(os, "environ", environ)

    export_http_settings(settings)
    assert {v: environ[v] for v in MLFLOW_HTTP_ENV} == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.mlflow_http_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(settings.mlflow_http_backoff),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(settings.mlflow_http_timeout),
    }
    assert sorted(written) == sorted(MLFLOW_HTTP_ENV)

    written.clear()
    export_http_settings(settings)
    assert written == [], "the same settings again rewrite nothing"

    export_http_settings(settings.with_overrides(mlflow_http_timeout=7))
    assert written == ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
