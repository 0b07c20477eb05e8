"""What a lab sees of its model learning its reviews: the review counts, the backlog since the last
adaptation and the trigger, the requests, and the newest versions with what they learned and their
promotion record read back from a real registry; the review half still answers when the registry
cannot be read. SQLite and PostgreSQL for the predictions database, a real MLflow for the registry."""

from __future__ import annotations

import json

from tests.conftest import free_port
from tests.serving.conftest import KNOWN_DROP, add_known_drop, register_tiny_model
from wbc_tasks.registry.client import configure_mlflow
from wbc_tasks.registry.decision import KEPT_CHAMPION, TWO_GROUP_RULE, PromotionDecision
from wbc_tasks.registry.paired_comparison import PairedGroup
from wbc_tasks.registry.promotion import apply_decision
from wbc_tasks.registry.tags import TAG_INIT_FROM_VERSION, TAG_REVIEWED_IMAGES
from wbc_tasks.serving.adaptation_requests import record_training_on_reviews, review_backlog
from wbc_tasks.serving.lab_learning import learning_status
from wbc_tasks.serving.review_decisions import record_review


def _group(name: str, images: int, candidate_right: int, champion_right: int) -> PairedGroup:
    return PairedGroup(
        name=name,
        images=images,
        candidate_accuracy=candidate_right / images,
        champion_accuracy=champion_right / images,
        candidate_balanced_accuracy=0.5,
        champion_balanced_accuracy=0.6,
        candidate_only=2,
        champion_only=1,
        mcnemar_p=1.0,
        difference_low=-0.2,
        difference_high=0.05,
    )


def test_the_lab_sees_its_reviews_the_backlog_and_each_version_with_what_it_learned_and_why(db_settings):
    settings = db_settings.with_overrides(adapt_after_reviews=3)
    add_known_drop(settings)
    for cell, reviewer in [("n1", "tech"), ("l1", "tech"), ("n1", "anna"), ("o1", "anna")]:
        record_review(settings, f"{KNOWN_DROP}/{cell}.jpg", "monocytes", reviewer=reviewer)
    record_training_on_reviews(settings, "manual__adapt-1", review_backlog(settings))
    record_review(settings, f"{KNOWN_DROP}/x1.jpg", "blasts", reviewer="tech")

    champion = register_tiny_model(settings, seed=1, alias="champion")
    candidate = register_tiny_model(settings, seed=2)
    client = configure_mlflow(settings)
    client.set_model_version_tag(settings.model_name, candidate.version, TAG_REVIEWED_IMAGES, '{"test": 1, "train": 3}')
    client.set_model_version_tag(settings.model_name, candidate.version, TAG_INIT_FROM_VERSION, champion.version)
    reason = "not better on the lab's reviewed images: (the evidence)"
    decision = PromotionDecision(
        promote=False,
        outcome=KEPT_CHAMPION,
        reason=reason,
        metric="balanced_accuracy",
        candidate_value=0.5,
        champion_version=champion.version,
        champion_value=0.6,
        margin=0.0,
        rule=TWO_GROUP_RULE,
        groups={
            "labelled_test": _group("labelled_test", 40, 20, 24).as_dict(),
            "reviewed_test": _group("reviewed_test", 12, 9, 8).as_dict(),
        },
    )
    apply_decision(settings, candidate, decision)

    status = learning_status(settings)

    assert (status.reviews, status.reviewed_cells, status.reviewers) == (5, 4, 2)
    assert (status.since_last_adaptation, status.adapt_after_reviews) == (1, 3)
    assert [(r["kind"], r["reviews"], r["run_id"]) for r in status.requests] == [("training", 4, "manual__adapt-1")]
    assert status.registry_error is None
    newest, first = status.versions
    assert (newest["version"], first["version"]) == (candidate.version, champion.version)
    assert first["aliases"] == ["champion"] and first["decision"] is None and first["reviewed_images"] is None
    assert newest["reviewed_images"] == {"test": 1, "train": 3} and newest["init_from_version"] == champion.version
    recorded = newest["decision"]
    assert (recorded["outcome"], recorded["rule"], recorded["reason"]) == (KEPT_CHAMPION, TWO_GROUP_RULE, reason)
    assert recorded["compared_with_version"] == champion.version
    assert recorded["groups"]["reviewed_test"] == json.loads(json.dumps(decision.groups["reviewed_test"]))
    assert newest["registered_at"] >= first["registered_at"]
    # The page and the API serve it as JSON.
    assert json.loads(json.dumps(status.as_dict(), default=str))["versions"][0]["version"] == candidate.version


def test_the_reviews_still_answer_when_the_registry_cannot_be_read(db_settings):
    unreachable = f"http://127.0.0.1:{free_port()}"
    settings = db_settings.with_overrides(mlflow_tracking_uri=unreachable, mlflow_retries=0, mlflow_http_retries=0)
    add_known_drop(settings)
    record_review(settings, f"{KNOWN_DROP}/n1.jpg", "neutrophils", reviewer="tech")

    status = learning_status(settings, versions=3)

    assert (status.reviews, status.since_last_adaptation, status.versions) == (1, 1, [])
    assert status.registry_error and "could not be read" in status.registry_error
