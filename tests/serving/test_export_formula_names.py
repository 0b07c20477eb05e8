"""Hostile file and drop names in the exports (issue 28): CSV, from the CLI's export and from the
HTTP stream alike, neutralises cells that begin a formula; JSON and Parquet keep the exact text."""

from __future__ import annotations

import csv
import io
import json

import pandas as pd
import pytest

from tests.serving.conftest import make_prediction, make_seen
from wbc_tasks.serving import export_stream
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.export_formats import stream_csv
from wbc_tasks.serving.export_stream import stream_columns, stream_probability_columns
from wbc_tasks.serving.report import differential_report
from wbc_tasks.serving.report_rendering import render_report

DROP = "=cmd|' /C calc'!A0"
NAMES = ['=HYPERLINK("http://evil.example","click").jpg', "+1+1.jpg", "-2.jpg", "@SUM(A1).jpg", "plain.jpg"]


@pytest.fixture
def hostile_rows(db_settings):
    with db.open_engine(db_settings.predictions_db_url) as engine, engine.begin() as connection:
        shas = [f"{i:064x}" for i in range(len(NAMES))]
        write_rows(connection, predictions=[make_prediction(s, "1", best=i) for i, s in enumerate(shas)])
        write_rows(connection, seen=[make_seen(f"{DROP}/{n}", s, DROP) for n, s in zip(NAMES, shas, strict=True)])
    return db_settings


def _cells(text: str, column: str) -> list[str]:
    return [row[column] for row in csv.DictReader(io.StringIO(text))]


def test_csv_exports_neutralise_formulas_and_json_and_parquet_keep_the_names(hostile_rows, tmp_path):
    expected = sorted(f"'{DROP}/{n}" for n in NAMES)  # every path starts with the drop's '='
    cli_csv = tmp_path / "p.csv"
    export_stream.export_predictions(hostile_rows, out=cli_csv, fmt="csv")
    assert sorted(_cells(cli_csv.read_text(), "path")) == expected
    assert set(_cells(cli_csv.read_text(), "drop")) == {"'" + DROP}

    classes = stream_probability_columns(hostile_rows)
    streamed = b"".join(stream_csv(stream_columns(hostile_rows), classes)).decode()
    assert sorted(_cells(streamed, "path")) == expected

    as_json = tmp_path / "p.json"
    export_stream.export_predictions(hostile_rows, out=as_json, fmt="json")
    assert sorted(r["path"] for r in json.loads(as_json.read_text())) == sorted(f"{DROP}/{n}" for n in NAMES)
    as_parquet = tmp_path / "p.parquet"
    export_stream.export_predictions(hostile_rows, out=as_parquet, fmt="parquet")
    assert set(pd.read_parquet(as_parquet)["drop"]) == {DROP}


def test_the_report_csv_neutralises_the_drop_name(hostile_rows):
    report = differential_report(hostile_rows, DROP)
    notes = {row["item"]: row["note"] for row in csv.DictReader(io.StringIO(render_report(report, "csv")))}
    assert notes["files"] == "'" + DROP
    assert json.loads(render_report(report, "json"))["drop"] == DROP
