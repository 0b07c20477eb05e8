"""Scanning the classify folder: settling files wait, symlinks are followed only into allowed
folders, a drop param cannot leave the folder, unchanged files are not read again."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.serving.conftest import (
    base_settings,
    copy_drop,
    drop_source,
    sha,
    table_rows,
)
from wbc_tasks.serving import infer, scan
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.nightly import classify_new_images


def test_files_still_being_written_wait_for_the_next_run(night_sqlite):
    settings = night_sqlite.with_overrides(settle_minutes=5)
    copy_drop("2026-11-24", settings)  # copied just now: as if still arriving
    summary = classify_new_images(settings)
    assert summary["files_settling"] == 100 and summary["images_classified"] == 0
    assert table_rows(settings, db.files_seen) == []
    later = classify_new_images(settings.with_overrides(settle_minutes=0))
    assert later["images_classified"] == 100


def test_symlinks_followed_only_into_allowed_folders(night_sqlite, tmp_path):
    source = drop_source("2026-11-24")
    share, elsewhere = tmp_path / "share", tmp_path / "elsewhere"
    (share / "scanner-7").mkdir(parents=True)
    elsewhere.mkdir()
    for i in (1, 2):
        shutil.copy(source / f"cell_000{i}.jpg", share / "scanner-7")
    shutil.copy(source / "cell_0003.jpg", elsewhere)
    settings = night_sqlite.with_overrides(allowed_roots=(share.resolve(),))
    loose = settings.classify_dir
    (loose / "2026-11-27").symlink_to(share / "scanner-7", target_is_directory=True)
    (loose / "outside.jpg").symlink_to(elsewhere / "cell_0003.jpg")
    (loose / "broken.jpg").symlink_to(loose / "gone.jpg")

    summary = classify_new_images(settings)

    assert summary["images_classified"] == 2
    seen = {s["path"]: s for s in table_rows(settings, db.files_seen)}
    assert seen["2026-11-27/cell_0001.jpg"]["drop"] == "2026-11-27"
    assert seen["outside.jpg"]["drop"] == db.LOOSE_DROP
    rejected = {r["path"]: r["reason"] for r in table_rows(settings, db.rejections)}
    assert set(rejected) == {"outside.jpg", "broken.jpg"}
    assert "outside the allowed folders" in rejected["outside.jpg"]
    assert "broken symlink" in rejected["broken.jpg"]


def test_drop_param_cannot_leave_the_classify_folder(tmp_path):
    settings = base_settings(tmp_path)
    settings.classify_dir.mkdir()
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", settings.classify_dir / "linked-out")
    for drop in ("../secret", "/etc", "..", "a/../../secret"):
        with pytest.raises(ValueError, match="directly in"):
            scan.list_files(settings, drop=drop)
    with pytest.raises(ValueError, match="points outside the allowed folders"):
        scan.list_files(settings, drop="linked-out")


def test_unchanged_files_are_not_reread_and_replaced_files_are_classified_again(night_sqlite, monkeypatch):
    settings = night_sqlite
    source = drop_source("2026-11-24")
    folder = settings.classify_dir / "2026-11-28"
    folder.mkdir()
    for i in (1, 2, 3):
        shutil.copy2(source / f"cell_000{i}.jpg", folder)
    classify_new_images(settings)

    reads = []
    real_hash = scan.sha256_of_file
    for module in (scan, infer):  # the scan's hashing and the check before decoding
        monkeypatch.setattr(module, "sha256_of_file", lambda path: reads.append(path) or real_hash(path))
    assert classify_new_images(settings)["images_classified"] == 0
    assert reads == []  # size and mtime unchanged: the recorded hash is reused

    # Same name, new content.
    shutil.copy(source / "cell_0009.jpg", folder / "cell_0002.jpg")
    summary = classify_new_images(settings)
    assert summary["images_classified"] == 1
    seen = [s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-28/cell_0002.jpg"]
    assert [s["sha256"] for s in seen] == [
        sha(source / "cell_0002.jpg"),
        sha(source / "cell_0009.jpg"),
    ]
