"""Which model a classification run uses: an alias (default: the champion) resolved once to one
fixed version, carried between tasks as a small JSON-able dict (XCom), and loaded from the
configured registry. Resolving once means every chunk of a run uses the same version even if a
promotion happens mid-run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.versions import ModelRef

log = logging.getLogger(__name__)


def model_ref_to_dict(ref: ModelRef) -> dict[str, Any]:
    """A JSON-able form of ``ref`` for XCom."""
    data = asdict(ref)
    data["class_names"] = list(ref.class_names)
    return data


def model_ref_from_dict(data: ModelRef | dict[str, Any]) -> ModelRef:
    """Back from :func:`model_ref_to_dict` (a ModelRef passes through)."""
    if isinstance(data, ModelRef):
        return data
    return ModelRef(
        name=str(data["name"]),
        version=str(data["version"]),
        run_id=str(data.get("run_id") or ""),
        uri=str(data["uri"]),
        image_size=int(data["image_size"]),
        class_names=tuple(data["class_names"]),
    )


def resolve_run_model(settings: Settings, ref: str | None = None) -> dict[str, Any]:
    """Resolve an alias or version (default: the champion) to one fixed version, as a dict.

    Raises :class:`wbc_tasks.registry.versions.NoModelError` (whose message says how to get a
    model) when there is none.
    """
    from wbc_tasks.registry.versions import resolve_model

    model = resolve_model(settings, ref)
    log.info(
        "classifying with %s version %s (asked for %r; run %s; %d px; classes %s)",
        model.name,
        model.version,
        ref or settings.champion_alias,
        model.run_id,
        model.image_size,
        ", ".join(model.class_names),
    )
    return model_ref_to_dict(model)


def load_policy(settings: Settings, ref: ModelRef) -> tuple[Any, Any]:
    """The trust policy and feature statistics of ``ref`` ((None, None) for a version without)."""
    from wbc_tasks.training.trust_policy import TRUST_ARTIFACT_PATH, load_trust

    return load_trust(_artifacts(settings, ref, TRUST_ARTIFACT_PATH))


def _artifacts(settings: Settings, ref: ModelRef, artifact_path: str) -> Path | None:
    from wbc_tasks.registry.versions import download_version_artifacts

    return download_version_artifacts(
        settings, ref, artifact_path, settings.work_dir / "model-trust" / f"{ref.name}-{ref.version}"
    )


def load_engine_for(settings: Settings, ref: ModelRef) -> Any | None:
    """The version's accepted CPU inference engine, or None (``WBC_INFERENCE_ENGINE=keras``, no
    engine exported, refused by the training run's export_engine step, or failing to load: Keras classifies)."""
    from wbc_tasks.training.export import ENGINE_ARTIFACT_PATH, load_engine

    if settings.inference_engine == "keras":
        return None
    return load_engine(_artifacts(settings, ref, ENGINE_ARTIFACT_PATH))


def load_model(settings: Settings, ref: ModelRef) -> Any:
    """The version ``ref`` ready to classify (:class:`~wbc_tasks.serving.infer.ServingModel`): its
    Keras model from the configured registry and its trust policy, downloaded once per version
    into ``<work_dir>/model-trust/``."""
    from wbc_tasks.registry.versions import load_keras_model
    from wbc_tasks.serving.infer import ServingModel
    from wbc_tasks.training.outputs import outputs_model

    started = time.perf_counter()
    model = load_keras_model(settings, ref)
    policy, stats = load_policy(settings, ref)
    try:
        outputs = outputs_model(model)
    except (ValueError, KeyError) as exc:
        # Not this project's architecture (no named head/base layers): probabilities only.
        log.warning("%s version %s: no feature outputs (%s); unfamiliar score off", ref.name, ref.version, exc)
        outputs, policy, stats = None, None, None
    engine = load_engine_for(settings, ref) if outputs is not None else None
    if engine is not None:
        outputs = engine
    if policy is None:
        log.warning(
            "%s version %s has no trust policy (registered before calibration existed): review threshold %.2f on "
            "the raw softmax, no unfamiliar score or blast flag; retrain to get them",
            ref.name,
            ref.version,
            settings.review_threshold if settings.review_threshold is not None else settings.legacy_review_threshold,
        )
    log.info(
        "loaded %s version %s in %.1f s, classifying with %s%s",
        ref.name,
        ref.version,
        time.perf_counter() - started,
        f"OpenVINO ({engine.precision}, checked against Keras when the version was trained)" if engine else "Keras",
        f" (T {policy.temperature:.2f}, review threshold {policy.review_threshold:.2f}, unfamiliar "
        f"{policy.unfamiliar_method} > {policy.unfamiliar_threshold:.2f})"
        if policy
        else "",
    )
    return ServingModel(model, outputs, policy, stats)
