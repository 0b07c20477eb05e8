"""The differential report of a drop: counts, percentages, review reasons and flags with their
rules on known rows (SQLite and PostgreSQL), the reviewed differential beside the automatic one,
the three renderings, and the reports a real night logs to MLflow."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.serving.conftest import KNOWN_DROP, add_known_drop, copy_drop, make_prediction
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.report import (
    DISCLAIMER,
    UNREADABLE,
    ReportError,
    differential_report,
)
from wbc_tasks.serving.report_rendering import render_report
from wbc_tasks.serving.review_decisions import record_review

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _rows(differential) -> dict[str, tuple[int, float | None]]:
    return {row["class"]: (row["count"], row["percent"]) for row in differential}


def _flags(flags) -> dict[str, tuple[bool, float | None]]:
    return {f["name"]: (f["raised"], f["value"]) for f in flags}


def test_report_counts_percentages_reasons_and_flags(db_settings):
    add_known_drop(db_settings)
    report = differential_report(db_settings, KNOWN_DROP)

    assert (report["files"], report["cells"], report["rejected"], report["pending"]) == (14, 11, 2, 1)
    rows = _rows(report["differential"])
    assert list(rows) == [*CLASS_NAMES, UNREADABLE]
    assert rows["neutrophils"] == (4, 36.4) and rows["lymphocytes"] == (2, 18.2) and rows["blasts"] == (1, 9.1)
    assert rows["basophils"] == (0, 0.0) and rows[UNREADABLE] == (2, 14.3)
    assert sum(n for name, (n, _) in rows.items() if name != UNREADABLE) == 11
    assert report["review"]["needs_review"] == 5
    assert report["review"]["reasons"] == {
        "low_confidence": 3,
        "unfamiliar": 1,
        "image_check": 0,
        "blast_suspected": 1,
    }
    assert report["models"] == [{"model_name": "wbc-classifier", "model_version": "1", "cells": 11}]
    # What the model speaks for: the 6 unflagged cells (n1-n3, l1, b1, m1); 1 of 11 unfamiliar.
    coverage = report["coverage"]
    assert (coverage["unflagged"], coverage["unfamiliar"], coverage["reviewed"], coverage["speaks_for"]) == (6, 1, 0, 6)
    assert coverage["meaningful"] and coverage["warning"] is None
    # 2 of 11 cells are blasts by class or reason (counted even when flagged); the left shift rests
    # on the 6 cells the model speaks for: 2 immature granulocytes of 6; 2 of 14 files unreadable.
    assert _flags(report["flags"]) == {
        "blasts_suspected": (True, 2),
        "left_shift": (True, 33.3),
        "many_unreadable_files": (True, 14.3),
    }
    rests_on = {f["name"]: f["rests_on"] for f in report["flags"]}
    assert rests_on["left_shift"].startswith("6 cells the model or a reviewer speaks for (6 unflagged, 0 reviewed)")
    assert "5 flagged cells nobody reviewed left out" in rests_on["left_shift"]
    rules = {f["name"]: f["rule"] for f in report["flags"]}
    assert "WBC_BLAST_FLAG_PROBABILITY" in rules["blasts_suspected"]
    assert "WBC_LEFT_SHIFT_PERCENT = 10 %" in rules["left_shift"]
    assert "WBC_UNREADABLE_FLAG_PERCENT = 10 %" in rules["many_unreadable_files"]
    assert report["reviewed"] is None and report["disclaimer"] == DISCLAIMER

    # The thresholds are settings: above the measured shares, the flags stay down.
    lenient = db_settings.with_overrides(left_shift_percent=33.5, unreadable_flag_percent=15.0)
    flags = _flags(differential_report(lenient, KNOWN_DROP)["flags"])
    assert not flags["left_shift"][0] and not flags["many_unreadable_files"][0] and flags["blasts_suspected"][0]


def test_reviewed_differential_beside_the_automatic_one(db_settings):
    add_known_drop(db_settings)
    record_review(db_settings, f"{KNOWN_DROP}/x1.jpg", "lymphocytes", reviewer="alice", reviewed_at=T0)
    record_review(db_settings, f"{KNOWN_DROP}/x1.jpg", "blasts", reviewer="bob", reviewed_at=T0 + timedelta(1))
    record_review(db_settings, f"{KNOWN_DROP}/o2.jpg", "monocytes", reviewer="alice", reviewed_at=T0)
    record_review(db_settings, f"{KNOWN_DROP}/b1.jpg", "unusable", reviewer="alice", reviewed_at=T0)
    record_review(db_settings, f"{KNOWN_DROP}/l2.jpg", "neutrophils", reviewer="alice", reviewed_at=T0)

    report = differential_report(db_settings, KNOWN_DROP)
    assert _rows(report["differential"])["bands"] == (1, 9.1)  # the automatic one is unchanged
    reviewed = report["reviewed"]
    assert (reviewed["reviewed_cells"], reviewed["changed"], reviewed["unusable"], reviewed["cells"]) == (4, 2, 1, 10)
    assert reviewed["reviewers"] == ["alice", "bob"]
    rows = _rows(reviewed["differential"])
    assert rows["neutrophils"] == (5, 50.0) and rows["lymphocytes"] == (1, 10.0) and rows["bands"] == (0, 0.0)
    assert rows["blasts"] == (1, 10.0) and rows["monocytes"] == (2, 20.0) and rows[UNREADABLE] == (2, 14.3)
    # The reviewer confirmed x1 and cleared o2; one immature granulocyte in ten is not above 10 %.
    assert _flags(reviewed["flags"]) == {
        "blasts_suspected": (True, 1),
        "left_shift": (False, 10.0),
        "many_unreadable_files": (True, 14.3),
    }
    assert report["review"]["reviewed"] == 4


def test_report_of_one_model_version_and_of_an_unknown_drop(db_settings):
    add_known_drop(db_settings)
    newer = make_prediction(
        _sha_of(db_settings, f"{KNOWN_DROP}/n1.jpg"), "2", best=CLASS_NAMES.index("eosinophils"), confidence=0.97
    )
    with db.open_engine(db_settings.predictions_db_url) as engine, engine.begin() as connection:
        write_rows(connection, predictions=[{**newer, "review_reasons": []}])

    newest = differential_report(db_settings, KNOWN_DROP)
    assert _rows(newest["differential"])["eosinophils"] == (1, 9.1)
    assert [(m["model_version"], m["cells"]) for m in newest["models"]] == [("1", 10), ("2", 1)]
    only_v2 = differential_report(db_settings, KNOWN_DROP, model_version=2)
    assert (only_v2["cells"], only_v2["pending"], only_v2["model_version_requested"]) == (1, 11, "2")
    assert _rows(only_v2["differential"])["eosinophils"] == (1, 100.0)
    with pytest.raises(ReportError, match="no files"):
        differential_report(db_settings, "2030-01-01")


def _sha_of(settings, path: str) -> str:
    from sqlalchemy import select

    with db.open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        return connection.execute(select(db.files_seen.c.sha256).where(db.files_seen.c.path == path)).scalar_one()


def test_renderings_carry_the_same_numbers_and_the_research_use_notice(db_settings):
    add_known_drop(db_settings)
    record_review(db_settings, f"{KNOWN_DROP}/b1.jpg", "unusable", reviewer="alice <script>")
    report = differential_report(db_settings, KNOWN_DROP)

    assert json.loads(render_report(report, "json"))["differential"] == report["differential"]

    table = pd.read_csv(io.StringIO(render_report(report, "csv")))
    assert table.iloc[0]["note"] == DISCLAIMER
    differential = table[table["section"] == "differential"].set_index("item")
    assert differential.loc["neutrophils", "count"] == 4 and differential.loc["neutrophils", "percent"] == 36.4
    assert differential.loc["bands", "reviewed_count"] == 0 and differential.loc[UNREADABLE, "count"] == 2
    flags = table[table["section"] == "flag"].set_index("item")
    assert flags.loc["left_shift", "count"] == 1 and flags.loc["left_shift", "reviewed_count"] == 0
    assert "WBC_LEFT_SHIFT_PERCENT" in flags.loc["left_shift", "note"]

    page = render_report(report, "html")
    assert page.count(DISCLAIMER) == 2  # top and bottom of the page
    assert "Left shift: RAISED" in page and "after review" in page
    assert "alice &lt;script&gt;" in page and "<script" not in page
    # Self-contained: nothing is fetched from elsewhere.
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(""", page)
    with pytest.raises(ValueError, match="unknown report format"):
        render_report(report, "pdf")


def test_a_real_night_logs_each_drops_report_to_its_mlflow_run(night, tmp_path):
    from wbc_tasks.registry.client import configure_mlflow

    settings = night
    copy_drop("2026-11-24", settings)
    copy_drop("2026-11-25", settings)
    summary = classify_new_images(settings, drop="2026-11-25")

    client = configure_mlflow(settings)
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "reports/2026-11-25")}
    assert logged == {f"reports/2026-11-25/differential.{fmt}" for fmt in ("html", "csv", "json")}
    assert [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "reports")] == ["reports/2026-11-25"]
    folder = client.download_artifacts(summary["mlflow_run_id"], "reports/2026-11-25", str(tmp_path))
    report = json.loads((Path(folder) / "differential.json").read_text())
    assert report["drop"] == "2026-11-25" and report["cells"] == summary["images_classified"] > 0
    assert report == {**differential_report(settings, "2026-11-25"), "generated_at": report["generated_at"]}
    summary_file = client.download_artifacts(summary["mlflow_run_id"], "summary.json", str(tmp_path))
    assert json.loads(Path(summary_file).read_text())["reports"] == ["2026-11-25"]


def test_the_html_report_carries_its_own_policy_and_escapes_the_lab_bar(db_settings):
    """A report file opened from disk or a mail has no server to send headers: its meta policy
    lets no script run and loads nothing; the lab's bar above it escapes its links and user."""
    import html
    from html.parser import HTMLParser

    from wbc_tasks.serving.report_rendering import REPORT_META_POLICY

    add_known_drop(db_settings)
    report = differential_report(db_settings, KNOWN_DROP)
    page = render_report(report, "html")
    metas = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert [html.unescape(m) for m in metas] == [REPORT_META_POLICY]  # as the browser reads the attribute
    directives = {d.split()[0]: d for d in (p.strip() for p in REPORT_META_POLICY.split(";"))}
    assert directives["script-src"] == "script-src 'none'" and directives["default-src"] == "default-src 'none'"
    assert page.index("Content-Security-Policy") < page.index("<style")  # before anything it governs

    hostile = {"drops": '/lab/drops"><svg onload=alert(1)>', "review": "javascript:alert(1)", "user": "<b>eve</b>"}
    with_bar = render_report(report, "html", nav=hostile)

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    tags = Tags()
    tags.feed(with_bar)
    assert "svg" not in tags.tags and tags.tags.count("b") == page.count("<b>")
    assert "signed in as <bdi>&lt;b&gt;eve&lt;/b&gt;</bdi>" in with_bar
