"""Registering a trained model: log it to the DAG run's MLflow run, make it a new version, tag it.

:func:`register_model` (the training DAG's register step) logs the model with the
``tensorflow`` flavour, registers it, waits until the version is READY and writes what every
version of this project carries: the ``image_size`` and ``class_names`` tags, the test metrics
as tags (``metric.<name>``, ``recall.<class>``; promotion reads them), the ``airflow_run_id``
tag and the model card as its description. Each call is retried while MLflow is unreachable and
safe to repeat: a retried task completes the version its DAG run registered instead of making a
second one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.client import call_with_retries, configure_mlflow
from wbc_tasks.registry.model_card import (
    MODEL_CARD_FILE,
    describe_registered_model,
    fit_description,
    model_card,
)
from wbc_tasks.registry.runs import tracking_run
from wbc_tasks.registry.tags import (
    TAG_AIRFLOW_RUN_ID,
    TAG_CLASS_NAMES,
    TAG_IMAGE_SIZE,
    metric_tags,
)
from wbc_tasks.registry.versions import (
    ModelRef,
    model_ref_from_version,
    wait_until_ready,
)

log = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"


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

    Logging and registering are separate calls, each retried while the server is unreachable
    (:func:`~wbc_tasks.registry.client.call_with_retries`); registering first looks for a
    version of the logged model, so a retry after a lost reply never registers the same model
    twice.
    """
    import mlflow.tensorflow
    import numpy as np
    from mlflow.models import infer_signature

    client = configure_mlflow(settings)
    example = np.zeros((1, image_size, image_size, 3), dtype=np.uint8)
    probabilities = np.asarray(model.predict(example, verbose=0))
    signature = infer_signature(example, probabilities)
    metadata = {TAG_IMAGE_SIZE: image_size, TAG_CLASS_NAMES: list(class_names)}
    # Stated, not inferred: MLflow's inference reloads the model in a subprocess (8.5 s of a 0.9 s
    # log here) and the model needs only TensorFlow (with its Keras) to load.
    import tensorflow as tf

    requirements = [f"tensorflow=={tf.__version__}"]
    # A retried log after a failure half-way leaves an unregistered logged model in the run: harmless.
    info = call_with_retries(
        settings,
        mlflow.tensorflow.log_model,
        model,
        name=MODEL_ARTIFACT_NAME,
        signature=signature,
        input_example=example,
        metadata=metadata,
        pip_requirements=requirements,
    )
    version = call_with_retries(settings, _register_once, settings, client, info.model_id, info.run_id)
    wait_until_ready(settings, version)
    _tag_version(
        settings,
        client,
        version,
        image_size=image_size,
        class_names=class_names,
        tags=tags,
        description=description,
    )
    log.info("registered %s version %s", settings.model_name, version)
    return model_ref_from_version(
        settings,
        call_with_retries(settings, client.get_model_version, settings.model_name, version),
    )


def _register_once(settings: Settings, client: Any, model_id: str, run_id: str | None) -> str:
    """The registered version of logged model ``model_id``, registering it if it has none."""
    import mlflow

    query = f"name='{settings.model_name}'" + (f" and run_id='{run_id}'" if run_id else "")
    source = f"models:/{model_id}"
    found = [
        v for v in client.search_model_versions(query) if getattr(v, "model_id", None) == model_id or v.source == source
    ]
    if found:
        return str(min(int(v.version) for v in found))
    return str(mlflow.register_model(source, settings.model_name, await_registration_for=0).version)


def _tag_version(
    settings: Settings,
    client: Any,
    version: str,
    *,
    image_size: int,
    class_names: tuple[str, ...],
    tags: dict[str, str] | None,
    description: str | None,
) -> None:
    """Set the tags (and description) every version of this project carries; idempotent."""
    name = settings.model_name
    all_tags = {
        TAG_IMAGE_SIZE: str(image_size),
        TAG_CLASS_NAMES: json.dumps(list(class_names)),
    }
    all_tags.update({key: str(value) for key, value in (tags or {}).items()})
    for key, value in all_tags.items():
        call_with_retries(settings, client.set_model_version_tag, name, version, key, value)
    if description:
        call_with_retries(
            settings,
            client.update_model_version,
            name,
            version,
            description=description,
        )


def register_model(
    settings: Settings,
    dag_run_id: str,
    model: Any,
    *,
    image_size: int,
    class_names: tuple[str, ...] | list[str],
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    params: Mapping[str, Any],
    extra_tags: Mapping[str, str] | None = None,
) -> ModelRef:
    """Log and register ``model`` in the DAG run's MLflow run, with its model card.

    The card (:func:`~wbc_tasks.registry.model_card.model_card`) becomes the version's
    description, the registered model's description and the run artifact ``model_card.md``; the
    test metrics become version tags (:func:`~wbc_tasks.registry.tags.metric_tags`), with
    ``extra_tags`` (which inference engine the version classifies with). A retried
    task finds the version its DAG run already registered (by MLflow run id) and completes its
    tags instead of registering a second one.
    """
    import mlflow

    class_names = tuple(class_names)
    client = configure_mlflow(settings)
    with tracking_run(settings, dag_run_id) as run_id:
        existing = call_with_retries(
            settings,
            client.search_model_versions,
            f"name='{settings.model_name}' and run_id='{run_id}'",
        )
        tags = {TAG_AIRFLOW_RUN_ID: dag_run_id, **metric_tags(metrics), **(extra_tags or {})}
        if existing:
            version = str(max(int(v.version) for v in existing))
            log.warning(
                "DAG run %s already registered version %s (task retried); completing it",
                dag_run_id,
                version,
            )
            wait_until_ready(settings, version)
        else:
            version = log_model_version(settings, model, image_size=image_size, class_names=class_names).version
        card = model_card(
            model_name=settings.model_name,
            version=version,
            dag_run_id=dag_run_id,
            mlflow_run_id=run_id,
            image_size=image_size,
            class_names=class_names,
            metrics=metrics,
            data_summary=data_summary,
            params=params,
            registered_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        call_with_retries(settings, mlflow.log_text, card, MODEL_CARD_FILE)
        description = fit_description(
            card,
            f"(cut to fit; the full card is `{MODEL_CARD_FILE}` in MLflow run {run_id})",
        )
        _tag_version(
            settings,
            client,
            version,
            image_size=image_size,
            class_names=class_names,
            tags=tags,
            description=description,
        )
        describe_registered_model(
            settings,
            version,
            f"Latest registered: version {version}. The version in use is @{settings.champion_alias}; "
            f"its own card is in its version description.",
        )
    ref = model_ref_from_version(settings, client.get_model_version(settings.model_name, version))
    log.info(
        "registered %s version %s for DAG run %s with its model card",
        ref.name,
        ref.version,
        dag_run_id,
    )
    return ref
