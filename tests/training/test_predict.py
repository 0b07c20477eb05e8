"""Batched prediction: every batch has the model's usual shape, the padding never reaches the
result, and a store is read chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_tasks.training.predict import predict_batches


class RecordingModel:
    """A stand-in for a Keras model: the mean pixel of each image as a one-class output."""

    output_shape = (None, 1)

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 20])
def test_every_batch_has_the_same_shape_and_the_padding_is_dropped(n):
    images = np.arange(n * 2 * 2 * 3, dtype=np.float32).reshape(n, 2, 2, 3)
    model = RecordingModel()
    probabilities = predict_batches(model, images, batch_size=8)
    assert probabilities.shape == (n, 1)
    np.testing.assert_allclose(probabilities[:, 0], images.reshape(n, -1).mean(axis=1))
    assert set(model.shapes) == {(8, 2, 2, 3)}
    assert len(model.shapes) == -(-n // 8)


def test_no_images_give_no_rows():
    model = RecordingModel()
    assert predict_batches(model, np.zeros((0, 2, 2, 3)), batch_size=8).shape == (0, 1)
    assert model.shapes == []
