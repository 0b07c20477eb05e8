"""The model's four outputs from one pass: probabilities, logits, pooled top features and averaged
mid-level features (what calibration and the unfamiliar score need), built over a trained
model's own layers, and predicted in batches."""

from __future__ import annotations

from typing import Any

import numpy as np

from wbc_tasks.training import unfamiliar as uf
from wbc_tasks.training.calibration import LOGITS_LAYER


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
