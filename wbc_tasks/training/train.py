"""Train the VGG16 classifier from memory-mapped stores: the loop that ties the schedule
(``schedule``), the input pipeline (``input``), checkpoints and the epoch monitor
(``checkpoints``) and precision (``precision``) together, and writes the model and its history.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.store import ImageStore, open_store
from wbc_tasks.training.checkpoints import HISTORY_COLUMNS, Checkpoints, checkpoint_fingerprint, epoch_monitor_class
from wbc_tasks.training.input import EpochClock, make_dataset, reviewed_rows
from wbc_tasks.training.model import build_model, float32_copy, set_trainable, start_from_weights
from wbc_tasks.training.params import LearningRateSchedule, TrainingParams, WeightAveraging, Weights
from wbc_tasks.training.precision import PrecisionChoice, choose_precision, compile_model
from wbc_tasks.training.schedule import SCRATCH_LR_HINT, Phase, balanced_class_weights, plan_phases

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"


def _open_stores(train_store: Path, val_store: Path, params: TrainingParams) -> tuple[ImageStore, ImageStore]:
    """The training and validation stores, refused when empty (training) or of another image size."""
    train = open_store(Path(train_store))
    val = open_store(Path(val_store))
    if len(train) == 0:
        raise ValueError(f"training store {train_store} holds no images")
    if train.image_size != params.image_size:
        raise ValueError(
            f"training store {train_store} holds {train.image_size} px images but params.image_size "
            f"is {params.image_size}; re-run preprocessing with the same image size"
        )
    if len(val) and val.image_size != train.image_size:
        raise ValueError(
            f"validation store {val_store} holds {val.image_size} px images, training {train.image_size} px"
        )
    return train, val


def _log_plan(
    train: ImageStore,
    val: ImageStore,
    val_store: Path,
    params: TrainingParams,
    phases: list[Phase],
    choice: PrecisionChoice,
) -> None:
    """What this training will do, and the warnings its params and data call for."""
    log.info(
        "training on %d images %s; validating on %d %s; %s px, weights=%s, phases %s, batch %d, policy %s, "
        "XLA %s (%s), TF_ENABLE_ONEDNN_OPTS=%s",
        len(train),
        train.class_counts(CLASS_NAMES),
        len(val),
        val.class_counts(CLASS_NAMES),
        train.image_size,
        params.weights,
        [(p.name, p.epochs, p.learning_rate) for p in phases],
        params.batch_size,
        choice.policy,
        choice.xla,
        choice.reason,
        os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
    )
    if not len(val):
        log.warning("validation store %s is empty: early stopping watches the training loss", val_store)
    if params.weights == Weights.NONE and params.learning_rate_finetune < SCRATCH_LR_HINT:
        log.warning(
            "training from scratch at learning_rate_finetune=%g; VGG16 from scratch usually needs "
            "about 1e-4 (Adam) to learn in a reasonable number of epochs",
            params.learning_rate_finetune,
        )


def _class_weights(train: ImageStore, params: TrainingParams) -> dict[int, float] | None:
    """Balanced class weights when ``params.class_weights`` asks for them (logged), else None."""
    class_weight = balanced_class_weights(train.labels, len(CLASS_NAMES)) if params.class_weights else None
    if class_weight:
        log.info("class weights: %s", {CLASS_NAMES[i]: round(w, 3) for i, w in class_weight.items()})
    return class_weight


def _resume_or_build_model(
    checkpoints: Checkpoints,
    resumed: bool,
    image_size: int,
    params: TrainingParams,
    choice: PrecisionChoice,
    settings: Settings,
    *,
    dropout: float,
    dense_units: int,
    init_weights: Callable[[], list[np.ndarray]] | None = None,
) -> Any:
    """The last checkpoint's model when ``resumed``, else a new one (holding ``init_weights()``
    when given), under ``choice``'s dtype policy (the global policy is restored afterwards)."""
    import keras

    checkpoint_dir = checkpoints.folder
    previous_policy = keras.mixed_precision.global_policy()
    if choice.mixed:
        keras.mixed_precision.set_global_policy(choice.policy)
    try:
        if resumed:
            state = checkpoints.state
            model = keras.models.load_model(checkpoint_dir / state["model_file"])
            model.jit_compile = choice.xla
            log.info(
                "resuming from %s: %d epochs done %s",
                checkpoint_dir / state["model_file"],
                state["epochs_done"],
                state["phase_epochs"],
            )
        else:
            # Fails here, before any data is read, when pretrained weights are missing.
            model = build_model(
                image_size,
                len(CLASS_NAMES),
                weights=params.weights,
                settings=settings,
                dropout=dropout,
                dense_units=dense_units,
            )
            if init_weights is not None:
                start_from_weights(model, init_weights())
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return model


@dataclass
class _PhaseRunner:
    """Runs the training phases on one model, from where the checkpoints left off."""

    model: Any
    checkpoints: Checkpoints
    params: TrainingParams
    choice: PrecisionChoice
    train_data: Any
    val_data: Any
    class_weight: dict[int, float] | None
    monitor: str
    n_train: int
    total_epochs: int
    clock: EpochClock

    @property
    def early_stopping(self) -> bool:
        return self.params.early_stopping_patience > 0

    @property
    def averaging(self) -> bool:
        return self.params.weight_averaging == WeightAveraging.EMA

    def run(self, phases: list[Phase]) -> None:
        """Every phase not finished yet (a retry may plan more epochs for a phase, never go back to one)."""
        state = self.checkpoints.state
        for index, phase in enumerate(phases):
            later_started = any(state["phase_epochs"].get(p.name, 0) for p in phases[index + 1 :])
            if later_started or phase.name in state["stopped_early"]:
                continue
            done = state["phase_epochs"].get(phase.name, 0)
            remaining = max(0, phase.epochs - done)
            if remaining and done == 0:
                self._start_phase(index, phase)
            if remaining:
                self._fit_epochs(phase, remaining)

    def _start_phase(self, index: int, phase: Phase) -> None:
        """A new phase: start from the best weights so far, with a fresh patience count, the
        phase's layers trainable and the model compiled at its learning rate."""
        state = self.checkpoints.state
        if index > 0 and self.early_stopping and self.checkpoints.restore_best(self.model):
            log.info("phase %s starts from the best weights (epoch %d)", phase.name, state["best"]["epoch"])
        trainable = set_trainable(self.model, phase.name, self.params.unfreeze_layers)
        cosine = self.params.learning_rate_schedule == LearningRateSchedule.COSINE
        compile_model(
            self.model,
            phase.learning_rate,
            policy=self.choice.policy,
            xla=self.choice.xla,
            cosine_decay_steps=phase.epochs * int(self.train_data.cardinality()) if cosine else None,
            average_weights=self.averaging,
        )
        state["wait"] = 0
        log.info(
            "phase %s: %d epochs at lr %g%s, %d trainable weights%s",
            phase.name,
            phase.epochs,
            phase.learning_rate,
            " falling to 0 along a half cosine" if cosine else "",
            trainable,
            "; validated and kept: their moving average" if self.averaging else "",
        )

    def _fit_epochs(self, phase: Phase, remaining: int) -> None:
        """The phase's ``remaining`` epochs, checkpointed and watched by the epoch monitor."""
        import keras

        start = self.checkpoints.state["epochs_done"]
        self.model.fit(
            self.train_data,
            validation_data=self.val_data,
            epochs=start + remaining,
            initial_epoch=start,
            class_weight=self.class_weight,
            callbacks=[
                # Validation sees the averaged weights (swapped in and out around it); the
                # monitor then checkpoints the raw ones with the optimizer, and keeps the
                # averaged ones as the best. Keras' fit ends by putting the average in place.
                *([keras.callbacks.SwapEMAWeights()] if self.averaging else []),
                epoch_monitor_class()(
                    phase=phase.name,
                    checkpoints=self.checkpoints,
                    monitor=self.monitor,
                    patience=self.params.early_stopping_patience,
                    n_train=self.n_train,
                    total_epochs=self.total_epochs,
                    clock=self.clock,
                ),
            ],
            shuffle=False,  # the dataset shuffles itself, per epoch, from the seed
            verbose=0,
        )


def _summary(
    model_path: Path,
    history_path: Path,
    checkpoint_dir: Path,
    state: dict[str, Any],
    history: pd.DataFrame,
    monitor: str,
    resumed_from_epoch: int,
    choice: PrecisionChoice,
    class_weight: dict[int, float] | None,
) -> dict:
    """What :func:`train_model` returns: epochs per phase, the best value, speed, precision, paths."""
    speeds = history["images_per_s"].dropna()
    return {
        "model_path": str(model_path),
        "history_path": str(history_path),
        "checkpoint_dir": str(checkpoint_dir),
        "epochs": dict(state["phase_epochs"]),
        "epochs_total": int(state["epochs_done"]),
        "monitor": monitor,
        "best_value": state["best"]["value"] if state["best"] else None,
        "best_epoch": state["best"]["epoch"] if state["best"] else None,
        "stopped_early": bool(state["stopped_early"]),
        "stopped_early_phases": list(state["stopped_early"]),
        # The first epoch pays for tracing/compiling; the median is what a longer run sees.
        "images_per_s": float(speeds.median()) if len(speeds) else None,
        "resumed_from_epoch": int(resumed_from_epoch),
        "mixed_precision": choice.mixed,
        "precision": choice.policy,
        "precision_reason": choice.reason,
        "xla": choice.xla,
        "class_weights": {CLASS_NAMES[i]: w for i, w in class_weight.items()} if class_weight else None,
    }


def train_model(
    train_store: Path,
    val_store: Path,
    out_dir: Path,
    params: TrainingParams,
    settings: Settings,
    *,
    checkpoint_dir: Path | None = None,
    flip_augment: bool = True,
    dropout: float = 0.5,
    dense_units: int = 256,
    init_from_version: int | None = None,
    init_weights: Callable[[], list[np.ndarray]] | None = None,
) -> dict:
    """Train on ``train_store``, stop early on ``val_store``; write ``out_dir/model.keras``.

    ``init_weights`` (the registered ``init_from_version``'s weights, asked for only when no
    checkpoint is resumed) replace the new model's initial ones: the run fine-tunes that version.

    ``checkpoint_dir`` (default ``out_dir/checkpoints``) should lie outside ``out_dir`` when the
    caller wipes ``out_dir`` on retry (``workdir.run_step`` does): a retry with the same
    ``checkpoint_dir`` resumes after the last finished epoch. Early stopping watches
    ``val_loss`` (training ``loss`` if the validation store is empty): a phase ends after
    ``early_stopping_patience`` epochs without improvement, the next phase starts from the best
    weights so far and the saved model has the best weights overall; ``early_stopping_patience=0``
    turns it off (every epoch runs, the last weights are kept). Returns a small summary (epochs per
    phase, best value, images/s, paths).
    """
    import keras

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    n_classes = len(CLASS_NAMES)
    train, val = _open_stores(train_store, val_store, params)

    choice = choose_precision(params.precision, params.xla)
    if choice.warning:
        log.warning("precision %s: %s", choice.policy, choice.warning)
    keras.utils.set_random_seed(params.seed)
    phases = plan_phases(params)
    monitor = "val_loss" if len(val) else "loss"
    _log_plan(train, val, val_store, params, phases, choice)
    class_weight = _class_weights(train, params)

    checkpoints = Checkpoints(
        checkpoint_dir,
        checkpoint_fingerprint(params, train, val, params.class_weights, choice.policy, init_from_version),
    )
    resumed = checkpoints.load()
    model = _resume_or_build_model(
        checkpoints,
        resumed,
        train.image_size,
        params,
        choice,
        settings,
        dropout=dropout,
        dense_units=dense_units,
        init_weights=init_weights,
    )
    resumed_from_epoch = checkpoints.state["epochs_done"] if resumed else 0
    state = checkpoints.state

    clock = EpochClock()
    train_data = make_dataset(
        train,
        params.batch_size,
        n_classes,
        shuffle=True,
        seed=params.seed,
        clock=clock,
        flip_augment=flip_augment,
        outlier_share=params.outlier_exposure,
        guaranteed_rows=reviewed_rows(train),
        guaranteed_share=params.reviewed_share,
        guaranteed_balanced=params.reviewed_balance,
    )
    val_data = make_dataset(val, params.batch_size, n_classes, shuffle=False, seed=params.seed) if len(val) else None
    runner = _PhaseRunner(
        model,
        checkpoints,
        params,
        choice,
        train_data,
        val_data,
        class_weight,
        monitor,
        n_train=len(train),
        total_epochs=sum(p.epochs for p in phases),
        clock=clock,
    )
    runner.run(phases)

    if runner.early_stopping and checkpoints.restore_best(model):
        log.info(
            "restored the best weights: epoch %d, %s=%.4f", state["best"]["epoch"], monitor, state["best"]["value"]
        )
    if choice.mixed:
        model = float32_copy(model, settings=settings)
    model_path = out_dir / MODEL_FILE
    model.save(model_path)
    history = pd.DataFrame(state["history"], columns=HISTORY_COLUMNS)
    history.to_csv(out_dir / HISTORY_FILE, index=False)
    summary = _summary(
        model_path,
        out_dir / HISTORY_FILE,
        checkpoint_dir,
        state,
        history,
        monitor,
        resumed_from_epoch,
        choice,
        class_weight,
    )
    log.info("training done: %s", {k: summary[k] for k in ("epochs", "best_value", "stopped_early", "images_per_s")})
    return summary
