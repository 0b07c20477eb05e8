"""The training schedule: phases per weights choice, and class weights."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_tasks.training.params import training_params
from wbc_tasks.training.schedule import balanced_class_weights, plan_phases


def _params(**overrides):
    values = {"image_size": 32, "learning_rate_head": 1e-3, "learning_rate_finetune": 1e-4, **overrides}
    return training_params(values)


def test_balanced_class_weights_follow_sklearn():
    labels = np.array([0, 0, 0, 1], dtype=np.int16)
    weights = balanced_class_weights(labels, 3)
    assert weights == {0: pytest.approx(4 / (2 * 3)), 1: pytest.approx(4 / (2 * 1)), 2: 1.0}


def test_pretrained_weights_train_the_head_then_fine_tune():
    phases = plan_phases(_params(weights="imagenet", epochs_head=3, epochs_finetune=4))
    assert [(p.name, p.epochs, p.learning_rate) for p in phases] == [("head", 3, 1e-3), ("finetune", 4, 1e-4)]


def test_from_scratch_is_one_phase_of_all_epochs():
    phases = plan_phases(_params(weights="none", epochs_head=3, epochs_finetune=4))
    assert [(p.name, p.epochs, p.learning_rate) for p in phases] == [("scratch", 7, 1e-4)]
