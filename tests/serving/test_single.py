"""Classifying a few files now, without Airflow (``wbc classify``): files outside the configured
folders are rejected, nothing is written unless asked, and recorded rows appear in
``wbc predictions`` at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.serving.conftest import V2_CLASSES, copy_drop, drop_source, sha, table_rows
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.single import classify_paths


def test_classify_paths_without_airflow_writes_only_when_asked(registry_settings, tmp_path):
    source = drop_source("2026-11-24")
    allowed = tmp_path / "allowed"
    settings = registry_settings.with_overrides(
        predictions_db_url=f"sqlite:///{tmp_path / 'p.db'}",
        allowed_roots=(source.resolve(), allowed.resolve()),
    )
    bad = allowed / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    # A real image, but in no configured folder.
    outside = tmp_path / "elsewhere" / "cell.jpg"
    outside.parent.mkdir()
    shutil.copy(source / "cell_0007.jpg", outside)
    paths = [source / "cell_0005.jpg", bad, source / "cell_0006.jpg", outside]

    results = classify_paths(settings, paths, model_ref="1")

    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert results[0]["predicted_class"] in CLASS_NAMES and results[0]["model_version"] == "1"
    assert results[0]["sha256"] == sha(paths[0])
    assert "not a readable image" in results[1]["rejected"]
    assert "predicted_class" in results[2]
    assert results[3]["rejected"].startswith("file lies outside the allowed folders")
    assert not (tmp_path / "p.db").exists()

    v2 = classify_paths(settings, paths[:1], model_ref="2", record=True)
    assert set(v2[0]["probabilities"]) == set(V2_CLASSES)
    rows = table_rows(settings, db.predictions)
    assert [(r["sha256"], r["model_version"]) for r in rows] == [(sha(paths[0]), "2")]


def test_recorded_cli_classifications_appear_in_predictions_at_once(registry_settings, tmp_path):
    """README's `wbc classify --record FILE…` then `wbc predictions`: a file in the classify
    folder is listed under its relative path and real drop (the nightly run then adds no second
    row), one elsewhere under drop `cli` and its absolute path, a rejection with its reason."""
    settings = registry_settings.with_overrides(
        classify_dir=tmp_path / "classify",
        work_dir=tmp_path / "work",
        predictions_db_url=f"sqlite:///{tmp_path / 'predictions.db'}",
        allowed_roots=((tmp_path / "desk").resolve(),),
    )
    settings.classify_dir.mkdir()
    drop = copy_drop("2026-11-24", settings)
    inside = drop / "cell_0005.jpg"
    desk = tmp_path / "desk"
    desk.mkdir()
    outside = Path(shutil.copy(drop_source("2026-11-24") / "cell_0007.jpg", desk / "mine.jpg"))
    bad = desk / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WBC_")}
    env.update(
        WBC_HOME=str(settings.home),
        WBC_CLASSIFY_DIR=str(settings.classify_dir),
        WBC_WORK_DIR=str(settings.work_dir),
        WBC_PREDICTIONS_DB_URL=settings.predictions_db_url,
        WBC_ALLOWED_ROOTS=str(desk),
        WBC_WORKERS="1",
    )
    wbc = str(Path(sys.executable).with_name("wbc"))
    done = subprocess.run(
        [wbc, "classify", "--record", str(inside), str(outside), str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 3, done.stderr  # 3: at least one file was rejected
    listed = subprocess.run(
        [wbc, "predictions", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = {r["path"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"2026-11-24/cell_0005.jpg", str(outside), str(bad)}
    assert (
        rows["2026-11-24/cell_0005.jpg"]["drop"],
        rows["2026-11-24/cell_0005.jpg"]["status"],
    ) == ("2026-11-24", "classified")
    assert (rows[str(outside)]["drop"], rows[str(outside)]["status"]) == (
        "cli",
        "classified",
    )
    assert rows[str(bad)]["status"] == "rejected" and "not a readable image" in rows[str(bad)]["rejection_reason"]

    classify_new_images(settings.with_overrides(settle_minutes=0.0))
    seen = [s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-24/cell_0005.jpg"]
    assert len(seen) == 1
    assert [p["sha256"] for p in table_rows(settings, db.predictions)].count(sha(inside)) == 1
