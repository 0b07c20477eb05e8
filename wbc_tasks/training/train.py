"""Train the VGG16 classifier from memory-mapped stores: schedule, input pipeline, checkpoints.

Schedule: with ImageNet weights, a ``head`` phase (VGG16 frozen, ``learning_rate_head``,
``epochs_head`` epochs) then a ``finetune`` phase (the top ``unfreeze_layers`` conv layers
unfrozen, ``learning_rate_finetune``, ``epochs_finetune`` epochs). Without pretrained weights a
frozen random base would learn nothing, so a single ``scratch`` phase trains the whole network
for ``epochs_head + epochs_finetune`` epochs at ``learning_rate_finetune`` (VGG16 from scratch
wants about 1e-4 with Adam; the default 1e-5 suits fine-tuning and is slow from scratch).

Every finished epoch is checkpointed (model with optimizer state, phase, early-stopping state,
history) in a folder that survives a retry, so a retried task resumes after the last finished
epoch instead of starting again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wbc_tasks.core.settings import CLASS_NAMES, Settings
from wbc_tasks.training.params import TrainingParams
from wbc_tasks.data.store import ImageStore, open_store, release_pages
from wbc_tasks.core.workdir import write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
CHECKPOINT_STATE_FILE = "state.json"
HISTORY_COLUMNS = [
    "epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
    "learning_rate", "images_per_s", "seconds",
]
#: Below this, from-scratch training is very slow to start; the log says so.
_SCRATCH_LR_HINT = 5e-5


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    learning_rate: float


def plan_phases(params: TrainingParams) -> list[Phase]:
    """The training phases ``params`` ask for (see the module docstring)."""
    if params.weights == "none":
        return [Phase("scratch", params.epochs_head + params.epochs_finetune, params.learning_rate_finetune)]
    return [
        Phase("head", params.epochs_head, params.learning_rate_head),
        Phase("finetune", params.epochs_finetune, params.learning_rate_finetune),
    ]


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """scikit-learn's "balanced" weights for the classes present; 1.0 for absent ones."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    result = {i: 1.0 for i in range(n_classes)}
    result.update({int(c): float(w) for c, w in zip(present, weights)})
    return result


class _EpochClock:
    """The epoch the input pipeline is producing; set by the monitor at each epoch start.

    Shuffling and flips are drawn from (seed, epoch, batch), never from a running random state,
    so a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    epoch = 0


def make_dataset(
    store: ImageStore,
    batch_size: int,
    n_classes: int,
    *,
    shuffle: bool,
    seed: int,
    clock: _EpochClock | None = None,
    flip_augment: bool = False,
):
    """A ``tf.data`` pipeline of (uint8 images, one-hot labels) batches read from the memory map.

    Batches of indices come from a generator; the rows are read by ``tf.numpy_function`` (in
    parallel, order kept), so only a few batches are ever in memory. ``flip_augment`` applies a
    random one of the eight flips/right-angle rotations per image: a cell has no up or left.
    """
    import tensorflow as tf

    n = len(store)
    clock = clock or _EpochClock()
    images, labels = store.images, store.labels.astype(np.int32)

    def index_batches():
        epoch = clock.epoch
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for number, start in enumerate(range(0, n, batch_size)):
            yield np.int64(epoch), np.int64(number), order[start : start + batch_size].astype(np.int64)

    def read(epoch: np.int64, number: np.int64, index: np.ndarray):
        index = np.sort(index)  # ascending reads are kinder to the page cache; order is irrelevant
        batch = np.asarray(images[index])
        release_pages(images)  # resident memory stays at a few batches, whatever the store's size
        if flip_augment:
            rng = np.random.default_rng([seed, int(epoch), int(number), 1])
            batch = batch.copy()
            for i, (turns, mirror) in enumerate(zip(rng.integers(0, 4, len(index)), rng.random(len(index)) < 0.5)):
                view = np.rot90(batch[i], int(turns))
                batch[i] = view[:, ::-1] if mirror else view
        return batch, labels[index]

    def load(epoch, number, index):
        batch, batch_labels = tf.numpy_function(read, [epoch, number, index], [tf.uint8, tf.int32])
        batch.set_shape((None, store.image_size, store.image_size, 3))
        batch_labels.set_shape((None,))
        return batch, tf.one_hot(batch_labels, n_classes)

    signature = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((None,), tf.int64),
    )
    dataset = tf.data.Dataset.from_generator(index_batches, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _active_mlflow():
    """The ``mlflow`` module if a run is active, else None.

    Checked through ``sys.modules``: a run can only be active if someone imported mlflow, and
    training should not pay for importing it otherwise.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        return mlflow
    return None


def _fingerprint(params: TrainingParams, train: ImageStore, val: ImageStore, class_weights: bool) -> dict:
    """What a checkpoint must agree on to be resumed (epoch counts and patience may change)."""
    return {
        "weights": params.weights,
        "image_size": train.image_size,
        "batch_size": params.batch_size,
        "learning_rate_head": params.learning_rate_head,
        "learning_rate_finetune": params.learning_rate_finetune,
        "unfreeze_layers": params.unfreeze_layers,
        "seed": params.seed,
        "class_weights": class_weights,
        "train_images": len(train),
        "train_labels_sha256": hashlib.sha256(train.labels.tobytes()).hexdigest(),
        "val_images": len(val),
    }


class _Checkpoints:
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
                k for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                if state.get("fingerprint", {}).get(k) != self.fingerprint.get(k)
            )
            log.warning("checkpoints in %s are from a different setup (%s differ); starting afresh", self.folder, changed)
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
                np.savez(handle, *model.get_weights())
            tmp.replace(self.folder / best_file)
            self.state["best"]["file"] = best_file
        keep |= {model_file, (self.state["best"] or {}).get("file")}
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
def _epoch_monitor_class():
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

    def __init__(self, *, phase: str, checkpoints: _Checkpoints, monitor: str, patience: int,
                 n_train: int, total_epochs: int, clock: _EpochClock) -> None:
        super().__init__()
        self.phase = phase
        self.checkpoints = checkpoints
        self.monitor = monitor
        self.patience = patience
        self.n_train = n_train
        self.total_epochs = total_epochs
        self.clock = clock
        self._started = 0.0
        self._train_done = None

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
            epoch + 1, self.total_epochs, self.phase, " ".join(parts), row["learning_rate"],
            row["images_per_s"] or 0.0, row["seconds"],
            f" best {self.monitor}" if improved else "",
            f"; stopping early: no {self.monitor} improvement in {self.patience} epochs" if self.model.stop_training else "",
        )
        mlflow = _active_mlflow()
        if mlflow is not None:
            metrics = {k: row[k] for k in HISTORY_COLUMNS[2:] if row[k] is not None}
            try:
                mlflow.log_metrics(metrics, step=epoch + 1)
            except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not cost the training
                log.warning("could not log epoch %d metrics to MLflow: %s", epoch + 1, exc)


def _compile(model, learning_rate: float, *, mixed: bool, xla: bool) -> None:
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=xla)


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
) -> dict:
    """Train on ``train_store``, stop early on ``val_store``; write ``out_dir/model.keras``.

    ``checkpoint_dir`` (default ``out_dir/checkpoints``) should lie outside ``out_dir`` when the
    caller wipes ``out_dir`` on retry (``workdir.run_step`` does): a retry with the same
    ``checkpoint_dir`` resumes after the last finished epoch. Early stopping watches
    ``val_loss`` (training ``loss`` if the validation store is empty): a phase ends after
    ``early_stopping_patience`` epochs without improvement, the next phase starts from the best
    weights so far and the saved model has the best weights overall; ``early_stopping_patience=0``
    turns it off (every epoch runs, the last weights are kept). Returns a small summary (epochs per phase, best value, images/s, paths).
    """
    import keras
    import tensorflow as tf

    from wbc_tasks.training.model import build_model, float32_copy, set_trainable

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    n_classes = len(CLASS_NAMES)
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
        raise ValueError(f"validation store {val_store} holds {val.image_size} px images, training {train.image_size} px")

    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed, xla = gpu, gpu
    keras.utils.set_random_seed(params.seed)
    phases = plan_phases(params)
    total_epochs = sum(p.epochs for p in phases)
    monitor = "val_loss" if len(val) else "loss"
    log.info(
        "training on %d images %s; validating on %d %s; %s px, weights=%s, phases %s, batch %d, "
        "mixed precision %s, XLA %s",
        len(train), train.class_counts(CLASS_NAMES), len(val), val.class_counts(CLASS_NAMES),
        train.image_size, params.weights, [(p.name, p.epochs, p.learning_rate) for p in phases],
        params.batch_size, mixed, xla,
    )
    if not len(val):
        log.warning("validation store %s is empty: early stopping watches the training loss", val_store)
    if params.weights == "none" and params.learning_rate_finetune < _SCRATCH_LR_HINT:
        log.warning(
            "training from scratch at learning_rate_finetune=%g; VGG16 from scratch usually needs "
            "about 1e-4 (Adam) to learn in a reasonable number of epochs", params.learning_rate_finetune,
        )
    class_weight = balanced_class_weights(train.labels, n_classes) if params.class_weights else None
    if class_weight:
        log.info("class weights: %s", {CLASS_NAMES[i]: round(w, 3) for i, w in class_weight.items()})

    checkpoints = _Checkpoints(checkpoint_dir, _fingerprint(params, train, val, params.class_weights))
    resumed = checkpoints.load()
    previous_policy = keras.mixed_precision.global_policy()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if resumed:
            state = checkpoints.state
            model = keras.models.load_model(checkpoint_dir / state["model_file"])
            model.jit_compile = xla
            log.info(
                "resuming from %s: %d epochs done %s", checkpoint_dir / state["model_file"],
                state["epochs_done"], state["phase_epochs"],
            )
        else:
            # Fails here, before any data is read, when pretrained weights are missing.
            model = build_model(
                train.image_size, n_classes, weights=params.weights, settings=settings,
                dropout=dropout, dense_units=dense_units,
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    resumed_from_epoch = checkpoints.state["epochs_done"] if resumed else 0
    state = checkpoints.state

    clock = _EpochClock()
    train_data = make_dataset(
        train, params.batch_size, n_classes, shuffle=True, seed=params.seed, clock=clock, flip_augment=flip_augment
    )
    val_data = make_dataset(val, params.batch_size, n_classes, shuffle=False, seed=params.seed) if len(val) else None
    early_stopping = params.early_stopping_patience > 0

    for index, phase in enumerate(phases):
        later_started = any(state["phase_epochs"].get(p.name, 0) for p in phases[index + 1 :])
        if later_started or phase.name in state["stopped_early"]:
            continue  # finished (a retry may plan more epochs for a phase, never go back to one)
        done = state["phase_epochs"].get(phase.name, 0)
        remaining = max(0, phase.epochs - done)
        if remaining and done == 0:
            # A new phase: start from the best weights so far, with a fresh patience count.
            if index > 0 and early_stopping and checkpoints.restore_best(model):
                log.info("phase %s starts from the best weights (epoch %d)", phase.name, state["best"]["epoch"])
            trainable = set_trainable(model, phase.name, params.unfreeze_layers)
            _compile(model, phase.learning_rate, mixed=mixed, xla=xla)
            state["wait"] = 0
            log.info("phase %s: %d epochs at lr %g, %d trainable weights", phase.name, phase.epochs, phase.learning_rate, trainable)
        if remaining:
            start = state["epochs_done"]
            model.fit(
                train_data,
                validation_data=val_data,
                epochs=start + remaining,
                initial_epoch=start,
                class_weight=class_weight,
                callbacks=[
                    _epoch_monitor_class()(
                        phase=phase.name, checkpoints=checkpoints, monitor=monitor,
                        patience=params.early_stopping_patience, n_train=len(train),
                        total_epochs=total_epochs, clock=clock,
                    )
                ],
                shuffle=False,  # the dataset shuffles itself, per epoch, from the seed
                verbose=0,
            )

    if early_stopping and checkpoints.restore_best(model):
        log.info("restored the best weights: epoch %d, %s=%.4f", state["best"]["epoch"], monitor, state["best"]["value"])
    if mixed:
        model = float32_copy(model, settings=settings)
    model_path = out_dir / MODEL_FILE
    model.save(model_path)
    history = pd.DataFrame(state["history"], columns=HISTORY_COLUMNS)
    history.to_csv(out_dir / HISTORY_FILE, index=False)
    speeds = history["images_per_s"].dropna()
    summary = {
        "model_path": str(model_path),
        "history_path": str(out_dir / HISTORY_FILE),
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
        "mixed_precision": mixed,
        "xla": xla,
        "class_weights": {CLASS_NAMES[i]: w for i, w in class_weight.items()} if class_weight else None,
    }
    log.info("training done: %s", {k: summary[k] for k in ("epochs", "best_value", "stopped_early", "images_per_s")})
    return summary
