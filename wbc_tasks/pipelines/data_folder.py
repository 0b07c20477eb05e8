"""Which labelled folder a training run uses, the one rule for the training steps and ``wbc
train``'s checks before Airflow starts: the ``data_dir`` param, resolved and only inside the
configured folders (:meth:`Settings.input_roots`: ``WBC_DATA_DIR``, ``WBC_HOME``, the classify
folder, ``WBC_ALLOWED_ROOTS``), else ``WBC_DATA_DIR``, else generated demo data."""

from __future__ import annotations

import logging
from pathlib import Path

from wbc_tasks.core.paths import resolve_inside
from wbc_tasks.core.settings import Settings
from wbc_tasks.training.params import TrainingParams

log = logging.getLogger(__name__)


def configured_data_dir(settings: Settings, params: TrainingParams) -> Path | None:
    """The labelled folder the param or ``WBC_DATA_DIR`` names; None when neither does (the run
    trains on generated demo data). Raises
    :class:`~wbc_tasks.core.paths.OutsideAllowedFoldersError` for a param outside the configured
    folders."""
    if params.data_dir:
        return resolve_inside(params.data_dir, settings.input_roots(), "data_dir")
    return settings.data_dir


def resolve_data_dir(settings: Settings, params: TrainingParams) -> Path:
    """The labelled folder of :func:`configured_data_dir`, else generated demo data (made under
    ``WBC_HOME`` on first use)."""
    configured = configured_data_dir(settings, params)
    if configured is not None:
        return configured
    from wbc_tasks.data.demo import generate_demo_dataset

    demo = settings.home / "demo-data" / "WBC"
    if not demo.is_dir():
        log.info("no data folder configured: generating demo images in %s", demo)
        generate_demo_dataset(demo, seed=params.seed)
    return demo
