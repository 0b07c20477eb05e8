"""The predictions database: Alembic migrations from an empty database and idempotent writes, on
SQLite and on a throwaway PostgreSQL database (localhost:5432)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import func, inspect, select, text

from tests.serving.conftest import make_prediction, make_seen
from wbc_tasks.serving import predictions as db


def _count(url: str, table) -> int:
    with db.open_engine(url) as engine, engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar_one()


# ------------------------------------------------------------------ schema


def test_migrations_build_the_schema_from_empty_and_match_the_tables(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert db.upgrade_database(db_url) == db.head_revision()
    assert db.upgrade_database(db_url) == db.head_revision()  # a second run changes nothing
    with db.open_engine(db_url) as engine:
        names = set(inspect(engine).get_table_names())
        assert {"predictions", "files_seen", "rejections", "reviews", db.VERSION_TABLE} <= names
        # Left free for MLflow/Airflow in a shared database.
        assert "alembic_version" not in names
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={"version_table": db.VERSION_TABLE, "compare_type": True},
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
        assert not {"predictions", "files_seen", "rejections", "reviews"} & set(inspect(engine).get_table_names())
    assert db.upgrade_database(db_url) == db.head_revision()


def test_two_processes_migrating_at_once_both_succeed(db_url):
    # A CLI run beside the nightly DAG: both may find an empty database and migrate it.
    code = "import sys; from wbc_tasks.serving.predictions import upgrade_database; upgrade_database(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    failures = [p.communicate(timeout=300)[1] for p in processes if p.wait(timeout=300) != 0]
    assert failures == []
    with db.open_engine(db_url) as engine:
        assert db.current_revision(engine) == db.head_revision()


# ------------------------------------------------------------------ idempotent writes


def test_insert_ignore_keeps_one_row_per_key_even_for_unreadable_files(db_url):
    db.upgrade_database(db_url)
    now = db.utcnow()
    with db.open_engine(db_url) as engine:
        for attempt in range(2):  # a retried task writes the same rows again
            with engine.begin() as connection:
                db.insert_ignore(
                    connection,
                    db.predictions,
                    [make_prediction("a" * 64, confidence=0.9 - attempt / 10)],
                )
                db.insert_ignore(
                    connection,
                    db.files_seen,
                    [
                        make_seen("d1/x.jpg", "a" * 64, "d1"),
                        make_seen("d2/x.jpg", "a" * 64, "d2"),
                    ],
                )
                # '' not NULL: PostgreSQL and SQLite would both let NULLs repeat under UNIQUE.
                db.insert_ignore(
                    connection,
                    db.rejections,
                    [
                        {
                            "path": "d1/locked.jpg",
                            "sha256": db.UNREADABLE_SHA,
                            "reason": "cannot read",
                            "created_at": now,
                            "dag_run_id": "night",
                        }
                    ],
                )
        with engine.connect() as connection:
            confidence = connection.execute(select(db.predictions.c.confidence)).scalar_one()
    # The first write wins; a retry never overwrites.
    assert confidence == pytest.approx(0.9)
    assert _count(db_url, db.predictions) == 1
    assert _count(db_url, db.files_seen) == 2
    assert _count(db_url, db.rejections) == 1


def test_migration_0002_gives_old_flagged_rows_the_low_confidence_reason(db_url):
    # Rows written before review reasons existed: flagged ones could only have been flagged for
    # low confidence; the others get no reason. Downgrading drops the columns again.
    assert db.upgrade_database(db_url, "0001") == "0001"
    insert = text(
        "INSERT INTO predictions (sha256, predicted_class, confidence, probabilities, model_name,"
        " model_version, model_run_id, dag_run_id, created_at, needs_review)"
        " VALUES (:sha, 'blasts', 0.5, '{}', 'm', '1', 'r', 'd', :now, :flagged)"
    )
    with db.open_engine(db_url) as engine, engine.begin() as connection:
        for sha, flagged in (("a" * 64, True), ("b" * 64, False)):
            connection.execute(insert, {"sha": sha, "now": db.utcnow(), "flagged": flagged})
    assert db.upgrade_database(db_url) == db.head_revision()
    with db.open_engine(db_url) as engine, engine.connect() as connection:
        rows = dict(connection.execute(select(db.predictions.c.sha256, db.predictions.c.review_reasons)).all())
    assert rows == {"a" * 64: ["low_confidence"], "b" * 64: []}
    assert db.downgrade_database(db_url, "0001") == "0001"
    with db.open_engine(db_url) as engine:
        assert "review_reasons" not in {c["name"] for c in inspect(engine).get_columns("predictions")}


def test_migrations_0004_to_0006_keep_every_row_and_count_every_drop(db_url, settings):
    """From the schema before the adaptation requests, the drop scans and the drop summaries
    (0003), with data in it: every row kept, the adaptation requests and drop scans empty (every
    drop is scanned once more), every drop counted as its cells say, and back down again."""
    from tests.serving.conftest import add_known_drop, counts_from_cells, write_raw_rows
    from wbc_tasks.serving.drop_summaries import list_drops

    assert db.upgrade_database(db_url, "0003") == "0003"
    lab = settings.with_overrides(predictions_db_url=db_url)
    add_known_drop(lab, write=write_raw_rows)
    add_known_drop(lab, drop="2026-11-30", write=write_raw_rows)
    expected = counts_from_cells(lab)
    assert len(expected) == 3 and list_drops(lab) == expected  # before the table: counted from the rows
    tables = (db.predictions, db.files_seen, db.rejections, db.reviews)
    before = {t.name: _count(db_url, t) for t in tables}
    assert before["predictions"] > 0 and before["files_seen"] > 0

    assert db.upgrade_database(db_url) == db.head_revision() == "0006"
    assert {t.name: _count(db_url, t) for t in tables} == before
    assert _count(db_url, db.adaptation_requests) == 0 and _count(db_url, db.drop_scans) == 0
    assert _count(db_url, db.drop_summaries) == 3 and list_drops(lab) == expected
    assert db.downgrade_database(db_url, "0003") == "0003"
    with db.open_engine(db_url) as engine:
        new_tables = {"adaptation_requests", "drop_scans", "drop_summaries"}
        assert not (new_tables & set(inspect(engine).get_table_names()))
    assert {t.name: _count(db_url, t) for t in tables} == before
