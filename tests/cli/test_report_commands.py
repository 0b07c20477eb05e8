"""``wbc report`` and ``wbc reviews export`` on a real predictions database (SQLite and
PostgreSQL), through the command's own argument parsing and environment settings."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.serving.conftest import (
    DB_KINDS,
    KNOWN_DROP,
    add_known_drop,
    drop_source,
    make_prediction,
    make_seen,
    sha,
    throwaway_database,
)
from wbc_tasks.cli.main import main
from wbc_tasks.core.settings import get_settings
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.report import DISCLAIMER
from wbc_tasks.serving.review_decisions import record_review


@pytest.fixture(params=DB_KINDS)
def cli_settings(request, settings, tmp_path, monkeypatch):
    """The environment a user's shell would have: WBC_HOME and the predictions database URL."""
    with throwaway_database(request.param, tmp_path) as url:
        monkeypatch.setenv("WBC_PREDICTIONS_DB_URL", url)
        db.upgrade_database(url)
        yield get_settings()


def test_report_in_each_format_to_a_file_or_standard_output(cli_settings, tmp_path, capsys):
    add_known_drop(cli_settings)
    for fmt in ("html", "csv", "json"):
        out = tmp_path / "reports" / f"r.{fmt}"
        assert main(["report", KNOWN_DROP, "--format", fmt, "--out", str(out)]) == 0
        assert DISCLAIMER in out.read_text()
        assert str(out) in capsys.readouterr().err

    assert main(["report", KNOWN_DROP, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["drop"], report["cells"], report["rejected"]) == (KNOWN_DROP, 11, 2)
    assert main(["report", KNOWN_DROP, "--format", "json", "--model-version", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == 0

    assert main(["report", "2030-01-01"]) == 2
    assert "no files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", KNOWN_DROP, "--format", "pdf"])


def test_reviews_export_writes_class_folders_and_refuses_the_classify_folder(cli_settings, tmp_path, capsys):
    settings = cli_settings
    source = drop_source("2026-11-24") / "cell_0007.jpg"
    target = settings.classify_dir / "2026-11-24" / source.name
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        write_rows(connection, predictions=[make_prediction(sha(target), "1", best=8)])
        write_rows(connection, seen=[make_seen("2026-11-24/cell_0007.jpg", sha(target), "2026-11-24")])
    record_review(settings, "2026-11-24/cell_0007.jpg", "basophils", reviewer="alice")

    out = tmp_path / "curated"
    assert main(["reviews", "export", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["per_class"] == {"basophils": 1} and summary["exported"] == 1
    assert (out / "basophils" / "cell_0007.jpg").read_bytes() == source.read_bytes()

    assert main(["reviews", "export", "--out", str(settings.classify_dir / "x")]) == 2
    assert "overlaps the classify" in capsys.readouterr().err
    assert not (settings.classify_dir / "x").exists()
