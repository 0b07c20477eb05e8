"""Drift per drop: does tonight's drop look like the images the model was trained on?

For every drop a classification run touched, from the predictions of the run's model version:
the class mix against the class mix of the version's labelled training split (Jensen-Shannon
divergence; drops under ``WBC_DRIFT_MIN_IMAGES`` classified images raise no class-mix alert),
the mean calibrated confidence, the share flagged unfamiliar and the share of files rejected.
The limits come from the version's trust policy (fitted on 100-image draws from its validation
split, never on another lab's images) and, for rejections, ``WBC_DRIFT_MAX_REJECTED_SHARE``: a
drop from a new scanner raises a flag the first night.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from sqlalchemy import and_, select

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db

log = logging.getLogger(__name__)


def _drop_rows(settings: Settings, run_id: str, ref: ModelRef) -> dict[str, dict[str, Any]]:
    """Per drop touched by ``run_id``: its files' predictions by ``ref`` and rejections."""
    fs, p, r = db.files_seen, db.predictions, db.rejections
    query = (
        select(fs.c.drop, fs.c.sha256, p.c.predicted_class, p.c.confidence, p.c.review_reasons, r.c.reason)
        .select_from(fs)
        .outerjoin(
            p,
            and_(p.c.sha256 == fs.c.sha256, p.c.model_name == ref.name, p.c.model_version == str(ref.version)),
        )
        .outerjoin(r, and_(r.c.path == fs.c.path, r.c.sha256 == fs.c.sha256))
        .where(fs.c.dag_run_id == run_id)
    )
    with db.open_engine(settings.predictions_db_url) as engine:
        rows = db.read_with_retries(settings, engine, lambda c: c.execute(query).all(), what="reading drops for drift")
    drops: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    for drop, sha, predicted, confidence, reasons, rejected in rows:
        d = drops.setdefault(drop, {"classes": Counter(), "confidence": [], "unfamiliar": 0, "rejected": 0, "files": 0})
        d["files"] += 1
        if rejected is not None:
            d["rejected"] += 1
        elif predicted is not None and (drop, sha) not in seen:  # copies of one image count once
            seen.add((drop, sha))
            d["classes"][predicted] += 1
            d["confidence"].append(float(confidence))
            d["unfamiliar"] += int("unfamiliar" in (reasons or []))
    return drops


def _unfamiliar_limit(limits: dict[str, float], n: int) -> float:
    """The unfamiliar share a familiar drop of ``n`` images stays under 999 times in 1000: the
    larger of a binomial quantile at the validation images' own share (chance, which shrinks as
    ``n`` grows) and the quantile over simulated 100-image specimens (a drop is one patient, and
    its class mix, hence its unfamiliar share, varies with the patient; a binomial alone raised a
    false alert on a training lab's drop with three times the training split's blasts)."""
    from scipy.stats import binom

    from wbc_tasks.training.drift_limits import DRIFT_QUANTILE

    specimens = float(limits["max_unfamiliar_share"])
    rate = limits.get("validation_unfamiliar_share")
    if rate is None:
        return specimens
    return max(float(binom.ppf(DRIFT_QUANTILE, n, max(rate, 1e-3)) / n), specimens)


def drift_by_drop(settings: Settings, run_id: str, ref: ModelRef, policy: Any | None) -> list[dict[str, Any]]:
    """Drift measures and alerts of every drop ``run_id`` touched (empty without a policy, except
    the rejected share, which needs none)."""
    import numpy as np

    from wbc_tasks.training.drift_limits import jensen_shannon

    out = []
    for drop, d in sorted(_drop_rows(settings, run_id, ref).items()):
        n = sum(d["classes"].values())
        rejected_share = d["rejected"] / d["files"] if d["files"] else 0.0
        entry: dict[str, Any] = {
            "drop": drop,
            "images": n,
            "files": d["files"],
            "rejected_share": rejected_share,
            "mean_confidence": float(np.mean(d["confidence"])) if n else None,
            "unfamiliar_share": d["unfamiliar"] / n if n else None,
            "class_mix_divergence": None,
            "alerts": [],
        }
        if rejected_share > settings.drift_max_rejected_share:
            entry["alerts"].append(
                f"{rejected_share:.0%} of files rejected (limit {settings.drift_max_rejected_share:.0%}, "
                "WBC_DRIFT_MAX_REJECTED_SHARE)"
            )
        if policy is not None and n:
            limits = policy.drift
            mix = np.array([policy.training_class_mix.get(c, 0.0) for c in policy.class_names])
            counts = np.array([d["classes"].get(c, 0) for c in policy.class_names], dtype=float)
            entry["class_mix_divergence"] = jensen_shannon(counts / counts.sum(), mix)
            if n >= settings.drift_min_images and entry["class_mix_divergence"] > limits["max_class_mix_divergence"]:
                entry["alerts"].append(
                    f"class mix unlike the training labs' (divergence {entry['class_mix_divergence']:.3f} > "
                    f"{limits['max_class_mix_divergence']:.3f})"
                )
            if entry["mean_confidence"] < limits["min_mean_confidence"]:
                entry["alerts"].append(
                    f"mean confidence {entry['mean_confidence']:.2f} < {limits['min_mean_confidence']:.2f}"
                )
            unfamiliar_limit = _unfamiliar_limit(limits, n)
            entry["max_unfamiliar_share"] = unfamiliar_limit
            if entry["unfamiliar_share"] > unfamiliar_limit:
                entry["alerts"].append(
                    f"{entry['unfamiliar_share']:.0%} of images unfamiliar "
                    f"(limit {unfamiliar_limit:.0%} for {n} images)"
                )
        if entry["alerts"]:
            log.warning("drift in drop %r (%d images): %s", drop, n, "; ".join(entry["alerts"]))
        else:
            log.info(
                "drop %r: %d images, no drift (divergence %s, mean confidence %s, unfamiliar %s, rejected %.0f%%)",
                drop,
                n,
                "n/a" if entry["class_mix_divergence"] is None else f"{entry['class_mix_divergence']:.3f}",
                "n/a" if entry["mean_confidence"] is None else f"{entry['mean_confidence']:.2f}",
                "n/a" if entry["unfamiliar_share"] is None else f"{entry['unfamiliar_share']:.0%}",
                100 * rejected_share,
            )
        out.append(entry)
    return out


def drift_alert_details(run_id: str, drifted: list[dict[str, Any]]) -> dict[str, Any]:
    """An alert (the shape :func:`wbc_tasks.ops.alerts.send_alert` sends) for drifted drops."""
    from datetime import UTC, datetime

    names = ", ".join(repr(d["drop"]) for d in drifted)
    reason = "; ".join(f"{d['drop']!r}: " + ", ".join(d["alerts"]) for d in drifted)
    return {
        "event": "drift",
        "dag_id": DagId.NIGHTLY.value,
        "run_id": run_id,
        "task_id": "summarise",
        "reason": reason,
        "drops": drifted,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "text": f"WBC: drift in drop(s) {names} in run {run_id}: {reason}"[:500],
    }
