"""Evaluation: argmax predictions, metrics with absent classes, files, per-group breakdown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.training.evaluate import NO_GROUP, compute_metrics, evaluate_model, read_groups

NAMES = ("a", "b", "c")


def test_predictions_are_argmax_not_rounding():
    # Rounding would turn the first row into "no class at all"; argmax says class a.
    probabilities = [[0.40, 0.35, 0.25], [0.20, 0.50, 0.30], [0.10, 0.30, 0.60], [0.45, 0.30, 0.25]]
    metrics = compute_metrics([0, 1, 1, 2], probabilities, NAMES)

    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert metrics["per_class"]["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
        "predicted": 2,
    }
    assert metrics["per_class"]["c"]["precision"] == 0.0  # predicted once, wrongly
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert metrics["confusion_matrix_normalized"][1] == [0.0, 0.5, 0.5]


def test_absent_classes_are_reported_as_such_not_as_zero_recall():
    names = ("a", "b", "c", "d")
    probabilities = [
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.6, 0.2, 0.1],
        [0.1, 0.2, 0.3, 0.4],  # true b, predicted d: a class without test images
        [0.6, 0.2, 0.1, 0.1],
    ]
    metrics = compute_metrics([0, 1, 1, 0], probabilities, names)

    assert metrics["absent_classes"] == ["c", "d"]
    assert set(metrics["per_class_recall"]) == {"a", "b"}
    assert metrics["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0}
    assert metrics["per_class"]["d"]["recall"] is None
    assert metrics["per_class"]["d"]["precision"] == 0.0  # predicted for a b: a real mistake
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # macro F1 over the classes with test images: a (p=1, r=1), b (p=1, r=.5)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["confusion_matrix"][2] == [0, 0, 0, 0]
    assert metrics["confusion_matrix_normalized"][2] == [None, None, None, None]
    json.dumps(metrics)  # all plain JSON


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="probabilities must be"):
        compute_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], NAMES)
    with pytest.raises(ValueError, match="labels but"):
        compute_metrics([0], [[0.2, 0.3, 0.5]] * 2, NAMES)
    with pytest.raises(ValueError, match="no test images"):
        compute_metrics([], np.zeros((0, 3)), NAMES)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """An (untrained, but deterministic) model evaluated on 27 generated test images with groups."""
    import keras

    from tests.demo_stores import build_demo_stores
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.training.model import build_model

    root = tmp_path_factory.mktemp("evaluate")
    stores = build_demo_stores(root / "data", splits={"test": 3}, size=32, render_size=48)
    keras.utils.set_random_seed(7)
    model = build_model(32, len(CLASS_NAMES), weights="none", settings=get_settings(), dense_units=32)
    model.save(root / "model.keras")
    records = pd.read_csv(stores["test"] / "records.csv")
    # two labs by path, one image left out of the file on purpose
    groups = pd.DataFrame(
        {"path": records["path"].iloc[1:], "group": ["lab-a" if i % 2 else "lab-b" for i in range(1, len(records))]}
    )
    groups.to_csv(root / "groups.csv", index=False)
    summary = evaluate_model(
        root / "model.keras",
        stores["test"],
        root / "out",
        class_names=CLASS_NAMES,
        groups_csv=root / "groups.csv",
        batch_size=8,
    )
    return root, summary, records


def test_evaluate_model_writes_every_artifact(evaluation):
    root, summary, records = evaluation
    out = root / "out"
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "misclassified.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    for name, path in summary["artifacts"].items():
        assert (out / path.rsplit("/", 1)[-1]).is_file(), name

    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == len(records) == 27
    assert list(predictions["path"]) == list(records["path"])
    probs = predictions[[f"prob_{c}" for c in CLASS_NAMES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    assert list(predictions["predicted"]) == [CLASS_NAMES[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(predictions["confidence"], probs.max(axis=1), rtol=1e-6)
    assert summary["misclassified"] == int((predictions["true"] != predictions["predicted"]).sum())

    # the files agree with the pure function applied to the written predictions
    y_true = [CLASS_NAMES.index(c) for c in predictions["true"]]
    expected = compute_metrics(y_true, probs, CLASS_NAMES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert summary["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert summary["metrics"]["per_class"]["blasts"]["support"] == 3
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    assert np.asarray(confusion["counts"]).sum() == 27
    assert set(summary["per_class_recall"]) == set(CLASS_NAMES)


def test_evaluate_model_breaks_metrics_down_by_group(evaluation):
    root, summary, _records = evaluation
    table = pd.read_csv(root / "out" / "groups.csv")
    assert sorted(table["group"]) == sorted(["lab-a", "lab-b", NO_GROUP])
    assert table.set_index("group")["n_images"].to_dict() == {"lab-a": 13, "lab-b": 13, NO_GROUP: 1}
    predictions = pd.read_csv(root / "out" / "predictions.csv")
    lab_a = predictions.iloc[[i for i in range(1, 27) if i % 2]]
    accuracy = float((lab_a["true"] == lab_a["predicted"]).mean())
    assert table.set_index("group").loc["lab-a", "accuracy"] == pytest.approx(accuracy)
    assert set(summary["groups"]) == {"lab-a", "lab-b", NO_GROUP}


def test_groups_by_sha256_and_bad_group_files(tmp_path):
    records = pd.DataFrame({"path": ["x/1.png", "x/2.png"], "sha256": ["h1", "h2"]})
    by_hash = tmp_path / "by_hash.csv"
    pd.DataFrame({"sha256": ["h2"], "group": ["scanner-2"]}).to_csv(by_hash, index=False)
    assert list(read_groups(by_hash, records)) == [NO_GROUP, "scanner-2"]

    no_key = tmp_path / "no_key.csv"
    pd.DataFrame({"file": ["x/1.png"], "group": ["g"]}).to_csv(no_key, index=False)
    with pytest.raises(ValueError, match="no_key.csv"):
        read_groups(no_key, records)

    conflicting = tmp_path / "conflicting.csv"
    pd.DataFrame({"path": ["x/1.png", "x/1.png"], "group": ["g1", "g2"]}).to_csv(conflicting, index=False)
    with pytest.raises(ValueError, match="more than one group"):
        read_groups(conflicting, records)
