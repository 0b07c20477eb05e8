"""The reviewed images as files: the export (linked under each class, what it left out), the
allowed-folder checks before a reviewed file is read, archived files, on real images (SQLite and
PostgreSQL) and after a real night."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.serving.conftest import copy_drop, files_under, make_prediction, make_seen, sha
from wbc_tasks.data.images import ImageError
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.drop_summaries import list_drops
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.review_decisions import ReviewError, record_review
from wbc_tasks.serving.review_export import export_reviewed, review_image_path, reviewed_images
from wbc_tasks.serving.review_queue import review_queue


def _classified_copy(settings, name: str, source_drop: str = "2026-11-24", *, drop: str | None = None) -> str:
    """Copy a real image into the classify folder and record it as seen and classified."""
    from tests.serving.conftest import drop_source

    drop = drop or source_drop
    target = settings.classify_dir / drop / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(drop_source(source_drop) / name, target)
    rel = f"{drop}/{name}"
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        write_rows(connection, predictions=[make_prediction(sha(target), "1", best=8, review=True)])
        write_rows(connection, seen=[make_seen(rel, sha(target), drop)])
    return rel


def _snapshot(folder):
    return {p: (os.stat(folder / p).st_mtime_ns, s) for p, s in files_under(folder).items()}


def test_export_links_each_reviewed_image_under_its_class_and_reports_what_it_left_out(db_settings, tmp_path):
    settings = db_settings
    a = _classified_copy(settings, "cell_0001.jpg")
    same_name = _classified_copy(settings, "cell_0001.jpg", "2026-11-25")
    b = _classified_copy(settings, "cell_0002.jpg")
    junk = _classified_copy(settings, "cell_0003.jpg")
    gone = _classified_copy(settings, "cell_0004.jpg")
    changed = _classified_copy(settings, "cell_0005.jpg")
    record_review(settings, a, "neutrophils", reviewer="alice")
    record_review(settings, same_name, "neutrophils", reviewer="alice")
    record_review(settings, b, "lymphocytes", reviewer="alice")
    record_review(settings, b, "blasts", reviewer="bob")  # the latest counts
    record_review(settings, junk, "unusable", reviewer="alice", note="smudge")
    record_review(settings, gone, "monocytes", reviewer="alice")
    record_review(settings, changed, "monocytes", reviewer="alice")
    (settings.classify_dir / gone).unlink()  # the lab removed it after review
    shutil.copy(settings.classify_dir / a, settings.classify_dir / changed)  # replaced by other content
    before = {
        p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()
    }

    out = tmp_path / "curated"
    summary = export_reviewed(settings, out)

    assert files_under(out) == {
        "neutrophils/cell_0001.jpg": sha(settings.classify_dir / a),
        f"neutrophils/cell_0001-{sha(settings.classify_dir / same_name)[:12]}.jpg": sha(
            settings.classify_dir / same_name
        ),
        "blasts/cell_0002.jpg": sha(settings.classify_dir / b),
    }
    assert summary["exported"] == summary["linked"] == 3 and summary["copied"] == 0
    assert summary["per_class"] == {"blasts": 1, "neutrophils": 2}
    assert [r["path"] for r in summary["renamed"]] == [same_name]
    assert [u["path"] for u in summary["unusable"]] == [junk]
    missing = {m["path"]: m["reason"] for m in summary["missing"]}
    assert set(missing) == {gone, changed}
    assert "disappeared" in missing[gone] and "changed since it was reviewed" in missing[changed]
    assert os.stat(out / "blasts" / "cell_0002.jpg").st_ino == os.stat(settings.classify_dir / b).st_ino
    after = {
        p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()
    }
    assert after == before  # the drop folders are only read

    again = export_reviewed(settings, out)  # a second export adds nothing
    assert again["exported"] == 0 and again["already_there"] == 3
    assert len(files_under(out)) == 3

    with pytest.raises(ReviewError, match="overlaps the classify"):
        export_reviewed(settings, settings.classify_dir / "export")
    with pytest.raises(ReviewError, match="overlaps the classify"):
        export_reviewed(settings, settings.classify_dir.parent)


def test_reviewed_files_are_read_only_inside_the_allowed_folders(db_settings, tmp_path):
    settings = db_settings
    rel = _classified_copy(settings, "cell_0001.jpg")
    record_review(settings, rel, "neutrophils", reviewer="alice")
    # The file is replaced by a link to a byte-identical copy outside every allowed folder.
    outside = tmp_path / "elsewhere" / "cell_0001.jpg"
    outside.parent.mkdir()
    shutil.move(settings.classify_dir / rel, outside)
    os.symlink(outside, settings.classify_dir / rel)

    with pytest.raises(ImageError, match="outside the allowed folders"):
        review_image_path(settings, rel)
    found = reviewed_images(settings)
    assert found.images == [] and "outside the allowed folders" in found.missing[0]["reason"]
    with pytest.raises(ReviewError, match="without '..'"):
        review_image_path(settings, f"{rel}/../../../elsewhere/cell_0001.jpg")

    allowed = settings.with_overrides(allowed_roots=(outside.parent.resolve(),))
    assert review_image_path(allowed, rel) == outside.resolve()
    assert [i.path for i in reviewed_images(allowed).images] == [outside.resolve()]


def test_archived_files_are_found_in_the_archive(db_settings, tmp_path):
    rel = _classified_copy(db_settings, "cell_0001.jpg")
    record_review(db_settings, rel, "neutrophils", reviewer="alice")
    archive = tmp_path / "archive"
    (archive / rel).parent.mkdir(parents=True)
    shutil.move(db_settings.classify_dir / rel, archive / rel)
    settings = db_settings.with_overrides(archive_dir=archive.resolve())

    assert [i.path for i in reviewed_images(settings).images] == [(archive / rel).resolve()]


def test_a_real_night_reviewed_then_exported(night, tmp_path):
    settings = night
    copy_drop("2026-11-24", settings)
    classify_new_images(settings)
    queue = review_queue(settings, "2026-11-24")
    assert queue, "the tiny model flags some of these cells"
    confidences = [q["confidence"] for q in queue if not q["blast_suspected"]]
    assert confidences == sorted(confidences)
    for cell in queue[:3]:
        record_review(settings, cell["path"], "eosinophils", reviewer="tech1")
    record_review(settings, queue[3]["path"], "unusable", reviewer="tech1")

    counts = {d["drop"]: d for d in list_drops(settings)}["2026-11-24"]
    assert counts["cells"] == 100 and counts["reviewed"] == 4
    summary = export_reviewed(settings, tmp_path / "out")
    assert summary["per_class"] == {"eosinophils": 3} and len(summary["unusable"]) == 1
    assert sorted(files_under(tmp_path / "out")) == sorted(f"eosinophils/{q['path'].split('/')[-1]}" for q in queue[:3])
