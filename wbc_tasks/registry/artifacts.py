"""What a DAG run's steps log to its MLflow run: the split manifest as the training input, each
step folder's small result files, metrics and figures.

Each function finds the DAG run's MLflow run through :mod:`wbc_tasks.registry.runs` and logs
through the retried client; with ``WBC_PSEUDONYMISE_NAMES`` the CSV and JSON files go up as
pseudonymised copies. Metrics are flattened from nested dicts (``recall_blasts``); the image
stores themselves are never logged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import COMPLETE_MARKER, Settings
from wbc_tasks.registry.client import call_with_retries, configure_mlflow
from wbc_tasks.registry.runs import open_tracking_run, tracking_run

log = logging.getLogger(__name__)

#: Data-stage files worth keeping with the run (the image stores themselves are not).
STAGE_ARTIFACT_SUFFIXES = (".png", ".json", ".csv")


def log_split_manifest(
    settings: Settings,
    dag_run_id: str,
    manifest: Any,
    data_dir: Path | str,
    *,
    name: str = "split-manifest",
) -> None:
    """Log the split manifest (a DataFrame with a ``class`` column) as the run's training input."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    with tracking_run(settings, dag_run_id):
        with warnings.catch_warnings():
            # A plain path matches two equivalent local source types; MLflow picks one and says so.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = from_pandas(manifest, source=str(data_dir), name=name, targets="class")
        call_with_retries(settings, mlflow.log_input, dataset, context="training")
    log.info(
        "logged %s (%d images from %s) as the training input of DAG run %s",
        name,
        len(manifest),
        data_dir,
        dag_run_id,
    )


def log_stage_artifacts(
    settings: Settings,
    dag_run_id: str,
    folder: Path,
    artifact_path: str,
    *,
    suffixes: tuple[str, ...] = STAGE_ARTIFACT_SUFFIXES,
    roots: tuple[Path, ...] = (),
) -> list[str]:
    """Log a step folder's small result files (PNG, JSON, CSV; not the image stores) under
    ``artifact_path``; return the names logged. Sub-folders are not descended into.

    With ``WBC_PSEUDONYMISE_NAMES`` the CSV and JSON files are logged as pseudonymised copies
    (:mod:`wbc_tasks.core.privacy`; ``roots``: the data folder, for absolute paths in them); the
    files in the work folder keep the real paths."""
    import tempfile

    from wbc_tasks.core.privacy import pseudonymiser

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"step folder {folder} does not exist")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and p.name != COMPLETE_MARKER
    )
    client = configure_mlflow(settings)
    run_id = open_tracking_run(settings, dag_run_id)
    names = pseudonymiser(settings, *roots)
    with tempfile.TemporaryDirectory(prefix="wbc-pseudonymised-") as scratch:
        if names.enabled:
            # Paths of every CSV here (manifest and rejections), to find them in free text too.
            known = names.known(p for f in files if f.suffix.lower() == ".csv" for p in names.csv_paths(f))
            files = [
                names.write_copy(f, Path(scratch) / f.name, known) if f.suffix.lower() in (".csv", ".json") else f
                for f in files
            ]
        for path in files:
            call_with_retries(settings, client.log_artifact, run_id, str(path), artifact_path)
    log.info(
        "logged %d files of %s under %s/%s",
        len(files),
        folder,
        artifact_path,
        " (file names pseudonymised)" if names.enabled else "",
    )
    return [p.name for p in files]


def _metric_key(text: str) -> str:
    # MLflow allows letters, digits and _ - . space / : in metric names.
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in text)


def flatten_metrics(metrics: Mapping[str, Any], *, sep: str = "_", prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict: ``{"recall": {"blasts": .9}}`` -> ``recall_blasts``.

    Non-numeric leaves (confusion matrices as lists, strings, None) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, sep=sep, prefix=name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[_metric_key(name)] = float(value)
        elif hasattr(value, "dtype") and getattr(value, "shape", None) == ():
            # numpy scalars: np.float32 and np.int64 are no Python float or int
            flat[_metric_key(name)] = float(value)
    return flat


def log_metrics(
    settings: Settings,
    dag_run_id: str,
    metrics: Mapping[str, Any],
    *,
    prefix: str = "",
    step: int | None = None,
) -> dict[str, float]:
    """Log a (nested) metrics dict to the DAG run's MLflow run; return the flat keys logged."""
    import mlflow

    flat = flatten_metrics(metrics, prefix=prefix)
    with tracking_run(settings, dag_run_id):
        call_with_retries(settings, mlflow.log_metrics, flat, step=step)
    return flat


def log_figure(settings: Settings, dag_run_id: str, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure (e.g. ``evaluate/confusion_matrix.png``) to the DAG run's run."""
    client = configure_mlflow(settings)
    run_id = open_tracking_run(settings, dag_run_id)
    call_with_retries(settings, client.log_figure, run_id, figure, artifact_file)
