"""The training schedule: which phases run, for how many epochs, at which learning rate, and
the class weights that stand in for SMOTE when asked.

With ImageNet weights, a ``head`` phase (VGG16 frozen, ``learning_rate_head``, ``epochs_head``
epochs) then a ``finetune`` phase (the top ``unfreeze_layers`` conv layers unfrozen,
``learning_rate_finetune``, ``epochs_finetune`` epochs). Without pretrained weights a frozen
random base would learn nothing, so a single ``scratch`` phase trains the whole network for
``epochs_head + epochs_finetune`` epochs at ``learning_rate_finetune`` (VGG16 from scratch wants
about 1e-4 with Adam; the default 1e-5 suits fine-tuning and is slow from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wbc_tasks.training.params import TrainingParams, Weights

#: Below this, from-scratch training is very slow to start; the log says so.
SCRATCH_LR_HINT = 5e-5


@dataclass(frozen=True)
class Phase:
    """One training phase: its name (head, finetune, scratch), epochs and learning rate."""

    name: str
    epochs: int
    learning_rate: float


def plan_phases(params: TrainingParams) -> list[Phase]:
    """The training phases ``params`` ask for (see the module docstring)."""
    if params.weights == Weights.NONE:
        return [Phase("scratch", params.epochs_head + params.epochs_finetune, params.learning_rate_finetune)]
    return [
        Phase("head", params.epochs_head, params.learning_rate_head),
        Phase("finetune", params.epochs_finetune, params.learning_rate_finetune),
    ]


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """scikit-learn's "balanced" weights for the classes present; 1.0 for absent ones."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    result = {i: 1.0 for i in range(n_classes)}
    result.update({int(c): float(w) for c, w in zip(present, weights)})
    return result
