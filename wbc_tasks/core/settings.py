"""The one settings module: every path, URI and default the pipeline uses.

Settings come from environment variables named ``WBC_*`` (documented in README.md, "Settings").
Nothing else in the package reads the environment or hard-codes a path. Per-run choices a user
makes in the Airflow trigger form (epochs, learning rates, ...) are *params*, not settings: they
live in :mod:`wbc_tasks.training.params`.
"""

from __future__ import annotations

from wbc_tasks.core.paths import safe_name

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

#: The nine classes, in the order the model's outputs use.
CLASS_NAMES: tuple[str, ...] = (
    "bands",
    "basophils",
    "blasts",
    "eosinophils",
    "lymphocytes",
    "metamyelocytes",
    "monocytes",
    "myelocytes",
    "neutrophils",
)

#: Extensions the image finder accepts (compared lower-case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Name of the marker a step writes last, once its whole output is in place.
COMPLETE_MARKER = "_COMPLETE.json"

#: The source checkout this package runs from, or None when it is installed as a package.
_CHECKOUT = Path(__file__).resolve().parents[2]
PROJECT_ROOT: Path | None = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else None


def default_home() -> Path:
    """Where the embedded state lives unless ``WBC_HOME`` says: ``.wbc`` in the checkout, or
    ``~/.wbc`` for an installed package."""
    return PROJECT_ROOT / ".wbc" if PROJECT_ROOT is not None else Path("~/.wbc").expanduser()


def dags_folder() -> Path:
    """The DAG files: ``WBC_DAGS_DIR``, else the checkout's ``dags/``, else the copy installed
    inside the package (``wbc_tasks/_dags``, put there by the wheel build)."""
    configured = os.environ.get("WBC_DAGS_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    if PROJECT_ROOT is not None and (PROJECT_ROOT / "dags").is_dir():
        return PROJECT_ROOT / "dags"
    return Path(__file__).resolve().parents[1] / "_dags"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"setting {name}={value!r} is not an integer") from exc


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ValueError(f"setting {name}={value!r} is not a number") from exc


def _env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"setting {name}={value!r} is not a boolean (true/false, yes/no, 1/0, on/off)")


def _env_optional(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


@dataclass(frozen=True)
class Settings:
    """Where things live and the defaults that are not per-run params."""

    #: Project-local state folder of the embedded default (SQLite files, artifacts, work folders).
    home: Path
    #: Labelled images laid out as ``<data_dir>/<class>/<image>``; None = use generated demo data.
    data_dir: Path | None
    #: Per-run work folders live under ``<work_dir>/runs/<run id>/<step>/``.
    work_dir: Path
    #: Where lab staff drop unlabelled images for the nightly classification.
    classify_dir: Path
    #: MLflow tracking URI (``sqlite:///...`` embedded, ``http://mlflow:5000`` in the stack).
    mlflow_tracking_uri: str
    #: Artifact root for a file-based/SQLite MLflow; ignored by a server with proxied artifacts.
    mlflow_artifact_root: Path
    mlflow_experiment: str
    #: Registered model name and the aliases promotion uses.
    model_name: str
    champion_alias: str
    rollback_alias: str
    #: SQLAlchemy URL of the predictions database.
    predictions_db_url: str
    #: Explicit path to VGG16 ImageNet no-top weights (.h5); else the Keras cache is searched.
    vgg16_weights_path: Path | None
    #: Default image side in pixels (the model's input is side x side x 3).
    image_size: int
    seed: int
    test_fraction: float
    val_fraction: float
    #: Decoding refuses images with more pixels than this (decompression bombs).
    max_image_pixels: int
    #: Images with a side shorter than this are rejected (nothing to classify at 8x8).
    min_image_side: int
    #: Worker processes for decoding/resizing (0 = all cores).
    workers: int
    #: Images per chunk when streaming through memory-mapped stores.
    chunk_size: int
    #: Side of the reduced copy SMOTE finds neighbours on.
    smote_neighbour_size: int
    #: Folders symlinks may point into (labs mount shares that way); others are rejected.
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)
    #: Keras's own home (env ``KERAS_HOME``, default ``~/.keras``): its ``models/`` cache is where
    #: pretrained weights are looked for when ``vgg16_weights_path`` is unset.
    keras_home: Path = field(default_factory=lambda: Path("~/.keras").expanduser())
    #: Retries (after the first try) of an MLflow call that failed for a passing reason.
    mlflow_retries: int = 3
    #: Seconds before the first retry; doubled each time.
    mlflow_retry_wait: float = 1.0
    #: Seconds to wait for a shared lock (promotion: another run may be evaluating the champion).
    lock_timeout: float = 3600.0
    #: Seconds to wait for a new model version to become READY before promoting it.
    model_ready_timeout: float = 300.0
    #: MLflow's own HTTP client (a tracking server): retries of one request, their backoff factor
    #: (whole seconds; waits of 0, 2, 4, 8... times it) and the timeout of one request, in
    #: seconds. Exported to MLflow's ``MLFLOW_HTTP_REQUEST_*`` variables by
    #: :func:`wbc_tasks.registry.client.configure_mlflow`; ``mlflow_retries`` retry on top of them.
    mlflow_http_retries: int = 5
    mlflow_http_backoff: int = 1
    mlflow_http_timeout: int = 60
    #: Retries (after the first try) of a predictions-database transaction that failed because the
    #: connection was lost or refused, the first after ``predictions_db_retry_wait`` seconds,
    #: each wait doubled (a whole transaction is retried: nothing is half committed).
    predictions_db_retries: int = 5
    predictions_db_retry_wait: float = 1.0
    #: Nightly classification: cron schedule and the timezone it (and start_date) is read in.
    classify_schedule: str = "0 2 * * *"
    timezone: str = "UTC"
    #: Files modified within this many minutes may still be copying; they wait for the next run.
    settle_minutes: float = 5.0
    #: Images per classification chunk (one mapped task each) and the cap on chunks per run
    #: (the chunk size grows so a big backlog never makes more than this many tasks).
    classify_chunk_size: int = 500
    max_chunks: int = 32
    #: Images per model call; the next batch is decoded while the model predicts this one.
    classify_batch_size: int = 32
    #: Predictions less confident than this are flagged ``needs_review``.
    review_threshold: float = 0.7
    #: If set, classified/rejected files are moved here (after their rows are committed).
    archive_dir: Path | None = None
    #: MLflow experiment the nightly run summaries are logged to.
    classify_experiment: str = "wbc-classification"
    #: Retention (wbc_tasks.ops.retention): a training run's work folder untouched for this many days
    #: is deleted, except the newest ``retention_keep_runs`` folders, folders of model versions
    #: holding an alias and runs whose MLflow run is still RUNNING.
    retention_days: float = 30.0
    retention_keep_runs: int = 5
    #: Also delete the MLflow artifacts of old training runs that never registered a version.
    retention_mlflow_artifacts: bool = False
    #: When the wbc_maintenance DAG (retention) runs, in ``timezone``.
    maintenance_schedule: str = "30 3 * * *"
    #: Failure alerts (wbc_tasks.ops.alerts). Secrets stay out of ``repr`` and so out of logs.
    alert_webhook_url: str | None = field(default=None, repr=False)
    alert_email: tuple[str, ...] = ()
    alert_callback: str | None = None
    #: Seconds each network call of an alert (webhook POST, SMTP session) may take.
    alert_timeout: float = 10.0
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_starttls: bool = True
    smtp_from: str = "wbc-pipeline@localhost"
    #: Privacy (wbc_tasks.core.privacy): image file names in MLflow artifacts and task logs become
    #: keyed pseudonyms. The key (HMAC) stays out of ``repr``; unset, one is generated once into
    #: ``<work_dir>/.pseudonym_key`` (mode 0600).
    pseudonymise_names: bool = False
    pseudonym_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "Settings":
        """Read every ``WBC_*`` variable, falling back to the embedded defaults."""
        home = _env_path("WBC_HOME", default_home())
        data = os.environ.get("WBC_DATA_DIR")
        weights = os.environ.get("WBC_VGG16_WEIGHTS")
        archive = os.environ.get("WBC_ARCHIVE_DIR")
        roots = tuple(
            Path(p).expanduser().resolve()
            for p in os.environ.get("WBC_ALLOWED_ROOTS", "").split(os.pathsep)
            if p
        )
        return cls(
            home=home,
            data_dir=Path(data).expanduser().resolve() if data else None,
            work_dir=_env_path("WBC_WORK_DIR", home / "work"),
            classify_dir=_env_path("WBC_CLASSIFY_DIR", home / "classify-images"),
            mlflow_tracking_uri=_env_str(
                "WBC_MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
            ),
            mlflow_artifact_root=_env_path("WBC_MLFLOW_ARTIFACT_ROOT", home / "mlflow" / "artifacts"),
            mlflow_experiment=_env_str("WBC_MLFLOW_EXPERIMENT", "wbc-training"),
            model_name=_env_str("WBC_MODEL_NAME", "wbc-classifier"),
            champion_alias=_env_str("WBC_CHAMPION_ALIAS", "champion"),
            rollback_alias=_env_str("WBC_ROLLBACK_ALIAS", "previous-champion"),
            predictions_db_url=_env_str(
                "WBC_PREDICTIONS_DB_URL", f"sqlite:///{home / 'predictions.db'}"
            ),
            vgg16_weights_path=Path(weights).expanduser().resolve() if weights else None,
            image_size=_env_int("WBC_IMAGE_SIZE", 256),
            seed=_env_int("WBC_SEED", 42),
            test_fraction=_env_float("WBC_TEST_FRACTION", 0.2),
            val_fraction=_env_float("WBC_VAL_FRACTION", 0.1),
            max_image_pixels=_env_int("WBC_MAX_IMAGE_PIXELS", 40_000_000),
            min_image_side=_env_int("WBC_MIN_IMAGE_SIDE", 32),
            workers=_env_int("WBC_WORKERS", 0),
            chunk_size=_env_int("WBC_CHUNK_SIZE", 256),
            smote_neighbour_size=_env_int("WBC_SMOTE_NEIGHBOUR_SIZE", 16),
            allowed_roots=roots,
            keras_home=_env_path("KERAS_HOME", Path("~/.keras").expanduser()),
            mlflow_retries=_env_int("WBC_MLFLOW_RETRIES", 3),
            mlflow_retry_wait=_env_float("WBC_MLFLOW_RETRY_WAIT", 1.0),
            lock_timeout=_env_float("WBC_LOCK_TIMEOUT", 3600.0),
            model_ready_timeout=_env_float("WBC_MODEL_READY_TIMEOUT", 300.0),
            mlflow_http_retries=_env_int("WBC_MLFLOW_HTTP_RETRIES", 5),
            mlflow_http_backoff=_env_int("WBC_MLFLOW_HTTP_BACKOFF", 1),
            mlflow_http_timeout=_env_int("WBC_MLFLOW_HTTP_TIMEOUT", 60),
            predictions_db_retries=_env_int("WBC_PREDICTIONS_DB_RETRIES", 5),
            predictions_db_retry_wait=_env_float("WBC_PREDICTIONS_DB_RETRY_WAIT", 1.0),
            classify_schedule=_env_str("WBC_CLASSIFY_SCHEDULE", "0 2 * * *"),
            timezone=_env_str("WBC_TIMEZONE", "UTC"),
            settle_minutes=_env_float("WBC_SETTLE_MINUTES", 5.0),
            classify_chunk_size=_env_int("WBC_CLASSIFY_CHUNK_SIZE", 500),
            max_chunks=_env_int("WBC_MAX_CHUNKS", 32),
            classify_batch_size=_env_int("WBC_CLASSIFY_BATCH_SIZE", 32),
            review_threshold=_env_float("WBC_REVIEW_THRESHOLD", 0.7),
            archive_dir=Path(archive).expanduser().resolve() if archive else None,
            classify_experiment=_env_str("WBC_CLASSIFY_EXPERIMENT", "wbc-classification"),
            retention_days=_env_float("WBC_RETENTION_DAYS", 30.0),
            retention_keep_runs=_env_int("WBC_RETENTION_KEEP_RUNS", 5),
            retention_mlflow_artifacts=_env_bool("WBC_RETENTION_MLFLOW_ARTIFACTS", False),
            maintenance_schedule=_env_str("WBC_MAINTENANCE_SCHEDULE", "30 3 * * *"),
            alert_webhook_url=_env_optional("WBC_ALERT_WEBHOOK_URL"),
            alert_email=tuple(
                a.strip() for a in os.environ.get("WBC_ALERT_EMAIL", "").split(",") if a.strip()
            ),
            alert_callback=_env_optional("WBC_ALERT_CALLBACK"),
            alert_timeout=_env_float("WBC_ALERT_TIMEOUT", 10.0),
            smtp_host=_env_optional("WBC_SMTP_HOST"),
            smtp_port=_env_int("WBC_SMTP_PORT", 587),
            smtp_user=_env_optional("WBC_SMTP_USER"),
            smtp_password=_env_optional("WBC_SMTP_PASSWORD"),
            smtp_starttls=_env_bool("WBC_SMTP_STARTTLS", True),
            smtp_from=_env_str("WBC_SMTP_FROM", "wbc-pipeline@localhost"),
            pseudonymise_names=_env_bool("WBC_PSEUDONYMISE_NAMES", False),
            pseudonym_key=_env_optional("WBC_PSEUDONYM_KEY"),
        )

    def with_overrides(self, **changes: object) -> "Settings":
        """A copy with some fields replaced (tests and the CLI use this)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **changes)  # type: ignore[arg-type]

    def worker_count(self) -> int:
        """Processes to use for CPU-bound image work."""
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)

    def run_dir(self, run_id: str) -> Path:
        """The work folder of one training run."""
        return self.work_dir / "runs" / safe_name(run_id)

    def input_roots(self) -> tuple[Path, ...]:
        """Folders that paths from the trigger form or the CLI may name (resolved)."""
        roots = [self.home, self.classify_dir, *self.allowed_roots]
        if self.data_dir is not None:
            roots.insert(0, self.data_dir)
        return tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))


def get_settings() -> Settings:
    """Settings from the current environment (read each time: tests change the environment)."""
    return Settings.from_env()
