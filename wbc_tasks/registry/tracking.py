"""MLflow: where runs are tracked, how a model version is logged, found and loaded.

Image size and class names travel with the model version (tags ``image_size`` and
``class_names``, and the logged model's metadata), never in a second place.

One Airflow DAG run is one MLflow run, tagged ``airflow_run_id``. Its tasks run in different
processes (or hosts), so each finds the run again through the tracking server
(:func:`open_tracking_run`), resumes it for its logging (:func:`tracking_run`) and leaves it
RUNNING; the DAG's last task, or its failure path, closes it (:func:`finish_tracking_run`).
Registration (:func:`register_model`) writes a model card into the version's and the registered
model's description and the test metrics into version tags (``metric.<name>``,
``recall.<class>``), where promotion (:mod:`wbc_tasks.registry.promotion`) reads them.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from wbc_tasks.core.settings import COMPLETE_MARKER, Settings
from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.retry import call_with_backoff

log = logging.getLogger(__name__)

TAG_IMAGE_SIZE = "image_size"
TAG_CLASS_NAMES = "class_names"
MODEL_ARTIFACT_NAME = "model"
#: Run tag (and version tag) naming the Airflow DAG run that produced it.
TAG_AIRFLOW_RUN_ID = "airflow_run_id"
#: Version tag prefix of headline test metrics (``metric.balanced_accuracy``).
METRIC_TAG_PREFIX = "metric."
#: Per-class metric kinds stored as version tags ``<kind>.<class>`` (``recall.blasts``).
PER_CLASS_KINDS = ("recall", "precision", "f1", "support")
#: The registry stores descriptions in a 5,000-character column (PostgreSQL enforces it).
MAX_DESCRIPTION_CHARS = 5000
#: File name of the full model card among the run's artifacts.
MODEL_CARD_FILE = "model_card.md"
#: Data-stage files worth keeping with the run (the image stores themselves are not).
STAGE_ARTIFACT_SUFFIXES = (".png", ".json", ".csv")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

T = TypeVar("T")


class NoModelError(LookupError):
    """The registry has no model for the reference asked for."""


@dataclass(frozen=True)
class ModelRef:
    """One registered model version and what inference needs to know about it."""

    name: str
    version: str
    run_id: str
    uri: str
    image_size: int
    class_names: tuple[str, ...]


#: MLflow's own HTTP client settings (read by MLflow at every request) and where ours come from.
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "mlflow_http_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "mlflow_http_backoff",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "mlflow_http_timeout",
}


def configure_mlflow(settings: Settings):
    """Point MLflow at the configured tracking/registry URI; return an ``MlflowClient``.

    Also sets MLflow's HTTP client retries, backoff and timeout (``MLFLOW_HTTP_REQUEST_*``) from
    the settings: MLflow's defaults (7 retries, factor 2, 120 s) keep one call of an unreachable
    server hanging for about four minutes, before :func:`call_with_retries` even starts.
    """
    import os

    import mlflow
    from mlflow import MlflowClient

    for variable, name in MLFLOW_HTTP_ENV.items():
        os.environ[variable] = str(getattr(settings, name))
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(settings: Settings) -> str:
    """The experiment id, creating it (with the configured artifact root) if needed."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    experiment = call_with_retries(settings, client.get_experiment_by_name, settings.mlflow_experiment)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment '{settings.mlflow_experiment}' at {settings.mlflow_tracking_uri} "
                f"is deleted; restore it (`mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}`) or set WBC_MLFLOW_EXPERIMENT to another name"
            )
        return experiment.experiment_id
    location = None
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.mlflow_artifact_root.as_uri()
    try:
        return client.create_experiment(settings.mlflow_experiment, artifact_location=location)
    except MlflowException as exc:
        # Two tasks starting together: the other one created it first.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(settings.mlflow_experiment).experiment_id


def model_ref_from_version(settings: Settings, version: Any) -> ModelRef:
    """A :class:`ModelRef` from an ``mlflow`` ``ModelVersion``."""
    tags = version.tags or {}
    if TAG_IMAGE_SIZE not in tags or TAG_CLASS_NAMES not in tags:
        raise NoModelError(
            f"model {version.name} version {version.version} lacks the '{TAG_IMAGE_SIZE}' and "
            f"'{TAG_CLASS_NAMES}' tags; it was not registered by this project"
        )
    return ModelRef(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or "",
        uri=f"models:/{version.name}/{version.version}",
        image_size=int(tags[TAG_IMAGE_SIZE]),
        class_names=tuple(json.loads(tags[TAG_CLASS_NAMES])),
    )


def resolve_model(settings: Settings, ref: str | None = None) -> ModelRef:
    """Resolve an alias (default: the champion) or a version number to one fixed version."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    ref = str(ref) if ref not in (None, "") else settings.champion_alias
    try:
        if ref.isdigit():
            version = call_with_retries(settings, client.get_model_version, settings.model_name, ref)
        else:
            version = call_with_retries(settings, client.get_model_version_by_alias, settings.model_name, ref)
    except MlflowException as exc:
        if is_transient_error(exc):
            raise
        raise NoModelError(
            f"no model '{settings.model_name}@{ref}' in the registry at "
            f"{settings.mlflow_tracking_uri}. Train one first: trigger the wbc_training DAG "
            f"(or run `make demo`), which registers a version and promotes it to "
            f"'{settings.champion_alias}' when it passes the floors; or promote an existing "
            f"version with `wbc promote VERSION`."
        ) from exc
    return model_ref_from_version(settings, version)


def load_keras_model(settings: Settings, ref: ModelRef):
    """Load a registered version as a Keras model (only from the configured registry).

    ``ref`` travels through XCom and params; whatever it says, the model is read from
    ``models:/<WBC_MODEL_NAME>/<version>`` of the configured registry, never from another path
    or URI (a ``.keras`` file can carry code that runs when it is loaded).
    """
    import mlflow.tensorflow

    expected = f"models:/{settings.model_name}/{ref.version}"
    if ref.name != settings.model_name or ref.uri != expected or not str(ref.version).isdigit():
        raise ValueError(
            f"refusing to load model {ref.name!r} version {ref.version!r} from {ref.uri!r}: models are "
            f"loaded only from the configured registry, as {expected!r} (WBC_MODEL_NAME={settings.model_name})"
        )
    configure_mlflow(settings)
    return mlflow.tensorflow.load_model(expected)


def log_model_version(
    settings: Settings,
    model: Any,
    *,
    image_size: int,
    class_names: tuple[str, ...],
    description: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelRef:
    """Log ``model`` to the active MLflow run and register it as a new version.

    Uses the ``tensorflow`` flavour: MLflow 3.17's ``keras`` flavour writes the input example
    before creating its folder and fails whenever an example is given.

    Logging and registering are separate calls, each retried while the server is unreachable
    (:func:`call_with_retries`); registering first looks for a version of the logged model, so a
    retry after a lost reply never registers the same model twice.
    """
    import mlflow
    import mlflow.tensorflow
    import numpy as np
    from mlflow.models import infer_signature

    client = configure_mlflow(settings)
    example = np.zeros((1, image_size, image_size, 3), dtype=np.uint8)
    probabilities = np.asarray(model.predict(example, verbose=0))
    signature = infer_signature(example, probabilities)
    metadata = {TAG_IMAGE_SIZE: image_size, TAG_CLASS_NAMES: list(class_names)}
    # Stated, not inferred: MLflow's inference reloads the model in a subprocess (8.5 s of a 0.9 s
    # log here) and the model needs only TensorFlow (with its Keras) to load.
    import tensorflow as tf

    requirements = [f"tensorflow=={tf.__version__}"]
    # A retried log after a failure half-way leaves an unregistered logged model in the run: harmless.
    info = call_with_retries(
        settings, mlflow.tensorflow.log_model, model, name=MODEL_ARTIFACT_NAME, signature=signature,
        input_example=example, metadata=metadata, pip_requirements=requirements,
    )
    version = call_with_retries(settings, _register_once, settings, client, info.model_id, info.run_id)
    wait_until_ready(settings, version)
    _tag_version(settings, client, version, image_size=image_size, class_names=class_names, tags=tags,
                 description=description)
    log.info("registered %s version %s", settings.model_name, version)
    return model_ref_from_version(
        settings, call_with_retries(settings, client.get_model_version, settings.model_name, version)
    )


def _register_once(settings: Settings, client: Any, model_id: str, run_id: str | None) -> str:
    """The registered version of logged model ``model_id``, registering it if it has none."""
    import mlflow

    query = f"name='{settings.model_name}'" + (f" and run_id='{run_id}'" if run_id else "")
    source = f"models:/{model_id}"
    found = [
        v for v in client.search_model_versions(query)
        if getattr(v, "model_id", None) == model_id or v.source == source
    ]
    if found:
        return str(min(int(v.version) for v in found))
    return str(mlflow.register_model(source, settings.model_name, await_registration_for=0).version)


def _tag_version(
    settings: Settings,
    client: Any,
    version: str,
    *,
    image_size: int,
    class_names: tuple[str, ...],
    tags: dict[str, str] | None,
    description: str | None,
) -> None:
    """Set the tags (and description) every version of this project carries; idempotent."""
    name = settings.model_name
    all_tags = {TAG_IMAGE_SIZE: str(image_size), TAG_CLASS_NAMES: json.dumps(list(class_names))}
    all_tags.update({key: str(value) for key, value in (tags or {}).items()})
    for key, value in all_tags.items():
        call_with_retries(settings, client.set_model_version_tag, name, version, key, value)
    if description:
        call_with_retries(settings, client.update_model_version, name, version, description=description)


# --------------------------------------------------------------------------------------------
# Retries


#: MLflow error codes that mean "try again soon" (a locked SQLite file, a throttling server).
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


class MlflowUnavailableError(ConnectionError):
    """MLflow stayed unreachable (or busy) through every retry of a call."""


def is_transient_error(exc: BaseException) -> bool:
    """Whether an MLflow call failed for a reason that may pass (server unreachable or busy)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowUnavailableError):
        return False  # its retries are spent already; retrying around it would multiply them
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in TRANSIENT_ERROR_CODES:
            return True
        # MLflow's REST client reports a server it could not reach (after its own retries) as a
        # bare INTERNAL_ERROR whose message starts like this; genuine server errors do not.
        return exc.error_code == "INTERNAL_ERROR" and str(exc.message).startswith("API request to")
    return False


def call_with_retries(settings: Settings, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with exponential backoff while it fails transiently.

    ``settings.mlflow_retries`` retries, the first after ``settings.mlflow_retry_wait`` seconds,
    each wait doubled (tenacity), on top of MLflow's own HTTP retries of each request
    (``settings.mlflow_http_*``). Only calls that are safe to repeat go through here. When every
    try failed transiently, raises :class:`MlflowUnavailableError` naming the server and the call.
    """
    name = getattr(fn, "__name__", fn)

    def give_up(exc: BaseException, seconds: float) -> Exception:
        return MlflowUnavailableError(
            f"MLflow at {settings.mlflow_tracking_uri} is unreachable or busy: {name} failed "
            f"{settings.mlflow_retries + 1} times over {seconds:.0f} s (WBC_MLFLOW_RETRIES="
            f"{settings.mlflow_retries}, each try with up to {settings.mlflow_http_retries} HTTP retries, "
            f"WBC_MLFLOW_HTTP_RETRIES). Check that the tracking server is up; the task can be retried "
            f"safely. Last error: {exc}"
        )

    return call_with_backoff(
        lambda: fn(*args, **kwargs), retries=settings.mlflow_retries, first_wait=settings.mlflow_retry_wait,
        is_transient=is_transient_error, what=f"MLflow call {name}", give_up=give_up, log=log,
    )


# --------------------------------------------------------------------------------------------
# One MLflow run per DAG run


def _tag_filter(key: str, value: str) -> str:
    """An MLflow search filter ``tags.key = 'value'``, quoted safely."""
    if "'" not in value:
        return f"tags.{key} = '{value}'"
    if '"' not in value:
        return f'tags.{key} = "{value}"'
    raise ValueError(f"cannot search MLflow for a tag value holding both quote kinds: {value!r}")


def find_tracking_run(settings: Settings, dag_run_id: str) -> str | None:
    """The MLflow run id of a DAG run, looked up on the tracking server; None if there is none."""
    client = configure_mlflow(settings)
    experiment_id = ensure_experiment(settings)
    runs = call_with_retries(
        settings, client.search_runs, [experiment_id],
        filter_string=_tag_filter(TAG_AIRFLOW_RUN_ID, dag_run_id),
        order_by=["attributes.start_time ASC"], max_results=10,
    )
    if not runs:
        return None
    runs = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    if len(runs) > 1:
        # A create retried after a lost reply; every task settles on the same (oldest) one.
        log.warning(
            "DAG run %s has %d MLflow runs (%s); using the oldest, %s",
            dag_run_id, len(runs), ", ".join(r.info.run_id for r in runs), runs[0].info.run_id,
        )
    return runs[0].info.run_id


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _log_params_once(settings: Settings, client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks; a param already logged keeps its first value."""
    from mlflow.entities import Param

    logged = call_with_retries(settings, client.get_run, run_id).data.params
    missing = []
    for key, value in params.items():
        text = _param_value(value)
        if key not in logged:
            missing.append(Param(key, text))
        elif logged[key] != text:
            log.warning("param %s is already %r in MLflow run %s; not changed to %r", key, logged[key], run_id, text)
    for start in range(0, len(missing), 100):  # log_batch takes at most 100 params
        call_with_retries(settings, client.log_batch, run_id, params=missing[start : start + 100])


def open_tracking_run(settings: Settings, dag_run_id: str, params: dict | None = None) -> str:
    """The MLflow run id of DAG run ``dag_run_id``, creating the run on the first call.

    The run is named after the DAG run and tagged ``airflow_run_id``; later calls, from any
    process or host, find it by that tag on the tracking server. ``params`` (every training
    param) are logged once; a param already logged is not changed.
    """
    import filelock

    client = configure_mlflow(settings)
    experiment_id = ensure_experiment(settings)
    run_id = find_tracking_run(settings, dag_run_id)
    if run_id is None:
        # Serialise creation among tasks sharing the work folder, so two first tasks of one DAG
        # run cannot create two MLflow runs.
        lock_path = settings.work_dir / "locks" / f"tracking-{safe_name(dag_run_id)}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(lock_path, timeout=settings.lock_timeout):
            run_id = find_tracking_run(settings, dag_run_id)
            if run_id is None:
                run = call_with_retries(
                    settings, client.create_run, experiment_id, run_name=dag_run_id,
                    tags={TAG_AIRFLOW_RUN_ID: dag_run_id},
                )
                run_id = find_tracking_run(settings, dag_run_id) or run.info.run_id
                log.info("created MLflow run %s for DAG run %s", run_id, dag_run_id)
    if params:
        _log_params_once(settings, client, run_id, params)
    return run_id


@contextmanager
def tracking_run(settings: Settings, dag_run_id: str) -> Iterator[str]:
    """Resume the DAG run's MLflow run as the active run; yield its id.

    On leaving, the run is detached but stays RUNNING (the DAG's other tasks still log to it):
    :func:`finish_tracking_run` sets its final status. Nested use for the same DAG run is a no-op.
    """
    import mlflow

    run_id = open_tracking_run(settings, dag_run_id)
    active = mlflow.active_run()
    if active is not None:
        if active.info.run_id == run_id:
            yield run_id
            return
        raise RuntimeError(
            f"MLflow run {active.info.run_id} is already active in this thread; end it before "
            f"resuming the run {run_id} of DAG run {dag_run_id}"
        )
    call_with_retries(settings, mlflow.start_run, run_id=run_id)
    try:
        yield run_id
    finally:
        try:
            # end_run pops the active run first, then records the status: RUNNING keeps it open.
            mlflow.end_run(status="RUNNING")
        except Exception as exc:  # never hide the task's own error behind a bookkeeping one
            log.warning("could not detach from MLflow run %s: %s", run_id, exc)


def finish_tracking_run(settings: Settings, dag_run_id: str, status: str = "FINISHED") -> str | None:
    """Mark the DAG run's MLflow run FINISHED, FAILED or KILLED; None if it never had one."""
    import mlflow

    status = status.upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    run_id = find_tracking_run(settings, dag_run_id)
    if run_id is None:
        log.warning("DAG run %s has no MLflow run to mark %s", dag_run_id, status)
        return None
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)
    else:
        call_with_retries(settings, configure_mlflow(settings).set_terminated, run_id, status)
    log.info("MLflow run %s of DAG run %s marked %s", run_id, dag_run_id, status)
    return run_id


# --------------------------------------------------------------------------------------------
# What the DAG's steps log


def log_split_manifest(
    settings: Settings, dag_run_id: str, manifest: Any, data_dir: Path | str, *, name: str = "split-manifest"
) -> None:
    """Log the split manifest (a DataFrame with a ``class`` column) as the run's training input."""
    import mlflow
    import mlflow.data

    with tracking_run(settings, dag_run_id):
        with warnings.catch_warnings():
            # A plain path matches two equivalent local source types; MLflow picks one and says so.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(manifest, source=str(data_dir), name=name, targets="class")
        call_with_retries(settings, mlflow.log_input, dataset, context="training")
    log.info("logged %s (%d images from %s) as the training input of DAG run %s", name, len(manifest), data_dir, dag_run_id)


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
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and p.name != COMPLETE_MARKER
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
    log.info("logged %d files of %s under %s/%s", len(files), folder, artifact_path,
             " (file names pseudonymised)" if names.enabled else "")
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
        elif hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy scalars
            flat[_metric_key(name)] = float(value)
    return flat


def log_metrics(
    settings: Settings, dag_run_id: str, metrics: Mapping[str, Any], *, prefix: str = "", step: int | None = None
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


# --------------------------------------------------------------------------------------------
# Metrics as version tags


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes))


def per_class_values(metrics: Mapping[str, Any], kind: str) -> dict[str, float]:
    """``{class: value}`` of one per-class metric, from either ``metrics[kind][class]`` or
    ``metrics["per_class"][class][kind]``; empty if the metrics carry neither."""
    values: dict[str, float] = {}
    direct = metrics.get(kind)
    if isinstance(direct, Mapping):
        values.update({str(c): float(v) for c, v in direct.items() if _is_number(v)})
    per_class = metrics.get("per_class")
    if isinstance(per_class, Mapping):
        for cls, row in per_class.items():
            if isinstance(row, Mapping) and _is_number(row.get(kind)):
                values.setdefault(str(cls), float(row[kind]))
    return values


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for test metrics: ``metric.<name>`` for headline numbers, ``<kind>.<class>``
    for per-class recall, precision, f1 and support."""
    tags = {
        f"{METRIC_TAG_PREFIX}{key}": repr(float(value))
        for key, value in metrics.items()
        if not isinstance(value, Mapping) and _is_number(value)
    }
    for kind in PER_CLASS_KINDS:
        for cls, value in per_class_values(metrics, kind).items():
            tags[f"{kind}.{cls}"] = repr(value)
    return tags


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """The metrics dict :func:`metric_tags` wrote (headline numbers plus per-class dicts)."""
    metrics: dict[str, Any] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            metrics[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
        else:
            kind, _, cls = key.partition(".")
            if kind in PER_CLASS_KINDS and cls:
                metrics.setdefault(kind, {})[cls] = float(value)
    return metrics


def version_metrics(settings: Settings, version: str) -> dict[str, Any]:
    """The test metrics recorded on a registered version (from its tags)."""
    client = configure_mlflow(settings)
    mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
    return metrics_from_tags(mv.tags or {})


# --------------------------------------------------------------------------------------------
# Model card

#: Citations of the public sets the shared development data comes from (their licences require
#: attribution wherever they are used), matched by the start of a SOURCES.csv ``source`` value.
KNOWN_SOURCE_CITATIONS: dict[str, str] = {
    "pbc": (
        "PBC dataset: A. Acevedo et al., \"A dataset of microscopic peripheral blood cell images "
        "for development of automatic recognition systems\", Data in Brief 30 (2020) 105474; "
        "CC BY 4.0."
    ),
    "matek": (
        "AML-Cytomorphology_LMU: C. Matek et al., \"Human-level recognition of blast cells in "
        "acute myeloid leukaemia with convolutional neural networks\", Nature Machine Intelligence "
        "1 (2019) 538-544; TCIA doi:10.7937/tcia.2019.36f5o9ld; CC BY."
    ),
}
#: Below this many test images a class's recall is a rough estimate; the card says so.
FEW_TEST_IMAGES = 30
SOURCES_FILE = "SOURCES.csv"


def source_counts(manifest: Any, data_dir: Path | str) -> dict[str, dict[str, int]] | None:
    """``{class: {source: images}}`` for the manifest's images, from a ``SOURCES.csv`` (columns
    ``sha256`` and ``source``) in ``data_dir`` or its parent; None where there is none."""
    import pandas as pd

    data_dir = Path(data_dir)
    for candidate in (data_dir / SOURCES_FILE, data_dir.parent / SOURCES_FILE):
        if candidate.is_file():
            sources = pd.read_csv(candidate, dtype=str, keep_default_na=False)
            break
    else:
        return None
    if not {"sha256", "source"} <= set(sources.columns):
        log.warning("%s lacks the sha256/source columns; sources left out of the model card", candidate)
        return None
    by_hash = dict(zip(sources["sha256"], sources["source"], strict=True))
    counts: dict[str, dict[str, int]] = {}
    for cls, sha in zip(manifest["class"], manifest["sha256"], strict=True):
        source = by_hash.get(sha, "unknown")
        counts.setdefault(str(cls), {}).setdefault(source, 0)
        counts[str(cls)][source] += 1
    return counts


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def model_card(
    *,
    model_name: str,
    version: str,
    dag_run_id: str,
    mlflow_run_id: str,
    image_size: int,
    class_names: tuple[str, ...],
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    params: Mapping[str, Any],
    registered_at: str | None = None,
) -> str:
    """The model card (markdown) of one version.

    ``data_summary`` is the split step's summary: ``counts`` (``{split: {class: n}}``),
    ``data_dir``, ``rejected``; optionally ``sources`` (``{class: {source: n}}``, see
    :func:`source_counts`), ``train_after_balancing`` (``{class: n}``) and ``attribution`` (text).
    """
    registered_at = registered_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"# {model_name} version {version}: model card",
        "",
        f"White-blood-cell classifier; input {image_size}x{image_size} RGB uint8 pixels "
        f"(normalisation inside the model); outputs probabilities for {len(class_names)} classes: "
        f"{', '.join(class_names)}. Registered {registered_at} by Airflow DAG run `{dag_run_id}` "
        f"(MLflow run `{mlflow_run_id}`).",
        "",
        "## Intended use",
        "- **Research use only. Not a diagnostic device**; not cleared or approved for clinical use.",
        "- Suggests a class for single-cell images like the training images; **every result needs "
        "review by a qualified person** before it informs any decision about a patient.",
        "- Not for other cell types, whole slides, or classes outside the list above (it always "
        "answers one of them).",
        "",
        "## Training data",
    ]
    counts: Mapping[str, Mapping[str, int]] = data_summary.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if s in counts] + [s for s in counts if s not in ("train", "val", "test")]
    balanced = data_summary.get("train_after_balancing") or {}
    if data_summary.get("data_dir"):
        lines.append(f"Images from `{data_summary['data_dir']}`, split by content hash.")
    if counts:
        header = ["class", *splits, "total"] + (["train after balancing"] if balanced else [])
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        classes = [c for c in class_names if any(c in counts[s] for s in splits)]
        for cls in classes:
            row = [int(counts[s].get(cls, 0)) for s in splits]
            cells = [cls, *map(str, row), str(sum(row))] + ([str(balanced.get(cls, ""))] if balanced else [])
            lines.append("| " + " | ".join(cells) + " |")
        totals = [sum(int(v) for v in counts[s].values()) for s in splits]
        lines.append("| **all** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |" + (" |" if balanced else ""))
    if data_summary.get("rejected"):
        lines.append(f"\n{data_summary['rejected']} files were rejected (unreadable, duplicate or conflicting labels; see the run's split artifacts).")
    sources: Mapping[str, Mapping[str, int]] = data_summary.get("sources") or {}
    if sources:
        per_source: dict[str, int] = {}
        for by_source in sources.values():
            for source, n in by_source.items():
                per_source[source] = per_source.get(source, 0) + int(n)
        lines.append("\nSources: " + ", ".join(f"{s} ({n} images)" for s, n in sorted(per_source.items())) + ".")
        citations = [
            text for prefix, text in KNOWN_SOURCE_CITATIONS.items()
            if any(s.lower().startswith(prefix) for s in per_source)
        ]
        if citations:
            lines += ["", "Attribution (required by the sets' licences):"] + [f"- {c}" for c in citations]
    if data_summary.get("attribution"):
        lines += ["", str(data_summary["attribution"])]
    if not sources and not data_summary.get("attribution"):
        lines.append("\nSources and licences: see the data folder's own README / SOURCES file.")

    lines += ["", "## Test metrics", ""]
    headline = {k: v for k, v in metrics.items() if not isinstance(v, Mapping) and _is_number(v)}
    if headline:
        lines.append(", ".join(f"{k} **{_fmt(float(v))}**" for k, v in headline.items()) + " on the test split.")
    recall = per_class_values(metrics, "recall")
    precision = per_class_values(metrics, "precision")
    support = per_class_values(metrics, "support")
    if recall:
        lines += ["", "| class | recall | precision | test images |", "|---|---|---|---|"]
        for cls in [c for c in class_names if c in recall] + sorted(set(recall) - set(class_names)):
            n = support.get(cls, counts.get("test", {}).get(cls, ""))
            lines.append(f"| {cls} | {_fmt(recall[cls])} | {_fmt(precision.get(cls, ''))} | {_fmt(int(n)) if n != '' else ''} |")

    lines += ["", "## Training params", ""]
    lines.append("; ".join(f"{k}={_param_value(v)}" for k, v in params.items()) or "(none recorded)")

    lines += ["", "## Limitations"]
    lines.append(
        "- Lab, stain and scanner shift: it has only seen the labs and scanners above. Cells from "
        "another lab, stain or magnification may be misclassified with high confidence; validate "
        "on local images before relying on it."
    )
    single_source = sorted(
        (cls, next(iter(by_source))) for cls, by_source in sources.items()
        if len(by_source) == 1 and len(sources) > 1
    )
    if single_source:
        lines.append(
            "- Classes from a single source: "
            + ", ".join(f"{cls} (only {src})" for cls, src in single_source)
            + ". The model may have learnt that source's look instead of the cell: an unfamiliar "
            "stain can be called one of these classes."
        )
    few = sorted(cls for cls, n in (support or counts.get("test", {})).items() if 0 < float(n) < FEW_TEST_IMAGES)
    if few:
        lines.append(f"- Few test images (under {FEW_TEST_IMAGES}) for {', '.join(few)}: their recall is a rough estimate.")
    lines.append(
        "- Neighbouring maturation stages (bands vs neutrophils, metamyelocytes vs myelocytes) are "
        "the most confused pairs."
    )
    if params.get("smote"):
        lines.append("- Minority classes were oversampled with SMOTE (synthetic training images).")
    return "\n".join(lines) + "\n"


def _fit_description(text: str, note: str) -> str:
    """``text`` cut at a line to fit the registry's description column, ending with ``note``."""
    if len(text) <= MAX_DESCRIPTION_CHARS:
        return text
    budget = MAX_DESCRIPTION_CHARS - len(note) - 2
    cut = text[:budget].rsplit("\n", 1)[0]
    return f"{cut}\n\n{note}"


def describe_registered_model(settings: Settings, version: str, headline: str) -> None:
    """Set the registered model's description: ``headline`` and the card of ``version``."""
    client = configure_mlflow(settings)
    mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
    text = _fit_description(
        f"**{headline}**\n\n{mv.description or ''}",
        f"(cut to fit; the full card is `{MODEL_CARD_FILE}` in MLflow run {mv.run_id})",
    )
    call_with_retries(settings, client.update_registered_model, settings.model_name, description=text)


# --------------------------------------------------------------------------------------------
# Registration


def register_model(
    settings: Settings,
    dag_run_id: str,
    model: Any,
    *,
    image_size: int,
    class_names: tuple[str, ...] | list[str],
    metrics: dict,
    data_summary: dict,
    params: dict,
) -> ModelRef:
    """Log and register ``model`` in the DAG run's MLflow run, with its model card.

    The card (:func:`model_card`) becomes the version's description, the registered model's
    description and the run artifact ``model_card.md``; the test metrics become version tags
    (:func:`metric_tags`). A retried task finds the version its DAG run already registered
    (by MLflow run id) and completes its tags instead of registering a second one.
    """
    import mlflow

    class_names = tuple(class_names)
    client = configure_mlflow(settings)
    with tracking_run(settings, dag_run_id) as run_id:
        existing = call_with_retries(
            settings, client.search_model_versions,
            f"name='{settings.model_name}' and run_id='{run_id}'",
        )
        tags = {TAG_AIRFLOW_RUN_ID: dag_run_id, **metric_tags(metrics)}
        if existing:
            version = str(max(int(v.version) for v in existing))
            log.warning("DAG run %s already registered version %s (task retried); completing it", dag_run_id, version)
            wait_until_ready(settings, version)
        else:
            version = log_model_version(settings, model, image_size=image_size, class_names=class_names).version
        card = model_card(
            model_name=settings.model_name, version=version, dag_run_id=dag_run_id, mlflow_run_id=run_id,
            image_size=image_size, class_names=class_names, metrics=metrics, data_summary=data_summary,
            params=params, registered_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        call_with_retries(settings, mlflow.log_text, card, MODEL_CARD_FILE)
        description = _fit_description(card, f"(cut to fit; the full card is `{MODEL_CARD_FILE}` in MLflow run {run_id})")
        _tag_version(settings, client, version, image_size=image_size, class_names=class_names, tags=tags,
                     description=description)
        describe_registered_model(
            settings, version,
            f"Latest registered: version {version}. The version in use is @{settings.champion_alias}; "
            f"its own card is in its version description.",
        )
    ref = model_ref_from_version(settings, client.get_model_version(settings.model_name, version))
    log.info("registered %s version %s for DAG run %s with its model card", ref.name, ref.version, dag_run_id)
    return ref


# --------------------------------------------------------------------------------------------
# Aliases


def current_aliases(settings: Settings) -> dict[str, str]:
    """``{alias: version}`` of the registered model; empty if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        model = call_with_retries(settings, client.get_registered_model, settings.model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def wait_until_ready(settings: Settings, version: str) -> Any:
    """The version once its registration is READY; raises if it failed or took too long."""
    client = configure_mlflow(settings)
    deadline = time.monotonic() + settings.model_ready_timeout
    delay = 0.5
    while True:
        mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION":
            raise RuntimeError(
                f"{settings.model_name} version {version} failed to register: {mv.status_message or 'no message'}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{settings.model_name} version {version} still {mv.status} after "
                f"{settings.model_ready_timeout:.0f} s (WBC_MODEL_READY_TIMEOUT)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
