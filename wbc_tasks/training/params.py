"""Per-run training params: one table feeds the Airflow trigger form, validation and the CLI.

Each entry is a JSON-schema fragment (what Airflow's ``Param`` takes) plus a description the
trigger form shows. :func:`training_params` validates a mapping against the same table, so a run
started from the CLI or a test is checked exactly like one started from the UI. The params with
a fixed set of values have theirs declared once, as the StrEnums beside the table: the table's
``enum`` lists and the code that acts on a value (``model``, ``precision``, ``train``) use them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from jsonschema import Draft202012Validator

from wbc_tasks.core.errors import PermanentError


class ParamError(PermanentError, ValueError):
    """A training param is unknown, missing or out of its range."""


# The params with a fixed set of values (weights, learning_rate_schedule, weight_averaging,
# promotion_metric, precision, xla): the table's ``enum`` lists are made from these.
class Weights(StrEnum):
    IMAGENET = "imagenet"
    NONE = "none"


class LearningRateSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class WeightAveraging(StrEnum):
    NONE = "none"
    EMA = "ema"


class PromotionMetric(StrEnum):
    BALANCED_ACCURACY = "balanced_accuracy"
    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"


class Precision(StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    MIXED_FLOAT16 = "mixed_float16"
    MIXED_BFLOAT16 = "mixed_bfloat16"


class Xla(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


def choices(values: type[StrEnum]) -> tuple[str, ...]:
    """The values of ``values`` as plain strings, in declaration order (a table's ``enum``)."""
    return tuple(member.value for member in values)


#: name -> JSON-schema fragment with "default" and "description".
TRAINING_PARAM_SPECS: dict[str, dict[str, Any]] = {
    "data_dir": {
        "default": None,
        "type": ["null", "string"],
        "description": "Folder laid out as <class>/<images>, inside WBC_DATA_DIR, WBC_HOME or WBC_ALLOWED_ROOTS. "
        "Empty: WBC_DATA_DIR, else generated demo data.",
    },
    "include_reviewed": {
        "default": True,
        "type": "boolean",
        "description": "Add the images people reviewed in the predictions database (latest review per image, "
        "'unusable' left out and listed) to the labelled images with their reviewed class, split by content hash "
        "like the rest. Headline test metrics stay on labelled test images; reviewed test images are reported "
        "apart. No effect while there are no reviews.",
    },
    "init_from": {
        "default": "none",
        "type": "string",
        "pattern": "^(none|champion|[1-9][0-9]*)$",
        "description": "Start from a registered version's weights instead of from scratch: none, champion (the "
        "version the alias names when the run starts, fixed for the run) or a version number. Its image size and "
        "class names must be this run's. For a new lab learning from its own reviews: minutes, not an hour.",
    },
    "image_size": {
        "default": 256,
        "type": "integer",
        "minimum": 32,
        "maximum": 512,
        "description": "Side in pixels the images are resized to (VGG16 needs at least 32).",
    },
    "weights": {
        "default": Weights.IMAGENET.value,
        "type": "string",
        "enum": list(choices(Weights)),
        "description": "imagenet: fine-tune ImageNet weights (need the weights file); none: train from scratch.",
    },
    "epochs_head": {
        "default": 5,
        "type": "integer",
        "minimum": 0,
        "maximum": 500,
        "description": "Epochs training the head with the VGG16 base frozen (imagenet weights only).",
    },
    "epochs_finetune": {
        "default": 10,
        "type": "integer",
        "minimum": 0,
        "maximum": 500,
        "description": "Epochs with the last conv layers unfrozen (or the whole network, from scratch).",
    },
    "batch_size": {
        "default": 32,
        "type": "integer",
        "minimum": 1,
        "maximum": 1024,
        "description": "Images per training step.",
    },
    "learning_rate_head": {
        "default": 1e-3,
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "Adam learning rate while the base is frozen.",
    },
    "learning_rate_finetune": {
        "default": 1e-5,
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "Adam learning rate once conv layers are unfrozen (from scratch: the only rate).",
    },
    "learning_rate_schedule": {
        "default": LearningRateSchedule.CONSTANT.value,
        "type": "string",
        "enum": list(choices(LearningRateSchedule)),
        "description": "constant: each phase at its learning rate throughout; cosine: each phase starts at its "
        "rate and falls to 0 along a half cosine by its last epoch (measured at the cpu profile: sharper, also on "
        "images from other labs; not the default).",
    },
    "weight_averaging": {
        "default": WeightAveraging.NONE.value,
        "type": "string",
        "enum": list(choices(WeightAveraging)),
        "description": "none: the model is the weights of its best epoch; ema: validation, the best epoch and the "
        "saved model use an exponential moving average of the weights over the last steps (Polyak averaging, "
        "momentum 0.99, about one epoch at the cpu profile). The cpu profile uses ema (measured over three seeds: "
        "balanced accuracy 0.820 against 0.804, more images unflagged at the same accuracy); not yet measured "
        "when fine-tuning ImageNet weights.",
    },
    "reviewed_share": {
        "default": 0.0,
        "type": "number",
        "minimum": 0,
        "maximum": 0.5,
        "description": "A guaranteed share of each training batch for the images people reviewed (a new lab's few "
        "dozen cells among thousands of labelled ones): extra rows drawn from the reviewed training images, each a "
        "fresh random augmentation so repeats differ. 0: reviewed images count like any other. Needs "
        "include_reviewed; no effect without reviewed training images.",
    },
    "reviewed_balance": {
        "default": False,
        "type": "boolean",
        "description": "Draw the reviewed share class-balanced: each class among the reviewed training images "
        "equally often, however few of it were reviewed (a new lab's rare class, e.g. 5 eosinophils among 100 "
        "reviews), instead of uniformly over the reviewed images. No effect without reviewed_share. Off in the "
        "adapt profile: on one review pool it measured worse (balanced accuracy 0.625 against 0.706).",
    },
    "outlier_exposure": {
        "default": 0.0,
        "type": "number",
        "minimum": 0,
        "maximum": 0.5,
        "description": "Outlier exposure: this share of each training batch is added as copies of its images in a "
        "stain far beyond the augmentation's, taught to give every class the same probability, so that a lab "
        "unlike the training labs' is met with doubt rather than with the class whose lab it resembles. 0: off. "
        "The extra rows cost the same share of training time. The cpu profile uses 0.25 (measured over three seeds: "
        "a third lab's cells called blasts 2.9 % against 17.3 %, at a mean confidence of 0.31 against 0.84-0.97, "
        "with the same balanced accuracy on the training labs); not yet measured when fine-tuning ImageNet weights.",
    },
    "unfreeze_layers": {
        "default": 4,
        "type": "integer",
        "minimum": 0,
        "maximum": 13,
        "description": "How many of VGG16's 13 conv layers, counted from the top, fine-tuning unfreezes.",
    },
    "early_stopping_patience": {
        "default": 3,
        "type": "integer",
        "minimum": 0,
        "maximum": 100,
        "description": "Epochs without validation improvement before stopping (best weights restored); 0 = off.",
    },
    "augment_per_class": {
        "default": 200,
        "type": "integer",
        "minimum": 0,
        "maximum": 100000,
        "description": "Training images per class after augmentation, before SMOTE "
        "(classes above it are kept as they are).",
    },
    "smote": {
        "default": True,
        "type": "boolean",
        "description": "Balance the training classes with SMOTE (off: compare against class weights).",
    },
    "smote_k": {
        "default": 5,
        "type": "integer",
        "minimum": 1,
        "maximum": 50,
        "description": "SMOTE neighbours (k = min(k, n-1) for small classes).",
    },
    "class_weights": {
        "default": False,
        "type": "boolean",
        "description": "Weight the loss by inverse class frequency (an alternative to SMOTE).",
    },
    "promotion_metric": {
        "default": PromotionMetric.BALANCED_ACCURACY.value,
        "type": "string",
        "enum": list(choices(PromotionMetric)),
        "description": "Test metric a new model must beat the champion on.",
    },
    "promotion_margin": {
        "default": 0.0,
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "How much higher than the champion's the metric must be (ties keep the champion).",
    },
    "min_metric": {
        "default": 0.5,
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "Floor the promotion metric must reach for any promotion.",
    },
    "min_class_recall": {
        "default": 0.3,
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "Floor every class's test recall must reach.",
    },
    "min_blast_recall": {
        "default": 0.8,
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "Floor for blasts' test recall (a missed blast costs most).",
    },
    "max_ece": {
        "default": None,
        "type": ["null", "number"],
        "minimum": 0,
        "maximum": 1,
        "description": "Optional ceiling on the candidate's calibrated test ECE (15 bins); empty: off. A perfectly "
        "calibrated model scores about 0.04 on a 544-image test split by chance, so keep any ceiling above that.",
    },
    "review_target_accuracy": {
        "default": 0.95,
        "type": "number",
        "minimum": 0.5,
        "maximum": 1,
        "description": "Accuracy wanted among predictions not flagged for review: the version's review "
        "threshold (on calibrated confidence) is the lowest that reaches it on the validation split.",
    },
    "blast_recall_target": {
        "default": 0.95,
        "type": "number",
        "minimum": 0.5,
        "maximum": 1,
        "description": "Share of validation blasts that must be predicted blasts or flagged blast_suspected: "
        "sets the version's blast flag probability.",
    },
    "unfamiliar_rate": {
        "default": 0.05,
        "type": "number",
        "minimum": 0.001,
        "maximum": 0.5,
        "description": "Share of the validation split's own images the unfamiliar threshold flags (its cost on "
        "familiar images).",
    },
    "precision": {
        "default": Precision.AUTO.value,
        "type": "string",
        "enum": list(choices(Precision)),
        "description": "Training arithmetic. auto: mixed_float16 on a CUDA GPU, mixed_bfloat16 on a CPU with "
        "AVX512_BF16/AMX (1.7-2x float32's speed, same quality), float32 on other CPUs (where bfloat16 is "
        "emulated and slower). The registered model is float32 either way.",
    },
    "xla": {
        "default": Xla.AUTO.value,
        "type": "string",
        "enum": list(choices(Xla)),
        "description": "XLA compilation. auto: on with a GPU, off on CPUs; off if a driver misbehaves.",
    },
    "seed": {
        "default": 42,
        "type": "integer",
        "minimum": 0,
        "description": "Seed for augmentation, SMOTE, shuffling and initialisation.",
    },
}


@dataclass(frozen=True)
class TrainingParams:
    """Validated params of one training run. A param with choices holds the plain string (what
    MLflow, the checkpoints and the model card record); it compares equal to its StrEnum member
    (``params.weights == Weights.NONE``)."""

    data_dir: str | None
    include_reviewed: bool
    init_from: str
    image_size: int
    weights: str
    epochs_head: int
    epochs_finetune: int
    batch_size: int
    learning_rate_head: float
    learning_rate_finetune: float
    learning_rate_schedule: str
    weight_averaging: str
    outlier_exposure: float
    reviewed_share: float
    reviewed_balance: bool
    unfreeze_layers: int
    early_stopping_patience: int
    augment_per_class: int
    smote: bool
    smote_k: int
    class_weights: bool
    promotion_metric: str
    promotion_margin: float
    min_metric: float
    min_class_recall: float
    min_blast_recall: float
    max_ece: float | None
    review_target_accuracy: float
    blast_recall_target: float
    unfamiliar_rate: float
    precision: str
    xla: str
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _schema() -> dict[str, Any]:
    """The table as one JSON schema (the same checks Airflow's ``Param`` runs on the form)."""
    form_only = ("default", "description", "title")
    properties = {
        name: {k: v for k, v in spec.items() if k not in form_only} for name, spec in TRAINING_PARAM_SPECS.items()
    }
    return {"type": "object", "properties": properties}


def training_params(values: dict[str, Any] | None = None) -> TrainingParams:
    """Defaults overridden by ``values``, checked against the table's JSON schema (a ``ParamError``
    names every param that fails)."""
    values = dict(values or {})
    unknown = set(values) - set(TRAINING_PARAM_SPECS)
    if unknown:
        raise ParamError(f"unknown params: {sorted(unknown)}; known: {sorted(TRAINING_PARAM_SPECS)}")
    merged = {name: values.get(name, spec["default"]) for name, spec in TRAINING_PARAM_SPECS.items()}
    # The trigger form sends an emptied optional text field as "": that means unset.
    merged = {
        name: None if value == "" and "null" in TRAINING_PARAM_SPECS[name]["type"] else value
        for name, value in merged.items()
    }
    problems = [
        f"param {'.'.join(map(str, error.path)) or '?'}: {error.message}"
        for error in sorted(Draft202012Validator(_schema()).iter_errors(merged), key=lambda e: list(e.path))
    ]
    if problems:
        raise ParamError("; ".join(problems))
    # JSON schema's "integer" also admits 3.0, its "number" 3: store each as its Python type.
    typed: dict[str, Any] = {
        name: int(value) if spec["type"] == "integer" else float(value) if spec["type"] == "number" else value
        for (name, spec), value in zip(TRAINING_PARAM_SPECS.items(), merged.values())
    }
    return TrainingParams(**typed)
