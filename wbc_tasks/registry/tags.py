"""The text this project writes on MLflow runs and model versions, and how it reads it back.

Owns the tag names (``image_size``, ``class_names``, ``airflow_run_id``, ``reviewed_images``,
``init_from_version``), the metric <-> tag
codec (headline test metrics as ``metric.<name>``, per-class ones as ``<kind>.<class>``, which
promotion reads back) and how a param value is written as text. Pure functions on dicts: no
MLflow import, no I/O, so the codec can be checked without a tracking server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TAG_IMAGE_SIZE = "image_size"
TAG_CLASS_NAMES = "class_names"
#: Run tag (and version tag) naming the Airflow DAG run that produced it.
TAG_AIRFLOW_RUN_ID = "airflow_run_id"
#: Version tag: the lab's reviewed images the version's run added, per split (JSON), when it did.
TAG_REVIEWED_IMAGES = "reviewed_images"
#: Version tag: the registered version its training started from (absent: from scratch).
TAG_INIT_FROM_VERSION = "init_from_version"
#: Version tag prefix of headline test metrics (``metric.balanced_accuracy``).
METRIC_TAG_PREFIX = "metric."
#: Per-class metric kinds stored as version tags ``<kind>.<class>`` (``recall.blasts``).
PER_CLASS_KINDS = ("recall", "precision", "f1", "support")


def is_number(value: Any) -> bool:
    """Whether ``value`` is a number (not a bool, not a numeric string)."""
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes))


def param_text(value: Any) -> str:
    """A param value as MLflow (and the model card) show it: lists and dicts as sorted JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def per_class_values(metrics: Mapping[str, Any], kind: str) -> dict[str, float]:
    """``{class: value}`` of one per-class metric, from either ``metrics[kind][class]`` or
    ``metrics["per_class"][class][kind]``; empty if the metrics carry neither."""
    values: dict[str, float] = {}
    direct = metrics.get(kind)
    if isinstance(direct, Mapping):
        values.update({str(c): float(v) for c, v in direct.items() if is_number(v)})
    per_class = metrics.get("per_class")
    if isinstance(per_class, Mapping):
        for cls, row in per_class.items():
            if isinstance(row, Mapping) and is_number(row.get(kind)):
                values.setdefault(str(cls), float(row[kind]))
    return values


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for test metrics: ``metric.<name>`` for headline numbers, ``<kind>.<class>``
    for per-class recall, precision, f1 and support."""
    tags = {
        f"{METRIC_TAG_PREFIX}{key}": repr(float(value))
        for key, value in metrics.items()
        if not isinstance(value, Mapping) and is_number(value)
    }
    for kind in PER_CLASS_KINDS:
        for cls, value in per_class_values(metrics, kind).items():
            tags[f"{kind}.{cls}"] = repr(value)
    return tags


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """The metrics dict :func:`metric_tags` wrote (headline numbers plus per-class dicts)."""
    metrics: dict[str, Any] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            metrics[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
        else:
            kind, _, cls = key.partition(".")
            if kind in PER_CLASS_KINDS and cls:
                metrics.setdefault(kind, {})[cls] = float(value)
    return metrics
