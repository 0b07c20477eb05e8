"""Fitting a version's trust policy: :func:`calibrate_model` (the DAG's ``calibrate`` task) predicts
the validation, training and synthetic negative sets, :func:`fit_trust` fits the policy from those
outputs (temperature: :mod:`.calibration`; review threshold and blast flag: :mod:`.review_thresholds`;
drift limits: :mod:`.drift_limits`; unfamiliar score: :mod:`.unfamiliar`), and the calibrated model,
``trust/`` and its plots are written. What serving applies lives in :mod:`.trust_policy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wbc_tasks.core.vocabulary import BLAST_CLASS
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.image_checks import colour_shifts, corner_crops
from wbc_tasks.data.store import ImageStore, open_store
from wbc_tasks.training import unfamiliar as uf
from wbc_tasks.training.calibration import (
    calibration_metrics,
    fit_temperature,
    fold_temperature,
    softmax,
    temperature_worth_keeping,
)
from wbc_tasks.training.drift_limits import fit_drift_limits
from wbc_tasks.training.input import reviewed_rows
from wbc_tasks.training.outputs import outputs_model, predict_all
from wbc_tasks.training.review_thresholds import (
    blast_probability_for_recall,
    review_threshold_by_count,
    review_threshold_for_accuracy,
    risk_coverage,
)
from wbc_tasks.training.trust_plots import write_trust_plots
from wbc_tasks.training.trust_policy import FEATURES_FILE, TRUST_ARTIFACT_PATH, TrustPolicy

log = logging.getLogger(__name__)

#: Training images per class whose features the class means are taken from (bounds the time).
FEATURE_IMAGES_PER_CLASS = 400
#: Validation images the synthetic negatives are made from; as many training images give the
#: cell-free crops whose mean the ``cell_free`` score measures against.
NEGATIVE_SOURCE_IMAGES = 400


def _kept_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, dict[str, Any]]:
    """The temperature fitted on the validation logits, and the one kept (1.0 when the fitted one
    does not beat its noise), with the guard's verdict: (kept, fitted, guard)."""
    fitted = fit_temperature(logits, labels)
    guard = temperature_worth_keeping(logits, labels, fitted)
    if not guard["keep"]:
        log.info(
            "temperature %.3f not kept (validation NLL gain %.4f, standard error %.4f: within noise); T = 1",
            fitted,
            guard["nll_gain"],
            guard["nll_gain_standard_error"],
        )
    return (fitted if guard["keep"] else 1.0), fitted, guard


@dataclass
class _UnfamiliarFit:
    """The unfamiliar score fitted for one version: its statistics, standardiser, chosen method
    and threshold, the AUROCs it was chosen by and the validation images it flags."""

    stats: uf.FeatureStatistics
    standardiser: Any
    method: str
    threshold: float
    aurocs: dict[str, Any]
    flagged_validation: np.ndarray


def _fit_unfamiliar(
    val: dict[str, np.ndarray],
    train: dict[str, np.ndarray],
    train_labels: np.ndarray,
    negatives: dict[str, dict[str, np.ndarray]],
    cell_free: dict[str, np.ndarray] | None,
    n_classes: int,
    temperature: float,
    unfamiliar_rate: float,
    train_reviewed: np.ndarray | None = None,
) -> _UnfamiliarFit:
    """Feature statistics from the training outputs, the standardiser from the validation ones,
    the method separating validation images best from the negatives, and its threshold."""

    def calibrated_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**outputs, "logits": outputs["logits"] / temperature}

    stats = uf.fit_feature_statistics(
        train["top"],
        train["low"],
        train_labels,
        n_classes,
        cell_free_top=None if cell_free is None else cell_free["top"],
        reviewed=train_reviewed,
    )
    standard = uf.fit_standardiser(uf.raw_scores(calibrated_outputs(val), stats))
    val_scores = uf.scores(calibrated_outputs(val), stats, standard)
    negative_scores = {name: uf.scores(calibrated_outputs(o), stats, standard) for name, o in negatives.items()}
    method, aurocs = uf.choose_method(val_scores, negative_scores)
    threshold = uf.threshold_for_rate(val_scores[method], unfamiliar_rate)
    return _UnfamiliarFit(stats, standard, method, threshold, aurocs, val_scores[method] > threshold)


def _blast_flag_probability(
    calibrated: np.ndarray, val_labels: np.ndarray, class_names: list[str], target: float
) -> float:
    """The blast flag probability meeting ``target`` blast recall on validation (1.0 without blasts)."""
    if BLAST_CLASS not in class_names:
        return 1.0
    blast = class_names.index(BLAST_CLASS)
    predicted = calibrated.argmax(axis=1)
    return blast_probability_for_recall(calibrated[:, blast], predicted == blast, val_labels == blast, target)


def _training_mix(training_counts: dict[str, int], class_names: list[str]) -> np.ndarray:
    """The training split's share of each class (zeros when it is empty)."""
    total = sum(training_counts.get(c, 0) for c in class_names) or 1
    return np.array([training_counts.get(c, 0) / total for c in class_names])


def fit_trust(
    val: dict[str, np.ndarray],
    val_labels: np.ndarray,
    train: dict[str, np.ndarray],
    train_labels: np.ndarray,
    negatives: dict[str, dict[str, np.ndarray]],
    *,
    cell_free: dict[str, np.ndarray] | None = None,
    class_names: list[str],
    training_counts: dict[str, int],
    review_target_accuracy: float,
    blast_recall_target: float,
    unfamiliar_rate: float,
    drift_class_mix_concentration: float = 10.0,
    seed: int = 0,
    train_reviewed: np.ndarray | None = None,
) -> tuple[TrustPolicy, uf.FeatureStatistics, dict[str, Any]]:
    """Fit every part of the policy from model outputs (see :func:`predict_all`, uncalibrated).

    ``val``/``train``: outputs on the validation split and the (unaugmented) training split;
    ``negatives``: outputs on synthetic negative sets by name (made from validation images, to
    choose the method); ``cell_free``: outputs on cell-free crops of *training* images (their mean
    feeds the ``cell_free`` score; None leaves that score out); ``train_reviewed``: which ``train``
    rows are a lab's reviewed images (their classes get means of their own). Returns the policy, the feature
    statistics and a report (validation calibration before/after, AUROC per method and set).
    """
    val_labels = np.asarray(val_labels)
    temperature, fitted_temperature, guard = _kept_temperature(val["logits"], val_labels)
    calibrated = softmax(val["logits"], temperature)
    unfamiliar = _fit_unfamiliar(
        val,
        train,
        np.asarray(train_labels),
        negatives,
        cell_free,
        len(class_names),
        temperature,
        unfamiliar_rate,
        train_reviewed=train_reviewed,
    )
    confidence = calibrated.max(axis=1)
    predicted = calibrated.argmax(axis=1)
    correct = predicted == val_labels
    review_threshold = review_threshold_for_accuracy(confidence, correct, review_target_accuracy)
    blast_probability = _blast_flag_probability(calibrated, val_labels, class_names, blast_recall_target)
    mix = _training_mix(training_counts, class_names)
    drift = fit_drift_limits(
        val_labels,
        predicted,
        confidence,
        unfamiliar.flagged_validation,
        mix,
        drift_class_mix_concentration,
        seed,
    )
    policy = TrustPolicy(
        class_names=list(class_names),
        temperature=temperature,
        review_threshold=review_threshold,
        review_target_accuracy=review_target_accuracy,
        blast_flag_probability=blast_probability,
        blast_recall_target=blast_recall_target,
        unfamiliar_method=unfamiliar.method,
        unfamiliar_threshold=unfamiliar.threshold,
        unfamiliar_rate=unfamiliar_rate,
        standardiser=uf.to_json(unfamiliar.standardiser),
        training_class_mix={c: float(m) for c, m in zip(class_names, mix)},
        drift=drift,
        fitted_on={
            "validation_images": len(val_labels),
            "training_images_for_features": len(train_labels),
            "negative_sets": {name: len(o["logits"]) for name, o in negatives.items()},
            "cell_free_crops": 0 if cell_free is None else len(cell_free["top"]),
            "fitted_temperature": fitted_temperature,
            "temperature_kept": guard["keep"],
        },
    )
    unflagged = confidence >= review_threshold
    report = {
        "temperature_guard": guard,
        "validation_before": calibration_metrics(softmax(val["logits"]), val_labels),
        "validation_after": calibration_metrics(calibrated, val_labels),
        "unfamiliar_auroc": unfamiliar.aurocs,
        "validation_coverage": float(unflagged.mean()),
        "validation_unflagged_accuracy": float(correct[unflagged].mean()) if unflagged.any() else None,
        # What counting right answers alone would have chosen (the rule before 2026-12-04).
        "review_threshold_by_count": review_threshold_by_count(confidence, correct, review_target_accuracy),
        "risk_coverage": risk_coverage(confidence, correct),
    }
    log.info(
        "trust fitted on %d validation images: T %.3f, review threshold %.3f (coverage %.2f), blast flag %.3f, "
        "unfamiliar %s > %.2f, drift limits %s",
        len(val_labels),
        temperature,
        review_threshold,
        report["validation_coverage"],
        blast_probability,
        unfamiliar.method,
        unfamiliar.threshold,
        {k: round(v, 3) for k, v in drift.items()},
    )
    return policy, unfamiliar.stats, report


def _sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, int)


@dataclass
class _FittingOutputs:
    """The outputs :func:`fit_trust` is fitted on, with the labels they go with."""

    val: dict[str, np.ndarray]
    val_labels: np.ndarray
    train: dict[str, np.ndarray]
    train_labels: np.ndarray
    negatives: dict[str, dict[str, np.ndarray]]
    cell_free: dict[str, np.ndarray] | None
    #: Which ``train`` rows are reviewed images.
    train_reviewed: np.ndarray


def _predict_fitting_sets(
    outputs: Any, val: ImageStore, train: ImageStore, class_names: tuple[str, ...], batch_size: int, seed: int
) -> _FittingOutputs:
    """The model's outputs on the validation split, a per-class sample of the training split, the
    synthetic negatives made from validation images and cell-free crops of training images."""
    index = {name: i for i, name in enumerate(class_names)}
    val_labels = np.array([index[c] for c in val.records["class"]])
    train_labels_all = np.array([index[c] for c in train.records["class"]])
    picked = _sample_per_class(train_labels_all, FEATURE_IMAGES_PER_CLASS, seed)
    # Every reviewed training image, whatever the sample drew: their classes get means of their own.
    reviewed = reviewed_rows(train)
    picked = np.union1d(picked, reviewed).astype(np.int64)
    log.info(
        "calibrating on %d validation images; class features from %d training images; negatives from %d",
        len(val),
        len(picked),
        min(len(val), NEGATIVE_SOURCE_IMAGES),
    )
    val_out = predict_all(outputs, val.images, batch_size)
    train_out = predict_all(outputs, np.asarray(train.images[picked]), batch_size)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(val))[:NEGATIVE_SOURCE_IMAGES])
    source = np.asarray(val.images[chosen])
    negatives = {
        "corner_crops": predict_all(outputs, corner_crops(source, seed=seed), batch_size),
        "colour_shifts": predict_all(outputs, colour_shifts(source, seed=seed), batch_size),
    }
    # Cell-free crops of training images (another seed than the negatives): the score is fitted
    # on training images, the method chosen on validation ones.
    crop_from = np.sort(np.random.default_rng(seed + 1).permutation(picked)[:NEGATIVE_SOURCE_IMAGES])
    cell_free = (
        predict_all(outputs, corner_crops(np.asarray(train.images[crop_from]), seed=seed + 1), batch_size)
        if len(crop_from)
        else None
    )
    return _FittingOutputs(
        val_out, val_labels, train_out, train_labels_all[picked], negatives, cell_free, np.isin(picked, reviewed)
    )


def _calibration_summary(
    model_path: Path, trust_dir: Path, policy: TrustPolicy, report: dict[str, Any]
) -> dict[str, Any]:
    """What :func:`calibrate_model` returns for a calibrated model (the DAG task's XCom)."""
    return {
        "model_path": str(model_path),
        "trust_dir": str(trust_dir),
        "calibrated": True,
        "temperature": policy.temperature,
        "review_threshold": policy.review_threshold,
        "blast_flag_probability": policy.blast_flag_probability,
        "unfamiliar_method": policy.unfamiliar_method,
        "unfamiliar_threshold": policy.unfamiliar_threshold,
        "validation_coverage": report["validation_coverage"],
        "validation_unflagged_accuracy": report["validation_unflagged_accuracy"],
        "validation_ece_before": report["validation_before"]["ece"],
        "validation_ece_after": report["validation_after"]["ece"],
        "unfamiliar_auroc": report["unfamiliar_auroc"][policy.unfamiliar_method],
    }


def calibrate_model(
    model_path: Path,
    val_store: Path,
    train_store: Path,
    out_dir: Path,
    *,
    class_names: tuple[str, ...],
    training_counts: dict[str, int],
    review_target_accuracy: float,
    blast_recall_target: float,
    unfamiliar_rate: float,
    batch_size: int,
    seed: int,
    drift_class_mix_concentration: float = 10.0,
) -> dict[str, Any]:
    """Fit the trust policy of a trained model and save the calibrated model.

    Writes in ``out_dir``: ``model.keras`` (the temperature folded into its logits layer),
    ``trust/`` (``trust.json``, ``feature_stats.npz``, ``reliability_validation.png``,
    ``risk_coverage_validation.png``) and ``trust_report.json``. Returns the summary.
    """
    import keras

    out_dir = Path(out_dir)
    trust_dir = out_dir / TRUST_ARTIFACT_PATH
    model = keras.models.load_model(model_path)
    val = open_store(Path(val_store))
    train = open_store(Path(train_store))
    if len(val) == 0:
        # Nothing to fit on (a data set too small for a validation split): the model is kept as it
        # is and served like a version from before calibration (legacy threshold, no unfamiliar
        # score or blast flag), which the serving side logs whenever it loads it.
        log.warning(
            "validation store %s is empty: the model is NOT calibrated and gets no trust policy (no unfamiliar "
            "score, no blast flag; the legacy review threshold applies); use more labelled images",
            val_store,
        )
        model.save(out_dir / "model.keras")
        return {"model_path": str(out_dir / "model.keras"), "trust_dir": None, "calibrated": False}
    trust_dir.mkdir(parents=True, exist_ok=True)
    fitted = _predict_fitting_sets(outputs_model(model), val, train, class_names, batch_size, seed)
    policy, stats, report = fit_trust(
        fitted.val,
        fitted.val_labels,
        fitted.train,
        fitted.train_labels,
        fitted.negatives,
        cell_free=fitted.cell_free,
        train_reviewed=fitted.train_reviewed,
        class_names=list(class_names),
        training_counts=training_counts,
        review_target_accuracy=review_target_accuracy,
        blast_recall_target=blast_recall_target,
        unfamiliar_rate=unfamiliar_rate,
        drift_class_mix_concentration=drift_class_mix_concentration,
        seed=seed,
    )
    fold_temperature(model, policy.temperature)
    model.save(out_dir / "model.keras")
    policy.save(trust_dir)
    stats.save(trust_dir / FEATURES_FILE)
    write_trust_plots(fitted.val_labels, fitted.val["logits"], policy, report["risk_coverage"], trust_dir)
    write_json_atomic(out_dir / "trust_report.json", report)
    return _calibration_summary(out_dir / "model.keras", trust_dir, policy, report)
