"""Test metrics as version tags and back (wbc_tasks.registry.tags), without MLflow."""

from __future__ import annotations

import numpy as np


def test_metric_tags_round_trip_headline_and_per_class_values():
    from wbc_tasks.registry.tags import metric_tags, metrics_from_tags

    metrics = {
        "balanced_accuracy": np.float32(0.75),
        "accuracy": 0.8,
        "ok": True,
        "name": "not a metric",
        "recall": {"blasts": 0.9, "bands": 0.5},
        "per_class": {"bands": {"f1": 0.4, "recall": 0.1}, "blasts": {"support": 12}},
        "confusion_matrix": [[1, 0], [0, 1]],
    }
    tags = metric_tags(metrics)
    assert tags == {
        "metric.balanced_accuracy": "0.75",
        "metric.accuracy": "0.8",
        "recall.blasts": "0.9",
        "recall.bands": "0.5",  # the direct dict wins over per_class
        "f1.bands": "0.4",
        "support.blasts": "12.0",
    }
    assert metrics_from_tags({**tags, "image_size": "32", "promotion.outcome": "x"}) == {
        "balanced_accuracy": 0.75,
        "accuracy": 0.8,
        "recall": {"blasts": 0.9, "bands": 0.5},
        "f1": {"bands": 0.4},
        "support": {"blasts": 12.0},
    }
