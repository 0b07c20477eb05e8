"""Champion/challenger promotion: decide, record, move the aliases, one run at a time.

A new version becomes champion only if it passes the floors (the promotion metric, every class's
recall, blasts' recall) and beats the current champion evaluated on the SAME test images by more
than a margin (ties keep the champion). The previous champion keeps the rollback alias. Every
decision is recorded as tags on the candidate version (``promotion.*``), hand moves as
``manual_promotion.*`` / ``rollback.*`` on the version promoted and ``demotion.*`` on the one it
replaced.

Serialised: "read the champion -> evaluate it -> decide -> move the aliases" runs under a file
lock in the shared work folder (:func:`promotion_lock`), and the champion is read inside it, so
two runs finishing together cannot both win on a stale comparison. The champion's metrics come
from the caller, a function evaluating a version on the candidate's own test images (the training
pipeline's :mod:`wbc_tasks.pipelines.champion`): the registry stores and decides, it does not
rebuild test data. Aliases move only once the version is READY, rollback alias first and champion
last; if a move fails, both aliases are put back as they were, so there is never a half-promoted
state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from wbc_tasks.core.locks import file_lock
from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.client import call_with_retries, configure_mlflow
from wbc_tasks.registry.decision import (
    ALREADY_CHAMPION,
    ERROR,
    PromotionConflict,
    PromotionDecision,
    _metric_value,
    _now,
    check_floors,
    decide_promotion,
)
from wbc_tasks.registry.model_card import describe_registered_model
from wbc_tasks.registry.versions import (
    ModelRef,
    NoModelError,
    current_aliases,
    model_ref_from_version,
    resolve_model,
    version_metrics,
    wait_until_ready,
)

log = logging.getLogger(__name__)

#: The promotion lock's file, in ``<work_dir>/locks/``.
LOCK_FILE = "promotion.lock"


@contextmanager
def promotion_lock(settings: Settings) -> Iterator[None]:
    """Hold ``<work_dir>/locks/promotion.lock`` while reading, deciding and moving the champion
    (up to ``WBC_LOCK_TIMEOUT``). Works across processes and hosts sharing the work folder."""
    with file_lock(settings.work_dir / "locks" / LOCK_FILE, timeout=settings.lock_timeout, holder="another promotion"):
        yield


def _set_tags(settings: Settings, version: str, tags: Mapping[str, str]) -> None:
    client = configure_mlflow(settings)
    for key, value in tags.items():
        call_with_retries(settings, client.set_model_version_tag, settings.model_name, str(version), key, value)


def _point_alias(settings: Settings, alias: str, version: str | None) -> None:
    """Point ``alias`` at ``version``; None removes the alias."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    if version is not None:
        call_with_retries(settings, client.set_registered_model_alias, settings.model_name, alias, str(version))
        return
    try:
        call_with_retries(settings, client.delete_registered_model_alias, settings.model_name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise


def _move_champion(settings: Settings, new_champion: str, aliases: Mapping[str, str]) -> dict[str, str | None]:
    """Champion -> ``new_champion``, rollback -> the old champion; all or nothing.

    ``aliases`` are the aliases as read under the lock. On failure both aliases are put back.
    """
    old_champion = aliases.get(settings.champion_alias)
    old_rollback = aliases.get(settings.rollback_alias)
    new_rollback = old_champion if old_champion not in (None, new_champion) else old_rollback
    try:
        if new_rollback != old_rollback:
            _point_alias(settings, settings.rollback_alias, new_rollback)
        _point_alias(settings, settings.champion_alias, new_champion)
    except Exception:
        log.error("moving the aliases failed; putting them back (champion %s, rollback %s)", old_champion, old_rollback)
        for alias, version in ((settings.champion_alias, old_champion), (settings.rollback_alias, old_rollback)):
            try:
                _point_alias(settings, alias, version)
            except Exception as exc:  # keep going: restore what can be restored, report the rest
                log.critical("could not restore alias @%s to version %s: %s", alias, version, exc)
        raise
    log.info(
        "@%s -> version %s; @%s -> version %s",
        settings.champion_alias,
        new_champion,
        settings.rollback_alias,
        new_rollback,
    )
    return {"champion": new_champion, "rollback": new_rollback, "previous_champion": old_champion}


def _after_move(
    settings: Settings, new_champion: str, headline: str, demoted: str | None, demotion_tags: Mapping[str, str]
) -> None:
    """Bookkeeping once the champion moved; a failure here is logged, never undoes the move."""
    try:
        describe_registered_model(settings, new_champion, headline)
        if demoted is not None:
            _set_tags(settings, demoted, demotion_tags)
    except Exception as exc:
        log.warning("champion moved to version %s, but updating descriptions/tags failed: %s", new_champion, exc)


def apply_decision(settings: Settings, candidate: ModelRef, decision: PromotionDecision) -> dict[str, Any]:
    """Record ``decision`` on the candidate version and, if it promotes, move the aliases.

    Call it under :func:`promotion_lock`. Raises :class:`PromotionConflict` when the champion is
    no longer the one the decision compared with.
    """
    # Only a fully registered version moves: READY and tagged with what inference needs
    # (model_ref_from_version refuses a version without its image size and class names).
    model_ref_from_version(settings, wait_until_ready(settings, candidate.version))
    aliases = current_aliases(settings)
    champion_now = aliases.get(settings.champion_alias)
    if decision.outcome != ALREADY_CHAMPION and champion_now != decision.champion_version:
        raise PromotionConflict(
            f"the champion is version {champion_now}, but the decision on version "
            f"{candidate.version} compared with {decision.champion_version}; decide again"
        )
    decided_at = _now()
    result = {
        **decision.as_dict(),
        "version": candidate.version,
        "decided_at": decided_at,
        "compared_with_version": decision.champion_version,
        "champion": champion_now,
        "rollback": aliases.get(settings.rollback_alias),
    }
    if decision.outcome == ALREADY_CHAMPION:
        return result
    _set_tags(settings, candidate.version, decision.as_tags(decided_at))
    log.info("version %s: %s (%s)", candidate.version, decision.outcome, decision.reason)
    if not decision.promote:
        return result
    try:
        moved = _move_champion(settings, candidate.version, aliases)
    except Exception as exc:
        _set_tags(
            settings,
            candidate.version,
            {
                "promotion.decision": ERROR,
                "promotion.reason": f"decided to promote ({decision.reason}) but moving the aliases failed "
                f"({exc}); the aliases were put back",
            },
        )
        raise
    _after_move(
        settings,
        candidate.version,
        f"Champion: version {candidate.version} (promoted {decided_at}: {decision.reason})",
        champion_now,
        {
            "demotion.replaced_by": candidate.version,
            "demotion.at": decided_at,
            "demotion.by": "automatic promotion",
            "demotion.why": decision.reason,
        },
    )
    return {**result, **moved}


def promote_if_better(
    settings: Settings,
    candidate: ModelRef,
    candidate_metrics: Mapping[str, Any],
    champion_metrics_fn: Callable[[ModelRef], Mapping[str, Any]],
    *,
    metric: str,
    margin: float,
    min_metric: float,
    min_class_recall: float,
    min_blast_recall: float,
    max_ece: float | None = None,
    compare_groups: Callable[[PromotionDecision, ModelRef], PromotionDecision] | None = None,
) -> dict[str, Any]:
    """Decide on ``candidate`` against the champion of this moment and apply the decision.

    ``compare_groups`` (the training pipeline's image-by-image comparison on the labelled and the
    reviewed test images, :func:`~wbc_tasks.registry.decision.decide_on_two_groups`) then has
    the last word whenever there is a champion to compare with, under the same lock.

    Under :func:`promotion_lock`: read the champion, evaluate it with ``champion_metrics_fn`` on
    the same test split the candidate's metrics come from (skipped when the candidate already
    fails a floor), decide (:func:`decide_promotion`), record and move (:func:`apply_decision`).
    Returns a small JSON-able dict (the decision, the numbers, the aliases after it).
    """
    wait_until_ready(settings, candidate.version)
    floors: dict[str, Any] = {
        "metric": metric,
        "min_metric": min_metric,
        "min_class_recall": min_class_recall,
        "min_blast_recall": min_blast_recall,
        "max_ece": max_ece,
    }
    with promotion_lock(settings):
        champion_version = current_aliases(settings).get(settings.champion_alias)
        if champion_version == candidate.version:
            # A retried promote task whose first attempt already won.
            value = _metric_value(candidate_metrics, metric, "candidate")
            decision = PromotionDecision(
                True,
                ALREADY_CHAMPION,
                f"version {candidate.version} is already the champion",
                metric,
                value,
                champion_version,
                value,
                margin,
            )
        elif check_floors(candidate_metrics, **floors) or champion_version is None:
            decision = decide_promotion(candidate_metrics, None, champion_version=None, margin=margin, **floors)
            if champion_version is not None:  # rejected on floors: say which champion stays
                decision = replace(decision, champion_version=champion_version)
        else:
            champion = resolve_model(settings, champion_version)
            log.info("evaluating champion version %s on the candidate's test split", champion_version)
            champion_metrics = champion_metrics_fn(champion)
            decision = decide_promotion(
                candidate_metrics, champion_metrics, champion_version=champion_version, margin=margin, **floors
            )
        if compare_groups is not None and champion_version is not None and decision.outcome != ALREADY_CHAMPION:
            decision = compare_groups(decision, resolve_model(settings, champion_version))
        return apply_decision(settings, candidate, decision)


def _require(who: str, why: str) -> None:
    if not who or not who.strip():
        raise ValueError("say who moves the champion (who=...)")
    if not why or not why.strip():
        raise ValueError("say why the champion moves (why=...)")


def _ready_ref(settings: Settings, version: str) -> ModelRef:
    from mlflow.exceptions import MlflowException

    try:
        mv = wait_until_ready(settings, version)
    except MlflowException as exc:
        raise NoModelError(
            f"no version {version} of '{settings.model_name}' in the registry at {settings.mlflow_tracking_uri}"
        ) from exc
    return model_ref_from_version(settings, mv)


def promote_version(settings: Settings, version: str, *, who: str, why: str) -> dict[str, Any]:
    """Make ``version`` the champion by hand (no floors); the old champion gets the rollback
    alias. Who, when and why go into tags on both versions."""
    _require(who, why)
    version = str(version)
    with promotion_lock(settings):
        ref = _ready_ref(settings, version)
        aliases = current_aliases(settings)
        old = aliases.get(settings.champion_alias)
        at = _now()
        result = {
            "action": "promote",
            "version": version,
            "by": who,
            "why": why,
            "at": at,
            "metrics": version_metrics(settings, version),
        }
        if old == version:
            return {**result, "changed": False, "champion": version, "rollback": aliases.get(settings.rollback_alias)}
        _set_tags(
            settings,
            ref.version,
            {
                "manual_promotion.by": who,
                "manual_promotion.at": at,
                "manual_promotion.why": why,
                "manual_promotion.replaced_version": old or "none",
            },
        )
        moved = _move_champion(settings, ref.version, aliases)
        _after_move(
            settings,
            ref.version,
            f"Champion: version {version} (promoted by hand by {who}, {at}: {why})",
            old,
            {"demotion.replaced_by": version, "demotion.at": at, "demotion.by": who, "demotion.why": why},
        )
    log.info("%s promoted version %s by hand (was %s): %s", who, version, old, why)
    return {**result, "changed": True, **moved}


def rollback(settings: Settings, *, who: str, why: str) -> dict[str, Any]:
    """Champion <- the rollback alias's version; the former champion becomes the rollback target.

    Who, when and why go into ``rollback.*`` tags on the restored version and ``demotion.*``
    tags on the former champion.
    """
    _require(who, why)
    with promotion_lock(settings):
        aliases = current_aliases(settings)
        target = aliases.get(settings.rollback_alias)
        if target is None:
            raise NoModelError(
                f"'{settings.model_name}' has no @{settings.rollback_alias} version to roll back to "
                f"(a promotion sets it); promote a version by hand instead (`wbc promote VERSION`)"
            )
        old = aliases.get(settings.champion_alias)
        at = _now()
        result = {"action": "rollback", "version": target, "by": who, "why": why, "at": at}
        if old == target:
            return {**result, "changed": False, "champion": target, "rollback": target}
        ref = _ready_ref(settings, target)
        _set_tags(
            settings,
            ref.version,
            {"rollback.by": who, "rollback.at": at, "rollback.why": why, "rollback.replaced_version": old or "none"},
        )
        moved = _move_champion(settings, ref.version, aliases)
        _after_move(
            settings,
            ref.version,
            f"Champion: version {target} (rolled back by {who}, {at}: {why})",
            old,
            {"demotion.replaced_by": target, "demotion.at": at, "demotion.by": who, "demotion.why": why},
        )
    log.info("%s rolled the champion back from version %s to %s: %s", who, old, target, why)
    return {**result, "changed": True, **moved}
