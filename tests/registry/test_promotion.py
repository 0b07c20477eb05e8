"""Champion/challenger promotion: the pure decision table, then the alias moves and their records
against a real MLflow registry (SQLite in a tmp folder)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.registry.decision import KEPT_CHAMPION, PROMOTED, REJECTED, PromotionConflict, decide_promotion
from wbc_tasks.registry.promotion import apply_decision, promote_if_better, promote_version, rollback
from wbc_tasks.registry.tags import metric_tags
from wbc_tasks.registry.versions import (
    NoModelError,
    current_aliases,
    model_ref_from_version,
)

# A margin exact in binary, so the "exactly the margin" case is a true tie.
FLOORS = {
    "metric": "balanced_accuracy",
    "margin": 0.0625,
    "min_metric": 0.5,
    "min_class_recall": 0.3,
    "min_blast_recall": 0.8,
}


def metrics(balanced: float, *, blasts: float = 0.9, others: float = 0.7, **overrides: float) -> dict:
    recall = {"blasts": blasts, "neutrophils": others, "lymphocytes": others, "monocytes": others}
    recall.update(overrides)
    return {"balanced_accuracy": balanced, "accuracy": balanced, "recall": recall, "support": {c: 5 for c in recall}}


# ------------------------------------------------------------------ the pure decision


@pytest.mark.parametrize(
    ("candidate", "champion", "outcome", "reason_has"),
    [
        (metrics(0.6), None, PROMOTED, "no champion yet"),
        (metrics(0.45), None, REJECTED, "min_metric"),
        (metrics(0.8, monocytes=0.2), None, REJECTED, "recall of monocytes 0.2000 is below the floor 0.3000"),
        (
            metrics(0.8, blasts=0.75),
            metrics(0.5),
            REJECTED,
            "recall of blasts 0.7500 is below the floor 0.8000 (min_blast_recall)",
        ),
        (metrics(0.70), metrics(0.75), KEPT_CHAMPION, "does not beat"),
        (metrics(0.75), metrics(0.75), KEPT_CHAMPION, "does not beat"),  # a tie keeps the champion
        (metrics(0.78), metrics(0.75), KEPT_CHAMPION, "margin 0.0625"),  # better, but within the margin
        (metrics(0.8125), metrics(0.75), KEPT_CHAMPION, "does not beat"),  # exactly the margin: still a tie
        (metrics(0.85), metrics(0.75), PROMOTED, "beats champion version 3"),
        (metrics(0.85, blasts=0.75), metrics(0.75), REJECTED, "min_blast_recall"),  # wins, yet a floor fails
    ],
)
def test_decide_promotion_table(candidate, champion, outcome, reason_has):
    decision = decide_promotion(candidate, champion, champion_version="3" if champion else None, **FLOORS)
    assert decision.outcome == outcome
    assert decision.promote is (outcome == PROMOTED)
    assert reason_has in decision.reason
    assert decision.candidate_value == candidate["balanced_accuracy"]
    assert decision.champion_value == (champion["balanced_accuracy"] if champion else None)
    assert bool(decision.failed_floors) is (outcome == REJECTED)


def test_classes_without_test_images_are_not_held_to_the_floor():
    candidate = metrics(0.8, myelocytes=0.0)
    candidate["support"]["myelocytes"] = 0
    assert decide_promotion(candidate, None, champion_version=None, **FLOORS).promote
    candidate["support"]["myelocytes"] = 2
    rejected = decide_promotion(candidate, None, champion_version=None, **FLOORS)
    assert rejected.failed_floors == ("recall of myelocytes 0.0000 is below the floor 0.3000 (min_class_recall)",)


def test_blasts_absent_from_test_skips_the_blast_floor():
    candidate = metrics(0.8)
    del candidate["recall"]["blasts"], candidate["support"]["blasts"]
    assert decide_promotion(candidate, None, champion_version=None, **FLOORS).promote


def test_decision_needs_the_numbers():
    with pytest.raises(ValueError, match="no 'macro_f1'"):
        decide_promotion(metrics(0.8), None, champion_version=None, **{**FLOORS, "metric": "macro_f1"})
    with pytest.raises(ValueError, match="per-class recall"):
        decide_promotion({"balanced_accuracy": 0.9}, None, champion_version=None, **FLOORS)
    with pytest.raises(ValueError, match="without its metrics"):
        decide_promotion(metrics(0.8), None, champion_version="2", **FLOORS)


def test_calibration_ceiling_is_off_by_default_and_recorded_either_way():
    candidate = {**metrics(0.8), "ece": 0.12, "ece_before_calibration": 0.2, "coverage": 0.6}
    passed = decide_promotion(candidate, None, champion_version=None, **FLOORS)
    assert passed.promote and passed.candidate_trust == {"ece": 0.12, "ece_before_calibration": 0.2, "coverage": 0.6}
    assert passed.as_tags("now")["promotion.candidate_ece"] == "0.12"
    capped = decide_promotion(candidate, None, champion_version=None, **FLOORS, max_ece=0.1)
    assert capped.outcome == REJECTED and "ECE) 0.1200 is above the ceiling 0.1000 (max_ece)" in capped.reason
    assert decide_promotion(metrics(0.8), None, champion_version=None, **FLOORS, max_ece=0.1).failed_floors == (
        "no calibration error recorded, and max_ece 0.100 is set",
    )


# ------------------------------------------------------------------ against a real registry


def add_version(settings, test_metrics: dict):
    """A registered version with this project's tags and test-metric tags. Promotion never loads
    the model, so the version points at an empty folder instead of a logged model (fast)."""
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.client import configure_mlflow

    client = configure_mlflow(settings)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(settings.model_name)
    source = settings.home / "fake-model"
    source.mkdir(parents=True, exist_ok=True)
    tags = {"image_size": "32", "class_names": json.dumps(list(CLASS_NAMES)), **metric_tags(test_metrics)}
    version = client.create_model_version(settings.model_name, source.as_uri(), tags=tags)
    return model_ref_from_version(settings, client.get_model_version(settings.model_name, version.version))


def tags_of(settings, version: str) -> dict[str, str]:
    from wbc_tasks.registry.client import configure_mlflow

    return configure_mlflow(settings).get_model_version(settings.model_name, version).tags


def test_promotion_sequence_moves_and_records(mlflow_settings):
    s = mlflow_settings
    scores = {}

    def champion_metrics(ref):
        return scores[ref.version]

    v1, v2, v3 = (add_version(s, metrics(b)) for b in (0.70, 0.80, 0.75))
    scores.update({v1.version: metrics(0.70), v2.version: metrics(0.80), v3.version: metrics(0.75)})

    first = promote_if_better(s, v1, metrics(0.70), champion_metrics, **FLOORS)
    assert first["outcome"] == PROMOTED and first["champion"] == v1.version
    assert current_aliases(s) == {s.champion_alias: v1.version}, "no rollback target before a second champion"

    second = promote_if_better(s, v2, metrics(0.80), champion_metrics, **FLOORS)
    assert second["outcome"] == PROMOTED
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}
    tags = tags_of(s, v2.version)
    assert tags["promotion.decision"] == PROMOTED and tags["promotion.compared_with_version"] == v1.version
    assert float(tags["promotion.candidate_value"]) == 0.80 and float(tags["promotion.champion_value"]) == 0.70
    assert tags["promotion.metric"] == "balanced_accuracy" and tags["promotion.decided_at"].startswith("20")
    assert tags_of(s, v1.version)["demotion.replaced_by"] == v2.version

    # Loses: aliases untouched, the decision recorded with the champion's number it lost to.
    third = promote_if_better(s, v3, metrics(0.75), champion_metrics, **FLOORS)
    assert third["outcome"] == KEPT_CHAMPION
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}
    tags = tags_of(s, v3.version)
    assert tags["promotion.decision"] == KEPT_CHAMPION and "does not beat" in tags["promotion.reason"]
    assert tags["promotion.compared_with_version"] == v2.version and float(tags["promotion.champion_value"]) == 0.80

    # A retried promote task of the winner changes nothing.
    assert promote_if_better(s, v2, metrics(0.80), champion_metrics, **FLOORS)["outcome"] == "already_champion"
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}

    from wbc_tasks.registry.client import configure_mlflow

    card = configure_mlflow(s).get_registered_model(s.model_name).description
    assert card.startswith(f"**Champion: version {v2.version}")


def test_floor_rejection_is_recorded_without_evaluating_the_champion(mlflow_settings):
    s = mlflow_settings
    champion = add_version(s, metrics(0.6))
    promote_version(s, champion.version, who="tester", why="seed a champion")
    weak = add_version(s, metrics(0.95, blasts=0.5))
    evaluated = []
    result = promote_if_better(s, weak, metrics(0.95, blasts=0.5), lambda ref: evaluated.append(ref) or {}, **FLOORS)
    assert result["outcome"] == REJECTED and not evaluated
    tags = tags_of(s, weak.version)
    assert tags["promotion.decision"] == REJECTED and "min_blast_recall" in tags["promotion.reason"]
    assert json.loads(tags["promotion.failed_floors"]) == [
        "recall of blasts 0.5000 is below the floor 0.8000 (min_blast_recall)"
    ]
    assert tags["promotion.compared_with_version"] == champion.version
    assert current_aliases(s) == {s.champion_alias: champion.version}


def test_manual_promote_and_rollback_record_who_when_why(mlflow_settings):
    s = mlflow_settings
    v1, v2 = add_version(s, metrics(0.7)), add_version(s, metrics(0.6))
    with pytest.raises(NoModelError, match=f"no @{s.rollback_alias}"):
        rollback(s, who="ana", why="nothing to roll back to")

    promote_version(s, v1.version, who="ana", why="first model")
    moved = promote_version(s, v2.version, who="ben", why="better on the new stain")
    assert moved["changed"] and moved["previous_champion"] == v1.version
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}
    tags = tags_of(s, v2.version)
    assert (tags["manual_promotion.by"], tags["manual_promotion.why"]) == ("ben", "better on the new stain")
    assert tags["manual_promotion.replaced_version"] == v1.version and tags["manual_promotion.at"].startswith("20")
    assert tags_of(s, v1.version)["demotion.by"] == "ben"
    assert moved["metrics"]["balanced_accuracy"] == 0.6

    back = rollback(s, who="cat", why="blasts missed in review")
    assert back["changed"] and back["version"] == v1.version
    assert current_aliases(s) == {s.champion_alias: v1.version, s.rollback_alias: v2.version}
    tags = tags_of(s, v1.version)
    assert (tags["rollback.by"], tags["rollback.why"], tags["rollback.replaced_version"]) == (
        "cat",
        "blasts missed in review",
        v2.version,
    )
    assert tags_of(s, v2.version)["demotion.why"] == "blasts missed in review"
    # Rolling back again swaps them back: the former champion is always the rollback target.
    rollback(s, who="cat", why="undo")
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}

    with pytest.raises(ValueError, match="why"):
        promote_version(s, v1.version, who="ana", why=" ")
    with pytest.raises(NoModelError, match="no version 99"):
        promote_version(s, "99", who="ana", why="typo")


def test_stale_decision_is_refused(mlflow_settings):
    s = mlflow_settings
    v1, v2 = add_version(s, metrics(0.7)), add_version(s, metrics(0.9))
    decision = decide_promotion(metrics(0.9), None, champion_version=None, **FLOORS)
    promote_version(s, v1.version, who="ana", why="meanwhile")  # the champion changed after deciding
    with pytest.raises(PromotionConflict, match="decide again"):
        apply_decision(s, v2, decision)
    assert current_aliases(s) == {s.champion_alias: v1.version}
    assert "promotion.decision" not in tags_of(s, v2.version)


def test_failed_alias_move_leaves_no_half_promotion(mlflow_settings, monkeypatch):
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry import promotion

    s = mlflow_settings
    v1, v2, v3 = (add_version(s, metrics(b)) for b in (0.6, 0.7, 0.9))
    promote_version(s, v1.version, who="ana", why="one")
    promote_version(s, v2.version, who="ana", why="two")
    before = current_aliases(s)
    real_point = promotion._point_alias
    failures = []

    def champion_move_fails(settings, alias, version):
        # Fault injection: the registry refuses the champion move (after the rollback alias moved).
        if alias == s.champion_alias and version == v3.version:
            failures.append(version)
            raise MlflowException("registry went away")
        real_point(settings, alias, version)

    monkeypatch.setattr(promotion, "_point_alias", champion_move_fails)
    with pytest.raises(MlflowException, match="registry went away"):
        promote_if_better(s, v3, metrics(0.9), lambda ref: metrics(0.7), **FLOORS)
    assert failures and current_aliases(s) == before, "both aliases are put back"
    tags = tags_of(s, v3.version)
    assert tags["promotion.decision"] == "error" and "aliases were put back" in tags["promotion.reason"]


def test_simultaneous_promotions_end_with_the_better_champion(mlflow_settings):
    """Two runs finish together; the slower champion evaluation belongs to the WORSE candidate,
    so without serialisation it would finish last and overwrite the better one."""
    s = mlflow_settings
    v0, worse, better = (add_version(s, metrics(b)) for b in (0.60, 0.70, 0.80))
    promote_version(s, v0.version, who="ana", why="baseline")
    scores = {v0.version: metrics(0.60), worse.version: metrics(0.70), better.version: metrics(0.80)}
    start = threading.Barrier(2)
    results, errors = {}, []

    def run(candidate, delay):
        def champion_metrics(ref):
            time.sleep(delay)
            return scores[ref.version]

        try:
            start.wait()
            results[candidate.version] = promote_if_better(
                s, candidate, scores[candidate.version], champion_metrics, **FLOORS
            )
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(worse, 1.5)), threading.Thread(target=run, args=(better, 0.2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert current_aliases(s)[s.champion_alias] == better.version
    outcome = {v: r["outcome"] for v, r in results.items()}
    if outcome[worse.version] == PROMOTED:  # the worse one got the lock first ...
        assert results[better.version]["compared_with_version"] == worse.version  # ... and was compared with
        assert current_aliases(s)[s.rollback_alias] == worse.version
    else:
        assert outcome == {worse.version: KEPT_CHAMPION, better.version: PROMOTED}
        assert results[worse.version]["compared_with_version"] == better.version


def test_a_version_without_its_registration_tags_is_never_promoted(mlflow_settings):
    """A version whose registration stopped before tagging (no image size, no class names) does
    not become champion, however good its numbers."""
    from dataclasses import replace

    from wbc_tasks.registry.client import configure_mlflow

    s = mlflow_settings
    v1 = add_version(s, metrics(0.7))
    promote_version(s, v1.version, who="ana", why="baseline")
    bare = configure_mlflow(s).create_model_version(s.model_name, (s.home / "fake-model").as_uri())
    with pytest.raises(NoModelError, match="lacks the 'image_size'"):
        promote_if_better(s, replace(v1, version=str(bare.version)), metrics(0.9), lambda ref: metrics(0.7), **FLOORS)
    assert current_aliases(s) == {s.champion_alias: v1.version}
    assert "promotion.decision" not in tags_of(s, str(bare.version))
