"""Drift per drop: measures and alerts from the predictions database (SQLite and PostgreSQL),
with a policy whose limits are known, and the alert posted to a real local HTTP endpoint."""

from __future__ import annotations

import hashlib

import pytest

from tests.local_servers import Webhook
from tests.serving.conftest import make_prediction, make_seen
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.drift import drift_alert_details, drift_by_drop
from wbc_tasks.training.trust_policy import TrustPolicy

REF = ModelRef("wbc-classifier", "1", "run1", "models:/wbc-classifier/1", 32, CLASS_NAMES)
MIX = {c: 1 / len(CLASS_NAMES) for c in CLASS_NAMES}


def _policy() -> TrustPolicy:
    return TrustPolicy(
        class_names=list(CLASS_NAMES),
        temperature=1.0,
        review_threshold=0.5,
        review_target_accuracy=0.95,
        blast_flag_probability=0.3,
        blast_recall_target=0.95,
        unfamiliar_method="mahalanobis",
        unfamiliar_threshold=3.0,
        unfamiliar_rate=0.05,
        standardiser={"centre": {}, "scale": {}},
        training_class_mix=MIX,
        drift={"max_class_mix_divergence": 0.2, "min_mean_confidence": 0.6, "max_unfamiliar_share": 0.15},
    )


def _write_drop(url: str, drop: str, classes: list[int], *, confidence=0.9, unfamiliar=0, rejected=0, run="night"):
    preds, seen, rejections = [], [], []
    for i, best in enumerate(classes):
        sha = hashlib.sha256(f"{drop}/{i}".encode()).hexdigest()
        reasons = ["unfamiliar"] if i < unfamiliar else []
        row = make_prediction(sha, best=best, confidence=confidence, reasons=reasons)
        preds.append(row)
        seen.append({**make_seen(f"{drop}/{i}.jpg", sha, drop), "dag_run_id": run})
    for i in range(rejected):
        sha = hashlib.sha256(f"{drop}/bad{i}".encode()).hexdigest()
        seen.append({**make_seen(f"{drop}/bad{i}.jpg", sha, drop), "dag_run_id": run})
        rejections.append(
            {
                "path": f"{drop}/bad{i}.jpg",
                "sha256": sha,
                "reason": "corrupt",
                "created_at": db.utcnow(),
                "dag_run_id": run,
            }
        )
    with db.open_engine(url) as engine, engine.begin() as connection:
        write_rows(connection, predictions=preds)
        write_rows(connection, seen=seen)
        write_rows(connection, rejections=rejections)


def test_each_drop_is_measured_against_the_versions_limits(db_settings):
    url = db_settings.predictions_db_url
    db.upgrade_database(url)
    familiar = [i % 9 for i in range(90)]  # the training mix exactly
    _write_drop(url, "familiar", familiar)
    _write_drop(url, "one-class", [8] * 60)  # all neutrophils: a shifted class mix
    _write_drop(url, "small", [8] * 20)  # too small for a class-mix alert
    _write_drop(url, "strange", familiar, confidence=0.5, unfamiliar=40)
    _write_drop(url, "broken", familiar[:30], rejected=20)
    _write_drop(url, "other-run", [8] * 60, run="another night")  # not this run's

    drops = {d["drop"]: d for d in drift_by_drop(db_settings, "night", REF, _policy())}

    assert set(drops) == {"familiar", "one-class", "small", "strange", "broken"}
    assert drops["familiar"]["alerts"] == [] and drops["familiar"]["class_mix_divergence"] == pytest.approx(0, abs=1e-9)
    assert drops["one-class"]["class_mix_divergence"] > 0.2
    assert [a.split(" (")[0] for a in drops["one-class"]["alerts"]] == ["class mix unlike the training labs'"]
    assert drops["small"]["images"] == 20 and drops["small"]["alerts"] == []
    assert len(drops["strange"]["alerts"]) == 2  # mean confidence and unfamiliar share
    assert drops["strange"]["unfamiliar_share"] == pytest.approx(40 / 90)
    assert drops["broken"]["rejected_share"] == pytest.approx(20 / 50)
    assert any("rejected" in a for a in drops["broken"]["alerts"])
    # Without a policy (an old version) only the rejected share is judged.
    bare = {d["drop"]: d for d in drift_by_drop(db_settings, "night", REF, None)}
    assert [d for d, e in bare.items() if e["alerts"]] == ["broken"]


def test_drift_alert_reaches_a_webhook(db_settings):
    from wbc_tasks.ops.alerts import send_alert

    hook = Webhook()
    try:
        drifted = [{"drop": "2026-12-01", "alerts": ["90% of images unfamiliar (limit 12%)"]}]
        outcome = send_alert(
            db_settings.with_overrides(alert_webhook_url=hook.url), drift_alert_details("night", drifted)
        )
    finally:
        hook.close()
    assert outcome == {"webhook": "sent"}
    posted = hook.posts[0]["json"]
    assert posted["event"] == "drift" and "2026-12-01" in posted["text"] and "unfamiliar" in posted["text"]


def test_the_unfamiliar_limit_is_chance_or_the_spread_between_specimens_whichever_is_larger():
    from scipy.stats import binom

    from wbc_tasks.serving.drift import _unfamiliar_limit

    limits = {"max_unfamiliar_share": 0.16, "validation_unfamiliar_share": 0.05}
    # 100 images: the binomial allows 13 %, patients' differing class mixes 16 %.
    assert binom.ppf(0.999, 100, 0.05) / 100 < 0.16
    assert _unfamiliar_limit(limits, 100) == 0.16
    # 10 images: chance alone allows far more.
    assert _unfamiliar_limit(limits, 10) == binom.ppf(0.999, 10, 0.05) / 10 > 0.16
    # A policy from before the validation share was stored: the simulated limit.
    assert _unfamiliar_limit({"max_unfamiliar_share": 0.2}, 40) == 0.2
