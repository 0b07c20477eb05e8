"""The domain's names, each spelled once: the nine classes, the class whose misses cost most, why
a prediction needs review, the three DAGs, and the steps of a training run's work folder."""

from __future__ import annotations

from enum import StrEnum

#: The nine classes, in the order the model's outputs use.
CLASS_NAMES: tuple[str, ...] = (
    "bands",
    "basophils",
    "blasts",
    "eosinophils",
    "lymphocytes",
    "metamyelocytes",
    "monocytes",
    "myelocytes",
    "neutrophils",
)

#: The class whose misses cost most: it has its own recall floor, flag and review priority.
BLAST_CLASS = "blasts"


class ReviewReason(StrEnum):
    """Why a prediction needs review (several can apply to one row)."""

    #: Calibrated confidence under the version's review threshold.
    LOW_CONFIDENCE = "low_confidence"
    #: An image unlike the training images (the unfamiliar score over its threshold).
    UNFAMILIAR = "unfamiliar"
    #: A pre-model image check failed (blank, uniform, noise, not a cell).
    IMAGE_CHECK = "image_check"
    #: A blast probability at or over the version's blast flag probability.
    BLAST_SUSPECTED = "blast_suspected"


#: The review reasons as plain strings, in the order reports list them.
REVIEW_REASONS: tuple[str, ...] = tuple(reason.value for reason in ReviewReason)


class DagId(StrEnum):
    """The project's four DAGs."""

    TRAINING = "wbc_training"
    NIGHTLY = "wbc_batch_classification"
    MAINTENANCE = "wbc_maintenance"
    ADAPTATION = "wbc_adaptation"


class Step(StrEnum):
    """The folders of a training run's work folder (``<work dir>/runs/<run id>/<step>/``)."""

    SPLIT = "split"
    PREPROCESS = "preprocess"
    AUGMENT = "augment"
    BALANCE = "balance"
    TRAIN = "train"
    TRAIN_CHECKPOINTS = "train_checkpoints"
    CALIBRATE = "calibrate"
    EVALUATE = "evaluate"
    EXPORT = "export"
    REGISTER = "register"
    PROMOTE = "promote"
