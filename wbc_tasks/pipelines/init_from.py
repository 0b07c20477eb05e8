"""The registered version a training run starts from (the ``init_from`` param): resolved once, in
the split step, to one version number that the run records and its checkpoints are keyed by; its
float32 weights are what the train step starts from. A version whose image size, class names or
layers differ from the run's is refused with what differs."""

from __future__ import annotations

import logging
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.training.params import ParamError, TrainingParams

log = logging.getLogger(__name__)

#: ``init_from`` values that start from nothing.
FROM_SCRATCH = "none"
CHAMPION = "champion"


def resolve_init_from(settings: Settings, params: TrainingParams) -> int | None:
    """The version number ``params.init_from`` names (``champion``: the alias's version now), or
    None from scratch; :class:`ParamError` when there is no such version or it cannot be this
    run's starting point."""
    from wbc_tasks.registry.versions import NoModelError, resolve_model

    if params.init_from == FROM_SCRATCH:
        return None
    wanted = settings.champion_alias if params.init_from == CHAMPION else params.init_from
    try:
        ref = resolve_model(settings, wanted)
    except NoModelError as exc:
        raise ParamError(f"init_from={params.init_from}: {exc}") from exc
    differences = []
    if ref.image_size != params.image_size:
        differences.append(f"image size {ref.image_size} px where this run's is {params.image_size} px")
    if tuple(ref.class_names) != CLASS_NAMES:
        differences.append(f"class names {list(ref.class_names)} where this run's are {list(CLASS_NAMES)}")
    if differences:
        raise ParamError(
            f"init_from={params.init_from}: {ref.name} version {ref.version} cannot start this run: "
            + "; ".join(differences)
        )
    log.info("init_from=%s: starting from %s version %s", params.init_from, ref.name, ref.version)
    return int(ref.version)


def initial_weights(settings: Settings, version: int) -> list[Any]:
    """The registered ``version``'s weights (float32, calibration folded in), in the order of
    :func:`wbc_tasks.training.model.build_model`'s ``get_weights()``."""
    from wbc_tasks.registry.versions import load_keras_model, resolve_model

    model = load_keras_model(settings, resolve_model(settings, str(version)))
    return [w.astype("float32") for w in model.get_weights()]
