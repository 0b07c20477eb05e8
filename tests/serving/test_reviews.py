"""Reviews of classified cells: the queue's order and contents, recording decisions (kept, never
overwritten; the latest counts), the drops list, and the reviewed images as files (export), on
known rows (SQLite and PostgreSQL) and on real images after a real night."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta

import pytest

from tests.serving.conftest import (
    KNOWN_DROP,
    add_known_drop,
    copy_drop,
    files_under,
    known_sha,
    make_prediction,
    make_seen,
    sha,
    table_rows,
)
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.images import ImageError
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.reviews import (
    REVIEW_LABELS,
    ReviewError,
    export_reviewed,
    latest_reviews,
    list_drops,
    record_review,
    review_image_path,
    review_queue,
    reviewed_images,
)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _path(name: str) -> str:
    return f"{KNOWN_DROP}/{name}"


def test_queue_lists_flagged_cells_and_every_suspected_blast_blasts_first_then_least_confident(db_settings):
    add_known_drop(db_settings)
    queue = review_queue(db_settings, KNOWN_DROP)

    assert [q["path"] for q in queue] == [_path(n) for n in ("o2.jpg", "x1.jpg", "l2.jpg", "o1.jpg", "n4.jpg")]
    first = queue[0]
    assert first["blast_suspected"] and first["reasons"] == ["blast_suspected", "low_confidence"]
    assert first["predicted_class"] == "monocytes" and first["model_version"] == "1"
    assert [t["class"] for t in first["top_classes"]][0] == "monocytes" and len(first["top_classes"]) == 3
    assert first["top_classes"][0]["probability"] == pytest.approx(0.6)
    assert sum(t["probability"] for t in first["top_classes"]) < 1.0
    # A confident blast needs a person too; an old flagged row with no reasons reads as low confidence.
    assert queue[1]["reasons"] == [] and queue[1]["blast_suspected"]
    assert queue[3]["reasons"] == ["low_confidence"]
    assert all(q["latest_review"] is None for q in queue)
    assert review_queue(db_settings, "no-such-drop") == []


def test_reviews_are_kept_and_the_latest_counts(db_settings):
    add_known_drop(db_settings)
    first = record_review(db_settings, _path("x1.jpg"), "lymphocytes", reviewer="alice", reviewed_at=T0)
    second = record_review(
        db_settings, _path("x1.jpg"), "blasts", reviewer="bob", note="nucleoli visible", reviewed_at=T0 + timedelta(1)
    )

    assert second["id"] != first["id"]
    assert second["sha256"] == known_sha(_path("x1.jpg")) and second["drop"] == KNOWN_DROP
    assert (second["model_name"], second["model_version"], second["predicted_class"]) == (
        "wbc-classifier",
        "1",
        "blasts",
    )
    stored = table_rows(db_settings, db.reviews)
    assert [(r["reviewer"], r["label"], r["note"]) for r in stored] == [
        ("alice", "lymphocytes", None),
        ("bob", "blasts", "nucleoli visible"),
    ]
    assert stored[1]["reviewed_at"].replace(tzinfo=UTC) == T0 + timedelta(1)
    latest = latest_reviews(db_settings, drop=KNOWN_DROP)
    assert [(r["path"], r["reviewer"], r["label"]) for r in latest] == [(_path("x1.jpg"), "bob", "blasts")]
    queued = {q["path"]: q for q in review_queue(db_settings, KNOWN_DROP)}
    assert queued[_path("x1.jpg")]["latest_review"]["reviewer"] == "bob"

    # An earlier time recorded later does not win; the same time is decided by the order recorded.
    record_review(db_settings, _path("x1.jpg"), "monocytes", reviewer="carol", reviewed_at=T0)
    record_review(db_settings, _path("x1.jpg"), "eosinophils", reviewer="dave", reviewed_at=T0 + timedelta(1))
    assert [r["reviewer"] for r in latest_reviews(db_settings, drop=KNOWN_DROP)] == ["dave"]
    assert len(table_rows(db_settings, db.reviews)) == 4
    assert latest_reviews(db_settings, drop="2026-12-02") == []


@pytest.mark.parametrize(
    ("path", "label", "reviewer", "message"),
    [
        ("x1.jpg", "skip", "alice", "not a review"),
        ("x1.jpg", "smudge", "alice", "not one of"),
        ("x1.jpg", "Blasts ", "alice", "not one of"),
        ("x1.jpg", "blasts", " ", "reviewer"),
        ("late.jpg", "blasts", "alice", "no prediction"),
        ("empty.png", "unusable", "alice", "no readable file"),
        ("missing.jpg", "blasts", "alice", "no readable file"),
        ("../../etc/passwd", "blasts", "alice", "without '..'"),
    ],
)
def test_a_review_that_cannot_be_recorded_says_why_and_records_nothing(db_settings, path, label, reviewer, message):
    add_known_drop(db_settings)
    with pytest.raises(ReviewError, match=message):
        record_review(db_settings, _path(path), label, reviewer=reviewer)
    with pytest.raises(ReviewError, match="relative"):
        record_review(db_settings, "/" + _path("x1.jpg"), "blasts", reviewer="alice")
    assert table_rows(db_settings, db.reviews) == []


def test_every_class_and_unusable_is_a_label(db_settings):
    add_known_drop(db_settings)
    assert (*CLASS_NAMES, "unusable") == REVIEW_LABELS
    for label in REVIEW_LABELS:
        record_review(db_settings, _path("n1.jpg"), label, reviewer="alice")
    assert [r["label"] for r in table_rows(db_settings, db.reviews)] == list(REVIEW_LABELS)


def test_drops_list_counts_cells_flagged_and_reviewed(db_settings):
    add_known_drop(db_settings)
    record_review(db_settings, _path("x1.jpg"), "blasts", reviewer="alice")
    record_review(db_settings, _path("x1.jpg"), "blasts", reviewer="bob")
    record_review(db_settings, _path("n1.jpg"), "unusable", reviewer="alice")

    drops = list_drops(db_settings)
    assert [d["drop"] for d in drops] == ["2026-12-02", KNOWN_DROP]
    assert drops[1] == {
        "drop": KNOWN_DROP,
        "files": 14,
        "cells": 11,
        "rejected": 2,
        "pending": 1,
        "needs_review": 5,
        "reviewed": 2,
        "blast_suspected": 2,
    }
    assert drops[0]["cells"] == 1 and drops[0]["blast_suspected"] == 1 and drops[0]["reviewed"] == 0


# ------------------------------------------------------------------ reviewed images as files


def _classified_copy(settings, name: str, source_drop: str = "2026-11-24", *, drop: str | None = None) -> str:
    """Copy a real image into the classify folder and record it as seen and classified."""
    from tests.serving.conftest import drop_source

    drop = drop or source_drop
    target = settings.classify_dir / drop / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(drop_source(source_drop) / name, target)
    rel = f"{drop}/{name}"
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        db.insert_ignore(connection, db.predictions, [make_prediction(sha(target), "1", best=8, review=True)])
        db.insert_ignore(connection, db.files_seen, [make_seen(rel, sha(target), drop)])
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
