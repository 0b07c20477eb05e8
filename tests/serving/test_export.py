"""Reading the predictions database: the export of every file seen with each prediction of its
content, its filters and formats, on known rows (SQLite and PostgreSQL) and after a real night."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import select

from tests.serving.conftest import add_bad_files, copy_drop, make_prediction, make_seen
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import export, export_stream
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.nightly import classify_new_images


@pytest.fixture
def known_rows(db_settings):
    """Two drops; one image classified by two versions with different class lists; a rejection."""
    url = db_settings.predictions_db_url
    old = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    new = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    classes_v2 = (*CLASS_NAMES, "smudge")
    with db.open_engine(url) as engine, engine.begin() as connection:
        write_rows(
            connection,
            predictions=[
                make_prediction("a" * 64, "1", best=2, confidence=0.95, created_at=old),
                make_prediction(
                    "b" * 64, "1", best=8, confidence=0.40, created_at=old, reasons=["low_confidence", "unfamiliar"]
                ),
                make_prediction(
                    "a" * 64,
                    "2",
                    classes=classes_v2,
                    best=9,
                    confidence=0.6,
                    created_at=new,
                ),
                make_prediction(
                    "c" * 64,
                    "2",
                    classes=classes_v2,
                    best=2,
                    confidence=0.99,
                    created_at=new,
                    reasons=["blast_suspected"],
                ),
            ],
        )
        write_rows(
            connection,
            seen=[
                make_seen("2026-11-24/a.jpg", "a" * 64, "2026-11-24", old),
                make_seen("2026-11-24/b.jpg", "b" * 64, "2026-11-24", old),
                make_seen("2026-11-24/bad.jpg", "d" * 64, "2026-11-24", old),
                make_seen("2026-11-25/a-again.jpg", "a" * 64, "2026-11-25", new),
                make_seen("c.jpg", "c" * 64, db.LOOSE_DROP, new),
            ],
        )
        write_rows(
            connection,
            rejections=[
                {
                    "path": "2026-11-24/bad.jpg",
                    "sha256": "d" * 64,
                    "reason": "corrupt or truncated image",
                    "created_at": old,
                    "dag_run_id": "night",
                }
            ],
        )
    return db_settings


def test_export_lists_every_file_with_each_prediction_of_its_content(known_rows, tmp_path):
    out = tmp_path / "all.csv"
    assert export_stream.export_predictions(known_rows, fmt="csv", out=out) == 7
    table = pd.read_csv(
        out,
        dtype={"model_version": str, "drop": str},
        keep_default_na=False,
        na_values=[""],
    )
    by_file = table.groupby("path")
    # a.jpg's content has two predictions (v1, v2): two rows for it and for its later copy
    assert sorted(by_file.get_group("2026-11-24/a.jpg")["model_version"]) == ["1", "2"]
    assert sorted(by_file.get_group("2026-11-25/a-again.jpg")["model_version"]) == [
        "1",
        "2",
    ]
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
        n = export_stream.export_predictions(known_rows, export.PredictionFilter(**filters), fmt="json", out=buffer)
        records = json.loads(buffer.getvalue())
        assert len(records) == n
        return records

    assert {r["path"] for r in rows(drop="2026-11-25")} == {"2026-11-25/a-again.jpg"}
    assert {r["path"] for r in rows(drop=db.LOOSE_DROP)} == {"c.jpg"}
    assert {(r["path"], r["model_version"]) for r in rows(predicted_class="blasts")} == {
        ("2026-11-24/a.jpg", "1"),
        ("2026-11-25/a-again.jpg", "1"),
        ("c.jpg", "2"),
    }
    assert [r["path"] for r in rows(needs_review=True)] == ["2026-11-24/b.jpg", "c.jpg"]
    assert {r["path"] for r in rows(model_version=2)} == {
        "2026-11-24/a.jpg",
        "2026-11-25/a-again.jpg",
        "c.jpg",
    }
    latest = rows(latest=True)
    assert len(latest) == 5 and len({r["path"] for r in latest}) == 5
    assert {r["model_version"] for r in latest if r["path"].endswith("a.jpg")} == {"2"}
    # since: files first seen, or predictions made, at or after that time
    since = rows(since="2026-11-25T00:00:00")
    assert {(r["path"], r["model_version"]) for r in since} == {
        ("2026-11-24/a.jpg", "2"),
        ("2026-11-25/a-again.jpg", "1"),
        ("2026-11-25/a-again.jpg", "2"),
        ("c.jpg", "2"),
    }
    assert rows(since=datetime(2026, 11, 26, tzinfo=UTC) + timedelta(days=1)) == []
    smudge = next(r for r in rows(model_version="2") if r["path"] == "2026-11-24/a.jpg")
    assert smudge["predicted_class"] == "smudge" and set(smudge["probabilities"]) == {
        *CLASS_NAMES,
        "smudge",
    }


def test_review_reasons_are_exported_as_lists_and_filter_rows(known_rows, tmp_path):
    def paths(**filters):
        buffer = io.BytesIO()
        export_stream.export_predictions(known_rows, export.PredictionFilter(**filters), fmt="json", out=buffer)
        return {(r["path"], tuple(r["review_reasons"])) for r in json.loads(buffer.getvalue())}

    assert paths(review_reason="unfamiliar") == {("2026-11-24/b.jpg", ("low_confidence", "unfamiliar"))}
    assert paths(review_reason="low_confidence") == {("2026-11-24/b.jpg", ("low_confidence", "unfamiliar"))}
    assert paths(review_reason="blast_suspected") == {("c.jpg", ("blast_suspected",))}
    assert paths(review_reason="image_check") == set()
    with pytest.raises(ValueError, match="unknown review reason 'tired'"):
        export.PredictionFilter(review_reason="tired")
    # CSV: the list as JSON text; parquet: a list column.
    export_stream.export_predictions(known_rows, fmt="csv", out=tmp_path / "x.csv")
    export_stream.export_predictions(known_rows, fmt="parquet", out=tmp_path / "x.parquet")
    csv = pd.read_csv(tmp_path / "x.csv", keep_default_na=False)
    assert json.loads(csv.set_index("path").loc["2026-11-24/b.jpg", "review_reasons"]) == [
        "low_confidence",
        "unfamiliar",
    ]
    parquet = pd.read_parquet(tmp_path / "x.parquet").set_index("path")
    assert list(parquet.loc["c.jpg", "review_reasons"]) == ["blast_suspected"]


def test_export_formats_hold_the_same_rows(known_rows, tmp_path):
    for fmt in export.EXPORT_FORMATS:
        export_stream.export_predictions(known_rows, fmt=fmt, out=tmp_path / f"x.{fmt}")
    csv = pd.read_csv(tmp_path / "x.csv", dtype={"model_version": str})
    parquet = pd.read_parquet(tmp_path / "x.parquet")
    records = json.loads((tmp_path / "x.json").read_text())
    key = ["path", "model_version"]
    csv, parquet = (
        csv.sort_values(key, na_position="first"),
        parquet.sort_values(key, na_position="first"),
    )
    assert list(csv["path"]) == list(parquet["path"])
    assert list(csv.columns) == list(parquet.columns)
    assert csv["confidence"].fillna(-1).tolist() == pytest.approx(parquet["confidence"].fillna(-1).tolist())
    for record in records:
        match = parquet[
            (parquet["path"] == record["path"])
            & (parquet["model_version"].fillna("") == (record["model_version"] or ""))
        ]
        assert len(match) == 1
        for name, prob in (record["probabilities"] or {}).items():
            assert match.iloc[0][f"prob_{name}"] == pytest.approx(prob)


def test_export_to_stdout_and_bad_format(known_rows, capsysbinary):
    assert export_stream.export_predictions(known_rows, export.PredictionFilter(drop="2026-11-25"), fmt="csv") == 2
    lines = capsysbinary.readouterr().out.decode().splitlines()
    assert lines[0].startswith("path,drop,status") and len(lines) == 3
    with pytest.raises(ValueError, match="unknown export format 'xlsx'"):
        export_stream.export_predictions(known_rows, fmt="xlsx")


def test_export_in_every_format_matches_the_database(night, tmp_path):
    settings = night
    folder = copy_drop("2026-11-24", settings)
    add_bad_files(folder, folder / "cell_0002.jpg")
    classify_new_images(settings)
    with (
        db.open_engine(settings.predictions_db_url) as engine,
        engine.connect() as connection,
    ):
        joined = (
            connection.execute(
                select(db.files_seen.c.path, db.predictions).join(
                    db.predictions, db.predictions.c.sha256 == db.files_seen.c.sha256
                )
            )
            .mappings()
            .all()
        )
    truth = {r["path"]: r for r in joined}
    assert len(truth) == 100

    for fmt in export.EXPORT_FORMATS:
        out = tmp_path / f"predictions.{fmt}"
        assert export_stream.export_predictions(settings, fmt=fmt, out=out) == 103
        if fmt == "json":
            records = json.loads(out.read_text())
            probs = {r["path"]: r["probabilities"] for r in records}
        else:
            table = pd.read_csv(out, dtype={"model_version": str}) if fmt == "csv" else pd.read_parquet(out)
            records = table.to_dict("records")
            probs = {r["path"]: {c: r[f"prob_{c}"] for c in CLASS_NAMES} for r in records}
        exported = {r["path"]: r for r in records}
        assert set(exported) == set(truth) | {f"2026-11-24/{n}" for n in ("truncated.jpg", "empty.png", "notes.txt")}
        for path, row in truth.items():
            got = exported[path]
            assert got["status"] == "classified" and got["predicted_class"] == row["predicted_class"]
            assert got["confidence"] == pytest.approx(row["confidence"])
            assert bool(got["needs_review"]) == row["needs_review"]
            assert str(got["model_version"]) == row["model_version"] and got["sha256"] == row["sha256"]
            assert probs[path] == pytest.approx(row["probabilities"])
        assert exported["2026-11-24/empty.png"]["status"] == "rejected"

    flagged = sum(r["needs_review"] for r in truth.values())
    review = export.PredictionFilter(needs_review=True)
    assert export_stream.export_predictions(settings, review, out=tmp_path / "review.csv") == flagged
    some_class = next(iter(truth.values()))["predicted_class"]
    n_class = sum(r["predicted_class"] == some_class for r in truth.values())
    of_class = export.PredictionFilter(predicted_class=some_class)
    assert export_stream.export_predictions(settings, of_class, out=tmp_path / "c.csv") == n_class


@pytest.mark.parametrize("latest", [False, True])
def test_streamed_batches_of_any_size_hold_the_same_rows(known_rows, latest):
    """A file's rows split across two fetched batches are still one file's rows (``latest`` keeps its last)."""
    where = export.PredictionFilter(latest=latest)

    def read(batch_size):
        return [
            (r["path"], r["model_version"], r["status"], r["review_reasons"], r["probabilities"])
            for r in export_stream.stream_predictions(known_rows, where, batch_size=batch_size)
        ]

    whole = read(1000)
    assert len(whole) == (5 if latest else 7)
    assert read(1) == read(2) == read(3) == whole


def test_csv_cells_as_a_csv_reader_sees_them(known_rows, tmp_path):
    """The CSV's cells, read back with Python's csv module: booleans, times, lists, missing values."""
    import csv

    out = tmp_path / "x.csv"
    export_stream.export_predictions(known_rows, fmt="csv", out=out)
    with open(out, newline="") as handle:
        rows = {(r["path"], r["model_version"]): r for r in csv.DictReader(handle)}
    flagged = rows[("2026-11-24/b.jpg", "1")]
    assert flagged["needs_review"] == "True" and flagged["status"] == "classified"
    assert json.loads(flagged["review_reasons"]) == ["low_confidence", "unfamiliar"]
    assert flagged["predicted_at"] == "2026-11-24T02:00:00.000000+0000"
    assert float(flagged["prob_neutrophils"]) == pytest.approx(0.40) and flagged["prob_smudge"] == ""
    rejected = rows[("2026-11-24/bad.jpg", "")]
    assert rejected["status"] == "rejected" and rejected["needs_review"] == "" and rejected["confidence"] == ""
    assert rejected["rejection_reason"] == "corrupt or truncated image"


@pytest.mark.parametrize("batch_size", [1, 3])  # 3: the last batch read ahead while the client hangs up
def test_a_stream_closed_early_stops_reading(known_rows, batch_size):
    """A client that hangs up mid-download: the stream's read-ahead thread ends with it."""
    import threading
    import time

    stream = export_stream.stream_columns(known_rows, batch_size=batch_size)
    assert len(next(stream)["path"]) == batch_size
    time.sleep(0.5)  # the thread reads ahead as far as it may
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "export-read-ahead"]
    assert len(list(export_stream.stream_predictions(known_rows))) == 7  # the database is free for the next


def test_times_read_in_any_zone_are_exported_as_utc():
    """SQLite gives naive UTC times, PostgreSQL aware ones in the session's zone: both columns
    come out as the same UTC instants, as datetimes and as the CSV's text."""
    from zoneinfo import ZoneInfo

    from wbc_tasks.serving.export_formats import _csv_times, python_times, utc_times

    paris = datetime(2026, 7, 1, 4, 30, 15, 250, tzinfo=ZoneInfo("Europe/Paris"))  # 02:30:15 UTC
    times = utc_times([datetime(2026, 7, 1, 2, 30, 15, 250), paris, None])
    expected = datetime(2026, 7, 1, 2, 30, 15, 250, tzinfo=UTC)
    assert python_times(times) == [expected, expected, None]
    assert all(t is None or t.utcoffset() == timedelta(0) for t in python_times(times))
    assert _csv_times(times).to_pylist() == ["2026-07-01T02:30:15.000250+0000"] * 2 + [None]
