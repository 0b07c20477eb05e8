"""The promotion decision as a pure function of metrics: the floors (the promotion metric,
every class's recall, blasts' recall), the comparison with the champion on the same test images
(a margin; ties keep the champion) and the recorded outcome. No MLflow: ``promotion`` applies it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from wbc_tasks.core.vocabulary import BLAST_CLASS
from wbc_tasks.registry.paired_comparison import PairedGroup
from wbc_tasks.registry.tags import is_number, per_class_values

PROMOTED = "promoted"
REJECTED = "rejected"  # failed a floor
KEPT_CHAMPION = "kept_champion"  # lost or tied the comparison
ALREADY_CHAMPION = "already_champion"
ERROR = "error"  # an alias move failed; aliases were put back
#: Which rule decided: the labelled test split alone, or it and the lab's reviewed test images.
LABELLED_RULE = "labelled_test"
TWO_GROUP_RULE = "labelled_and_reviewed_test"


#: Trust figures of the candidate written into the comparison record.
TRUST_COMPARED = (
    "ece",
    "ece_before_calibration",
    "coverage",
    "unflagged_accuracy",
    "unfamiliar_or_image_check_share",
    "mosaics_flagged_share",
    "non_cells_flagged_share",
)


class PromotionConflict(RuntimeError):
    """The champion changed between the decision and the alias move: decide again."""


@dataclass(frozen=True)
class PromotionDecision:
    """What :func:`decide_promotion` concluded, and the numbers behind it."""

    promote: bool
    outcome: str
    reason: str
    metric: str
    candidate_value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    failed_floors: tuple[str, ...] = ()
    #: The candidate's calibration and unfamiliar-detection figures (recorded, compared by people).
    candidate_trust: Mapping[str, float] = field(default_factory=dict)
    rule: str = LABELLED_RULE
    #: Both models image by image on each group (:class:`PairedGroup` as dicts), when compared.
    groups: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failed_floors"] = list(self.failed_floors)
        out["candidate_trust"] = dict(self.candidate_trust)
        out["groups"] = dict(self.groups)
        return out

    def as_tags(self, decided_at: str) -> dict[str, str]:
        """The ``promotion.*`` tags recorded on the candidate version."""

        def num(value: float | None) -> str:
            return "none" if value is None else repr(float(value))

        return {
            "promotion.decision": self.outcome,
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.candidate_value": num(self.candidate_value),
            "promotion.champion_value": num(self.champion_value),
            "promotion.margin": repr(float(self.margin)),
            "promotion.compared_with_version": self.champion_version or "none",
            "promotion.failed_floors": json.dumps(list(self.failed_floors)),
            "promotion.decided_at": decided_at,
            **{f"promotion.candidate_{k}": num(v) for k, v in self.candidate_trust.items()},
            "promotion.rule": self.rule,
            **({"promotion.groups": json.dumps(dict(self.groups), sort_keys=True)} if self.groups else {}),
        }


def recorded_decision(tags: Mapping[str, str]) -> dict[str, Any] | None:
    """What :meth:`PromotionDecision.as_tags` recorded on a version, read back (None: not decided):
    the outcome, rule, reason, the version compared with, when, and the paired groups."""
    if "promotion.decision" not in tags:
        return None
    compared = tags.get("promotion.compared_with_version", "none")
    return {
        "outcome": tags["promotion.decision"],
        "rule": tags.get("promotion.rule", LABELLED_RULE),
        "reason": tags.get("promotion.reason", ""),
        "compared_with_version": None if compared == "none" else compared,
        "decided_at": tags.get("promotion.decided_at"),
        "groups": json.loads(tags["promotion.groups"]) if "promotion.groups" in tags else {},
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _metric_value(metrics: Mapping[str, Any], metric: str, whose: str) -> float:
    value = metrics.get(metric)
    if value is None or isinstance(value, Mapping):
        raise ValueError(f"{whose} metrics have no '{metric}' (keys: {sorted(metrics)})")
    return float(value)


def classes_in_test(metrics: Mapping[str, Any]) -> list[str]:
    """Classes with test images: support > 0 where support is given, else a defined recall."""
    recall = per_class_values(metrics, "recall")
    support = per_class_values(metrics, "support")
    if support:
        return [c for c in recall if support.get(c, 0) > 0]
    return [c for c in recall if not math.isnan(recall[c])]


def check_floors(
    metrics: Mapping[str, Any],
    *,
    metric: str,
    min_metric: float,
    min_class_recall: float,
    min_blast_recall: float,
    max_ece: float | None = None,
) -> list[str]:
    """Each floor the candidate misses, worded for people (empty: it passes them all).

    ``max_ece``: an optional ceiling on the candidate's calibrated test ECE (off when None).
    """
    failures = []
    if max_ece is not None:
        ece = metrics.get("ece")
        if ece is None or not is_number(ece):
            failures.append(f"no calibration error recorded, and max_ece {max_ece:.3f} is set")
        elif float(ece) > max_ece:
            failures.append(f"calibration error (ECE) {float(ece):.4f} is above the ceiling {max_ece:.4f} (max_ece)")
    value = _metric_value(metrics, metric, "candidate")
    if math.isnan(value) or value < min_metric:
        failures.append(f"{metric} {value:.4f} is below the floor {min_metric:.4f} (min_metric)")
    recall = per_class_values(metrics, "recall")
    if not recall:
        raise ValueError(
            "candidate metrics carry no per-class recall ({'recall': {class: value}}); "
            "promotion needs it to check the class floors"
        )
    for cls in classes_in_test(metrics):
        r = recall[cls]
        if math.isnan(r) or r < min_class_recall:
            failures.append(f"recall of {cls} {r:.4f} is below the floor {min_class_recall:.4f} (min_class_recall)")
        if cls == BLAST_CLASS and (math.isnan(r) or r < min_blast_recall):
            failures.append(f"recall of {cls} {r:.4f} is below the floor {min_blast_recall:.4f} (min_blast_recall)")
    return failures


def decide_promotion(
    candidate_metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None,
    *,
    champion_version: str | None,
    metric: str,
    margin: float,
    min_metric: float,
    min_class_recall: float,
    min_blast_recall: float,
    max_ece: float | None = None,
) -> PromotionDecision:
    """Promote, reject (a floor) or keep the champion; pure, no MLflow.

    ``champion_metrics`` are the champion's metrics on the same test split as the candidate's
    (None, with ``champion_version`` None, when there is no champion yet).
    """
    candidate_value = _metric_value(candidate_metrics, metric, "candidate")
    failures = check_floors(
        candidate_metrics,
        metric=metric,
        min_metric=min_metric,
        min_class_recall=min_class_recall,
        min_blast_recall=min_blast_recall,
        max_ece=max_ece,
    )
    common: dict[str, Any] = {
        "metric": metric,
        "candidate_value": candidate_value,
        "champion_version": champion_version,
        "margin": margin,
        "candidate_trust": {
            k: float(candidate_metrics[k]) for k in TRUST_COMPARED if is_number(candidate_metrics.get(k))
        },
    }
    champion_value = None
    if champion_version is not None:
        if champion_metrics is None:
            raise ValueError(f"champion version {champion_version} given without its metrics")
        champion_value = _metric_value(champion_metrics, metric, f"champion (version {champion_version})")
        if math.isnan(champion_value):
            raise ValueError(f"champion version {champion_version} has no {metric} on this test split (NaN)")
    if failures:
        return PromotionDecision(
            False,
            REJECTED,
            "failed floors: " + "; ".join(failures),
            champion_value=champion_value,
            failed_floors=tuple(failures),
            **common,
        )
    if champion_version is None:
        return PromotionDecision(
            True,
            PROMOTED,
            f"passes every floor and there is no champion yet ({metric} {candidate_value:.4f})",
            champion_value=None,
            **common,
        )
    if champion_value is not None and candidate_value > champion_value + margin:
        return PromotionDecision(
            True,
            PROMOTED,
            f"{metric} {candidate_value:.4f} beats champion version {champion_version}'s "
            f"{champion_value:.4f} by more than the margin {margin:.4f}",
            champion_value=champion_value,
            **common,
        )
    return PromotionDecision(
        False,
        KEPT_CHAMPION,
        f"{metric} {candidate_value:.4f} does not beat champion version {champion_version}'s "
        f"{champion_value:.4f} by more than the margin {margin:.4f}",
        champion_value=champion_value,
        **common,
    )


def _said(group: PairedGroup) -> str:
    return (
        f"on the {group.images} {group.name.replace('_', ' ')} images: right {group.candidate_accuracy:.3f} vs "
        f"{group.champion_accuracy:.3f} ({group.candidate_only} only the candidate, {group.champion_only} only "
        f"the champion; exact McNemar p={group.mcnemar_p:.3g}), balanced accuracy "
        f"{group.candidate_balanced_accuracy:.4f} vs {group.champion_balanced_accuracy:.4f}, difference "
        f"[{group.difference_low:+.4f}, {group.difference_high:+.4f}] (paired bootstrap, 90 %)"
    )


def decide_on_two_groups(
    decision: PromotionDecision,
    labelled: PairedGroup,
    reviewed: PairedGroup | None,
    *,
    trained_on_reviews: bool,
    min_reviewed: int,
    noninferiority_margin: float,
    alpha: float = 0.05,
) -> PromotionDecision:
    """The decision once the candidate and the champion were compared image by image.

    When the candidate trained on reviewed images and at least ``min_reviewed`` reviewed test
    images exist, they decide with the labelled test split: promoted when better on the reviewed
    images (exact McNemar at ``alpha``) and not worse on the labelled ones beyond
    ``noninferiority_margin`` of balanced accuracy (the paired interval's lower end). Otherwise
    ``decision`` (the labelled rule) stands, with both groups recorded. Floors still refuse.
    """
    groups = {"labelled_test": labelled.as_dict(), **({"reviewed_test": reviewed.as_dict()} if reviewed else {})}
    if decision.outcome in (REJECTED, ALREADY_CHAMPION, ERROR) or decision.champion_version is None:
        return replace(decision, groups=groups)
    if not trained_on_reviews or reviewed is None or reviewed.images < min_reviewed:
        why = (
            "the candidate trained on no reviewed images"
            if not trained_on_reviews
            else f"{reviewed.images if reviewed else 0} reviewed test images, under the minimum {min_reviewed}"
        )
        return replace(decision, groups=groups, reason=f"{decision.reason} (the labelled test split decided: {why})")
    better = reviewed.candidate_only > reviewed.champion_only and reviewed.mcnemar_p < alpha
    not_worse = labelled.difference_low >= -noninferiority_margin
    evidence = f"{_said(reviewed)}; {_said(labelled)}; non-inferiority margin {noninferiority_margin:.3f}"
    if better and not_worse:
        outcome, promote, reason = (
            PROMOTED,
            True,
            f"better on the lab's reviewed images and not worse on the labelled ones: {evidence}",
        )
    elif not better:
        outcome, promote, reason = KEPT_CHAMPION, False, f"not better on the lab's reviewed images: {evidence}"
    else:
        outcome, promote, reason = (
            KEPT_CHAMPION,
            False,
            f"worse on the labelled test images beyond the margin: {evidence}",
        )
    return replace(decision, promote=promote, outcome=outcome, reason=reason, rule=TWO_GROUP_RULE, groups=groups)
