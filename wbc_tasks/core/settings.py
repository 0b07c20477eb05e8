"""The one settings module: every path, URI and default the pipeline uses.

Owns :class:`Settings` (read from the environment variables named ``WBC_*``, documented in
README.md, "Settings"; :meth:`Settings.with_overrides` for a validated copy), the file-level
constants every layer shares (image extensions, the completion marker) and where the checkout,
the embedded state and the DAG files are. Nothing else in the package reads the environment or
hard-codes a path. Per-run choices a user makes in a trigger form (epochs, learning rates, ...)
are *params*, not settings: see :mod:`wbc_tasks.pipelines.params`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.paths import safe_name

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


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()


#: A path from the environment: ``~`` expanded, made absolute, links followed.
ResolvedPath = Annotated[Path, AfterValidator(_resolved)]


def _split(separator: str) -> BeforeValidator:
    """A before-validator reading a list from one environment string (``a:b``, ``x,y``)."""

    def split(value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(separator) if part.strip())
        return value

    return BeforeValidator(split)


class SettingsError(PermanentError, ValueError):
    """A ``WBC_*`` variable holds a value of the wrong kind (retrying cannot fix the environment)."""


class Settings(BaseSettings):
    """Where things live and the defaults that are not per-run params.

    Each field is read from ``WBC_<FIELD NAME>`` (``KERAS_HOME`` for ``keras_home``); an empty
    variable counts as unset. Defaults are stated here once; the folders and URIs of the
    embedded default derive from ``home`` (see :meth:`_embedded_defaults_under_home`).
    """

    model_config = SettingsConfigDict(
        env_prefix="WBC_", env_ignore_empty=True, frozen=True, extra="ignore", populate_by_name=True
    )

    #: Project-local state folder of the embedded default (SQLite files, artifacts, work folders).
    home: ResolvedPath = Field(default_factory=default_home)
    #: Labelled images laid out as ``<data_dir>/<class>/<image>``; None = use generated demo data.
    data_dir: ResolvedPath | None = None
    #: Per-run work folders live under ``<work_dir>/runs/<run id>/<step>/`` (default ``home/work``).
    work_dir: ResolvedPath
    #: Where lab staff drop unlabelled images for the nightly classification
    #: (default ``home/classify-images``).
    classify_dir: ResolvedPath
    #: MLflow tracking URI (``sqlite:///...`` embedded, ``http://mlflow:5000`` in the stack).
    mlflow_tracking_uri: str
    #: Artifact root for a file-based/SQLite MLflow; ignored by a server with proxied artifacts.
    mlflow_artifact_root: ResolvedPath
    mlflow_experiment: str = "wbc-training"
    #: Registered model name and the aliases promotion uses.
    model_name: str = "wbc-classifier"
    champion_alias: str = "champion"
    rollback_alias: str = "previous-champion"
    #: SQLAlchemy URL of the predictions database.
    predictions_db_url: str
    #: Explicit path to VGG16 ImageNet no-top weights (.h5); else the Keras cache is searched.
    vgg16_weights_path: ResolvedPath | None = Field(default=None, validation_alias=AliasChoices("WBC_VGG16_WEIGHTS"))
    #: Default image side in pixels (the model's input is side x side x 3).
    image_size: int = 256
    seed: int = 42
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    #: The same for images people reviewed: a larger share kept to measure and calibrate on a new
    #: lab's cells while they are few (with 50 reviews: about 25 train, 10 validation, 15 test).
    reviewed_test_fraction: float = Field(default=0.3, ge=0, le=0.6)
    reviewed_val_fraction: float = Field(default=0.2, ge=0, le=0.4)
    #: Decoding refuses images with more pixels than this (decompression bombs).
    max_image_pixels: int = 40_000_000
    #: Images with a side shorter than this are rejected (nothing to classify at 8x8).
    min_image_side: int = 32
    #: Worker processes for decoding/resizing (0 = all cores).
    workers: int = 0
    #: Images per chunk when streaming through memory-mapped stores.
    chunk_size: int = 256
    #: Side of the reduced copy SMOTE finds neighbours on.
    smote_neighbour_size: int = 16
    #: Folders symlinks may point into (labs mount shares that way); others are rejected.
    #: One variable, folders separated by ``os.pathsep``.
    allowed_roots: Annotated[tuple[ResolvedPath, ...], NoDecode, _split(os.pathsep)] = ()
    #: Keras's own home (env ``KERAS_HOME``, default ``~/.keras``): its ``models/`` cache is where
    #: pretrained weights are looked for when ``vgg16_weights_path`` is unset.
    keras_home: ResolvedPath = Field(
        default_factory=lambda: Path("~/.keras").expanduser(), validation_alias=AliasChoices("KERAS_HOME")
    )
    #: Retries (after the first try) of an MLflow call that failed for a passing reason.
    mlflow_retries: int = 3
    #: Seconds before the first retry; doubled each time.
    mlflow_retry_wait: float = 1.0
    #: Seconds to wait for a shared lock (promotion: another run may be evaluating the champion).
    lock_timeout: float = 3600.0
    #: Reviewed test images a candidate trained on reviews needs before they decide its promotion
    #: (with the labelled ones); fewer: the labelled test split decides alone and they are reported.
    promotion_min_reviewed_test: int = Field(default=12, ge=1)
    #: How much lower (balanced accuracy) the candidate may be on the labelled test split, at the
    #: paired interval's lower end, when the reviewed images decide.
    promotion_noninferiority_margin: float = Field(default=0.02, ge=0, le=1)
    #: Reviews recorded since the last adaptation run that make the night request the next one
    #: (the ``wbc_reviews_to_learn`` asset starts ``wbc_adaptation``); 0 turns the trigger off.
    #: Off in the embedded default (a one-machine trial decides by hand), 50 in the stack.
    adapt_after_reviews: int = Field(default=0, ge=0)
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
    #: What classification computes with: ``auto`` uses a version's exported CPU engine
    #: (OpenVINO, checked against Keras at registration) when it has an accepted one, Keras
    #: otherwise; ``keras`` always uses Keras.
    inference_engine: Literal["auto", "keras"] = "auto"
    #: The registration check of an exported engine: on up to ``engine_check_images`` test
    #: images, the top class and the review reasons must agree with Keras on at least
    #: ``engine_min_agreement`` of them and no calibrated probability may differ by more than
    #: ``engine_max_probability_difference``; otherwise the engine is refused.
    engine_check_images: int = Field(default=400, ge=0)
    engine_min_agreement: float = Field(default=0.995, ge=0, le=1)
    engine_max_probability_difference: float = Field(default=0.02, ge=0, le=1)
    #: Review threshold on the calibrated confidence. Unset (the default), each model version's
    #: own threshold is used: fitted on its validation split for the training param
    #: ``review_target_accuracy`` and stored with the version. Set, it overrides every version's.
    review_threshold: float | None = None
    #: Used for versions registered before thresholds were fitted (no trust artifacts).
    legacy_review_threshold: float = 0.7
    #: A cell whose calibrated blast probability reaches this is flagged ``blast_suspected``,
    #: whatever its top class (the lab report's "blasts suspected" flag uses the same rule).
    #: Unset, each version's own value: fitted on its validation split so that the training
    #: param ``blast_recall_target`` of blasts are predicted blasts or flagged.
    blast_flag_probability: float | None = None
    #: Cheap checks of each decoded image before the model (``image_check`` review reason): a
    #: nearly uniform frame (grey-level standard deviation below ``image_check_min_std``; real
    #: smears here have >= 26), too dark or too bright a frame (mean grey level outside
    #: ``image_check_min_mean``..``image_check_max_mean``; real smears here 158-232) and a
    #: noise-like texture (mean neighbour difference over standard deviation above
    #: ``image_check_max_roughness``; real smears <= 0.27 at 64 px, pixel noise ~1.14).
    image_check_min_std: float = 8.0
    image_check_min_mean: float = 40.0
    image_check_max_mean: float = 245.0
    image_check_max_roughness: float = 0.6
    #: Drift per drop: drops with fewer classified images raise no class-mix alert (too few to
    #: tell a shift from chance); a drop whose rejected share passes ``drift_max_rejected_share``
    #: raises an alert. The other drift limits are fitted per model version on its validation split.
    drift_min_images: int = 30
    drift_max_rejected_share: float = 0.2
    #: How far one specimen's class mix may lie from the training labs' mix before the class-mix
    #: alert: the limit is fitted on simulated drops whose class mix is drawn from a Dirichlet
    #: around the training mix with this concentration (10: a class making 23 % of the training
    #: images ranges about 0-50 % between specimens, as differentials of different patients do).
    #: Higher is stricter. Read when a model is calibrated (it is stored with the version).
    drift_class_mix_concentration: float = Field(default=10.0, gt=0)
    #: Differential report (wbc_tasks.serving.report): the "left shift" flag is raised when bands,
    #: metamyelocytes and myelocytes together are more than this percent of a drop's cells (a
    #: left shift is commonly read from about 10 % immature granulocytes upward).
    left_shift_percent: float = Field(default=10.0, ge=0, le=100)
    #: The "many unreadable files" flag is raised when more than this percent of a drop's files
    #: were rejected (a failing scanner or a copy gone wrong, rather than a few bad images).
    unreadable_flag_percent: float = Field(default=10.0, ge=0, le=100)
    #: If set, classified/rejected files are moved here (after their rows are committed).
    archive_dir: ResolvedPath | None = None
    #: MLflow experiment the nightly run summaries are logged to.
    classify_experiment: str = "wbc-classification"
    #: Retention (wbc_tasks.ops): a training run's work folder untouched for this many days
    #: is deleted, except the newest ``retention_keep_runs`` folders, folders of model versions
    #: holding an alias and runs whose MLflow run is still RUNNING.
    retention_days: float = 30.0
    retention_keep_runs: int = 5
    #: Also delete the MLflow artifacts of old training runs that never registered a version.
    retention_mlflow_artifacts: bool = False
    #: When the wbc_maintenance DAG (retention) runs, in ``timezone``.
    maintenance_schedule: str = "30 3 * * *"
    #: Failure alerts (wbc_tasks.ops.alerts). Secrets stay out of ``repr`` and so out of logs.
    alert_webhook_url: str | None = Field(default=None, repr=False)
    #: Addresses, comma-separated in the variable.
    alert_email: Annotated[tuple[str, ...], NoDecode, _split(",")] = ()
    alert_callback: str | None = None
    #: Seconds each network call of an alert (webhook POST, SMTP session) may take.
    alert_timeout: float = 10.0
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = Field(default=None, repr=False)
    smtp_starttls: bool = True
    smtp_from: str = "wbc-pipeline@localhost"
    #: Privacy (wbc_tasks.core.privacy): image file names in MLflow artifacts and task logs become
    #: keyed pseudonyms. The key (HMAC) stays out of ``repr``; unset, one is generated once into
    #: ``<work_dir>/.pseudonym_key`` (mode 0600).
    pseudonymise_names: bool = False
    pseudonym_key: str | None = Field(default=None, repr=False)
    #: Who ``wbc promote`` / ``wbc rollback`` record as having moved the champion when ``--who``
    #: is not given; unset: the login name.
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults_under_home(cls, data: Any) -> Any:
        """The embedded default keeps all state under one folder: the folders and URIs not set
        explicitly derive from ``home``."""
        if not isinstance(data, dict):
            return data
        home = _resolved(data.get("home") or default_home())
        derived = {
            "work_dir": home / "work",
            "classify_dir": home / "classify-images",
            "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            "mlflow_artifact_root": home / "mlflow" / "artifacts",
            "predictions_db_url": f"sqlite:///{home / 'predictions.db'}",
        }
        return {**derived, **{k: v for k, v in data.items() if v not in (None, "")}, "home": home}

    @classmethod
    def from_env(cls) -> Settings:
        """Read every ``WBC_*`` variable; a malformed one raises :class:`SettingsError` naming it."""
        try:
            return cls()
        except ValidationError as exc:
            raise _settings_error(exc) from None

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields replaced (tests and the CLI use this), validated like the
        environment: a path is resolved, a bad value raises :class:`SettingsError` naming it.

        The copy is built from this object's values and ``changes`` alone: the environment is
        not read again (it may have changed since), so what is not overridden stays as it is.
        A field set to None takes its default; the folders and URIs derived from ``home`` are
        derived again only when they are overridden with None."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        try:
            # model_validate runs every validator without BaseSettings.__init__, which would
            # read the environment again.
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            raise _settings_error(exc) from None

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


def _settings_error(exc: ValidationError) -> SettingsError:
    """One :class:`SettingsError` naming each refused setting by its variable, with the value."""
    problems = "; ".join(
        f"setting {env_variable(str(e['loc'][0])) if e['loc'] else 'WBC_*'}={e.get('input')!r}: {e['msg']}"
        for e in exc.errors()
    )
    return SettingsError(problems)


def env_variable(field_name: str) -> str:
    """The environment variable a settings field is read from."""
    field = Settings.model_fields.get(field_name, None)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"WBC_{field_name.upper()}"


def get_settings() -> Settings:
    """Settings from the current environment (read each time: tests change the environment)."""
    return Settings.from_env()
