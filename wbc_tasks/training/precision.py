"""Numeric precision and compilation: mixed precision and XLA where the hardware gains from
them, and the optimizer that goes with the choice."""

from __future__ import annotations


def precision_for_this_machine() -> tuple[bool, bool]:
    """(mixed float16, XLA): both on a CUDA GPU, where they pay; off on CPUs."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    return gpu, gpu


def compile_model(model, learning_rate: float, *, mixed: bool, xla: bool) -> None:
    """Adam at ``learning_rate`` (loss-scaled under mixed precision), cross-entropy, accuracy."""
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=xla)
