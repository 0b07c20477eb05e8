"""Promotion that sees each group (issue 30): the candidate and the champion compared image by image
on the labelled test split and on the lab's reviewed test images. The four cases: promoted (better
on the reviewed images, not worse on the labelled ones), refused on the labelled images, refused
on the reviewed images, and below the minimum of reviewed images (the labelled rule decides)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wbc_tasks.registry.decision import (
    KEPT_CHAMPION,
    LABELLED_RULE,
    PROMOTED,
    REJECTED,
    TWO_GROUP_RULE,
    PromotionDecision,
    decide_on_two_groups,
)
from wbc_tasks.registry.paired_comparison import balanced_accuracy, compare_paired, exact_mcnemar

CLASSES = ("eosinophils", "lymphocytes", "monocytes", "neutrophils")


def answers(n: int, right: np.ndarray, seed: int) -> tuple[list[str], list[str]]:
    """Labels of ``n`` images and answers right where ``right`` is True (wrong: the next class)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(CLASSES), n)
    given = np.where(right, truth, (truth + 1) % len(CLASSES))
    return [CLASSES[i] for i in truth], [CLASSES[i] for i in given]


def group(name: str, n: int, candidate_right: float, champion_right: float, seed: int = 0):
    """Two models on the same ``n`` images, right on the given shares (independently drawn)."""
    rng = np.random.default_rng(seed + 1)
    ours = rng.random(n) < candidate_right
    theirs = rng.random(n) < champion_right
    truth, candidate = answers(n, ours, seed)
    _, champion = answers(n, theirs, seed)
    return compare_paired(name, truth, candidate, champion, seed=seed)


def kept(reason: str = "balanced_accuracy 0.8100 does not beat champion version 1's 0.8200") -> PromotionDecision:
    """The labelled point-estimate rule's decision: the candidate 0.01 below, kept the champion."""
    return PromotionDecision(False, KEPT_CHAMPION, reason, "balanced_accuracy", 0.81, "1", 0.82, 0.0)


RULE = {"min_reviewed": 20, "noninferiority_margin": 0.02}


def test_exact_mcnemar_and_balanced_accuracy_are_the_textbook_ones():
    assert exact_mcnemar(0, 0) == 1.0
    assert exact_mcnemar(6, 0) == pytest.approx(2 * 0.5**6)  # 0.03125: the smallest n that can say so
    assert exact_mcnemar(5, 0) == pytest.approx(0.0625)
    assert exact_mcnemar(3, 7) == exact_mcnemar(7, 3) > 0.3
    truth = np.array([0, 0, 0, 1])
    assert balanced_accuracy(truth, np.array([0, 0, 0, 0])) == 0.5


def test_better_on_the_reviewed_images_and_not_worse_on_the_labelled_ones_is_promoted():
    labelled = group("labelled_test", 544, 0.82, 0.83)  # 0.7-point noise, as measured on 544 images
    reviewed = group("reviewed_test", 40, 0.85, 0.05, seed=3)
    decision = decide_on_two_groups(kept(), labelled, reviewed, trained_on_reviews=True, **RULE)
    assert (decision.promote, decision.outcome, decision.rule) == (True, PROMOTED, TWO_GROUP_RULE)
    assert labelled.difference_low >= -0.02 and reviewed.mcnemar_p < 0.05
    assert "better on the lab's reviewed images" in decision.reason and "McNemar" in decision.reason
    tags = decision.as_tags("2026-12-05T10:00:00+00:00")
    recorded = json.loads(tags["promotion.groups"])
    assert recorded["reviewed_test"]["images"] == 40 and recorded["labelled_test"]["images"] == 544
    assert tags["promotion.rule"] == TWO_GROUP_RULE


def test_worse_on_the_labelled_images_beyond_the_margin_is_refused_there():
    labelled = group("labelled_test", 544, 0.70, 0.83)
    reviewed = group("reviewed_test", 40, 0.85, 0.05, seed=3)
    decision = decide_on_two_groups(kept(), labelled, reviewed, trained_on_reviews=True, **RULE)
    assert (decision.promote, decision.outcome) == (False, KEPT_CHAMPION)
    assert decision.reason.startswith("worse on the labelled test images beyond the margin")


def test_not_better_on_the_reviewed_images_is_refused_there_even_when_ahead_on_the_labelled_ones():
    labelled = group("labelled_test", 544, 0.90, 0.83)
    reviewed = group("reviewed_test", 40, 0.50, 0.45, seed=5)
    ahead = PromotionDecision(True, PROMOTED, "beats", "balanced_accuracy", 0.9, "1", 0.83, 0.0)
    decision = decide_on_two_groups(ahead, labelled, reviewed, trained_on_reviews=True, **RULE)
    assert (decision.promote, decision.outcome) == (False, KEPT_CHAMPION)
    assert decision.reason.startswith("not better on the lab's reviewed images")


@pytest.mark.parametrize("images, trained", [(12, True), (40, False)])
def test_below_the_minimum_or_without_reviews_in_training_the_labelled_rule_decides(images, trained):
    labelled = group("labelled_test", 544, 0.82, 0.83)
    reviewed = group("reviewed_test", images, 0.9, 0.1, seed=3)
    base = kept()
    decision = decide_on_two_groups(base, labelled, reviewed, trained_on_reviews=trained, **RULE)
    assert (decision.promote, decision.outcome, decision.rule) == (False, KEPT_CHAMPION, LABELLED_RULE)
    assert decision.reason.startswith(base.reason) and "the labelled test split decided" in decision.reason
    assert set(decision.groups) == {"labelled_test", "reviewed_test"}  # reported all the same


def test_floors_still_refuse_and_both_groups_are_recorded():
    refused = PromotionDecision(
        False, REJECTED, "failed floors: recall of blasts", "balanced_accuracy", 0.9, "1", None, 0.0
    )
    labelled = group("labelled_test", 200, 0.9, 0.8)
    reviewed = group("reviewed_test", 40, 0.9, 0.1, seed=3)
    decision = decide_on_two_groups(refused, labelled, reviewed, trained_on_reviews=True, **RULE)
    assert (decision.promote, decision.outcome) == (False, REJECTED)
    assert set(decision.groups) == {"labelled_test", "reviewed_test"}


def test_the_paired_interval_holds_the_difference_it_measures():
    same = group("labelled_test", 544, 0.82, 0.82, seed=7)
    assert same.difference_low < 0 < same.difference_high  # no difference: the interval spans 0
    worse = group("labelled_test", 544, 0.70, 0.85, seed=7)
    assert worse.difference_high < 0
