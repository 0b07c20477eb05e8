"""Shared by the serving tests: a real predictions database (SQLite, or a throwaway database on
the local PostgreSQL) and rows to write into it."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from wbc_tasks.core.settings import CLASS_NAMES
from wbc_tasks.serving import predictions as db

#: Maintenance database of the local PostgreSQL (trust auth); throwaway databases are made there.
POSTGRES_ADMIN_URL = os.environ.get(
    "WBC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@localhost:5432/postgres"
)
DB_KINDS = ["sqlite", "postgresql"]


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
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc.orig}")
    name = f"wbc_test_{uuid.uuid4().hex[:12]}"
    connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            make_url(POSTGRES_ADMIN_URL)
            .set(database=name)
            .render_as_string(hide_password=False)
        )
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
) -> dict:
    """A ``predictions`` row of model ``version`` whose class ``best`` has ``confidence``."""
    rest = (1.0 - confidence) / (len(classes) - 1)
    probabilities = {
        name: (confidence if i == best else rest) for i, name in enumerate(classes)
    }
    return {
        "sha256": sha,
        "predicted_class": classes[best],
        "confidence": confidence,
        "probabilities": probabilities,
        "model_name": "wbc-classifier",
        "model_version": version,
        "model_run_id": f"run{version}",
        "dag_run_id": "night",
        "needs_review": review,
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
