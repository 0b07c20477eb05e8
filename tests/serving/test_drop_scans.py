"""A night skips the drops an earlier night finished when nothing under them changed (issue 31),
and catches every kind of change: a new file in a sub-folder, a file rewritten in place at the
same size, files copied with their old mtimes (``rsync -a``), a file still settling at the last
night, a renamed drop, a deleted file. ``full_scan`` reads everything. Real images, a real tiny
model, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.serving.conftest import drop_source, sha, table_rows
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.nightly import classify_new_images

SOURCE = "2026-11-24"
OLD, OTHER = "2026-01-01", "2026-01-02"


def _images(n: int, start: int = 0) -> list[Path]:
    return sorted(drop_source(SOURCE).iterdir())[start : start + n]


def _fill(settings, drop: str, images: list[Path], sub: str = "") -> Path:
    folder = settings.classify_dir / drop / sub
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture
def two_finished_drops(night):
    """Two drops (one with a sub-folder) classified by a first night, which finished both."""
    _fill(night, OLD, _images(4), sub="slide-1")
    _fill(night, OTHER, _images(4, start=4))
    first = classify_new_images(night)
    assert first["images_classified"] == 8 and first["drops_finished"] == 2
    return night


def test_an_unchanged_finished_drop_is_skipped_and_full_scan_reads_it(two_finished_drops):
    settings = two_finished_drops
    second = classify_new_images(settings)
    assert (second["drops_skipped_unchanged"], second["drops_scanned"], second["files_found"]) == (2, 0, 0)
    full = classify_new_images(settings, full_scan=True)
    assert (full["drops_skipped_unchanged"], full["files_found"], full["files_already_done"]) == (0, 8, 8)
    assert full["images_classified"] == 0
    assert {r["drop"] for r in table_rows(settings, db.drop_scans)} == {OLD, OTHER}


def _new_file_in_a_sub_folder(settings) -> dict:
    [image] = _images(1, start=8)
    _fill(settings, OLD, [image], sub="slide-1/deeper")
    return {"images_classified": 1}


def _rewritten_in_place_at_the_same_size(settings) -> dict:
    target = next((settings.classify_dir / OLD / "slide-1").iterdir())
    before = target.stat()
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    with open(target, "r+b") as f:  # the same file, the same size, other bytes
        f.write(data)
    # ... and its mtime set back, as a tool preserving times does: only the ctime tells.
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    return {"new_content_of": target.relative_to(settings.classify_dir).as_posix()}


def _copied_with_old_mtimes(settings) -> dict:
    [image] = _images(1, start=9)
    copied = settings.classify_dir / OLD / "slide-1" / image.name
    shutil.copy2(image, copied)  # as rsync -a: the source's (old) mtime
    os.utime(copied, (time.time() - 86400 * 30, time.time() - 86400 * 30))
    return {"images_classified": 1}


def _renamed_drop(settings) -> dict:
    (settings.classify_dir / OLD).rename(settings.classify_dir / "2026-01-01-renamed")
    return {"files_linked_to_existing_predictions": 4, "scanned": "2026-01-01-renamed"}


def _deleted_file(settings) -> dict:
    next((settings.classify_dir / OLD / "slide-1").iterdir()).unlink()
    return {"files_found": 3}


CHANGES = {
    "a new file in a sub-folder": _new_file_in_a_sub_folder,
    "a file rewritten in place at the same size": _rewritten_in_place_at_the_same_size,
    "files copied with their old mtimes (rsync -a)": _copied_with_old_mtimes,
    "a renamed drop": _renamed_drop,
    "a deleted file": _deleted_file,
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_drop_is_scanned_again_and_the_change_accounted_for(two_finished_drops, change):
    settings = two_finished_drops
    expected = CHANGES[change](settings)

    night = classify_new_images(settings)

    assert night["drops_skipped_unchanged"] == 1, "the other drop, unchanged, is skipped"
    assert night["drops_scanned"] == 1
    for key in ("images_classified", "files_linked_to_existing_predictions", "files_found"):
        if key in expected:
            assert night[key] == expected[key], (key, night)
    if "new_content_of" in expected:
        path = expected["new_content_of"]
        seen = {r["sha256"] for r in table_rows(settings, db.files_seen) if r["path"] == path}
        assert sha(settings.classify_dir / path) in seen, "the new content was read and recorded"
    # Finished again: the next night skips both.
    after = classify_new_images(settings)
    assert after["drops_scanned"] == 0 and after["files_found"] == 0


def test_a_drop_still_settling_at_the_last_night_is_not_skipped(night):
    settings = night.with_overrides(settle_minutes=0.05)  # 3 s
    _fill(settings, OLD, _images(3))
    first = classify_new_images(settings)  # just copied: every file still settling
    assert first["files_settling"] == 3 and first["drops_finished"] == 0
    time.sleep(3.5)
    second = classify_new_images(settings)
    assert second["drops_skipped_unchanged"] == 0 and second["images_classified"] == 3
    assert second["drops_finished"] == 1
    assert classify_new_images(settings)["drops_skipped_unchanged"] == 1


def test_a_drop_holding_a_symlink_is_always_scanned(night, tmp_path):
    settings = night.with_overrides(allowed_roots=(tmp_path.resolve(),))
    outside = _fill(settings.with_overrides(classify_dir=tmp_path / "elsewhere"), "x", _images(2))
    _fill(settings, OLD, _images(2, start=2))
    (settings.classify_dir / OLD / "linked").symlink_to(outside, target_is_directory=True)
    assert classify_new_images(settings)["images_classified"] == 4
    again = classify_new_images(settings)
    assert (again["drops_skipped_unchanged"], again["files_already_done"]) == (0, 4)


def test_loose_files_keep_their_fingerprint_beside_a_linked_drop_folder(night, tmp_path):
    """A drop folder that is a link makes that drop always read, not the loose files beside it."""
    from wbc_tasks.serving.scan import LOOSE, drop_fingerprint

    settings = night.with_overrides(allowed_roots=(tmp_path.resolve(),))
    [image] = _images(1)
    shutil.copy(image, settings.classify_dir / image.name)
    before = drop_fingerprint(settings, LOOSE)
    (settings.classify_dir / "linked-drop").symlink_to(tmp_path, target_is_directory=True)
    assert before is not None and drop_fingerprint(settings, LOOSE) == before
    assert drop_fingerprint(settings, "linked-drop") is None
