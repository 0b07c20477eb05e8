"""The training DAG's step functions in task order, called as its tasks call them (no Airflow)."""

from __future__ import annotations

from typing import Any

#: A whole training run in seconds on generated images (32 px, one epoch, no floors).
TINY_PARAMS: dict[str, Any] = {
    "image_size": 32,
    "weights": "none",
    "epochs_head": 0,
    "epochs_finetune": 1,
    "batch_size": 16,
    "augment_per_class": 0,
    "smote": False,
    "early_stopping_patience": 0,
    "min_metric": 0.0,
    "min_class_recall": 0.0,
    "min_blast_recall": 0.0,
    "seed": 4,
}

STEP_NAMES = (
    "split_step",
    "preprocess_step",
    "augment_step",
    "balance_step",
    "train_step",
    "calibrate_step",
    "evaluate_step",
    "export_step",
    "register_step",
    "promote_step",
)


def run_training_steps(
    run_id: str, params: dict[str, Any], *, first: str = "split_step", last: str = "promote_step"
) -> dict[str, dict]:
    """Run the steps from ``first`` through ``last`` for ``run_id``; their summaries by name."""
    from wbc_tasks.pipelines import training as steps

    names = STEP_NAMES[STEP_NAMES.index(first) : STEP_NAMES.index(last) + 1]
    return {name: getattr(steps, name)(run_id, params) for name in names}
