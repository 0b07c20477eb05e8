"""The predictions database: Alembic migrations from an empty database, idempotent writes and the
export, on SQLite and on a throwaway PostgreSQL database (localhost:5432)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from wbc_tasks.serving import predictions as db
from wbc_tasks.core.settings import CLASS_NAMES

from tests.conftest import skip_unless_required

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
        skip_unless_required(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc.orig}")
    name = f"wbc_test_{uuid.uuid4().hex[:12]}"
    connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
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


def _count(url: str, table) -> int:
    with db.open_engine(url) as engine, engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar_one()


# ------------------------------------------------------------------ schema


def test_migrations_build_the_schema_from_empty_and_match_the_tables(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert db.upgrade_database(db_url) == "0001"
    assert db.upgrade_database(db_url) == "0001"  # a second run changes nothing
    with db.open_engine(db_url) as engine:
        names = set(inspect(engine).get_table_names())
        assert {"predictions", "files_seen", "rejections", db.VERSION_TABLE} <= names
        assert "alembic_version" not in names  # left free for MLflow/Airflow in a shared database
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"version_table": db.VERSION_TABLE, "compare_type": True}
            )
            assert compare_metadata(context, db.metadata) == []
        uniques = {
            table: {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints(table)}
            for table in ("predictions", "files_seen", "rejections")
        }
    assert ("sha256", "model_name", "model_version") in uniques["predictions"]
    assert ("path", "sha256") in uniques["files_seen"]
    assert ("path", "sha256") in uniques["rejections"]

    assert db.downgrade_database(db_url, "base") is None
    with db.open_engine(db_url) as engine:
        assert not {"predictions", "files_seen", "rejections"} & set(inspect(engine).get_table_names())
    assert db.upgrade_database(db_url) == "0001"


def test_two_processes_migrating_at_once_both_succeed(db_url):
    # A CLI run beside the nightly DAG: both may find an empty database and migrate it.
    code = "import sys; from wbc_tasks.serving.predictions import upgrade_database; upgrade_database(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    failures = [p.communicate(timeout=300)[1] for p in processes if p.wait(timeout=300) != 0]
    assert failures == []
    with db.open_engine(db_url) as engine:
        assert db.current_revision(engine) == "0001"


# ------------------------------------------------------------------ idempotent writes


def _prediction(sha: str, version: str = "1", *, classes=CLASS_NAMES, best=0, confidence=0.9,
                created_at=None, review=False) -> dict:
    rest = (1.0 - confidence) / (len(classes) - 1)
    probabilities = {name: (confidence if i == best else rest) for i, name in enumerate(classes)}
    return {
        "sha256": sha, "predicted_class": classes[best], "confidence": confidence,
        "probabilities": probabilities, "model_name": "wbc-classifier", "model_version": version,
        "model_run_id": f"run{version}", "dag_run_id": "night", "needs_review": review,
        "created_at": created_at or db.utcnow(),
    }


def _seen(path: str, sha: str, drop: str, seen_at=None) -> dict:
    return {"path": path, "drop": drop, "sha256": sha, "size": 10, "mtime": 1.5,
            "seen_at": seen_at or db.utcnow(), "dag_run_id": "night"}


def test_insert_ignore_keeps_one_row_per_key_even_for_unreadable_files(db_url):
    db.upgrade_database(db_url)
    now = db.utcnow()
    with db.open_engine(db_url) as engine:
        for attempt in range(2):  # a retried task writes the same rows again
            with engine.begin() as connection:
                db.insert_ignore(connection, db.predictions, [_prediction("a" * 64, confidence=0.9 - attempt / 10)])
                db.insert_ignore(connection, db.files_seen, [_seen("d1/x.jpg", "a" * 64, "d1"),
                                                             _seen("d2/x.jpg", "a" * 64, "d2")])
                # '' not NULL: PostgreSQL and SQLite would both let NULLs repeat under UNIQUE.
                db.insert_ignore(connection, db.rejections, [
                    {"path": "d1/locked.jpg", "sha256": db.UNREADABLE_SHA, "reason": "cannot read",
                     "created_at": now, "dag_run_id": "night"}])
        with engine.connect() as connection:
            confidence = connection.execute(select(db.predictions.c.confidence)).scalar_one()
    assert confidence == pytest.approx(0.9)  # the first write wins; a retry never overwrites
    assert _count(db_url, db.predictions) == 1
    assert _count(db_url, db.files_seen) == 2
    assert _count(db_url, db.rejections) == 1


# ------------------------------------------------------------------ export


@pytest.fixture
def known_rows(db_settings):
    """Two drops; one image classified by two versions with different class lists; a rejection."""
    url = db_settings.predictions_db_url
    old = datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc)
    new = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc)
    classes_v2 = (*CLASS_NAMES, "smudge")
    with db.open_engine(url) as engine, engine.begin() as connection:
        db.insert_ignore(connection, db.predictions, [
            _prediction("a" * 64, "1", best=2, confidence=0.95, created_at=old),
            _prediction("b" * 64, "1", best=8, confidence=0.40, created_at=old, review=True),
            _prediction("a" * 64, "2", classes=classes_v2, best=9, confidence=0.6, created_at=new),
            _prediction("c" * 64, "2", classes=classes_v2, best=2, confidence=0.99, created_at=new),
        ])
        db.insert_ignore(connection, db.files_seen, [
            _seen("2026-11-24/a.jpg", "a" * 64, "2026-11-24", old),
            _seen("2026-11-24/b.jpg", "b" * 64, "2026-11-24", old),
            _seen("2026-11-24/bad.jpg", "d" * 64, "2026-11-24", old),
            _seen("2026-11-25/a-again.jpg", "a" * 64, "2026-11-25", new),
            _seen("c.jpg", "c" * 64, db.LOOSE_DROP, new),
        ])
        db.insert_ignore(connection, db.rejections, [
            {"path": "2026-11-24/bad.jpg", "sha256": "d" * 64, "reason": "corrupt or truncated image",
             "created_at": old, "dag_run_id": "night"}])
    return db_settings


def test_export_lists_every_file_with_each_prediction_of_its_content(known_rows, tmp_path):
    out = tmp_path / "all.csv"
    assert db.export_predictions(known_rows, fmt="csv", out=out) == 7
    table = pd.read_csv(out, dtype={"model_version": str, "drop": str}, keep_default_na=False, na_values=[""])
    by_file = table.groupby("path")
    # a.jpg's content has two predictions (v1, v2): two rows for it and for its later copy
    assert sorted(by_file.get_group("2026-11-24/a.jpg")["model_version"]) == ["1", "2"]
    assert sorted(by_file.get_group("2026-11-25/a-again.jpg")["model_version"]) == ["1", "2"]
    bad = by_file.get_group("2026-11-24/bad.jpg").iloc[0]
    assert bad["status"] == "rejected" and bad["rejection_reason"] == "corrupt or truncated image"
    # wide: one column per class of every model; v1 rows have no smudge probability
    assert [c for c in table.columns if c.startswith("prob_")] == [f"prob_{c}" for c in (*CLASS_NAMES, "smudge")]
    v1 = table[(table["path"] == "2026-11-24/a.jpg") & (table["model_version"] == "1")].iloc[0]
    assert v1["predicted_class"] == "blasts" and v1["prob_blasts"] == pytest.approx(0.95)
    assert pd.isna(v1["prob_smudge"])
    loose = table[table["path"] == "c.jpg"].iloc[0]
    assert pd.isna(loose["drop"]) or loose["drop"] == ""


def test_export_filters(known_rows, tmp_path):
    def rows(**filters):
        buffer = io.BytesIO()
        n = db.export_predictions(known_rows, fmt="json", out=buffer, **filters)
        records = json.loads(buffer.getvalue())
        assert len(records) == n
        return records

    assert {r["path"] for r in rows(drop="2026-11-25")} == {"2026-11-25/a-again.jpg"}
    assert {r["path"] for r in rows(drop=db.LOOSE_DROP)} == {"c.jpg"}
    assert {(r["path"], r["model_version"]) for r in rows(predicted_class="blasts")} == {
        ("2026-11-24/a.jpg", "1"), ("2026-11-25/a-again.jpg", "1"), ("c.jpg", "2")}
    assert [r["path"] for r in rows(needs_review=True)] == ["2026-11-24/b.jpg"]
    assert {r["path"] for r in rows(model_version=2)} == {"2026-11-24/a.jpg", "2026-11-25/a-again.jpg", "c.jpg"}
    latest = rows(latest=True)
    assert len(latest) == 5 and len({r["path"] for r in latest}) == 5
    assert {r["model_version"] for r in latest if r["path"].endswith("a.jpg")} == {"2"}
    # since: files first seen, or predictions made, at or after that time
    since = rows(since="2026-11-25T00:00:00")
    assert {(r["path"], r["model_version"]) for r in since} == {
        ("2026-11-24/a.jpg", "2"), ("2026-11-25/a-again.jpg", "1"), ("2026-11-25/a-again.jpg", "2"),
        ("c.jpg", "2")}
    assert rows(since=datetime(2026, 11, 26, tzinfo=timezone.utc) + timedelta(days=1)) == []
    smudge = next(r for r in rows(model_version="2") if r["path"] == "2026-11-24/a.jpg")
    assert smudge["predicted_class"] == "smudge" and set(smudge["probabilities"]) == {*CLASS_NAMES, "smudge"}


def test_export_formats_hold_the_same_rows(known_rows, tmp_path):
    for fmt in db.EXPORT_FORMATS:
        db.export_predictions(known_rows, fmt=fmt, out=tmp_path / f"x.{fmt}")
    csv = pd.read_csv(tmp_path / "x.csv", dtype={"model_version": str})
    parquet = pd.read_parquet(tmp_path / "x.parquet")
    records = json.loads((tmp_path / "x.json").read_text())
    key = ["path", "model_version"]
    csv, parquet = csv.sort_values(key, na_position="first"), parquet.sort_values(key, na_position="first")
    assert list(csv["path"]) == list(parquet["path"])
    assert list(csv.columns) == list(parquet.columns)
    assert csv["confidence"].fillna(-1).tolist() == pytest.approx(parquet["confidence"].fillna(-1).tolist())
    for record in records:
        match = parquet[(parquet["path"] == record["path"])
                        & (parquet["model_version"].fillna("") == (record["model_version"] or ""))]
        assert len(match) == 1
        for name, prob in (record["probabilities"] or {}).items():
            assert match.iloc[0][f"prob_{name}"] == pytest.approx(prob)


def test_export_to_stdout_and_bad_format(known_rows, capsysbinary):
    assert db.export_predictions(known_rows, fmt="csv", drop="2026-11-25") == 2
    lines = capsysbinary.readouterr().out.decode().splitlines()
    assert lines[0].startswith("path,drop,status") and len(lines) == 3
    with pytest.raises(ValueError, match="unknown export format 'xlsx'"):
        db.export_predictions(known_rows, fmt="xlsx")
