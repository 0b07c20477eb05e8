"""Test-set metrics, confusion matrices, a gallery of mistakes and per-group breakdowns.

Predictions are always the ARGMAX of the class probabilities (never a rounded probability:
with nine classes no probability need exceed 0.5). Classes without test images are kept in the
per-class table with ``support`` 0 and ``recall``/``f1`` of ``None`` (JSON ``null``), are left
out of ``per_class_recall`` and of the macro averages (which run over the classes that have
test images), and their confusion-matrix rows hold zeros (counts) or ``None`` (row-normalised).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.figures import new_figure, save_figure
from wbc_tasks.data.store import ImageStore, open_store
from wbc_tasks.training.predict import predict_store

log = logging.getLogger(__name__)

#: Misclassified images shown in the gallery (most confident mistakes first).
GALLERY_LIMIT = 36
#: Group given to test images the groups file does not mention.
NO_GROUP = "(no group)"


def compute_metrics(y_true, probabilities, class_names: tuple[str, ...] | list[str]) -> dict:
    """Headline and per-class metrics from true class indices and predicted probabilities.

    Pure (no files): promotion reuses it on the champion's predictions of the same test images.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    class_names = list(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(class_names):
        raise ValueError(
            f"probabilities must be (n, {len(class_names)}) for {len(class_names)} classes, got {probabilities.shape}"
        )
    if len(y_true) != len(probabilities):
        raise ValueError(f"{len(y_true)} labels but {len(probabilities)} predictions")
    if len(y_true) == 0:
        raise ValueError("no test images to compute metrics on")
    if y_true.min() < 0 or y_true.max() >= len(class_names):
        raise ValueError(f"labels must be class indices 0..{len(class_names) - 1}")
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    predicted_counts = np.bincount(y_pred, minlength=len(class_names))
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = counts / counts.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        # Mean recall over the classes present in y_true; sklearn warns (and is right to skip
        # them) when some image was predicted as a class that has no test images.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced_accuracy = float(balanced_accuracy_score(y_true, y_pred))
    per_class = {
        name: {
            "precision": float(precision[i]) if predicted_counts[i] else None,
            "recall": float(recall[i]) if support[i] else None,
            "f1": float(f1[i]) if support[i] else None,
            "support": int(support[i]),
            "predicted": int(predicted_counts[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "n_images": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {class_names[i]: float(recall[i]) for i in present},
        "per_class": per_class,
        "absent_classes": [name for i, name in enumerate(class_names) if not support[i]],
        "class_names": class_names,
        "confusion_matrix": counts.tolist(),
        "confusion_matrix_normalized": [[None if np.isnan(v) else float(v) for v in row] for row in normalised],
    }


def _true_labels(store: ImageStore, class_names: tuple[str, ...]) -> np.ndarray:
    """Class indices into ``class_names`` from the store's records (its class column)."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(store.records["class"]) - set(index))
    if unknown:
        raise ValueError(f"test store {store.path} has classes the model does not know: {unknown}")
    return np.array([index[c] for c in store.records["class"]], dtype=np.int64)


def _plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path, *, title: str, fmt: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 1.0 + 0.75 * len(class_names)
    fig = new_figure(size + 1.5, size, dpi=110)
    ax = fig.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, values_format=fmt, colorbar=True
    )
    ax.set_title(title)
    save_figure(fig, path)


def _plot_gallery(store: ImageStore, rows: pd.DataFrame, path: Path, class_names: tuple[str, ...]) -> None:
    shown = rows.head(GALLERY_LIMIT)
    columns = 6
    n_rows = max(1, int(np.ceil(len(shown) / columns)))
    fig = new_figure(2.0 * columns, 2.3 * n_rows)
    axes = np.atleast_1d(fig.subplots(n_rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    if shown.empty:
        axes[0].text(0, 0.5, "no misclassified test images", fontsize=12)
    for ax, (_, row) in zip(axes, shown.iterrows()):
        ax.imshow(np.asarray(store.images[int(row["index"])]))
        ax.set_title(f"true: {row['true']}\npred: {row['predicted']} ({row['confidence']:.2f})", fontsize=8)
    fig.suptitle(
        f"misclassified test images: {len(rows)}"
        + (f" (showing the {len(shown)} most confident)" if len(rows) > len(shown) else "")
    )
    save_figure(fig, path)


def read_groups(groups_csv: Path, records: pd.DataFrame) -> pd.Series:
    """The group of each test record (``NO_GROUP`` where the file names none).

    The file has a ``group`` column and either ``path`` (relative to the data folder, as in
    ``records.csv``) or ``sha256``; ``path`` is used when both are there.
    """
    table = pd.read_csv(groups_csv, dtype=str, keep_default_na=False)
    if "group" not in table.columns or not ({"path", "sha256"} & set(table.columns)):
        raise ValueError(
            f"{groups_csv}: needs a 'group' column and a 'path' or 'sha256' column; found {list(table.columns)}"
        )
    key = "path" if "path" in table.columns else "sha256"
    if key == "path":
        table["path"] = table["path"].map(lambda p: Path(p.strip()).as_posix())
    conflicting = table.groupby(key)["group"].nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise ValueError(f"{groups_csv}: {key} values with more than one group: {list(conflicting.index[:5])}")
    mapping = table.drop_duplicates(key).set_index(key)["group"]
    record_keys = records[key].map(lambda p: Path(p).as_posix()) if key == "path" else records[key]
    groups = record_keys.map(mapping)
    missing = int(groups.isna().sum())
    if missing:
        log.warning(
            "%d of %d test images are not in %s; they are reported as %r", missing, len(records), groups_csv, NO_GROUP
        )
    return groups.fillna(NO_GROUP).astype(str)


def _predictions_table(
    store: ImageStore, y_true: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> pd.DataFrame:
    """One row per test image: its file, true and predicted class, confidence, every probability."""
    y_pred = probabilities.argmax(axis=1)
    return pd.DataFrame(
        {
            "path": store.records["path"],
            "sha256": store.records["sha256"],
            "true": [class_names[i] for i in y_true],
            "predicted": [class_names[i] for i in y_pred],
            "confidence": probabilities.max(axis=1),
            **{f"prob_{name}": probabilities[:, i] for i, name in enumerate(class_names)},
        }
    )


def _write_confusion(metrics: dict, class_names: tuple[str, ...], artifacts: dict[str, Path]) -> None:
    """The confusion matrix as JSON and as two pictures (counts, share of each true class)."""
    write_json_atomic(
        artifacts["confusion_matrix_json"],
        {
            "class_names": list(class_names),
            "rows": "true class",
            "columns": "predicted class",
            "counts": metrics["confusion_matrix"],
            "normalized": metrics["confusion_matrix_normalized"],
        },
    )
    counts = np.asarray(metrics["confusion_matrix"])
    normalised = np.array([[np.nan if v is None else v for v in row] for row in metrics["confusion_matrix_normalized"]])
    _plot_confusion(
        counts, list(class_names), artifacts["confusion_matrix_png"], title="confusion matrix (counts)", fmt="d"
    )
    _plot_confusion(
        normalised,
        list(class_names),
        artifacts["confusion_matrix_normalized_png"],
        title="confusion matrix (share of each true class)",
        fmt=".2f",
    )


def _write_groups(
    groups_csv: Path,
    store: ImageStore,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
    out_dir: Path,
    artifacts: dict[str, Path],
) -> dict[str, dict[str, float]]:
    """Metrics per group of test images (``groups_csv``: e.g. per source lab); their summary."""
    groups = read_groups(Path(groups_csv), store.records)
    rows, detail = [], {}
    for group in sorted(groups.unique()):
        mask = (groups == group).to_numpy()
        group_metrics = compute_metrics(y_true[mask], probabilities[mask], class_names)
        detail[group] = {
            k: group_metrics[k]
            for k in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "per_class_recall", "absent_classes")
        }
        rows.append(
            {
                "group": group,
                **{k: group_metrics[k] for k in ("n_images", "accuracy", "balanced_accuracy", "macro_f1")},
                **{f"recall_{name}": group_metrics["per_class_recall"].get(name) for name in class_names},
            }
        )
        log.info(
            "group %s: %d images, balanced accuracy %.3f",
            group,
            group_metrics["n_images"],
            group_metrics["balanced_accuracy"],
        )
    artifacts["groups_csv"] = out_dir / "groups.csv"
    artifacts["groups_json"] = out_dir / "groups.json"
    pd.DataFrame(rows).to_csv(artifacts["groups_csv"], index=False)
    write_json_atomic(artifacts["groups_json"], detail)
    return {g: {"n_images": d["n_images"], "balanced_accuracy": d["balanced_accuracy"]} for g, d in detail.items()}


def _evaluation_summary(metrics: dict, misclassified: int, groups: dict | None, artifacts: dict[str, Path]) -> dict:
    """What the evaluate step returns: headline metrics, per-class figures, artifact paths."""
    per_class = {
        name: {k: row[k] for k in ("precision", "recall", "f1", "support")}
        for name, row in metrics["per_class"].items()
    }
    return {
        # What registration and promotion record (numeric leaves; no matrices).
        "metrics": {
            **{k: metrics[k] for k in ("n_images", "accuracy", "balanced_accuracy", "macro_f1")},
            "per_class": per_class,
        },
        "n_images": metrics["n_images"],
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class_recall": metrics["per_class_recall"],
        "absent_classes": metrics["absent_classes"],
        "misclassified": misclassified,
        "groups": groups,
        "artifacts": {k: str(v) for k, v in artifacts.items()},
    }


def evaluate_model(
    model_path: Path,
    test_store: Path,
    out_dir: Path,
    *,
    class_names: tuple[str, ...],
    groups_csv: Path | None = None,
    batch_size: int = 32,
) -> dict:
    """Evaluate a saved Keras model on the test store; write metrics, figures and predictions.

    Files in ``out_dir``: ``metrics.json`` (all of :func:`compute_metrics`),
    ``confusion_matrix.json`` and ``.png``, ``confusion_matrix_normalized.png``,
    ``misclassified.png``, ``predictions.csv`` and, with ``groups_csv``, ``groups.csv`` and
    ``groups.json``. Returns headline metrics, per-class recall and the artifact paths.
    """
    import keras

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = tuple(class_names)
    store = open_store(Path(test_store))
    if len(store) == 0:
        raise ValueError(f"test store {test_store} holds no images; nothing to evaluate")
    model = keras.models.load_model(model_path)
    if int(model.output_shape[-1]) != len(class_names):
        raise ValueError(f"model {model_path} has {model.output_shape[-1]} outputs for {len(class_names)} class names")
    y_true = _true_labels(store, class_names)
    log.info(
        "evaluating %s on %d test images %s",
        model_path,
        len(store),
        store.records["class"].value_counts().sort_index().to_dict(),
    )
    probabilities = predict_store(model, store, batch_size)
    metrics = compute_metrics(y_true, probabilities, class_names)
    predictions = _predictions_table(store, y_true, probabilities, class_names)
    artifacts = {
        "metrics": out_dir / "metrics.json",
        "predictions": out_dir / "predictions.csv",
        "confusion_matrix_json": out_dir / "confusion_matrix.json",
        "confusion_matrix_png": out_dir / "confusion_matrix.png",
        "confusion_matrix_normalized_png": out_dir / "confusion_matrix_normalized.png",
        "misclassified_png": out_dir / "misclassified.png",
    }
    predictions.to_csv(artifacts["predictions"], index=False)
    write_json_atomic(artifacts["metrics"], metrics)
    _write_confusion(metrics, class_names, artifacts)
    wrong = predictions.assign(index=np.arange(len(predictions)))
    wrong = wrong[wrong["true"] != wrong["predicted"]].sort_values("confidence", ascending=False, kind="stable")
    _plot_gallery(store, wrong, artifacts["misclassified_png"], class_names)
    groups = None
    if groups_csv is not None:
        groups = _write_groups(groups_csv, store, y_true, probabilities, class_names, out_dir, artifacts)
    log.info(
        "test accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f; recall %s",
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["macro_f1"],
        json.dumps({k: round(v, 3) for k, v in metrics["per_class_recall"].items()}),
    )
    return _evaluation_summary(metrics, len(wrong), groups, artifacts)
