"""What makes a prediction trustworthy, fitted per model version on its validation split and
applied to every prediction: the calibration temperature, the review threshold, the blast flag,
the unfamiliar score and the drift limits of a drop.

:func:`fit_trust` runs after training (the DAG's ``calibrate`` task). It writes, in one folder
that registration logs with the version (``trust/``): ``trust.json`` (:class:`TrustPolicy`),
``feature_stats.npz`` (:class:`~wbc_tasks.training.unfamiliar.FeatureStatistics`), the
reliability diagram and the risk-coverage curve. :func:`assess` applies a policy to a batch of
model outputs: calibrated probabilities, the unfamiliar score and the review reasons.

Review reasons (several can apply; ``needs_review`` is true when any does):
``low_confidence`` (calibrated confidence under the review threshold), ``unfamiliar`` (score
over the version's threshold), ``image_check`` (the pre-model check failed) and
``blast_suspected`` (calibrated blast probability at or over the blast flag probability,
whatever the top class). Imports ``core``, ``data`` and the training modules it names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.training import unfamiliar as uf
from wbc_tasks.training.calibration import LOGITS_LAYER, softmax

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
FEATURES_FILE = "feature_stats.npz"
#: The MLflow artifact folder of a version's run holding the files above.
TRUST_ARTIFACT_PATH = "trust"
BLAST_CLASS = "blasts"
#: Drift limits are fitted on draws of this many validation images (a typical small drop).
DRIFT_DRAW_SIZE = 100
DRIFT_DRAWS = 2000
#: A drop of the training labs passes each drift limit this often (one false alert in about a
#: thousand nights per measure).
DRIFT_QUANTILE = 0.999
#: Fewest validation images a review threshold is chosen over (fewer: nothing is trusted).
_MIN_COVERED = 20
#: A review threshold is refused when its validation images' right answers fall short of the
#: target accuracy by more than chance would at this one-sided level.
REVIEW_TARGET_SIGNIFICANCE = 0.05


@dataclass
class TrustPolicy:
    """Everything a consumer needs besides the model to turn its output into a prediction row."""

    class_names: list[str]
    temperature: float
    review_threshold: float
    review_target_accuracy: float
    blast_flag_probability: float
    blast_recall_target: float
    unfamiliar_method: str
    unfamiliar_threshold: float
    unfamiliar_rate: float
    standardiser: dict[str, Any]
    training_class_mix: dict[str, float]
    drift: dict[str, float] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / TRUST_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> TrustPolicy:
        data = json.loads((Path(folder) / TRUST_FILE).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Assessment:
    """One batch's calibrated output and verdicts (arrays aligned with the batch)."""

    probabilities: np.ndarray
    unfamiliar_score: np.ndarray
    reasons: list[list[str]]


def outputs_model(model: Any) -> Any:
    """A model over ``model``'s layers returning probabilities, logits, pooled top features and
    averaged mid-level features (for the unfamiliar score). Shares weights; nothing is copied."""
    import keras

    from wbc_tasks.training.model import BASE_LAYER, PREPROCESS_LAYER

    base = model.get_layer(BASE_LAYER)
    inner = keras.Model(base.inputs, [base.get_layer(uf.LOW_LAYER).output, base.output])
    pixels = keras.Input(model.input_shape[1:], name="pixels")
    low, top = inner(model.get_layer(PREPROCESS_LAYER)(pixels))
    pooled = model.get_layer("head_pool")(top)
    logits = model.get_layer(LOGITS_LAYER)(model.get_layer("head_dense")(pooled))
    probabilities = model.get_layer("probabilities")(logits)
    low_pooled = keras.layers.GlobalAveragePooling2D(name="low_pool")(low)
    return keras.Model(pixels, [probabilities, logits, pooled, low_pooled], name=f"{model.name}_outputs")


def predict_all(outputs: Any, images: Any, batch_size: int) -> dict[str, np.ndarray]:
    """The four outputs of an :func:`outputs_model` for ``images`` (array or memory map)."""
    from wbc_tasks.training.predict import predict_outputs

    probabilities, logits, top, low = predict_outputs(outputs, images, batch_size)
    return {
        "probabilities": probabilities.astype(np.float64),
        "logits": logits.astype(np.float64),
        "top": top.astype(np.float64),
        "low": low.astype(np.float64),
    }


def _cumulative(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidences from the highest down, the right answers among the first n, and n."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    return conf, np.cumsum(np.asarray(correct)[order]), np.arange(1, len(conf) + 1)


def _lowest_threshold(conf: np.ndarray, ok: np.ndarray) -> float:
    """The lowest of the descending ``conf`` where ``ok`` holds with at least 20 images kept
    (1.0, flag all, when there is none); cuts fall only between distinct confidences, so ties
    are all kept or all flagged."""
    ok = ok & (np.arange(1, len(conf) + 1) >= min(_MIN_COVERED, len(conf)))
    candidates = np.flatnonzero(ok & np.r_[conf[1:] < conf[:-1], True])
    return float(conf[candidates.max()]) if len(candidates) else 1.0


def review_threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest confidence threshold whose unflagged images (confidence >= it, at least 20 of
    them) are expected to be right at least ``target`` of the time; 1.0 (flag all) when none is.

    Expected by their calibrated confidences: a calibrated model is right as often as its mean
    confidence says, and a mean of ~300 confidences varies far less than a count of ~300 right
    answers (counting alone set one version's threshold at 0.83 where 0.77 served; see
    docs/trust.md). The count keeps a veto: a threshold is refused when its images' right answers
    fall short of ``target`` by more than chance would (one-sided binomial test at
    ``REVIEW_TARGET_SIGNIFICANCE``), so a model too sure of itself at the top cannot pass on its
    own word.
    """
    from scipy.stats import binom

    conf, hits, n = _cumulative(confidence, correct)
    plausible = binom.cdf(hits, n, target) >= REVIEW_TARGET_SIGNIFICANCE
    return _lowest_threshold(conf, (np.cumsum(conf) / n >= target) & plausible)


def review_threshold_by_count(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The rule :func:`review_threshold_for_accuracy` replaced, kept for the report: the lowest
    threshold whose unflagged validation images are right at least ``target`` of the time, counted."""
    conf, hits, n = _cumulative(confidence, correct)
    return _lowest_threshold(conf, hits / n >= target)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    """Coverage (share unflagged) and accuracy among the unflagged for every threshold."""
    conf, hits, n = _cumulative(confidence, correct)
    return {
        "threshold": conf.tolist(),
        "coverage": (n / len(conf)).tolist(),
        "accuracy": (hits / n).tolist(),
    }


def blast_probability_for_recall(
    p_blast: np.ndarray, predicted_blast: np.ndarray, is_blast: np.ndarray, target: float
) -> float:
    """The highest blast probability such that at least ``target`` of the true blasts are
    predicted blasts or have at least that probability (1.0 when there are no blasts)."""
    is_blast = np.asarray(is_blast, bool)
    if not is_blast.any():
        return 1.0
    missed = np.asarray(p_blast)[is_blast & ~np.asarray(predicted_blast, bool)]
    allowed_misses = int(np.floor((1 - target) * is_blast.sum()))
    if len(missed) <= allowed_misses:
        return 1.0
    # Flag the blasts the model missed, from the most likely down, until few enough remain.
    return float(np.sort(missed)[::-1][len(missed) - allowed_misses - 1])


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, 0..1) between two class mixes."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p, q, base=2) ** 2)


def _drift_limits(
    labels: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    unfamiliar: np.ndarray,
    mix: np.ndarray,
    concentration: float,
    seed: int,
) -> dict[str, float]:
    """Limits a familiar drop stays within 999 times in 1000, from simulated drops of validation
    images. Each simulated drop is one specimen: its class mix is drawn from a Dirichlet around the
    training mix (``concentration``: specimens' differentials vary between patients), then its
    images from the validation images of each class; the drop is judged by the model's
    predictions on them, as a real drop is."""
    rng = np.random.default_rng(seed)
    n_classes = len(mix)
    size = min(DRIFT_DRAW_SIZE, len(predicted))
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    present = np.array([len(members) > 0 for members in by_class])
    alpha = concentration * np.where(present, mix, 0.0) + 1e-6 * present
    divergences, confidences, shares = [], [], []
    for _ in range(DRIFT_DRAWS):
        counts_true = rng.multinomial(size, rng.dirichlet(alpha[present]))
        pick = np.concatenate([rng.choice(by_class[c], n) for c, n in zip(np.flatnonzero(present), counts_true) if n])
        counts = np.bincount(predicted[pick], minlength=n_classes)
        divergences.append(jensen_shannon(counts / counts.sum(), mix))
        confidences.append(confidence[pick].mean())
        shares.append(unfamiliar[pick].mean())
    return {
        "draw_size": float(size),
        "class_mix_concentration": float(concentration),
        "max_class_mix_divergence": float(np.quantile(divergences, DRIFT_QUANTILE)),
        "min_mean_confidence": float(np.quantile(confidences, 1 - DRIFT_QUANTILE)),
        # The share of a 100-image drop; drift.py scales the limit to each drop's size.
        "max_unfamiliar_share": float(np.quantile(shares, DRIFT_QUANTILE)),
        "validation_unfamiliar_share": float(np.mean(unfamiliar)),
    }


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
) -> tuple[TrustPolicy, uf.FeatureStatistics, dict[str, Any]]:
    """Fit every part of the policy from model outputs (see :func:`predict_all`, uncalibrated).

    ``val``/``train``: outputs on the validation split and the (unaugmented) training split;
    ``negatives``: outputs on synthetic negative sets by name (made from validation images, to
    choose the method); ``cell_free``: outputs on cell-free crops of *training* images (their mean
    feeds the ``cell_free`` score; None leaves that score out). Returns the policy, the feature
    statistics and a report (validation calibration before/after, AUROC per method and set).
    """
    from wbc_tasks.training.calibration import calibration_metrics, fit_temperature, temperature_worth_keeping

    val_labels = np.asarray(val_labels)
    fitted_temperature = fit_temperature(val["logits"], val_labels)
    guard = temperature_worth_keeping(val["logits"], val_labels, fitted_temperature)
    temperature = fitted_temperature if guard["keep"] else 1.0
    if not guard["keep"]:
        log.info(
            "temperature %.3f not kept (validation NLL gain %.4f, standard error %.4f: within noise); T = 1",
            fitted_temperature,
            guard["nll_gain"],
            guard["nll_gain_standard_error"],
        )
    calibrated = softmax(val["logits"], temperature)

    def calibrated_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**outputs, "logits": outputs["logits"] / temperature}

    stats = uf.fit_feature_statistics(
        train["top"],
        train["low"],
        np.asarray(train_labels),
        len(class_names),
        cell_free_top=None if cell_free is None else cell_free["top"],
    )
    standard = uf.fit_standardiser(uf.raw_scores(calibrated_outputs(val), stats))
    val_scores = uf.scores(calibrated_outputs(val), stats, standard)
    negative_scores = {name: uf.scores(calibrated_outputs(o), stats, standard) for name, o in negatives.items()}
    method, aurocs = uf.choose_method(val_scores, negative_scores)
    unfamiliar_threshold = uf.threshold_for_rate(val_scores[method], unfamiliar_rate)

    confidence = calibrated.max(axis=1)
    predicted = calibrated.argmax(axis=1)
    correct = predicted == val_labels
    review_threshold = review_threshold_for_accuracy(confidence, correct, review_target_accuracy)
    blast = class_names.index(BLAST_CLASS) if BLAST_CLASS in class_names else None
    blast_probability = (
        1.0
        if blast is None
        else blast_probability_for_recall(
            calibrated[:, blast], predicted == blast, val_labels == blast, blast_recall_target
        )
    )
    total = sum(training_counts.get(c, 0) for c in class_names) or 1
    mix = np.array([training_counts.get(c, 0) / total for c in class_names])
    drift = _drift_limits(
        val_labels,
        predicted,
        confidence,
        val_scores[method] > unfamiliar_threshold,
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
        unfamiliar_method=method,
        unfamiliar_threshold=unfamiliar_threshold,
        unfamiliar_rate=unfamiliar_rate,
        standardiser=uf.to_json(standard),
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
        "unfamiliar_auroc": aurocs,
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
        method,
        unfamiliar_threshold,
        {k: round(v, 3) for k, v in drift.items()},
    )
    return policy, stats, report


def effective_thresholds(policy: TrustPolicy | None, settings: Settings) -> dict[str, float | None]:
    """Review threshold and blast flag probability in force: a setting when set, else the
    version's fitted value (versions without a policy: the legacy fixed threshold, no blast flag)."""
    review = settings.review_threshold
    if review is None:
        review = policy.review_threshold if policy else settings.legacy_review_threshold
    blast = settings.blast_flag_probability
    if blast is None and policy is not None:
        blast = policy.blast_flag_probability
    return {"review_threshold": float(review), "blast_flag_probability": blast}


def assess(
    outputs: dict[str, np.ndarray],
    image_checks: list[str | None],
    policy: TrustPolicy | None,
    stats: uf.FeatureStatistics | None,
    settings: Settings,
    *,
    review_threshold: float | None = None,
) -> Assessment:
    """Calibrated probabilities (the model's, already calibrated), unfamiliar scores and review
    reasons for a batch of outputs of a registered (temperature-folded) model.

    Without a policy (a version registered before trust existed) only ``low_confidence`` (at the
    legacy threshold) and ``image_check`` apply, and scores are NaN.
    """
    probabilities = np.asarray(outputs["probabilities"], dtype=np.float64)
    thresholds = effective_thresholds(policy, settings)
    threshold = thresholds["review_threshold"] if review_threshold is None else float(review_threshold)
    if policy is not None and stats is not None:
        standard = uf.standardiser_from_json(policy.standardiser)
        score = uf.scores(outputs, stats, standard)[policy.unfamiliar_method]
        unfamiliar = score > policy.unfamiliar_threshold
    else:
        score = np.full(len(probabilities), np.nan)
        unfamiliar = np.zeros(len(probabilities), bool)
    blast_p = thresholds["blast_flag_probability"]
    names = policy.class_names if policy else []
    blast = names.index(BLAST_CLASS) if BLAST_CLASS in names else None
    reasons: list[list[str]] = []
    for i, row in enumerate(probabilities):
        found = []
        if row.max() < threshold:
            found.append("low_confidence")
        if unfamiliar[i]:
            found.append("unfamiliar")
        if image_checks[i] is not None:
            found.append("image_check")
        if blast is not None and blast_p is not None and row[blast] >= blast_p:
            found.append("blast_suspected")
        reasons.append(found)
    return Assessment(probabilities, score, reasons)


#: Training images per class whose features the class means are taken from (bounds the time).
FEATURE_IMAGES_PER_CLASS = 400
#: Validation images the synthetic negatives are made from; as many training images give the
#: cell-free crops whose mean the ``cell_free`` score measures against.
NEGATIVE_SOURCE_IMAGES = 400


def _sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, int)


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

    from wbc_tasks.data.image_checks import colour_shifts, corner_crops
    from wbc_tasks.data.store import open_store
    from wbc_tasks.training.calibration import fold_temperature, plot_reliability

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
    outputs = outputs_model(model)
    index = {name: i for i, name in enumerate(class_names)}
    val_labels = np.array([index[c] for c in val.records["class"]])
    train_labels_all = np.array([index[c] for c in train.records["class"]])
    picked = _sample_per_class(train_labels_all, FEATURE_IMAGES_PER_CLASS, seed)
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
    policy, stats, report = fit_trust(
        val_out,
        val_labels,
        train_out,
        train_labels_all[picked],
        negatives,
        cell_free=cell_free,
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
    plot_reliability(
        val_labels,
        {"before": softmax(val_out["logits"]), "after": softmax(val_out["logits"], policy.temperature)},
        trust_dir / "reliability_validation.png",
        title=f"validation reliability (T = {policy.temperature:.2f})",
    )
    _plot_risk_coverage(report["risk_coverage"], policy.review_threshold, trust_dir / "risk_coverage_validation.png")
    write_json_atomic(out_dir / "trust_report.json", report)
    return {
        "model_path": str(out_dir / "model.keras"),
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


def _plot_risk_coverage(curve: dict[str, list[float]], threshold: float, path: Path) -> None:
    from wbc_tasks.data.figures import new_figure, save_figure

    fig = new_figure(5.5, 4.0, dpi=110)
    ax = fig.subplots()
    ax.plot(curve["coverage"], curve["accuracy"])
    covered = [c for c, t in zip(curve["coverage"], curve["threshold"]) if t >= threshold]
    if covered:
        ax.axvline(max(covered), color="grey", linestyle="--", label=f"review threshold {threshold:.2f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("coverage (share not flagged)")
    ax.set_ylabel("accuracy of the unflagged")
    ax.set_ylim(0, 1.01)
    ax.set_title("risk-coverage")
    save_figure(fig, path)


def load_trust(folder: Path | None) -> tuple[TrustPolicy | None, uf.FeatureStatistics | None]:
    """The policy and feature statistics in ``folder`` (None, None when absent)."""
    if folder is None or not (Path(folder) / TRUST_FILE).is_file():
        return None, None
    return TrustPolicy.load(folder), uf.FeatureStatistics.load(Path(folder) / FEATURES_FILE)
