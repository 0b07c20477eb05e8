"""Shared by the serving tests: a real (tiny) registered model, the real images of
``../shared/data/wbc-bench/classify-images``, settings for nightly runs and a real predictions
database (SQLite, or a throwaway database on the local PostgreSQL)."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tests.conftest import REPO_ROOT, skip_unless_required
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows

#: Maintenance database of the local PostgreSQL (trust auth); throwaway databases are made there.
POSTGRES_ADMIN_URL = os.environ.get("WBC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@localhost:5432/postgres")
DB_KINDS = ["sqlite", "postgresql"]
DROPS = REPO_ROOT.parent / "shared" / "data" / "wbc-bench" / "classify-images"
V2_CLASSES = (*CLASS_NAMES, "smudge")  # a later model with another class list
THRESHOLD = 0.65  # near the median confidence of the tiny seed-1 model on these images


@contextmanager
def throwaway_database(kind: str, folder: Path):
    """A URL to an empty database: a SQLite file in ``folder``, or ``wbc_test_<random>`` on the
    local PostgreSQL (dropped afterwards). Skips when PostgreSQL is not running."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'predictions.db'}"
        return
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        connection = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        skip_unless_required(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc.orig}")
    name = f"wbc_test_{uuid.uuid4().hex[:12]}"
    connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield (make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False))
    finally:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.close()
        admin.dispose()


@pytest.fixture(params=DB_KINDS)
def db_url(request, tmp_path):
    with throwaway_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def db_settings(settings, db_url):
    db.upgrade_database(db_url)
    return settings.with_overrides(predictions_db_url=db_url)


def make_prediction(
    sha: str,
    version: str = "1",
    *,
    classes=CLASS_NAMES,
    best=0,
    confidence=0.9,
    created_at=None,
    review=False,
    reasons=None,
) -> dict:
    """A ``predictions`` row of model ``version`` whose class ``best`` has ``confidence``."""
    rest = (1.0 - confidence) / (len(classes) - 1)
    probabilities = {name: (confidence if i == best else rest) for i, name in enumerate(classes)}
    return {
        "sha256": sha,
        "predicted_class": classes[best],
        "confidence": confidence,
        "probabilities": probabilities,
        "model_name": "wbc-classifier",
        "model_version": version,
        "model_run_id": f"run{version}",
        "dag_run_id": "night",
        "needs_review": review or bool(reasons),
        "review_reasons": list(reasons) if reasons is not None else (["low_confidence"] if review else []),
        "created_at": created_at or db.utcnow(),
    }


def make_seen(path: str, sha: str, drop: str, seen_at=None) -> dict:
    """A ``files_seen`` row."""
    return {
        "path": path,
        "drop": drop,
        "sha256": sha,
        "size": 10,
        "mtime": 1.5,
        "seen_at": seen_at or db.utcnow(),
        "dag_run_id": "night",
    }


def drop_source(name: str) -> Path:
    path = DROPS / name
    if not path.is_dir():
        skip_unless_required(f"real images absent: {path} not found (../shared/data is not checked out here)")
    return path


def register_tiny_model(settings, *, class_names=CLASS_NAMES, seed=0, alias=None) -> ModelRef:
    """A 32 px Rescaling + Flatten + Dense softmax model, registered like a trained one."""
    import keras
    import mlflow

    from wbc_tasks.registry.client import configure_mlflow, ensure_experiment
    from wbc_tasks.registry.registration import log_model_version

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            # Spread-out weights: confidences on both sides of the review threshold.
            keras.layers.Dense(
                len(class_names),
                activation="softmax",
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed),
            ),
        ]
    )
    with mlflow.start_run(experiment_id=ensure_experiment(settings)):
        ref = log_model_version(settings, model, image_size=32, class_names=tuple(class_names))
    if alias:
        configure_mlflow(settings).set_registered_model_alias(settings.model_name, alias, ref.version)
    return ref


def base_settings(folder: Path):
    """Settings whose state lives in ``folder`` (module fixtures cannot use monkeypatch)."""
    return get_settings().with_overrides(
        home=folder,
        work_dir=folder / "work",
        classify_dir=folder / "classify",
        mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
        mlflow_artifact_root=folder / "mlflow" / "artifacts",
        mlflow_experiment="wbc-training",
        classify_experiment="wbc-classification",
        model_name="wbc-classifier",
        champion_alias="champion",
        predictions_db_url=f"sqlite:///{folder / 'predictions.db'}",
        archive_dir=None,
        allowed_roots=(),
        settle_minutes=0.0,
        workers=1,
        classify_chunk_size=500,
        max_chunks=32,
        classify_batch_size=16,
        review_threshold=THRESHOLD,
    )


@pytest.fixture(scope="session")
def registry_settings(tmp_path_factory):
    """One MLflow registry for the serving tests: v1 (the champion) and v2 (another class list)."""
    settings = base_settings(tmp_path_factory.mktemp("registry"))
    v1 = register_tiny_model(settings, seed=1, alias="champion")
    v2 = register_tiny_model(settings, class_names=V2_CLASSES, seed=2)
    assert (v1.version, v2.version) == ("1", "2")
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def night(request, registry_settings, tmp_path):
    """Settings for nightly runs: this test's classify/work folders and predictions database."""
    with throwaway_database(request.param, tmp_path) as url:
        settings = registry_settings.with_overrides(
            classify_dir=tmp_path / "classify",
            work_dir=tmp_path / "work",
            predictions_db_url=url,
        )
        settings.classify_dir.mkdir()
        yield settings


@pytest.fixture
def night_sqlite(registry_settings, tmp_path):
    settings = registry_settings.with_overrides(
        classify_dir=tmp_path / "classify",
        work_dir=tmp_path / "work",
        predictions_db_url=f"sqlite:///{tmp_path / 'predictions.db'}",
    )
    settings.classify_dir.mkdir()
    return settings


def copy_drop(name: str, settings) -> Path:
    return Path(shutil.copytree(drop_source(name), settings.classify_dir / name))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def table_rows(settings, table) -> list[dict]:
    with (
        db.open_engine(settings.predictions_db_url) as engine,
        engine.connect() as connection,
    ):
        return [dict(r) for r in connection.execute(select(table).order_by(table.c.id)).mappings()]


def add_bad_files(folder: Path, good: Path) -> dict[str, str]:
    """A truncated JPEG, an empty PNG and a text file; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:3000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("slide 14 re-stained\n")
    return {
        "truncated.jpg": "truncated",
        "empty.png": "empty",
        "notes.txt": "unsupported file type",
    }


#: The known drop of the report and review tests: (file name, class, confidence, needs_review,
#: review_reasons). 11 cells, 2 immature granulocytes, 2 suspected blasts (one by class, one by reason).
KNOWN_DROP = "2026-12-01"
KNOWN_CELLS = (
    ("n1.jpg", "neutrophils", 0.9, False, []),
    ("n2.jpg", "neutrophils", 0.9, False, []),
    ("n3.jpg", "neutrophils", 0.9, False, []),
    ("n4.jpg", "neutrophils", 0.6, True, ["unfamiliar"]),
    ("l1.jpg", "lymphocytes", 0.95, False, []),
    ("l2.jpg", "lymphocytes", 0.5, True, ["low_confidence"]),
    ("b1.jpg", "bands", 0.8, False, []),
    ("m1.jpg", "metamyelocytes", 0.8, False, []),
    ("x1.jpg", "blasts", 0.95, False, []),
    ("o1.jpg", "monocytes", 0.55, True, []),  # flagged before reasons were recorded
    ("o2.jpg", "monocytes", 0.6, True, ["blast_suspected", "low_confidence"]),
)


def known_sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def write_raw_rows(connection, *, predictions=(), rejections=(), seen=()) -> None:
    """The rows alone, as code before the drop summaries (migration 0006) wrote them."""
    db.insert_ignore(connection, db.predictions, predictions)
    db.insert_ignore(connection, db.rejections, rejections)
    db.insert_ignore(connection, db.files_seen, seen)


def add_known_drop(settings, drop: str = KNOWN_DROP, *, write=write_rows) -> None:
    """:data:`KNOWN_CELLS` classified by version 1, two unreadable files and one pending file in
    ``drop``, and one classified file in another drop (which must not count); written by the
    product's writer (or ``write``)."""
    rows, seen = [], []
    for name, label, confidence, review, reasons in KNOWN_CELLS:
        sha_ = known_sha(f"{drop}/{name}")
        row = make_prediction(sha_, "1", best=CLASS_NAMES.index(label), confidence=confidence, review=review)
        rows.append({**row, "review_reasons": reasons})
        seen.append(make_seen(f"{drop}/{name}", sha_, drop))
    other = known_sha("other/n.jpg")
    rows.append(
        {**make_prediction(other, "1", best=CLASS_NAMES.index("blasts"), confidence=0.99), "review_reasons": []}
    )
    seen.append(make_seen("2026-12-02/n.jpg", other, "2026-12-02"))
    seen += [make_seen(f"{drop}/empty.png", db.UNREADABLE_SHA, drop), make_seen(f"{drop}/late.jpg", "f" * 64, drop)]
    seen.append(make_seen(f"{drop}/notes.txt", known_sha("notes"), drop))
    rejected = [
        {"path": f"{drop}/empty.png", "sha256": db.UNREADABLE_SHA, "reason": "empty file"},
        {"path": f"{drop}/notes.txt", "sha256": known_sha("notes"), "reason": "unsupported file type '.txt'"},
    ]
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        write(connection, predictions=rows)
        write(connection, rejections=[{**r, "created_at": db.utcnow(), "dag_run_id": "night"} for r in rejected])
        write(connection, seen=seen)


def counts_from_cells(settings) -> list[dict]:
    """Each drop's counts tallied here from every cell as the review code reads it (status,
    prediction, latest review): what the drop summaries must equal. Newest drop first."""
    from wbc_tasks.serving.review_queue import drop_cells, is_blast_suspected

    tally: dict[str, dict] = {}
    for cell in drop_cells(settings, None):
        counts = tally.setdefault(cell["drop"], dict.fromkeys(_COUNT_NAMES, 0))
        counts["files"] += 1
        if cell["status"] != "classified":
            counts[cell["status"]] += 1
            continue
        blast = is_blast_suspected(cell["prediction"])
        counts["cells"] += 1
        counts["needs_review"] += int(bool(cell["prediction"]["needs_review"]) or blast)
        counts["blast_suspected"] += int(blast)
        counts["reviewed"] += int(cell["review"] is not None)
    return [{"drop": drop, **tally[drop]} for drop in sorted(tally, reverse=True)]


_COUNT_NAMES = ("files", "cells", "rejected", "pending", "needs_review", "reviewed", "blast_suspected")
