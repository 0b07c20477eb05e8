"""The chunk commit: a chunk's rows go in all together or not at all, its files are archived only
after the commit, and a retried chunk writes nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serving.conftest import add_bad_files, copy_drop, table_rows
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import classify_chunk
from wbc_tasks.serving.model import resolve_run_model
from wbc_tasks.serving.plan import find_new_images


def test_a_chunk_commits_all_its_rows_or_none_and_retries_cleanly(night_sqlite, monkeypatch, tmp_path):
    settings = night_sqlite.with_overrides(archive_dir=tmp_path / "archive")
    folder = copy_drop("2026-11-24", settings)
    # Notes.txt is rejected (and archived) at once.
    add_bad_files(folder, folder / "cell_0003.jpg")
    model = resolve_run_model(settings)
    found = find_new_images(settings, run_id="night-1", model=model, chunk_size=60)
    assert len(found["chunks"]) == 2
    chunk = json.loads(Path(found["chunks"][0]).read_text())
    chunk_paths = [f["path"] for item in chunk["items"] for f in item["files"]]

    real_insert = db.insert_ignore

    def failing_insert(connection, table, rows):
        real_insert(connection, table, rows)
        if table is db.files_seen:
            raise RuntimeError("database went away")

    monkeypatch.setattr(db, "insert_ignore", failing_insert)
    with pytest.raises(RuntimeError, match="went away"):
        classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    monkeypatch.setattr(db, "insert_ignore", real_insert)
    assert table_rows(settings, db.predictions) == []
    assert {r["path"] for r in table_rows(settings, db.rejections)} == {"2026-11-24/notes.txt"}
    # Nothing archived.
    assert all((settings.classify_dir / p).is_file() for p in chunk_paths)

    first = classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    rows = table_rows(settings, db.predictions)
    assert len(rows) + first["files_rejected"] == len(chunk["items"])
    # Archived after commit.
    assert not any((settings.classify_dir / p).exists() for p in chunk_paths)
    assert all((settings.archive_dir / p).is_file() for p in chunk_paths)
    # A retry (summary file lost too) writes nothing twice.
    Path(found["chunks"][0]).with_suffix(".done.json").unlink()
    retry = classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    assert retry["images_classified"] == 0 and retry["images_already_classified"] == len(rows)
    assert table_rows(settings, db.predictions) == rows
