"""Nightly classification against a real (tiny) registered model, real images from
``../shared/data/wbc-bench/classify-images`` and a real predictions database (SQLite and a
throwaway PostgreSQL database)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select

from tests.bad_inputs import CASES, build_cases, check_exif_orientation, snapshot
from tests.serving.conftest import throwaway_database
from wbc_tasks.serving import classify
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving import queries
from wbc_tasks.core.settings import CLASS_NAMES, get_settings
from wbc_tasks.data.images import DISAPPEARED
from wbc_tasks.registry.tracking import ModelRef, NoModelError

from tests.conftest import REPO_ROOT  # noqa: E402
DROPS = REPO_ROOT.parent / "shared" / "data" / "wbc-bench" / "classify-images"
V2_CLASSES = (*CLASS_NAMES, "smudge")  # a later model with another class list
THRESHOLD = 0.65  # near the median confidence of the tiny seed-1 model on these images


def drop_source(name: str) -> Path:
    path = DROPS / name
    if not path.is_dir():
        pytest.skip(f"real images absent: {path} not found (../shared/data is not checked out here)")
    return path


def register_tiny_model(settings, *, class_names=CLASS_NAMES, seed=0, alias=None) -> ModelRef:
    """A 32 px Rescaling + Flatten + Dense softmax model, registered like a trained one."""
    import keras
    import mlflow

    from wbc_tasks.registry import tracking as registry

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Flatten(),
        # Spread-out weights: confidences on both sides of the review threshold.
        keras.layers.Dense(len(class_names), activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed)),
    ])
    with mlflow.start_run(experiment_id=registry.ensure_experiment(settings)):
        ref = registry.log_model_version(settings, model, image_size=32, class_names=tuple(class_names))
    if alias:
        registry.configure_mlflow(settings).set_registered_model_alias(settings.model_name, alias, ref.version)
    return ref


def base_settings(folder: Path):
    """Settings whose state lives in ``folder`` (module fixtures cannot use monkeypatch)."""
    return get_settings().with_overrides(
        home=folder,
        work_dir=folder / "work",
        classify_dir=folder / "classify",
        mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
        mlflow_artifact_root=folder / "mlflow" / "artifacts",
        mlflow_experiment="wbc-training",
        classify_experiment="wbc-classification",
        model_name="wbc-classifier",
        champion_alias="champion",
        predictions_db_url=f"sqlite:///{folder / 'predictions.db'}",
        archive_dir=None,
        allowed_roots=(),
        settle_minutes=0.0,
        workers=1,
        classify_chunk_size=500,
        max_chunks=32,
        classify_batch_size=16,
        review_threshold=THRESHOLD,
    )


@pytest.fixture(scope="module")
def registry_settings(tmp_path_factory):
    """One MLflow registry for the module: v1 (the champion) and v2 (another class list)."""
    settings = base_settings(tmp_path_factory.mktemp("registry"))
    v1 = register_tiny_model(settings, seed=1, alias="champion")
    v2 = register_tiny_model(settings, class_names=V2_CLASSES, seed=2)
    assert (v1.version, v2.version) == ("1", "2")
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def night(request, registry_settings, tmp_path):
    """Settings for nightly runs: this test's classify/work folders and predictions database."""
    with throwaway_database(request.param, tmp_path) as url:
        settings = registry_settings.with_overrides(
            classify_dir=tmp_path / "classify", work_dir=tmp_path / "work", predictions_db_url=url
        )
        settings.classify_dir.mkdir()
        yield settings


@pytest.fixture
def night_sqlite(registry_settings, tmp_path):
    settings = registry_settings.with_overrides(
        classify_dir=tmp_path / "classify", work_dir=tmp_path / "work",
        predictions_db_url=f"sqlite:///{tmp_path / 'predictions.db'}",
    )
    settings.classify_dir.mkdir()
    return settings


def copy_drop(name: str, settings) -> Path:
    return Path(shutil.copytree(drop_source(name), settings.classify_dir / name))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def table_rows(settings, table) -> list[dict]:
    with db.open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        return [dict(r) for r in connection.execute(select(table).order_by(table.c.id)).mappings()]


def add_bad_files(folder: Path, good: Path) -> dict[str, str]:
    """A truncated JPEG, an empty PNG and a text file; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:3000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("slide 14 re-stained\n")
    return {"truncated.jpg": "truncated", "empty.png": "empty", "notes.txt": "unsupported file type"}


# ------------------------------------------------------------------ the nightly flow


def test_each_image_classified_once_reruns_add_nothing_new_drops_add_theirs(night):
    settings = night
    first = copy_drop("2026-11-24", settings)
    images = {p.name: sha(p) for p in first.glob("*.jpg")}
    bad = add_bad_files(first, first / "cell_0001.jpg")
    before = {p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()}

    summary = classify.classify_new_images(settings)

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
    assert 0 < summary["needs_review"] < 100  # the threshold splits this model's outputs
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
    after = {p: (os.stat(settings.classify_dir / p).st_mtime_ns, s) for p, s in files_under(settings.classify_dir).items()}
    assert after == before  # the drop folder is only read

    # The summary went to MLflow, tagged with the model version it used.
    from wbc_tasks.registry.tracking import configure_mlflow

    client = configure_mlflow(settings)
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "wbc-classification"
    assert run.data.tags["model_version"] == "1" and run.data.tags["model_name"] == "wbc-classifier"
    assert run.data.metrics["images_classified"] == 100
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("count_")) == 100

    # Re-running the night adds nothing.
    again = classify.classify_new_images(settings)
    assert again["images_classified"] == 0 and again["files_rejected"] == 0
    assert table_rows(settings, db.predictions) == predictions
    assert len(table_rows(settings, db.files_seen)) == len(seen)
    assert len(table_rows(settings, db.rejections)) == len(rejected)

    # The next drop adds exactly its images; a byte-identical copy is linked, not re-classified.
    second = copy_drop("2026-11-25", settings)
    copy = settings.classify_dir / "2026-11-26" / "again.jpg"
    copy.parent.mkdir()
    shutil.copy(first / "cell_0001.jpg", copy)
    third = classify.classify_new_images(settings)
    new_hashes = {sha(p) for p in second.glob("*.jpg")}
    added = table_rows(settings, db.predictions)[len(predictions):]
    assert sorted(p["sha256"] for p in added) == sorted(new_hashes)
    assert third["images_classified"] == len(new_hashes) and third["files_linked_to_existing_predictions"] == 1
    linked = next(s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-26/again.jpg")
    original = next(p for p in predictions if p["sha256"] == linked["sha256"])
    assert linked["drop"] == "2026-11-26" and original["dag_run_id"] == summary["run_id"]


def test_new_champion_classifies_only_new_images_unless_reclassify(night):
    from wbc_tasks.registry.tracking import configure_mlflow

    settings = night
    client = configure_mlflow(settings)
    first = copy_drop("2026-11-24", settings)
    classify.classify_new_images(settings)
    night_one = table_rows(settings, db.predictions)
    client.set_registered_model_alias(settings.model_name, "champion", "2")
    try:
        second = copy_drop("2026-11-25", settings)
        summary = classify.classify_new_images(settings)
        assert summary["model_version"] == "2"
        rows = table_rows(settings, db.predictions)
        assert rows[: len(night_one)] == night_one
        assert {r["sha256"] for r in rows[len(night_one):]} == {sha(p) for p in second.glob("*.jpg")}
        assert {r["model_version"] for r in rows[len(night_one):]} == {"2"}
        assert all(set(r["probabilities"]) == set(V2_CLASSES) for r in rows[len(night_one):])

        redo = classify.classify_new_images(settings, reclassify=True)
        assert redo["images_classified"] == 100  # the first drop again; the second has v2 rows
        rows = table_rows(settings, db.predictions)
        assert rows[: len(night_one)] == night_one  # old rows kept
        by_version = {v: {r["sha256"] for r in rows if r["model_version"] == v} for v in ("1", "2")}
        assert by_version["1"] == {sha(p) for p in first.glob("*.jpg")}
        assert by_version["2"] == by_version["1"] | {sha(p) for p in second.glob("*.jpg")}
        assert classify.classify_new_images(settings, reclassify=True)["images_classified"] == 0
    finally:
        client.set_registered_model_alias(settings.model_name, "champion", "1")


def test_export_in_every_format_matches_the_database(night, tmp_path):
    settings = night
    folder = copy_drop("2026-11-24", settings)
    add_bad_files(folder, folder / "cell_0002.jpg")
    classify.classify_new_images(settings)
    with db.open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        joined = connection.execute(
            select(db.files_seen.c.path, db.predictions)
            .join(db.predictions, db.predictions.c.sha256 == db.files_seen.c.sha256)
        ).mappings().all()
    truth = {r["path"]: r for r in joined}
    assert len(truth) == 100

    for fmt in queries.EXPORT_FORMATS:
        out = tmp_path / f"predictions.{fmt}"
        assert queries.export_predictions(settings, fmt=fmt, out=out) == 103
        if fmt == "json":
            records = json.loads(out.read_text())
            probs = {r["path"]: r["probabilities"] for r in records}
        else:
            table = pd.read_csv(out, dtype={"model_version": str}) if fmt == "csv" else pd.read_parquet(out)
            records = table.to_dict("records")
            probs = {r["path"]: {c: r[f"prob_{c}"] for c in CLASS_NAMES} for r in records}
        exported = {r["path"]: r for r in records}
        assert set(exported) == set(truth) | {f"2026-11-24/{n}" for n in ("truncated.jpg", "empty.png", "notes.txt")}
        for path, row in truth.items():
            got = exported[path]
            assert got["status"] == "classified" and got["predicted_class"] == row["predicted_class"]
            assert got["confidence"] == pytest.approx(row["confidence"])
            assert bool(got["needs_review"]) == row["needs_review"]
            assert str(got["model_version"]) == row["model_version"] and got["sha256"] == row["sha256"]
            assert probs[path] == pytest.approx(row["probabilities"])
        assert exported["2026-11-24/empty.png"]["status"] == "rejected"

    flagged = sum(r["needs_review"] for r in truth.values())
    assert queries.export_predictions(settings, needs_review=True, out=tmp_path / "review.csv") == flagged
    some_class = next(iter(truth.values()))["predicted_class"]
    n_class = sum(r["predicted_class"] == some_class for r in truth.values())
    assert queries.export_predictions(settings, predicted_class=some_class, out=tmp_path / "c.csv") == n_class


def test_a_chunk_commits_all_its_rows_or_none_and_retries_cleanly(night_sqlite, monkeypatch, tmp_path):
    settings = night_sqlite.with_overrides(archive_dir=tmp_path / "archive")
    folder = copy_drop("2026-11-24", settings)
    add_bad_files(folder, folder / "cell_0003.jpg")  # notes.txt is rejected (and archived) at once
    model = classify.resolve_run_model(settings)
    found = classify.find_new_images(settings, run_id="night-1", model=model, chunk_size=60)
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
        classify.classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    monkeypatch.setattr(db, "insert_ignore", real_insert)
    assert table_rows(settings, db.predictions) == []
    assert {r["path"] for r in table_rows(settings, db.rejections)} == {"2026-11-24/notes.txt"}
    assert all((settings.classify_dir / p).is_file() for p in chunk_paths)  # nothing archived

    first = classify.classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    rows = table_rows(settings, db.predictions)
    assert len(rows) + first["files_rejected"] == len(chunk["items"])
    assert not any((settings.classify_dir / p).exists() for p in chunk_paths)  # archived after commit
    assert all((settings.archive_dir / p).is_file() for p in chunk_paths)
    # A retry (summary file lost too) writes nothing twice.
    Path(found["chunks"][0]).with_suffix(".done.json").unlink()
    retry = classify.classify_chunk(settings, found["chunks"][0], model, run_id="night-1")
    assert retry["images_classified"] == 0 and retry["images_already_classified"] == len(rows)
    assert table_rows(settings, db.predictions) == rows


def test_files_still_being_written_wait_for_the_next_run(night_sqlite):
    settings = night_sqlite.with_overrides(settle_minutes=5)
    copy_drop("2026-11-24", settings)  # copied just now: as if still arriving
    summary = classify.classify_new_images(settings)
    assert summary["files_settling"] == 100 and summary["images_classified"] == 0
    assert table_rows(settings, db.files_seen) == []
    later = classify.classify_new_images(settings.with_overrides(settle_minutes=0))
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

    summary = classify.classify_new_images(settings)

    assert summary["images_classified"] == 2
    seen = {s["path"]: s for s in table_rows(settings, db.files_seen)}
    assert seen["2026-11-27/cell_0001.jpg"]["drop"] == "2026-11-27"
    assert seen["outside.jpg"]["drop"] == db.LOOSE_DROP
    rejected = {r["path"]: r["reason"] for r in table_rows(settings, db.rejections)}
    assert set(rejected) == {"outside.jpg", "broken.jpg"}
    assert "outside the allowed folders" in rejected["outside.jpg"]
    assert "broken symlink" in rejected["broken.jpg"]


def test_chunks_are_capped_by_growing_their_size(night_sqlite):
    settings = night_sqlite.with_overrides(max_chunks=3)
    folder = copy_drop("2026-11-24", settings)
    model = classify.resolve_run_model(settings)
    found = classify.find_new_images(settings, run_id="n", model=model, chunk_size=10)
    items = [json.loads(Path(c).read_text())["items"] for c in found["chunks"]]
    assert [len(i) for i in items] == [34, 34, 32]
    hashes = [item["sha256"] for chunk in items for item in chunk]
    assert sorted(hashes) == sorted(sha(p) for p in folder.glob("*.jpg"))


@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 50_000])
def test_plan_chunks_covers_every_item_once_within_the_cap(n):
    bounds = classify.plan_chunks(n, 100, 32)
    assert len(bounds) <= 32
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(n))
    assert all(stop - start >= 100 for start, stop in bounds[:-1])


def test_no_champion_fails_with_how_to_get_one(tmp_path):
    settings = base_settings(tmp_path)
    settings.classify_dir.mkdir()
    with pytest.raises(NoModelError, match="Train one first: trigger the wbc_training DAG"):
        classify.classify_new_images(settings)
    assert not (tmp_path / "predictions.db").exists()


def test_classify_paths_without_airflow_writes_only_when_asked(registry_settings, tmp_path):
    source = drop_source("2026-11-24")
    allowed = tmp_path / "allowed"
    settings = registry_settings.with_overrides(
        predictions_db_url=f"sqlite:///{tmp_path / 'p.db'}", allowed_roots=(source.resolve(), allowed.resolve())
    )
    bad = allowed / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    outside = tmp_path / "elsewhere" / "cell.jpg"  # a real image, but in no configured folder
    outside.parent.mkdir()
    shutil.copy(source / "cell_0007.jpg", outside)
    paths = [source / "cell_0005.jpg", bad, source / "cell_0006.jpg", outside]

    results = classify.classify_paths(settings, paths, model_ref="1")

    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert results[0]["predicted_class"] in CLASS_NAMES and results[0]["model_version"] == "1"
    assert results[0]["sha256"] == sha(paths[0])
    assert "not a readable image" in results[1]["rejected"]
    assert "predicted_class" in results[2]
    assert results[3]["rejected"].startswith("file lies outside the allowed folders")
    assert not (tmp_path / "p.db").exists()

    v2 = classify.classify_paths(settings, paths[:1], model_ref="2", record=True)
    assert set(v2[0]["probabilities"]) == set(V2_CLASSES)
    rows = table_rows(settings, db.predictions)
    assert [(r["sha256"], r["model_version"]) for r in rows] == [(sha(paths[0]), "2")]


def test_unchanged_files_are_not_reread_and_replaced_files_are_classified_again(night_sqlite, monkeypatch):
    settings = night_sqlite
    source = drop_source("2026-11-24")
    folder = settings.classify_dir / "2026-11-28"
    folder.mkdir()
    for i in (1, 2, 3):
        shutil.copy2(source / f"cell_000{i}.jpg", folder)
    classify.classify_new_images(settings)

    reads = []
    real_hash = classify.sha256_of_file
    monkeypatch.setattr(classify, "sha256_of_file", lambda path: reads.append(path) or real_hash(path))
    assert classify.classify_new_images(settings)["images_classified"] == 0
    assert reads == []  # size and mtime unchanged: the recorded hash is reused

    shutil.copy(source / "cell_0009.jpg", folder / "cell_0002.jpg")  # same name, new content
    summary = classify.classify_new_images(settings)
    assert summary["images_classified"] == 1
    seen = [s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-28/cell_0002.jpg"]
    assert [s["sha256"] for s in seen] == [sha(source / "cell_0002.jpg"), sha(source / "cell_0009.jpg")]


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
        classify_dir=folder / "classify", work_dir=folder / "work",
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
    real_load = classify.load_image

    def keep(path, size, **kwargs):
        array = real_load(path, size, **kwargs)
        decoded[str(Path(path).relative_to(settings.classify_dir))] = array
        return array

    summaries = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify, "load_image", keep)
        for case in CASES:
            if case.min_side is not None:
                summaries.append(classify.classify_new_images(
                    settings.with_overrides(min_image_side=case.min_side), drop=drops[case.id]
                ))
        summaries.append(classify.classify_new_images(settings))
        again = classify.classify_new_images(settings)
    return {
        "settings": settings, "drops": drops, "before": before, "after": snapshot(*inputs),
        "decoded": decoded, "summaries": summaries, "again": again,
        "seen": _all_rows(settings, db.files_seen), "rejected": _all_rows(settings, db.rejections),
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
        assert [s["sha256"] for s in seen[path]] == [rejected[path][0]["sha256"]]  # seen, too
        assert rejected[path][0]["sha256"] not in night["predicted"]
    if case.id == "exif_rotated":
        check_exif_orientation(night["decoded"][path])


def test_bad_input_night_reads_only_and_accounts_for_every_entry(bad_input_night):
    night = bad_input_night
    assert night["after"] == night["before"]  # sha256, size and mtime of every input entry
    recorded = set(night["seen"]) | set(night["rejected"])
    base = night["settings"].classify_dir
    for entry in base.rglob("*"):
        rel = str(entry.relative_to(base))
        if entry.is_dir() and not entry.is_symlink():
            continue
        # A followed folder link is accounted for by the files under it.
        assert rel in recorded or any(r.startswith(rel + "/") for r in recorded), rel
    assert not any(p.startswith("2026-12-02") for p in recorded)  # an empty drop: nothing to record
    # The same image in two drops: one prediction, both files point to it.
    again = night["seen"]["2026-12-03/alpha again.png"][0]["sha256"]
    assert again == night["seen"][f"{CASE_DROP}/alpha.png"][0]["sha256"] and again in night["predicted"]
    rejected_files = sum(len(r) for r in night["rejected"].values())
    assert sum(s["files_rejected"] for s in night["summaries"]) == rejected_files
    assert night["again"]["images_classified"] == 0 and night["again"]["files_rejected"] == 0


def test_files_vanishing_mid_run_are_recorded_and_classified_when_back(night_sqlite, tmp_path, monkeypatch):
    """Files gone between listing and hashing, a drop folder renamed between finding and
    classifying, a file gone between hashing and decoding: the run finishes, each is recorded
    with the reason (no content hash: it was not read), and a later night classifies them once
    they are back. A copy of a vanished image that is still there waits for that night."""
    from tests.conftest import write_image

    settings = night_sqlite
    base = settings.classify_dir
    renamed, hashed, decoded = base / "2026-12-10", base / "2026-12-11", base / "2026-12-12"
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

    real_list, real_load = classify.list_files, classify.load_image

    def list_then_lose_y(*args, **kwargs):
        listing = real_list(*args, **kwargs)
        (hashed / "y.png").rename(away / "y.png")
        return listing

    def lose_z_then_load(path, size, **kwargs):
        if Path(path).name == "z.png":
            Path(path).rename(away / "z.png")
        return real_load(path, size, **kwargs)

    monkeypatch.setattr(classify, "list_files", list_then_lose_y)
    monkeypatch.setattr(classify, "load_image", lose_z_then_load)
    model = classify.resolve_run_model(settings)
    found = classify.find_new_images(settings, run_id="vanish-1", model=model)
    renamed.rename(away / renamed.name)  # the drop folder goes between listing and its chunk
    chunks = [classify.classify_chunk(settings, c, model, run_id="vanish-1") for c in found["chunks"]]
    summary = classify.summarise_run(settings, run_id="vanish-1", model=model, found=found, chunk_summaries=chunks)
    monkeypatch.undo()

    gone = {"2026-12-10/cell 0.png", "2026-12-10/cell 1.png", "2026-12-10/w.png",
            "2026-12-11/y.png", "2026-12-12/z.png"}
    rejected = {r["path"]: (r["sha256"], r["reason"]) for r in table_rows(settings, db.rejections)}
    assert rejected == {p: ("", DISAPPEARED) for p in gone}
    seen = {s["path"]: s["sha256"] for s in table_rows(settings, db.files_seen)}
    assert {p for p, s in seen.items() if s == ""} == gone  # recorded as seen, content unknown
    assert "2026-12-12/w copy.png" not in seen  # its twin vanished: it waits for the next night
    assert summary["files_rejected"] == 5 and summary["files_changed_during_run"] == 1
    assert summary["images_classified"] == 2  # kept0, kept1

    (away / renamed.name).rename(renamed)
    (away / "y.png").rename(hashed / "y.png")
    (away / "z.png").rename(decoded / "z.png")
    later = classify.classify_new_images(settings)
    assert later["images_classified"] == 5 and later["files_rejected"] == 0  # cell 0/1, w, y, z
    predicted = {p["sha256"] for p in table_rows(settings, db.predictions)}
    seen_now = _all_rows(settings, db.files_seen)
    for path in sorted(p.relative_to(base) for p in base.rglob("*.png")):
        assert sha(base / path) in {s["sha256"] for s in seen_now[str(path)]}, path
        assert sha(base / path) in predicted, path


def test_models_load_only_from_the_configured_registry(registry_settings, tmp_path):
    from dataclasses import replace

    from wbc_tasks.registry.tracking import load_keras_model, resolve_model

    ref = resolve_model(registry_settings, "1")
    assert load_keras_model(registry_settings, ref) is not None
    forged = [
        replace(ref, uri=str(tmp_path / "evil.keras")),  # a file anywhere on the worker
        replace(ref, uri=f"runs:/{ref.run_id}/model"),  # an unregistered run's artifact
        replace(ref, name="someone-elses-model", uri=f"models:/someone-elses-model/{ref.version}"),
        replace(ref, version="1/../../2", uri=f"models:/{ref.name}/1/../../2"),
    ]
    for bad in forged:
        with pytest.raises(ValueError, match="only from the configured registry"):
            load_keras_model(registry_settings, bad)


def test_drop_param_cannot_leave_the_classify_folder(tmp_path):
    settings = base_settings(tmp_path)
    settings.classify_dir.mkdir()
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", settings.classify_dir / "linked-out")
    for drop in ("../secret", "/etc", "..", "a/../../secret"):
        with pytest.raises(ValueError, match="directly in"):
            classify.list_files(settings, drop=drop)
    with pytest.raises(ValueError, match="points outside the allowed folders"):
        classify.list_files(settings, drop="linked-out")


def test_recorded_cli_classifications_appear_in_predictions_at_once(registry_settings, tmp_path):
    """README's `wbc classify --record FILE…` then `wbc predictions`: a file in the classify
    folder is listed under its relative path and real drop (the nightly run then adds no second
    row), one elsewhere under drop `cli` and its absolute path, a rejection with its reason."""
    settings = registry_settings.with_overrides(
        classify_dir=tmp_path / "classify", work_dir=tmp_path / "work",
        predictions_db_url=f"sqlite:///{tmp_path / 'predictions.db'}", allowed_roots=((tmp_path / "desk").resolve(),),
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
        WBC_HOME=str(settings.home), WBC_CLASSIFY_DIR=str(settings.classify_dir), WBC_WORK_DIR=str(settings.work_dir),
        WBC_PREDICTIONS_DB_URL=settings.predictions_db_url, WBC_ALLOWED_ROOTS=str(desk), WBC_WORKERS="1",
    )
    wbc = str(Path(sys.executable).with_name("wbc"))
    done = subprocess.run([wbc, "classify", "--record", str(inside), str(outside), str(bad)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # 3: at least one file was rejected
    listed = subprocess.run([wbc, "predictions", "--format", "json"], env=env, capture_output=True, text=True,
                            timeout=300, check=True)
    rows = {r["path"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"2026-11-24/cell_0005.jpg", str(outside), str(bad)}
    assert (rows["2026-11-24/cell_0005.jpg"]["drop"], rows["2026-11-24/cell_0005.jpg"]["status"]) == ("2026-11-24", "classified")
    assert (rows[str(outside)]["drop"], rows[str(outside)]["status"]) == ("cli", "classified")
    assert rows[str(bad)]["status"] == "rejected" and "not a readable image" in rows[str(bad)]["rejection_reason"]

    classify.classify_new_images(settings.with_overrides(settle_minutes=0.0))
    seen = [s for s in table_rows(settings, db.files_seen) if s["path"] == "2026-11-24/cell_0005.jpg"]
    assert len(seen) == 1
    assert [p["sha256"] for p in table_rows(settings, db.predictions)].count(sha(inside)) == 1
