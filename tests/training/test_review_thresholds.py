"""The review threshold for a target accuracy (and the counting rule it replaced) and the blast
flag probability for a target recall."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_tasks.training.review_thresholds import (
    blast_probability_for_recall,
    review_threshold_by_count,
    review_threshold_for_accuracy,
)


def test_review_threshold_is_the_lowest_whose_calibrated_confidence_expects_the_target_accuracy():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence  # calibrated: right as often as it says
    t = review_threshold_for_accuracy(confidence, correct, 0.9)
    kept = confidence >= t
    assert confidence[kept].mean() >= 0.9
    # One step lower (the next confidence below t) would expect less than the target ...
    lower = confidence[confidence < t].max()
    assert confidence[confidence >= lower].mean() < 0.9
    # ... and the kept images are right about as often as the target (calibrated: by chance only).
    assert correct[kept].mean() == pytest.approx(0.9, abs=0.03)
    assert review_threshold_for_accuracy(confidence, np.zeros(2000, bool), 0.9) == 1.0


def test_review_threshold_refuses_confidence_the_right_answers_do_not_bear_out():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.9, 1.0, 300)  # sure of everything ...
    correct = rng.uniform(size=300) < 0.8  # ... and right 80 % of the time
    by_confidence_alone = (confidence >= np.quantile(confidence, 0.5)).mean()  # mean 0.975: would pass
    kept = (confidence >= review_threshold_for_accuracy(confidence, correct, 0.95)).mean()
    assert kept < 0.15 < by_confidence_alone  # counting vetoes all but a lucky top sliver
    # Right at the top only: the threshold moves up to where the count agrees.
    correct = confidence > 0.97
    t = review_threshold_for_accuracy(confidence, correct, 0.95)
    assert 0.965 < t < 1.0 and correct[confidence >= t].mean() >= 0.9


def test_review_threshold_by_count_is_the_lowest_that_reaches_the_target_accuracy():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence
    t = review_threshold_by_count(confidence, correct, 0.9)
    assert correct[confidence >= t].mean() >= 0.9
    assert correct[confidence >= confidence[confidence < t].max()].mean() < 0.9


def test_blast_flag_probability_reaches_the_recall_target_on_missed_blasts():
    is_blast = np.array([True] * 20 + [False] * 5)
    predicted_blast = np.array([True] * 10 + [False] * 10 + [False] * 5)
    p_blast = np.r_[np.full(10, 0.9), np.linspace(0.05, 0.5, 10), np.full(5, 0.01)]
    p = blast_probability_for_recall(p_blast, predicted_blast, is_blast, 0.95)
    caught = predicted_blast[is_blast] | (p_blast[is_blast] >= p)
    assert caught.mean() >= 0.95
    assert p == pytest.approx(p_blast[11])  # one blast (the least likely) may be missed: 19/20
