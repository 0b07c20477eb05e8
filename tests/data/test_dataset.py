import hashlib
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.bad_inputs import CASES, build_cases, check_exif_orientation
from tests.bad_inputs import snapshot as tree_snapshot
from tests.conftest import write_image
from wbc_tasks.core.workdir import run_step
from wbc_tasks.data import dataset
from wbc_tasks.data.dataset import (
    SPLITS,
    find_labelled_images,
    read_manifest,
    split_dataset,
    split_of,
)
from wbc_tasks.data.images import DISAPPEARED
from wbc_tasks.data.labelled_folder import DatasetError, check_data_folder
from wbc_tasks.data.preprocess import PREPROCESS_REJECTED_FILE, preprocess_splits
from wbc_tasks.data.store import open_store


def snapshot(folder):
    """Every file's path, size, mtime and content hash: to prove inputs are never modified."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def split(data_dir, settings, name="run"):
    out = settings.run_dir(name) / "split"
    return run_step(out, lambda d: split_dataset(data_dir, d, settings)), out


def test_real_set_split_80_20_per_class(seed_shaped, settings):
    summary, out = split(seed_shaped, settings)
    manifest = read_manifest(out)
    assert summary["images"] == len(manifest) == 528
    assert set(manifest["split"]) == {"train", "val", "test"}
    for label, group in manifest.groupby("class"):
        test_share = (group["split"] == "test").mean()
        assert (group["split"] == "test").sum() >= 1, f"{label} has no test image"
        assert (group["split"] != "test").sum() >= 1, f"{label} has no training image"
        if len(group) >= 100:
            assert 0.12 < test_share < 0.28, (label, test_share)
    # The big classes decide the overall share; hash thresholds give about 20 % test.
    assert 0.15 < (manifest["split"] == "test").mean() < 0.25
    assert 0.05 < (manifest["split"] == "val").mean() < 0.15


def test_split_is_a_function_of_content_hash():
    sha = hashlib.sha256(b"cell").hexdigest()
    assert split_of(sha, 0.2, 0.1) == split_of(sha, 0.2, 0.1)
    splits = [split_of(hashlib.sha256(str(i).encode()).hexdigest(), 0.2, 0.1) for i in range(5000)]
    assert 0.18 < splits.count("test") / 5000 < 0.22
    assert 0.08 < splits.count("val") / 5000 < 0.12


def test_adding_images_moves_none_between_train_and_test(seed_shaped, settings, tmp_path):
    data = tmp_path / "WBC"
    shutil.copytree(seed_shaped, data)
    first, out1 = split(data, settings, "first")
    before = read_manifest(out1).set_index("sha256")["split"]
    # 20 % more images, spread over the classes, the tiny ones included.
    classes = sorted(p.name for p in data.iterdir())
    for i in range(int(0.2 * len(before))):
        write_image(data / classes[i % len(classes)] / f"new_{i}.png", seed=1000 + i)
    second, out2 = split(data, settings, "second")
    after = read_manifest(out2).set_index("sha256")["split"]
    assert len(after) == len(before) + int(0.2 * len(before))
    common = before.index.intersection(after.index)
    assert len(common) == len(before)
    moved = (before[common] == "test") != (after[common] == "test")
    assert not moved.any(), f"{moved.sum()} images changed between test and train"


def test_fresh_work_folder_gives_the_same_split(seed_shaped, settings, tmp_path):
    _, out1 = split(seed_shaped, settings, "a")
    other = settings.with_overrides(work_dir=tmp_path / "elsewhere")
    _, out2 = split(seed_shaped, other, "a")
    left = read_manifest(out1).set_index("sha256")["split"].sort_index()
    right = read_manifest(out2).set_index("sha256")["split"].sort_index()
    pd.testing.assert_series_equal(left, right)


@pytest.fixture
def messy_folder(tmp_path, seed_shaped):
    """Real images plus every kind of bad input the issue lists."""
    data = tmp_path / "messy"
    for label in ("blasts", "basophils", "monocytes"):
        shutil.copytree(seed_shaped / label, data / label)
    (data / "eosinophils").mkdir()  # empty class folder
    write_image(data / "platelets" / "p1.png", seed=5)  # unknown class folder
    (data / "blasts" / "empty.jpg").write_bytes(b"")
    (data / "blasts" / "notes.jpg").write_text("this is text, not a JPEG")
    whole = next((seed_shaped / "monocytes").iterdir()).read_bytes()
    (data / "monocytes" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (data / "monocytes" / "readme.txt").write_text("notes")
    (data / "stray.jpg").write_bytes(whole)
    # The same image under two classes, and an exact duplicate within one.
    conflict = next((seed_shaped / "basophils").iterdir())
    shutil.copy(conflict, data / "blasts" / "conflict.jpg")
    dup_source = sorted((seed_shaped / "monocytes").iterdir())[1]
    shutil.copy(dup_source, data / "monocytes" / "zz_copy of cell ü.jpg")
    return data


def test_bad_inputs_listed_with_reasons_and_inputs_untouched(messy_folder, settings):
    before = snapshot(messy_folder)
    summary, out = split(messy_folder, settings)
    assert snapshot(messy_folder) == before
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False).set_index("path")["reason"]
    assert "empty file" in rejected["blasts/empty.jpg"]
    assert "not a readable image" in rejected["blasts/notes.jpg"]
    assert "truncated" in rejected["monocytes/cut.jpg"] or "corrupt" in rejected["monocytes/cut.jpg"]
    assert "unsupported file type" in rejected["monocytes/readme.txt"]
    assert "unknown class folder 'platelets'" in rejected["platelets/p1.png"]
    assert "empty class folder" in rejected["eosinophils"]
    assert "outside any class folder" in rejected["stray.jpg"]
    assert "label conflict" in rejected["blasts/conflict.jpg"]
    conflict_name = [p for p in rejected.index if p.startswith("basophils/") and "label conflict" in rejected[p]]
    assert len(conflict_name) == 1, "both copies of a conflicting image are left out"
    assert "duplicate of monocytes/" in rejected["monocytes/zz_copy of cell ü.jpg"]
    manifest = read_manifest(out)
    # Every file is either in the manifest or rejected: nothing silently dropped.
    files = {k for k in before}
    accounted = set(manifest["path"]) | {p for p in rejected.index if p in files}
    assert files == accounted
    assert summary["rejected"] == len(rejected)


def test_fewer_than_two_classes_stops_with_clear_error(tmp_path, settings):
    data = tmp_path / "one"
    for i in range(3):
        write_image(data / "blasts" / f"{i}.png", seed=i)
    (data / "neutrophils").mkdir()
    (data / "neutrophils" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DatasetError, match="at least two classes"):
        split_dataset(data, tmp_path, settings)


def test_missing_data_folder_is_a_clear_error(tmp_path, settings):
    with pytest.raises(DatasetError, match="does not exist"):
        find_labelled_images(tmp_path / "nope", settings)


def test_symlink_outside_allowed_roots_rejected(tmp_path, settings):
    data = tmp_path / "links"
    for label in ("blasts", "bands"):
        for i in range(2):
            write_image(data / label / f"{i}.png", seed=hash(label) % 1000 + i)
    outside = write_image(tmp_path / "outside" / "x.png", seed=77)
    (data / "bands" / "link.png").symlink_to(outside)
    found, rejected = find_labelled_images(data, settings)
    assert any("outside the allowed folders" in r.reason for r in rejected)
    allowed = settings.with_overrides(allowed_roots=(outside.parent.resolve(),))
    found, rejected = find_labelled_images(data, allowed)
    assert any(p.name == "link.png" for p, _ in found) and not rejected


# ------------------------------------------------------------------ the table of bad inputs (issue 7)


def _case_folder(tmp_path, cases):
    """``WBC/blasts`` holds the cases beside two good images; ``WBC/bands`` three good images."""
    data = tmp_path / "WBC"
    build_cases(data / "blasts", tmp_path, cases)
    for i in range(2):
        write_image(data / "blasts" / f"good{i}.png", seed=900 + i)
    for i in range(3):
        write_image(data / "bands" / f"good{i}.png", seed=950 + i)
    return data


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_table_training_split(case, tmp_path, settings):
    """Each awkward file is used (and decodes in preprocessing) or rejected with its reason;
    nothing crashes and nothing under the data folder or the link targets is touched."""
    settings = settings.with_overrides(allowed_roots=((tmp_path / "share").resolve(),))
    if case.min_side is not None:
        settings = settings.with_overrides(min_image_side=case.min_side)
    data = _case_folder(tmp_path, [case])
    inputs = (data, tmp_path / "share", tmp_path / "elsewhere")
    before = tree_snapshot(*inputs)

    summary, out = split(data, settings)
    stores = settings.run_dir("run") / "preprocess"
    run_step(stores, lambda d: preprocess_splits(out, d, settings, 32))

    assert tree_snapshot(*inputs) == before
    manifest = read_manifest(out)
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    # What passed the split also decodes: preprocessing rejects nothing more.
    assert pd.read_csv(stores / PREPROCESS_REJECTED_FILE).empty
    path = f"blasts/{case.name}"
    good = {f"blasts/good{i}.png" for i in range(2)} | {f"bands/good{i}.png" for i in range(3)}
    assert good | {f"blasts/{n}" for n in case.also_used} <= set(manifest["path"])
    if case.reason is None:
        assert manifest.loc[manifest["path"] == path, "class"].tolist() == ["blasts"]
        assert path not in set(rejected["path"])
    else:
        rows = rejected[rejected["path"] == path]
        assert len(rows) == 1, rejected
        assert re.search(case.reason, rows["reason"].iloc[0]), rows["reason"].iloc[0]
        assert rows["class"].iloc[0] == "blasts"
        assert path not in set(manifest["path"])
    # Nothing else was rejected: one row per case at most.
    assert len(rejected) == (case.reason is not None) and summary["rejected"] == len(rejected)
    if case.id == "exif_rotated":
        for name in SPLITS:
            store = open_store(stores / name)
            rows = store.records.index[store.records["path"] == path]
            if len(rows):
                check_exif_orientation(np.asarray(store.images[rows[0]]))
                break
        else:
            pytest.fail(f"{path} is in no store")


def test_symlinked_class_folder_follows_the_allowed_roots(tmp_path, settings):
    data = tmp_path / "WBC"
    for i in range(2):
        write_image(data / "bands" / f"{i}.png", seed=960 + i)
        write_image(tmp_path / "share" / "blasts" / f"{i}.png", seed=970 + i)
    (data / "blasts").symlink_to(tmp_path / "share" / "blasts", target_is_directory=True)
    found, rejected = find_labelled_images(data, settings)
    assert [r.path for r in rejected] == ["blasts"] and "outside the allowed folders" in rejected[0].reason
    assert {label for _, label in found} == {"bands"}
    allowed = settings.with_overrides(allowed_roots=((tmp_path / "share").resolve(),))
    found, rejected = find_labelled_images(data, allowed)
    assert not rejected and sorted(str(p.relative_to(data)) for p, _ in found) == [
        "bands/0.png",
        "bands/1.png",
        "blasts/0.png",
        "blasts/1.png",
    ]


def test_files_vanishing_mid_run_are_rejected_with_a_reason(tmp_path, settings, monkeypatch):
    """A file gone between listing and validation, or between the split and preprocessing,
    is listed with the reason; the run goes on."""
    data = _case_folder(tmp_path, [])
    for i in range(3):
        write_image(data / "blasts" / "batch" / f"late{i}.png", seed=980 + i)
    real_find = dataset.find_labelled_images

    def find_then_lose_one(data_dir, settings_):
        found = real_find(data_dir, settings_)
        (data / "blasts" / "good0.png").rename(tmp_path / "moved-away.png")
        return found

    monkeypatch.setattr(dataset, "find_labelled_images", find_then_lose_one)
    summary, out = split(data, settings)
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False).set_index("path")["reason"]
    assert rejected.to_dict() == {"blasts/good0.png": DISAPPEARED}
    assert "blasts/batch/late0.png" in set(read_manifest(out)["path"])

    (data / "blasts" / "batch").rename(tmp_path / "batch-renamed")  # a whole sub-folder goes
    stores = settings.run_dir("run") / "preprocess"
    result = run_step(stores, lambda d: preprocess_splits(out, d, settings, 32))
    late = pd.read_csv(stores / PREPROCESS_REJECTED_FILE).set_index("path")["reason"]
    assert late.to_dict() == {f"blasts/batch/late{i}.png": DISAPPEARED for i in range(3)}
    assert result["rejected"] == 3


def test_data_folder_one_level_too_high_says_what_it_found_and_where_to_look(tmp_path):
    top = tmp_path / "wbc-bench"
    write_image(top / "WBC" / "blasts" / "a.png", seed=1)
    write_image(top / "WBC" / "bands" / "b.png", seed=2)
    (top / "classify-images" / "2026-11-24").mkdir(parents=True)
    with pytest.raises(DatasetError) as raised:
        check_data_folder(top)
    message = str(raised.value)
    assert "class folders with images: none" in message
    assert "other folders: WBC, classify-images" in message
    assert f"{top / 'WBC'} holds class folders (bands, blasts): did you mean that folder?" in message


def test_a_class_folder_given_as_the_data_folder_points_at_its_parent(tmp_path):
    write_image(tmp_path / "WBC" / "blasts" / "a.png", seed=1)
    with pytest.raises(DatasetError, match=f"point at the folder that holds the class folders, {tmp_path / 'WBC'}"):
        check_data_folder(tmp_path / "WBC" / "blasts")


def test_reviewed_images_keep_a_larger_share_out_of_training_by_the_same_hash_rule(settings):
    """Issue 30's split rule: reviewed images 30 % test, 20 % validation (labelled: 20 %, 10 %),
    from the content hash alone, so an image's split never depends on how many reviews exist."""
    import hashlib

    from wbc_tasks.data.dataset import SOURCE_LABELLED, SOURCE_REVIEW, split_fractions, split_of

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    for source, (test, val) in ((SOURCE_REVIEW, (0.3, 0.2)), (SOURCE_LABELLED, (0.2, 0.1))):
        assert split_fractions(settings, source) == (test, val)
        splits = [split_of(h, *split_fractions(settings, source)) for h in hashes]
        assert abs(splits.count("test") / len(hashes) - test) < 0.01
        assert abs(splits.count("val") / len(hashes) - val) < 0.01
