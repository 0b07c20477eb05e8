"""The trust policy each model version carries and serving applies: :class:`TrustPolicy` and its
files (``trust/trust.json``, ``feature_stats.npz``; :func:`load_trust`), the thresholds in force
(:func:`effective_thresholds`) and :func:`assess`, which turns a batch of model outputs into
calibrated probabilities, unfamiliar scores and review reasons. Nothing here fits anything: see
:mod:`~wbc_tasks.training.trust_fitting`.

Review reasons (several can apply; ``needs_review`` is true when any does):
``low_confidence`` (calibrated confidence under the review threshold), ``unfamiliar`` (score
over the version's threshold), ``image_check`` (the pre-model check failed) and
``blast_suspected`` (calibrated blast probability at or over the blast flag probability,
whatever the top class).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import BLAST_CLASS, ReviewReason
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.training import unfamiliar as uf

TRUST_FILE = "trust.json"
FEATURES_FILE = "feature_stats.npz"
#: The MLflow artifact folder of a version's run holding the files above.
TRUST_ARTIFACT_PATH = "trust"


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


def load_trust(folder: Path | None) -> tuple[TrustPolicy | None, uf.FeatureStatistics | None]:
    """The policy and feature statistics in ``folder`` (None, None when absent)."""
    if folder is None or not (Path(folder) / TRUST_FILE).is_file():
        return None, None
    return TrustPolicy.load(folder), uf.FeatureStatistics.load(Path(folder) / FEATURES_FILE)


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
            found.append(ReviewReason.LOW_CONFIDENCE.value)
        if unfamiliar[i]:
            found.append(ReviewReason.UNFAMILIAR.value)
        if image_checks[i] is not None:
            found.append(ReviewReason.IMAGE_CHECK.value)
        if blast is not None and blast_p is not None and row[blast] >= blast_p:
            found.append(ReviewReason.BLAST_SUSPECTED.value)
        reasons.append(found)
    return Assessment(probabilities, score, reasons)
