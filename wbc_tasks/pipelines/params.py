"""The params of each DAG's trigger form, declared one way: a table of JSON-schema fragments
(``default``, ``type``, bounds, ``title``, ``description``), exactly the keyword arguments of
Airflow's ``Param``. The DAG files turn each table into ``Param`` objects; the CLI and tests
validate against the same tables. Light to import: the scheduler parses the DAG files often, and
a form's defaults are read one setting at a time (:func:`~wbc_tasks.pipelines.parse_time.read_setting`)
unless a :class:`Settings` is given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.pipelines.parse_time import read_setting
from wbc_tasks.training.params import TRAINING_PARAM_SPECS

ParamSpecs = dict[str, dict[str, Any]]


def _reader(settings: Settings | None) -> Callable[[str], Any]:
    """How a form reads its defaults: from ``settings``, else each one alone from the environment."""
    return read_setting if settings is None else lambda name: getattr(settings, name)


def training_param_specs() -> ParamSpecs:
    """The ``wbc_training`` form: every training param (see :mod:`wbc_tasks.training.params`)."""
    return TRAINING_PARAM_SPECS


def adaptation_param_specs() -> ParamSpecs:
    """The ``wbc_adaptation`` form: the training params with the ``adapt`` profile as defaults
    (from the champion, the reviews included, few epochs at a lower learning rate)."""
    from wbc_tasks.training.profiles import PROFILES

    adapt = PROFILES["adapt"]
    return {name: {**spec, "default": adapt.get(name, spec["default"])} for name, spec in TRAINING_PARAM_SPECS.items()}


def classification_param_specs(settings: Settings | None = None) -> ParamSpecs:
    """The ``wbc_batch_classification`` form; defaults come from the settings."""
    setting = _reader(settings)
    return {
        "drop": {
            "default": "",
            "type": "string",
            "title": "Drop folder",
            "description": "Only this sub-folder of the classify folder (e.g. 2026-11-24); empty: all.",
        },
        "model": {
            "default": setting("champion_alias"),
            "type": "string",
            "title": "Model alias or version",
            "description": "Registry alias (e.g. champion) or version number; resolved once per run.",
        },
        "threshold": {
            "default": setting("review_threshold"),
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": 1,
            "title": "Review threshold",
            "description": (
                "Calibrated confidence below which a prediction is flagged low_confidence. Empty: the model "
                "version's own threshold, fitted on its validation split for a target accuracy."
            ),
        },
        "chunk_size": {
            "default": setting("classify_chunk_size"),
            "type": "integer",
            "minimum": 1,
            "title": "Chunk size",
            "description": f"Images per classify task (grown so a run has at most {setting('max_chunks')} chunks).",
        },
        "reclassify": {
            "default": False,
            "type": "boolean",
            "title": "Reclassify",
            "description": "Classify images again with this model version even if an older version "
            "already classified them (older rows are kept).",
        },
        "full_scan": {
            "default": False,
            "type": "boolean",
            "title": "Full scan",
            "description": "List and check every drop, also those an earlier night finished and that have not "
            "changed since (skipped otherwise: a night costs what is new, not the whole history).",
        },
    }


def maintenance_param_specs(settings: Settings | None = None) -> ParamSpecs:
    """The ``wbc_maintenance`` form; defaults come from the settings."""
    setting = _reader(settings)
    return {
        "dry_run": {
            "default": False,
            "type": "boolean",
            "title": "Dry run",
            "description": "Only report what would be deleted (the task log and its return value).",
        },
        "mlflow_artifacts": {
            "default": setting("retention_mlflow_artifacts"),
            "type": "boolean",
            "title": "Delete MLflow artifacts",
            "description": "Also delete the MLflow artifacts of old training runs that never registered "
            "a model version (their params and metrics stay).",
        },
    }
