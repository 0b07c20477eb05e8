"""How far the calibrated model's confidence and flags can be trusted, measured on the test split.

On the untouched test split: calibration before and after temperature scaling (ECE, NLL, Brier,
each with a bootstrap 95 % interval) and a reliability diagram; the review reasons the policy
gives; coverage (share unflagged) and the accuracy of the unflagged (bootstrap interval, per
class); the blast flag's cost on non-blasts; and two kinds of images that must come out
flagged: corner mosaics of the test images (no white cell; recipe B, not the recipe the score
was fitted with) and generated frames that are no cell at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import BLAST_CLASS, REVIEW_REASONS, ReviewReason
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.image_checks import check_image, corner_mosaics, generated_non_cells
from wbc_tasks.data.store import open_store
from wbc_tasks.data.transforms import stain_outliers
from wbc_tasks.training.calibration import bootstrap_intervals, calibration_metrics, plot_reliability, softmax
from wbc_tasks.training.outputs import outputs_model, predict_all
from wbc_tasks.training.trust_policy import Assessment, TrustPolicy, assess, load_trust

log = logging.getLogger(__name__)

#: Generated non-cell frames of each kind measured.
NON_CELLS_PER_KIND = 20
#: Test images the corner mosaics are made from (all of a small test split).
MOSAIC_IMAGES = 600
#: The seed of the stain-shifted copies of the test images (the same copies for every model).
STAIN_SHIFT_SEED = 7


def _bootstrap_accuracy(correct: np.ndarray, seed: int = 0, n_boot: int = 1000) -> tuple[float, float] | None:
    if not len(correct):
        return None
    rng = np.random.default_rng(seed)
    draws = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(n_boot)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def flagged_share(reasons: list[list[str]]) -> float:
    return float(np.mean([bool(r) for r in reasons])) if reasons else 0.0


def _has(reasons: list[list[str]], reason: ReviewReason) -> np.ndarray:
    """Per image, whether ``reason`` is among its review reasons."""
    return np.array([reason in r for r in reasons], dtype=bool)


@dataclass
class _Checked:
    """What the model and the policy make of a batch of images: their outputs and the verdict."""

    outputs: dict[str, np.ndarray]
    verdict: Assessment


def _check(
    outputs: Any, images: np.ndarray, policy: TrustPolicy, stats: Any, settings: Settings, batch_size: int
) -> _Checked:
    """Predict ``images`` and assess them with the policy (image checks included)."""
    predicted = predict_all(outputs, images, batch_size)
    checks = [check_image(image, settings) for image in images]
    return _Checked(predicted, assess(predicted, checks, policy, stats, settings))


def _test_calibration(
    y: np.ndarray, before: np.ndarray, after: np.ndarray, out_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration measures before and after the temperature, their bootstrap intervals, and the
    reliability diagram ``reliability_test.png``."""
    calibration = {"before": calibration_metrics(before, y), "after": calibration_metrics(after, y)}
    intervals = {"before": bootstrap_intervals(before, y), "after": bootstrap_intervals(after, y)}
    plot_reliability(y, {"before calibration": before, "after calibration": after}, out_dir / "reliability_test.png")
    return calibration, intervals


def _per_class_coverage(
    index: dict[str, int], y: np.ndarray, unflagged: np.ndarray, correct: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per class with test images: how many, the share unflagged and the accuracy of those."""
    per_class = {}
    for name, i in index.items():
        mask = y == i
        if mask.any():
            kept = mask & unflagged
            per_class[name] = {
                "images": int(mask.sum()),
                "coverage": float(kept.sum() / mask.sum()),
                "unflagged_accuracy": float(correct[kept].mean()) if kept.any() else None,
            }
    return per_class


def _non_cells(
    outputs: Any,
    image_size: int,
    policy: TrustPolicy,
    stats: Any,
    settings: Settings,
    batch_size: int,
    blast: int | None,
) -> dict[str, Any]:
    """Per kind of generated non-cell frame: the share flagged and those called blasts unflagged."""
    non_cells: dict[str, Any] = {}
    for kind, batch in generated_non_cells(image_size, NON_CELLS_PER_KIND, seed=1).items():
        v = _check(outputs, batch, policy, stats, settings, batch_size).verdict
        called_blasts = v.probabilities.argmax(axis=1) == blast if blast is not None else np.zeros(len(batch), bool)
        non_cells[kind] = {
            "flagged_share": flagged_share(v.reasons),
            "called_blasts_unflagged": int(sum(c and not r for c, r in zip(called_blasts, v.reasons))),
        }
    return non_cells


def _blast_metrics(y: np.ndarray, predicted: np.ndarray, reasons: list[list[str]], blast: int) -> dict[str, float]:
    """The blast flag's cost (share of non-blasts flagged) and the share of blasts caught."""
    blast_flagged = _has(reasons, ReviewReason.BLAST_SUSPECTED)
    non_blasts = y != blast
    metrics = {"blast_flag_non_blast_share": float(blast_flagged[non_blasts].mean()) if non_blasts.any() else 0.0}
    blasts = y == blast
    if blasts.any():
        metrics["blasts_caught_share"] = float((blast_flagged | (predicted == blast))[blasts].mean())
    return metrics


def _write_review_reasons(
    path: Path, store: Any, class_names: tuple[str, ...], predicted: np.ndarray, verdict: Assessment
) -> None:
    """One row per test image: its path, true and predicted class, confidence, score and reasons."""
    pd.DataFrame(
        {
            "path": store.records["path"],
            "true": store.records["class"],
            "predicted": [class_names[i] for i in predicted],
            "confidence": verdict.probabilities.max(axis=1),
            "unfamiliar_score": verdict.unfamiliar_score,
            "review_reasons": [";".join(r) for r in verdict.reasons],
        }
    ).to_csv(path, index=False)


def evaluate_trust(
    model_path: Path,
    trust_dir: Path,
    test_store: Path,
    out_dir: Path,
    settings: Settings,
    *,
    class_names: tuple[str, ...],
    batch_size: int = 32,
) -> dict[str, Any]:
    """Measure the policy in ``trust_dir`` with the calibrated model on the test store.

    Writes ``trust_metrics.json``, ``reliability_test.png`` and ``test_review_reasons.csv`` in
    ``out_dir``; returns the flat headline numbers (for MLflow, version tags and the card) under
    ``metrics`` and the rest under ``detail``.
    """
    import keras

    policy, stats = load_trust(Path(trust_dir))
    if policy is None:
        raise FileNotFoundError(f"no trust policy in {trust_dir}")
    out_dir = Path(out_dir)
    store = open_store(Path(test_store))
    outputs = outputs_model(keras.models.load_model(model_path))
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[c] for c in store.records["class"]])
    images = np.asarray(store.images)
    test = _check(outputs, images, policy, stats, settings, batch_size)
    verdict = test.verdict
    after = verdict.probabilities
    before = softmax(test.outputs["logits"] * policy.temperature)  # the folded logits times T: the raw model
    calibration, intervals = _test_calibration(y, before, after, out_dir)

    predicted = after.argmax(axis=1)
    correct = predicted == y
    unflagged = np.array([not r for r in verdict.reasons])
    id_cost = _has(verdict.reasons, ReviewReason.UNFAMILIAR) | _has(verdict.reasons, ReviewReason.IMAGE_CHECK)
    blast = class_names.index(BLAST_CLASS) if BLAST_CLASS in class_names else None
    mosaics = corner_mosaics(images[: min(len(images), MOSAIC_IMAGES)])
    mosaic_reasons = _check(outputs, mosaics, policy, stats, settings, batch_size).verdict.reasons
    # The test images in stains well beyond the training labs' (a fixed seed: a candidate and its
    # champion are shown the same copies): an adaptation to one new lab must not make the model
    # trust every foreign stain.
    stained = stain_outliers(images[: min(len(images), MOSAIC_IMAGES)], np.random.default_rng(STAIN_SHIFT_SEED))
    stained_reasons = _check(outputs, stained, policy, stats, settings, batch_size).verdict.reasons
    non_cells = _non_cells(outputs, store.image_size, policy, stats, settings, batch_size, blast)

    metrics: dict[str, float] = {
        "ece": calibration["after"]["ece"],
        "nll": calibration["after"]["nll"],
        "brier": calibration["after"]["brier"],
        "ece_before_calibration": calibration["before"]["ece"],
        "nll_before_calibration": calibration["before"]["nll"],
        "temperature": policy.temperature,
        "review_threshold": policy.review_threshold,
        "coverage": float(unflagged.mean()),
        "unfamiliar_or_image_check_share": float(id_cost.mean()),
        "mosaics_flagged_share": flagged_share(mosaic_reasons),
        "mosaics_unfamiliar_share": float(np.mean(_has(mosaic_reasons, ReviewReason.UNFAMILIAR))),
        "stain_shifted_flagged_share": flagged_share(stained_reasons),
        "non_cells_flagged_share": float(np.mean([v["flagged_share"] for v in non_cells.values()])),
    }
    if unflagged.any():
        metrics["unflagged_accuracy"] = float(correct[unflagged].mean())
    if blast is not None:
        metrics.update(_blast_metrics(y, predicted, verdict.reasons, blast))
    detail = {
        "calibration": calibration,
        "calibration_intervals_95": intervals,
        "unflagged_accuracy_interval_95": _bootstrap_accuracy(correct[unflagged]),
        "per_class": _per_class_coverage(index, y, unflagged, correct),
        "reason_counts": {r: int(sum(r in rs for rs in verdict.reasons)) for r in REVIEW_REASONS},
        "non_cells": non_cells,
        "mosaic_images": len(mosaics),
        "unfamiliar_method": policy.unfamiliar_method,
    }
    _write_review_reasons(out_dir / "test_review_reasons.csv", store, class_names, predicted, verdict)
    write_json_atomic(out_dir / "trust_metrics.json", {"metrics": metrics, "detail": detail})
    log.info(
        "test calibration ECE %.3f -> %.3f, NLL %.3f -> %.3f; coverage %.2f with unflagged accuracy %.3f; "
        "unfamiliar/image-check on %.1f %% of test images, mosaics flagged %.1f %%, non-cells flagged %.1f %%",
        calibration["before"]["ece"],
        calibration["after"]["ece"],
        calibration["before"]["nll"],
        calibration["after"]["nll"],
        metrics["coverage"],
        metrics.get("unflagged_accuracy", float("nan")),
        100 * metrics["unfamiliar_or_image_check_share"],
        100 * metrics["mosaics_flagged_share"],
        100 * metrics["non_cells_flagged_share"],
    )
    return {"metrics": metrics, "detail": detail}
