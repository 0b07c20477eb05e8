"""Which model a classification run uses: an alias (default: the champion) resolved once to one
fixed version, carried between tasks as a small JSON-able dict (XCom), and loaded from the
configured registry. Resolving once means every chunk of a run uses the same version even if a
promotion happens mid-run. Imports ``core`` and ``registry``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
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


def load_model(settings: Settings, ref: ModelRef) -> Any:
    """The Keras model of ``ref`` (from the configured registry)."""
    from wbc_tasks.registry.versions import load_keras_model

    started = time.perf_counter()
    model = load_keras_model(settings, ref)
    log.info(
        "loaded %s version %s in %.1f s",
        ref.name,
        ref.version,
        time.perf_counter() - started,
    )
    return model
