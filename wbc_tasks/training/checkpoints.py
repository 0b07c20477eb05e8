"""What makes training resumable and observable: the checkpoint folder that survives a retried
task (model with optimizer state, best weights, early-stopping state, history) and the per-epoch
monitor that logs a line, logs MLflow metrics (when a run is active), checkpoints and stops early.

Every finished epoch is checkpointed, so a retried task resumes after the last finished epoch
instead of starting again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.store import ImageStore
from wbc_tasks.training.input import EpochClock
from wbc_tasks.training.params import TrainingParams

log = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "state.json"
HISTORY_COLUMNS = [
    "epoch",
    "phase",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "images_per_s",
    "seconds",
]


def _active_mlflow():
    """The ``mlflow`` module if a run is active, else None.

    Checked through ``sys.modules``: a run can only be active if someone imported mlflow, and
    training should not pay for importing it otherwise.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        return mlflow
    return None


def checkpoint_fingerprint(
    params: TrainingParams,
    train: ImageStore,
    val: ImageStore,
    class_weights: bool,
    policy: str = "float32",
    init_from_version: int | None = None,
) -> dict:
    """What a checkpoint must agree on to be resumed (epoch counts and patience may change). The
    dtype policy is part of it: a retry on another device or precision starts over, saying so,
    rather than resuming a float16 model on a CPU; so is the registered version the run started
    from (``init_from``, resolved to one number)."""
    return {
        "policy": policy,
        "init_from_version": init_from_version,
        "weights": params.weights,
        "image_size": train.image_size,
        "batch_size": params.batch_size,
        "learning_rate_head": params.learning_rate_head,
        "learning_rate_finetune": params.learning_rate_finetune,
        "learning_rate_schedule": params.learning_rate_schedule,
        "weight_averaging": params.weight_averaging,
        "outlier_exposure": params.outlier_exposure,
        "reviewed_share": params.reviewed_share,
        "reviewed_balance": params.reviewed_balance,
        "unfreeze_layers": params.unfreeze_layers,
        "seed": params.seed,
        "class_weights": class_weights,
        "train_images": len(train),
        "train_labels_sha256": hashlib.sha256(train.labels.tobytes()).hexdigest(),
        "val_images": len(val),
    }


def validated_weights(model) -> list[np.ndarray]:
    """The weights the epoch's validation saw, in ``model.get_weights()`` order: the model's own,
    or, when its optimizer averages the weights (``use_ema``; Keras' ``SwapEMAWeights`` swaps the
    average in for validation only), the average in place of each trainable weight."""
    from keras import ops

    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not getattr(optimizer, "use_ema", False):
        return model.get_weights()
    # Keras keeps the average beside the optimizer's variable list, in the same order (private
    # names, used by its own SwapEMAWeights: tests/training/test_train.py checks them).
    average = {id(v): a for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
    return [ops.convert_to_numpy(average.get(id(w), w)) for w in model.weights]


class Checkpoints:
    """The resumable state of one training, in ``checkpoint_dir`` (survives a retried task).

    Files: ``epoch-NNNN.keras`` (model + optimizer after epoch N), ``best-NNNN.npz`` (weights of
    the best epoch so far) and ``state.json`` written last; older files are removed only after
    the state naming the newer ones is in place, so a crash at any point leaves a usable set.
    """

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {
            "fingerprint": fingerprint,
            "epochs_done": 0,
            "phase_epochs": {},
            "model_file": None,
            "best": None,
            "wait": 0,
            "stopped_early": [],
            "history": [],
        }

    def load(self) -> bool:
        """Adopt a previous attempt's state if it matches; return whether there was one."""
        path = self.folder / CHECKPOINT_STATE_FILE
        if not path.is_file():
            return False
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable checkpoint state %s (%s); starting afresh", path, exc)
            return False
        if state.get("fingerprint") != self.fingerprint:
            changed = sorted(
                k
                for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                if state.get("fingerprint", {}).get(k) != self.fingerprint.get(k)
            )
            log.warning(
                "checkpoints in %s are from a different setup (%s differ); starting afresh", self.folder, changed
            )
            return False
        if not state.get("model_file") or not (self.folder / state["model_file"]).is_file():
            log.warning("checkpoint state in %s names a missing model file; starting afresh", self.folder)
            return False
        self.state = state
        return True

    def save_epoch(self, model, epoch: int, improved: bool) -> None:
        keep = {CHECKPOINT_STATE_FILE}
        model_file = f"epoch-{epoch:04d}.keras"
        tmp = self.folder / f".tmp-{model_file}"
        model.save(tmp)
        tmp.replace(self.folder / model_file)
        self.state["model_file"] = model_file
        if improved:
            best_file = f"best-{epoch:04d}.npz"
            tmp = self.folder / f".tmp-{best_file}"
            with open(tmp, "wb") as handle:
                np.savez(handle, *validated_weights(model))
            tmp.replace(self.folder / best_file)
            self.state["best"]["file"] = best_file
        best_file_kept = (self.state["best"] or {}).get("file")
        keep |= {model_file, *([best_file_kept] if best_file_kept else [])}
        write_json_atomic(self.folder / CHECKPOINT_STATE_FILE, self.state)
        for path in self.folder.iterdir():
            if path.name not in keep and (path.suffix in (".keras", ".npz")):
                path.unlink()

    def restore_best(self, model) -> bool:
        best = self.state.get("best")
        if not best or not best.get("file"):
            return False
        with np.load(self.folder / best["file"]) as arrays:
            model.set_weights([arrays[f"arr_{i}"] for i in range(len(arrays.files))])
        return True


@cache
def epoch_monitor_class():
    """The Keras callback class, defined on first use so importing this module stays light."""
    import keras

    class EpochMonitor(_EpochMonitorLogic, keras.callbacks.Callback):
        pass

    return EpochMonitor


class _EpochMonitorLogic:
    """Per epoch: one log line, MLflow metrics, a checkpoint, early stopping.

    Written here rather than using ``keras.callbacks.EarlyStopping``/``ModelCheckpoint``: those
    reset their state at the start of every ``fit`` call, so they cannot resume after a retried
    task; this one keeps its state (best value, epochs without improvement) in the checkpoint.
    """

    #: Set by Keras on the real callback class (this logic is mixed into keras.callbacks.Callback).
    model: Any

    def __init__(
        self,
        *,
        phase: str,
        checkpoints: Checkpoints,
        monitor: str,
        patience: int,
        n_train: int,
        total_epochs: int,
        clock: EpochClock,
    ) -> None:
        super().__init__()
        self.phase = phase
        self.checkpoints = checkpoints
        self.monitor = monitor
        self.patience = patience
        self.n_train = n_train
        self.total_epochs = total_epochs
        self.clock = clock
        self._started = 0.0
        self._train_done: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.epoch = epoch
        self._started = time.perf_counter()
        self._train_done = None

    def on_test_begin(self, logs=None):
        if self._train_done is None:
            self._train_done = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import keras

        logs = dict(logs or {})
        ended = time.perf_counter()
        train_seconds = (self._train_done or ended) - self._started
        state = self.checkpoints.state
        row = {
            "epoch": epoch + 1,
            "phase": self.phase,
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": logs.get("val_accuracy"),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "images_per_s": self.n_train / train_seconds if train_seconds > 0 else None,
            "seconds": ended - self._started,
        }
        row = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in row.items()}
        value = row[self.monitor]
        best = state["best"]
        improved = value is not None and math.isfinite(value) and (best is None or value < best["value"])
        if improved:
            state["best"] = {"monitor": self.monitor, "value": float(value), "epoch": epoch + 1, "file": None}
            state["wait"] = 0
        else:
            state["wait"] += 1
        state["epochs_done"] = epoch + 1
        state["phase_epochs"][self.phase] = state["phase_epochs"].get(self.phase, 0) + 1
        state["history"].append(row)
        if self.patience > 0 and state["wait"] >= self.patience:
            self.model.stop_training = True
            state["stopped_early"].append(self.phase)
        self.checkpoints.save_epoch(self.model, epoch + 1, improved)

        parts = [f"{k}={row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if row[k] is not None]
        log.info(
            "epoch %d/%d [%s] %s lr=%.2e images/s=%.1f (%.1f s)%s%s",
            epoch + 1,
            self.total_epochs,
            self.phase,
            " ".join(parts),
            row["learning_rate"],
            row["images_per_s"] or 0.0,
            row["seconds"],
            f" best {self.monitor}" if improved else "",
            f"; stopping early: no {self.monitor} improvement in {self.patience} epochs"
            if self.model.stop_training
            else "",
        )
        mlflow = _active_mlflow()
        if mlflow is not None:
            metrics = {k: row[k] for k in HISTORY_COLUMNS[2:] if row[k] is not None}
            try:
                mlflow.log_metrics(metrics, step=epoch + 1)
            except Exception as exc:
                log.warning("could not log epoch %d metrics to MLflow: %s", epoch + 1, exc)
