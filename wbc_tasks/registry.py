"""MLflow: where runs are tracked, how a model version is logged, found and loaded.

Image size and class names travel with the model version (tags ``image_size`` and
``class_names``, and the logged model's metadata), never in a second place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from wbc_tasks.config import Settings

log = logging.getLogger(__name__)

TAG_IMAGE_SIZE = "image_size"
TAG_CLASS_NAMES = "class_names"
MODEL_ARTIFACT_NAME = "model"


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


def configure_mlflow(settings: Settings):
    """Point MLflow at the configured tracking/registry URI; return an ``MlflowClient``."""
    import mlflow
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(settings: Settings) -> str:
    """The experiment id, creating it (with the configured artifact root) if needed."""
    client = configure_mlflow(settings)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.mlflow_artifact_root.as_uri()
    return client.create_experiment(settings.mlflow_experiment, artifact_location=location)


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
            version = client.get_model_version(settings.model_name, ref)
        else:
            version = client.get_model_version_by_alias(settings.model_name, ref)
    except MlflowException as exc:
        raise NoModelError(
            f"no model '{settings.model_name}@{ref}' in the registry at "
            f"{settings.mlflow_tracking_uri}. Train one first: trigger the wbc_training DAG "
            f"(or run `make demo`), which registers a version and promotes it to "
            f"'{settings.champion_alias}' when it passes the floors; or promote an existing "
            f"version with `wbc promote VERSION`."
        ) from exc
    return model_ref_from_version(settings, version)


def load_keras_model(settings: Settings, ref: ModelRef):
    """Load a registered version as a Keras model (only from the configured registry)."""
    import mlflow.tensorflow

    configure_mlflow(settings)
    return mlflow.tensorflow.load_model(ref.uri)


def log_model_version(
    settings: Settings,
    model: Any,
    *,
    image_size: int,
    class_names: tuple[str, ...],
    description: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelRef:
    """Log ``model`` to the active MLflow run and register it as a new version.

    Uses the ``tensorflow`` flavour: MLflow 3.17's ``keras`` flavour writes the input example
    before creating its folder and fails whenever an example is given.
    """
    import mlflow
    import mlflow.tensorflow
    import numpy as np
    from mlflow.models import infer_signature

    client = configure_mlflow(settings)
    example = np.zeros((1, image_size, image_size, 3), dtype=np.uint8)
    probabilities = np.asarray(model.predict(example, verbose=0))
    signature = infer_signature(example, probabilities)
    metadata = {TAG_IMAGE_SIZE: image_size, TAG_CLASS_NAMES: list(class_names)}
    info = mlflow.tensorflow.log_model(
        model,
        name=MODEL_ARTIFACT_NAME,
        signature=signature,
        input_example=example,
        metadata=metadata,
        registered_model_name=settings.model_name,
    )
    version = str(info.registered_model_version)
    client.set_model_version_tag(settings.model_name, version, TAG_IMAGE_SIZE, str(image_size))
    client.set_model_version_tag(settings.model_name, version, TAG_CLASS_NAMES, json.dumps(list(class_names)))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(settings.model_name, version, key, str(value))
    if description:
        client.update_model_version(settings.model_name, version, description=description)
    log.info("registered %s version %s", settings.model_name, version)
    return model_ref_from_version(settings, client.get_model_version(settings.model_name, version))
