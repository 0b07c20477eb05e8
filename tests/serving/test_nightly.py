"""Nightly classification in one process (what the DAG runs task by task) against a real
(tiny) registered model, real images and a real predictions database: each image classified
once, new champions, the table of bad inputs, files vanishing mid-run."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.bad_inputs import CASES, build_cases, check_exif_orientation, snapshot
from tests.serving.conftest import (
    THRESHOLD,
    V2_CLASSES,
    add_bad_files,
    base_settings,
    copy_drop,
    files_under,
    sha,
    table_rows,
)
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.images import DISAPPEARED
from wbc_tasks.registry.versions import NoModelError
from wbc_tasks.serving import infer, plan
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import classify_chunk
from wbc_tasks.serving.model import resolve_run_model
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.summary import summarise_run

# ------------------------------------------------------------------ the nightly flow


def test_each_image_classified_once_reruns_add_nothing_new_drops_add_theirs(night):
    settings = night
    first = copy_drop("2026-11-24", settings)
    images = {p.name: sha(p) for p in first.glob("*.jpg")}
    bad = add_bad_files(first, first / "cell_0001.jpg")
    before = {
        p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()
    }

    summary = classify_new_images(settings)

    predictions = table_rows(settings, db.predictions)
    assert sorted(p["sha256"] for p in predictions) == sorted(set(images.values()))
    assert summary["images_classified"] == len(set(images.values())) == 100
    assert {p["model_version"] for p in predictions} == {"1"}
    for p in predictions:
        probs = p["probabilities"]
        assert list(probs) == list(CLASS_NAMES) and math.isclose(sum(probs.values()), 1.0, rel_tol=1e-4)
        assert p["predicted_class"] == max(probs, key=probs.get)
        assert p["confidence"] == pytest.approx(max(probs.values()))
        assert p["needs_review"] == (p["confidence"] < THRESHOLD)
    # The threshold splits this model's outputs.
    assert 0 < summary["needs_review"] < 100
    assert summary["needs_review"] == sum(p["needs_review"] for p in predictions)

    seen = {s["path"]: s for s in table_rows(settings, db.files_seen)}
    assert set(seen) == set(files_under(settings.classify_dir))  # every file recorded
    assert {s["drop"] for s in seen.values()} == {"2026-11-24"}
    rejected = {r["path"]: r["reason"] for r in table_rows(settings, db.rejections)}
    assert set(rejected) == {f"2026-11-24/{name}" for name in bad}
    for name, fragment in bad.items():
        assert fragment in rejected[f"2026-11-24/{name}"]
    predicted = {p["sha256"] for p in predictions}
    assert all(s["sha256"] in predicted or path in rejected for path, s in seen.items())
    after = {
        p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()
    }
    assert after == before  # the drop folder is only read

    # The summary went to MLflow, tagged with the model version it used.
    from wbc_tasks.registry.client import configure_mlflow

    client = configure_mlflow(settings)
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "wbc-classification"
    assert run.data.tags["model_version"] == "1" and run.data.tags["model_name"] == "wbc-classifier"
    assert run.data.metrics["images_classified"] == 100
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("count_")) == 100

    # Re-running the night adds nothing.
    again = classify_new_images(settings)
    assert again["images_classified"] == 0 and again["files_rejected"] == 0
    assert table_rows(settings, db.predictions) == predictions
    assert len(table_rows(settings, db.files_seen)) == len(seen)
    assert len(table_rows(settings, db.rejections)) == len(rejected)

    # The next drop adds exactly its images; a byte-identical copy is linked, not re-classified.
    second = copy_drop("2026-11-25", settings)
    copy = settings.classify_dir / "2026-11-26" / "again.jpg"
    copy.parent.mkdir()
    shutil.copy(first / "cell_0001.jpg", copy)
    third = classify_new_images(settings)
    new_hashes = {sha(p) for p in second.glob("*.jpg")}
    added = table_rows(settings, db.predictions)[len(predictions) :]
    assert sorted(p["sha256"] for p in added) == sorted(new_hashes)
    assert third["images_classified"] == len(new_hashes) and third["files_linked_to_existing_predictions"] == 1
    linked = next(s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-26/again.jpg")
    original = next(p for p in predictions if p["sha256"] == linked["sha256"])
    assert linked["drop"] == "2026-11-26" and original["dag_run_id"] == summary["run_id"]


def test_new_champion_classifies_only_new_images_unless_reclassify(night):
    from wbc_tasks.registry.client import configure_mlflow

    settings = night
    client = configure_mlflow(settings)
    first = copy_drop("2026-11-24", settings)
    classify_new_images(settings)
    night_one = table_rows(settings, db.predictions)
    client.set_registered_model_alias(settings.model_name, "champion", "2")
    try:
        second = copy_drop("2026-11-25", settings)
        summary = classify_new_images(settings)
        assert summary["model_version"] == "2"
        rows = table_rows(settings, db.predictions)
        assert rows[: len(night_one)] == night_one
        assert {r["sha256"] for r in rows[len(night_one) :]} == {sha(p) for p in second.glob("*.jpg")}
        assert {r["model_version"] for r in rows[len(night_one) :]} == {"2"}
        assert all(set(r["probabilities"]) == set(V2_CLASSES) for r in rows[len(night_one) :])

        redo = classify_new_images(settings, reclassify=True)
        # The first drop again; the second has v2 rows.
        assert redo["images_classified"] == 100
        rows = table_rows(settings, db.predictions)
        assert rows[: len(night_one)] == night_one  # old rows kept
        by_version = {v: {r["sha256"] for r in rows if r["model_version"] == v} for v in ("1", "2")}
        assert by_version["1"] == {sha(p) for p in first.glob("*.jpg")}
        assert by_version["2"] == by_version["1"] | {sha(p) for p in second.glob("*.jpg")}
        assert classify_new_images(settings, reclassify=True)["images_classified"] == 0
    finally:
        client.set_registered_model_alias(settings.model_name, "champion", "1")


def test_no_champion_fails_with_how_to_get_one(tmp_path):
    settings = base_settings(tmp_path)
    settings.classify_dir.mkdir()
    with pytest.raises(NoModelError, match="Train one first: trigger the wbc_training DAG"):
        classify_new_images(settings)
    assert not (tmp_path / "predictions.db").exists()


def test_files_vanishing_mid_run_are_recorded_and_classified_when_back(night_sqlite, tmp_path, monkeypatch):
    """Files gone between listing and hashing, a drop folder renamed between finding and
    classifying, a file gone between hashing and decoding: the run finishes, each is recorded
    with the reason (no content hash: it was not read), and a later night classifies them once
    they are back. A copy of a vanished image that is still there waits for that night."""
    from tests.conftest import write_image

    settings = night_sqlite
    base = settings.classify_dir
    renamed, hashed, decoded = (
        base / "2026-12-10",
        base / "2026-12-11",
        base / "2026-12-12",
    )
    for i in range(2):
        write_image(renamed / f"cell {i}.png", seed=700 + i)
        write_image(hashed / f"kept{i}.png", seed=710 + i)
    write_image(renamed / "w.png", seed=720)
    decoded.mkdir()
    shutil.copy(renamed / "w.png", decoded / "w copy.png")
    write_image(hashed / "y.png", seed=730)
    write_image(decoded / "z.png", seed=740)
    away = tmp_path / "away"
    away.mkdir()

    real_list, real_load = plan.list_files, infer.load_image

    def list_then_lose_y(*args, **kwargs):
        listing = real_list(*args, **kwargs)
        (hashed / "y.png").rename(away / "y.png")
        return listing

    def lose_z_then_load(path, size, **kwargs):
        if Path(path).name == "z.png":
            Path(path).rename(away / "z.png")
        return real_load(path, size, **kwargs)

    monkeypatch.setattr(plan, "list_files", list_then_lose_y)
    monkeypatch.setattr(infer, "load_image", lose_z_then_load)
    model = resolve_run_model(settings)
    found = plan.find_new_images(settings, run_id="vanish-1", model=model)
    # The drop folder goes between listing and its chunk.
    renamed.rename(away / renamed.name)
    chunks = [classify_chunk(settings, c, model, run_id="vanish-1") for c in found["chunks"]]
    summary = summarise_run(settings, run_id="vanish-1", model=model, found=found, chunk_summaries=chunks)
    monkeypatch.undo()

    gone = {
        "2026-12-10/cell 0.png",
        "2026-12-10/cell 1.png",
        "2026-12-10/w.png",
        "2026-12-11/y.png",
        "2026-12-12/z.png",
    }
    rejected = {r["path"]: (r["sha256"], r["reason"]) for r in table_rows(settings, db.rejections)}
    assert rejected == {p: ("", DISAPPEARED) for p in gone}
    seen = {s["path"]: s["sha256"] for s in table_rows(settings, db.files_seen)}
    assert {p for p, s in seen.items() if s == ""} == gone  # recorded as seen, content unknown
    # Its twin vanished: it waits for the next night.
    assert "2026-12-12/w copy.png" not in seen
    assert summary["files_rejected"] == 5 and summary["files_changed_during_run"] == 1
    assert summary["images_classified"] == 2  # kept0, kept1

    (away / renamed.name).rename(renamed)
    (away / "y.png").rename(hashed / "y.png")
    (away / "z.png").rename(decoded / "z.png")
    later = classify_new_images(settings)
    # Cell 0/1, w, y, z.
    assert later["images_classified"] == 5 and later["files_rejected"] == 0
    predicted = {p["sha256"] for p in table_rows(settings, db.predictions)}
    seen_now = _all_rows(settings, db.files_seen)
    for path in sorted(p.relative_to(base) for p in base.rglob("*.png")):
        assert sha(base / path) in {s["sha256"] for s in seen_now[str(path)]}, path
        assert sha(base / path) in predicted, path


# ------------------------------------------------------------------ the table of bad inputs (issue 7)

CASE_DROP = "2026-12-01"


def _all_rows(settings, table) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in table_rows(settings, table):
        rows.setdefault(row["path"], []).append(row)
    return rows


@pytest.fixture(scope="module")
def bad_input_night(registry_settings, tmp_path_factory):
    """The nights over a classify folder holding every case of the table: one drop with the
    cases at the default minimum side (plus an empty drop and a copy of one image in another
    drop), and one drop per case with its own minimum side, run first with that setting. Keeps
    what was decoded, the rows written and the input tree before and after."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    settings = registry_settings.with_overrides(
        classify_dir=folder / "classify",
        work_dir=folder / "work",
        predictions_db_url=f"sqlite:///{folder / 'predictions.db'}",
        allowed_roots=((folder / "share").resolve(),),
    )
    settings.classify_dir.mkdir()
    drops = {}
    for case in CASES:
        drops[case.id] = CASE_DROP if case.min_side is None else f"{CASE_DROP}-min{case.min_side}"
        build_cases(settings.classify_dir / drops[case.id], folder, [case])
    (settings.classify_dir / "2026-12-02").mkdir()  # an empty drop
    copy = settings.classify_dir / "2026-12-03" / "alpha again.png"
    copy.parent.mkdir()
    shutil.copy(settings.classify_dir / CASE_DROP / "alpha.png", copy)
    inputs = (settings.classify_dir, folder / "share", folder / "elsewhere")
    before = snapshot(*inputs)

    decoded = {}
    real_load = infer.load_image

    def keep(path, size, **kwargs):
        array = real_load(path, size, **kwargs)
        decoded[str(Path(path).relative_to(settings.classify_dir))] = array
        return array

    summaries = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(infer, "load_image", keep)
        for case in CASES:
            if case.min_side is not None:
                summaries.append(
                    classify_new_images(
                        settings.with_overrides(min_image_side=case.min_side),
                        drop=drops[case.id],
                    )
                )
        summaries.append(classify_new_images(settings))
        again = classify_new_images(settings)
    return {
        "settings": settings,
        "drops": drops,
        "before": before,
        "after": snapshot(*inputs),
        "decoded": decoded,
        "summaries": summaries,
        "again": again,
        "seen": _all_rows(settings, db.files_seen),
        "rejected": _all_rows(settings, db.rejections),
        "predicted": {p["sha256"] for p in table_rows(settings, db.predictions)},
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_table_nightly(case, bad_input_night):
    """Each awkward file is classified, or recorded as seen and rejected with its reason."""
    night = bad_input_night
    drop = night["drops"][case.id]
    path = f"{drop}/{case.name}"
    seen, rejected = night["seen"], night["rejected"]
    for rel in case.also_used + ((case.name,) if case.reason is None else ()):
        used = f"{drop}/{rel}"
        digest = sha(night["settings"].classify_dir / used)  # a link's target content
        assert [s["sha256"] for s in seen[used]] == [digest]
        assert digest in night["predicted"] and used not in rejected
        assert seen[used][0]["drop"] == drop
    if case.reason is not None:
        assert len(rejected[path]) == 1, rejected.get(path)
        assert re.search(case.reason, rejected[path][0]["reason"]), rejected[path][0]["reason"]
        # Seen, too.
        assert [s["sha256"] for s in seen[path]] == [rejected[path][0]["sha256"]]
        assert rejected[path][0]["sha256"] not in night["predicted"]
    if case.id == "exif_rotated":
        check_exif_orientation(night["decoded"][path])


def test_bad_input_night_reads_only_and_accounts_for_every_entry(bad_input_night):
    night = bad_input_night
    # Sha256, size and mtime of every input entry.
    assert night["after"] == night["before"]
    recorded = set(night["seen"]) | set(night["rejected"])
    base = night["settings"].classify_dir
    for entry in base.rglob("*"):
        rel = str(entry.relative_to(base))
        if entry.is_dir() and not entry.is_symlink():
            continue
        # A followed folder link is accounted for by the files under it.
        assert rel in recorded or any(r.startswith(rel + "/") for r in recorded), rel
    # An empty drop: nothing to record.
    assert not any(p.startswith("2026-12-02") for p in recorded)
    # The same image in two drops: one prediction, both files point to it.
    again = night["seen"]["2026-12-03/alpha again.png"][0]["sha256"]
    assert again == night["seen"][f"{CASE_DROP}/alpha.png"][0]["sha256"] and again in night["predicted"]
    rejected_files = sum(len(r) for r in night["rejected"].values())
    assert sum(s["files_rejected"] for s in night["summaries"]) == rejected_files
    assert night["again"]["images_classified"] == 0 and night["again"]["files_rejected"] == 0


def test_names_that_are_not_utf8_are_rejected_by_name_and_the_night_goes_on(night):
    """A file or a drop folder whose name is not UTF-8 (copied from an old Windows share, say)
    cannot be stored as text: it is rejected with its name escaped, and the rest is classified."""
    settings = night
    good = copy_drop("2026-11-24", settings)
    shutil.copy(good / "cell_0001.jpg", os.fsdecode(bytes(good) + b"/cell-\xff.jpg"))
    odd_drop = Path(os.fsdecode(bytes(settings.classify_dir) + b"/slide-\xe9"))
    odd_drop.mkdir()
    shutil.copy(good / "cell_0002.jpg", odd_drop / "cell.jpg")

    summary = classify_new_images(settings)

    rejected = {r["path"]: r["reason"] for r in table_rows(settings, db.rejections)}
    assert set(rejected) == {"2026-11-24/cell-\\xff.jpg", "slide-\\xe9/cell.jpg"}
    assert all("not valid UTF-8" in reason for reason in rejected.values()), rejected
    assert summary["images_classified"] == 100 and summary["files_rejected"] == 2
    # Recorded as seen: the next night neither rejects nor classifies them again.
    again = classify_new_images(settings)
    assert again["images_classified"] == 0 and again["files_rejected"] == 0
