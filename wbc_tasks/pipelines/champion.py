"""The champion's metrics on a training run's own test images, which promotion compares the
candidate with: the training pipeline rebuilds the images (from the run's split and preprocess
folders), the registry only decides (:func:`wbc_tasks.registry.promotion.promote_if_better`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import Step
from wbc_tasks.registry.versions import ModelRef


def champion_metrics_on_this_test_split(
    settings: Settings, run: Path, batch_size: int
) -> Callable[[ModelRef], dict[str, Any]]:
    """A function giving a registered model's metrics on a training run's test images.

    The champion is evaluated on the SAME images as the candidate (the current hash-stable test
    split in ``run``, the run's work folder), at its own image size and with its own class list.
    """

    def evaluate(ref: ModelRef) -> dict[str, Any]:
        import numpy as np

        from wbc_tasks.core.workdir import require_complete
        from wbc_tasks.data.dataset import headline_test, read_manifest
        from wbc_tasks.data.preprocess import build_split_store
        from wbc_tasks.data.store import open_store
        from wbc_tasks.registry.versions import load_keras_model
        from wbc_tasks.training.evaluate import compute_metrics
        from wbc_tasks.training.predict import predict_store

        test_dir = run / Step.PREPROCESS / "test"
        if open_store(test_dir).image_size != ref.image_size:
            test_dir = run / "promote_inputs" / f"test-{ref.image_size}px"
            if not (test_dir / "labels.npy").exists():
                manifest = read_manifest(run / Step.SPLIT)
                data_dir = Path(require_complete(run / Step.SPLIT)["data_dir"])
                table = headline_test(manifest)  # labelled only: the candidate's test images
                build_split_store(table, data_dir, test_dir, ref.image_size, settings)
        store = open_store(test_dir)
        known = {name: i for i, name in enumerate(ref.class_names)}
        missing = sorted(set(store.records["class"]) - set(known))
        if missing:
            raise ValueError(f"champion {ref.uri} cannot classify test classes {missing}")
        model = load_keras_model(settings, ref)
        probabilities = predict_store(model, store, batch_size)
        y_true = np.array([known[c] for c in store.records["class"]], dtype=np.int64)
        return compute_metrics(y_true, probabilities, tuple(ref.class_names))

    return evaluate
