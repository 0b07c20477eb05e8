"""Registered model versions as the rest of the pipeline sees them: found, waited for, loaded.

A :class:`ModelRef` is one fixed version and what inference needs to know about it; image size
and class names travel with the version (tags ``image_size`` and ``class_names``, and the
logged model's metadata), never in a second place. :func:`resolve_model` turns an alias (default:
the champion) or a version number into a ``ModelRef``; :func:`load_keras_model` loads one, only
from the configured registry; :func:`current_aliases`, :func:`version_metrics` and
:func:`wait_until_ready` read a version's aliases, test metrics and registration status, and
:func:`recent_versions` the newest versions with their tags. Nothing here writes to the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.client import (
    call_with_retries,
    configure_mlflow,
    is_transient_error,
)
from wbc_tasks.registry.tags import TAG_CLASS_NAMES, TAG_IMAGE_SIZE, metrics_from_tags

#: Initial and longest wait (seconds) between two looks at a version still registering.
READY_FIRST_WAIT = 0.5
READY_LONGEST_WAIT = 10.0


class NoModelError(LookupError):
    """The registry has no model for the reference asked for."""


@dataclass(frozen=True)
class ModelRef:
    """One registered model version and what inference needs to know about it."""

    name: str
    version: str
    run_id: str
    uri: str
    image_size: int
    class_names: tuple[str, ...]


def model_ref_from_version(settings: Settings, version: Any) -> ModelRef:
    """A :class:`ModelRef` from an ``mlflow`` ``ModelVersion``."""
    tags = version.tags or {}
    if TAG_IMAGE_SIZE not in tags or TAG_CLASS_NAMES not in tags:
        raise NoModelError(
            f"model {version.name} version {version.version} lacks the '{TAG_IMAGE_SIZE}' and "
            f"'{TAG_CLASS_NAMES}' tags; it was not registered by this project"
        )
    return ModelRef(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or "",
        uri=f"models:/{version.name}/{version.version}",
        image_size=int(tags[TAG_IMAGE_SIZE]),
        class_names=tuple(json.loads(tags[TAG_CLASS_NAMES])),
    )


def resolve_model(settings: Settings, ref: str | None = None) -> ModelRef:
    """Resolve an alias (default: the champion) or a version number to one fixed version."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    ref = str(ref) if ref not in (None, "") else settings.champion_alias
    try:
        if ref.isdigit():
            version = call_with_retries(settings, client.get_model_version, settings.model_name, ref)
        else:
            version = call_with_retries(settings, client.get_model_version_by_alias, settings.model_name, ref)
    except MlflowException as exc:
        if is_transient_error(exc):
            raise
        raise NoModelError(
            f"no model '{settings.model_name}@{ref}' in the registry at "
            f"{settings.mlflow_tracking_uri}. Train one first: trigger the wbc_training DAG "
            f"(or run `make demo`), which registers a version and promotes it to "
            f"'{settings.champion_alias}' when it passes the floors; or promote an existing "
            f"version with `wbc promote VERSION`."
        ) from exc
    return model_ref_from_version(settings, version)


def load_keras_model(settings: Settings, ref: ModelRef) -> Any:
    """Load a registered version as a Keras model (only from the configured registry).

    ``ref`` travels through XCom and params; whatever it says, the model is read from
    ``models:/<WBC_MODEL_NAME>/<version>`` of the configured registry, never from another path
    or URI (a ``.keras`` file can carry code that runs when it is loaded).
    """
    import mlflow.tensorflow

    expected = f"models:/{settings.model_name}/{ref.version}"
    if ref.name != settings.model_name or ref.uri != expected or not str(ref.version).isdigit():
        raise ValueError(
            f"refusing to load model {ref.name!r} version {ref.version!r} from {ref.uri!r}: models are "
            f"loaded only from the configured registry, as {expected!r} (WBC_MODEL_NAME={settings.model_name})"
        )
    configure_mlflow(settings)
    return mlflow.tensorflow.load_model(expected)


#: Written into a downloaded artifact folder once every file is there.
DOWNLOADED_MARKER = ".downloaded"


def download_version_artifacts(settings: Settings, ref: ModelRef, artifact_path: str, dst: Path) -> Path | None:
    """Download the folder ``artifact_path`` (``trust``, ``engine``) logged with ``ref``'s run into
    ``dst`` once (a version's artifacts never change); the local folder, or None when the run
    has no such folder (a version registered before it existed, or with no run)."""
    import mlflow.artifacts

    if not ref.run_id:
        return None
    dst = Path(dst)
    local = dst / artifact_path
    if (local / DOWNLOADED_MARKER).is_file():
        return local
    client = configure_mlflow(settings)
    found = call_with_retries(settings, client.list_artifacts, ref.run_id, artifact_path)
    if not found:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    call_with_retries(
        settings,
        mlflow.artifacts.download_artifacts,
        run_id=ref.run_id,
        artifact_path=artifact_path,
        dst_path=str(dst),
    )
    # Written last: a download cut short is not mistaken for a complete one.
    (local / DOWNLOADED_MARKER).write_text(ref.run_id)
    return local


def current_aliases(settings: Settings) -> dict[str, str]:
    """``{alias: version}`` of the registered model; empty if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        model = call_with_retries(settings, client.get_registered_model, settings.model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


@dataclass(frozen=True)
class VersionRecord:
    """A registered version as the registry holds it: number, registration time (UTC), aliases, tags."""

    version: str
    registered_at: datetime
    aliases: tuple[str, ...]
    tags: dict[str, str]


def recent_versions(settings: Settings, limit: int) -> list[VersionRecord]:
    """The ``limit`` newest versions of the registered model, newest first (none before the first)."""
    client = configure_mlflow(settings)
    found = call_with_retries(
        settings,
        client.search_model_versions,
        f"name='{settings.model_name}'",
        max_results=limit,
        order_by=["version_number DESC"],
    )
    # A search answers without the aliases (MLflow 3.17's SQL store): they come from the model.
    aliases: dict[str, list[str]] = {}
    for alias, version in current_aliases(settings).items():
        aliases.setdefault(version, []).append(alias)
    return [
        VersionRecord(
            version=str(v.version),
            registered_at=datetime.fromtimestamp(v.creation_timestamp / 1000, UTC),
            aliases=tuple(sorted(aliases.get(str(v.version), ()))),
            tags=dict(v.tags or {}),
        )
        for v in found
    ]


def version_metrics(settings: Settings, version: str) -> dict[str, Any]:
    """The test metrics recorded on a registered version (from its tags)."""
    client = configure_mlflow(settings)
    mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
    return metrics_from_tags(mv.tags or {})


def wait_until_ready(settings: Settings, version: str) -> Any:
    """The version once its registration is READY; raises if it failed or took too long.

    Looks again after 0.5 s, then after twice as long each time (at most 10 s), until
    ``WBC_MODEL_READY_TIMEOUT`` seconds have passed: :class:`TimeoutError` then. A failed
    registration raises :class:`RuntimeError` at once.
    """
    import tenacity

    client = configure_mlflow(settings)

    def look() -> Any:
        mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
        if mv.status == "FAILED_REGISTRATION":
            raise RuntimeError(
                f"{settings.model_name} version {version} failed to register: {mv.status_message or 'no message'}"
            )
        return mv

    def timed_out(state: tenacity.RetryCallState) -> Any:
        status = state.outcome.result().status if state.outcome else "not READY"
        raise TimeoutError(
            f"{settings.model_name} version {version} still {status} after "
            f"{settings.model_ready_timeout:.0f} s (WBC_MODEL_READY_TIMEOUT)"
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda mv: mv.status != "READY"),
        wait=tenacity.wait_exponential(multiplier=READY_FIRST_WAIT, min=0, max=READY_LONGEST_WAIT),
        stop=tenacity.stop_after_delay(settings.model_ready_timeout),
        retry_error_callback=timed_out,
    )
    return retrying(look)
