"""One function per DAG task: read settings and params, run one step in the run's work folder.

Each returns the small dict the step's completion marker holds (counts, locations, metrics):
that, and nothing bigger, is what Airflow's XCom carries. A step that already completed in this
run returns its recorded summary instead of running again (retries are safe).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wbc_tasks.config import Settings, get_settings
from wbc_tasks.params import TrainingParams, training_params
from wbc_tasks.workdir import require_complete, run_step

log = logging.getLogger(__name__)


def _context(run_id: str, params: dict[str, Any] | None) -> tuple[Settings, TrainingParams, Path]:
    settings = get_settings()
    return settings, training_params(params), settings.run_dir(run_id)


def resolve_data_dir(settings: Settings, params: TrainingParams) -> Path:
    """The labelled folder: the param, else ``WBC_DATA_DIR``, else generated demo data."""
    if params.data_dir:
        return Path(params.data_dir).expanduser().resolve()
    if settings.data_dir is not None:
        return settings.data_dir
    from wbc_tasks.demo import generate_demo_dataset

    demo = settings.home / "demo-data" / "WBC"
    if not demo.is_dir():
        log.info("no data folder configured: generating demo images in %s", demo)
        generate_demo_dataset(demo, seed=params.seed)
    return demo


def split_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Validate, de-duplicate and split the labelled images by content hash."""
    from wbc_tasks.dataset import split_dataset

    settings, p, run = _context(run_id, params)
    data_dir = resolve_data_dir(settings, p)
    return run_step(run / "split", lambda out: split_dataset(data_dir, out, settings))


def preprocess_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Decode and resize every split into memory-mapped uint8 stores."""
    from wbc_tasks.preprocess import preprocess_splits

    settings, p, run = _context(run_id, params)
    require_complete(run / "split")
    return run_step(
        run / "preprocess", lambda out: preprocess_splits(run / "split", out, settings, p.image_size)
    )
