"""Batched model prediction: the one place images meet the model.

Evaluation, the champion's check at promotion and nightly classification all predict through
:func:`predict_batches` (arrays already in memory) or :func:`predict_store` (a memory-mapped
store, read a chunk at a time). Every batch has the same shape, the last one padded with zeros,
because a new input shape makes TensorFlow retrace the model (seconds for VGG16).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from wbc_tasks.data.store import ImageStore, release_pages

#: Images read from a store's memory map at a time (its pages are released after each chunk).
PREDICTION_CHUNK = 512


def _padded_batches(images: Any, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """``images`` (an array or memory map) ``batch_size`` at a time, each batch with its count of
    real images; the last batch is padded with zeros to ``batch_size``."""
    batch_size = max(1, int(batch_size))
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size])
        count = len(batch)
        if count < batch_size:
            padding = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, padding])
        yield batch, count


def predict_batches(model: Any, images: Any, batch_size: int) -> np.ndarray:
    """Class probabilities of ``images`` (an array or memory map), ``batch_size`` at a time.

    The last batch is padded to ``batch_size`` and the padding's rows are dropped.
    """
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    parts = [np.asarray(model.predict_on_batch(batch))[:count] for batch, count in _padded_batches(images, batch_size)]
    return np.concatenate(parts)


def predict_outputs(model: Any, images: Any, batch_size: int) -> list[np.ndarray]:
    """Every output of a multi-output ``model`` for ``images``, ``batch_size`` at a time (the
    last batch padded like :func:`predict_batches`), one array per output."""
    parts = [
        [np.asarray(o)[:count] for o in model.predict_on_batch(batch)]
        for batch, count in _padded_batches(images, batch_size)
    ]
    if not parts:
        return [np.zeros((0, *o.shape[1:]), np.float32) for o in model.outputs]
    return [np.concatenate(column) for column in zip(*parts)]


def predict_store(model: Any, store: ImageStore, batch_size: int = 32) -> np.ndarray:
    """Class probabilities for every image of ``store``, read from its memory map in chunks."""
    n_classes = int(model.output_shape[-1])
    if len(store) == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    expected = tuple(model.input_shape[1:3])
    if expected != (store.image_size, store.image_size):
        raise ValueError(
            f"model expects {expected[0]}x{expected[1]} px images; store {store.path} holds "
            f"{store.image_size} px images"
        )
    parts = []
    for start, stop in store.chunks(PREDICTION_CHUNK):
        parts.append(predict_batches(model, store.images[start:stop], batch_size))
        release_pages(store.images)
    return np.concatenate(parts).astype(np.float32)
