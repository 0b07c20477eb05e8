"""Reviews flow back into training: reviewed images join the labelled ones through the same
hash-stable split (``include_reviewed``), unusable and vanished ones are listed, the manifest
says where each image came from, the headline test split stays labelled-only, and reviewed test
images are evaluated apart; on real images, with the reviews in SQLite and PostgreSQL."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.conftest import shared_set
from tests.demo_stores import tiny_training_params
from tests.serving.conftest import DB_KINDS, drop_source, make_prediction, make_seen, sha, throwaway_database
from tests.training_steps import run_training_steps
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.dataset import SOURCE_LABELLED, SOURCE_REVIEW, load_ledger, read_manifest, split_fractions, split_of
from wbc_tasks.data.store import open_store
from wbc_tasks.pipelines import training as steps
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import write_rows
from wbc_tasks.serving.review_decisions import record_review

DROP = "2026-11-24"


def _labelled_set(folder, per_class: int = 5):
    """The first ``per_class`` real images of each class of wbc-bench."""
    source = shared_set("wbc-bench") / "WBC"
    for name in CLASS_NAMES:
        (folder / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:per_class]:
            shutil.copy(image, folder / name / image.name)
    return folder


def _classified(settings, name: str, content=None) -> str:
    """A real image (or ``content``'s bytes) in the drop, recorded as seen and classified."""
    target = settings.classify_dir / DROP / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(content or drop_source(DROP) / name, target)
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        write_rows(connection, predictions=[make_prediction(sha(target), "1", best=8, review=True)])
        write_rows(connection, seen=[make_seen(f"{DROP}/{name}", sha(target), DROP)])
    return f"{DROP}/{name}"


@pytest.fixture(params=DB_KINDS)
def reviewed_lab(request, settings, tmp_path, monkeypatch):
    """A labelled folder of 45 real images and a drop with reviews: two reviewed images that
    fall in the test split by hash, three in train/val, one unusable, one that vanished and one
    that is a copy of a labelled image under another class."""
    with throwaway_database(request.param, tmp_path) as url:
        data_dir = _labelled_set(tmp_path / "WBC")
        monkeypatch.setenv("WBC_DATA_DIR", str(data_dir))
        monkeypatch.setenv("WBC_PREDICTIONS_DB_URL", url)
        db.upgrade_database(url)
        lab = get_settings()
        by_split: dict[str, list[str]] = {"test": [], "other": []}
        for image in sorted(drop_source(DROP).glob("*.jpg")):
            split = split_of(sha(image), *split_fractions(lab, SOURCE_REVIEW))  # reviewed images' own shares
            group = by_split["test" if split == "test" else "other"]
            if len(group) < (2 if split == "test" else 6):
                group.append(image.name)
        reviewed = {}
        for name, label in zip(by_split["test"] + by_split["other"][:3], ["eosinophils", "blasts", "bands"] * 2):
            reviewed[_classified(lab, name)] = label
        unusable = _classified(lab, by_split["other"][3])
        gone = _classified(lab, by_split["other"][4])
        labelled_copy = sorted((data_dir / "monocytes").iterdir())[0]
        duplicate = _classified(lab, "copy.jpg", labelled_copy)
        for path, label in reviewed.items():
            record_review(lab, path, "lymphocytes", reviewer="alice")
            record_review(lab, path, label, reviewer="bob")  # the latest counts
        record_review(lab, unusable, "unusable", reviewer="alice")
        record_review(lab, gone, "basophils", reviewer="alice")
        record_review(lab, duplicate, "neutrophils", reviewer="alice")
        (lab.classify_dir / gone).unlink()
        yield {
            "settings": lab,
            "reviewed": reviewed,
            "unusable": unusable,
            "gone": gone,
            "duplicate": duplicate,
            "test": [f"{DROP}/{n}" for n in by_split["test"]],
        }


def test_reviewed_images_join_the_split_by_content_hash_and_stay_out_of_the_headline_test(reviewed_lab):
    lab = reviewed_lab["settings"]
    classify = lab.classify_dir.resolve()
    before = {p: p.read_bytes() for p in classify.rglob("*") if p.is_file()}
    conf = tiny_training_params().as_dict()

    summary = steps.split_step("reviews-1", conf)

    manifest = read_manifest(lab.run_dir("reviews-1") / "split")
    from_review = manifest[manifest["source"] == SOURCE_REVIEW].set_index("path")
    expected = {str(classify / path): label for path, label in reviewed_lab["reviewed"].items()}
    assert from_review["class"].to_dict() == expected
    assert (manifest["source"] == SOURCE_LABELLED).sum() == 45
    ledger = load_ledger(lab.work_dir)
    for path, row in from_review.iterrows():
        assert row["sha256"] == sha(classify / str(path).split(f"{classify}/")[1])
        assert row["split"] == ledger[row["sha256"]]
        if not any(str(path) in note for note in summary["split_fallbacks"]):
            assert row["split"] == split_of(row["sha256"], *split_fractions(lab, SOURCE_REVIEW))
    assert set(from_review[from_review["split"] == "test"].index) == {str(classify / p) for p in reviewed_lab["test"]}

    reviewed = summary["reviewed"]
    assert reviewed["included"] and reviewed["added"] == 5 and reviewed["per_split"]["test"] == 2
    assert [u["path"] for u in reviewed["unusable"]] == [reviewed_lab["unusable"]]
    assert [m["path"] for m in reviewed["missing"]] == [reviewed_lab["gone"]]
    assert [r["path"] for r in reviewed["left_out"]] == [str(classify / reviewed_lab["duplicate"])]
    assert "the labelled folder wins" in reviewed["left_out"][0]["reason"]

    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import open_tracking_run

    metrics = configure_mlflow(lab).get_run(open_tracking_run(lab, "reviews-1")).data.metrics
    assert metrics["reviewed_images_added"] == 5 and metrics["reviewed_images_test"] == 2
    assert metrics["reviewed_images_unusable"] == 1 and metrics["reviewed_images_missing"] == 1

    steps.preprocess_step("reviews-1", conf)
    stores = lab.run_dir("reviews-1") / "preprocess"
    headline = open_store(stores / "test").records
    assert not headline["path"].isin(from_review.index).any()
    assert len(headline) == ((manifest["split"] == "test") & (manifest["source"] == SOURCE_LABELLED)).sum()
    assert sorted(open_store(stores / "test_reviewed").records["path"]) == sorted(
        str(classify / p) for p in reviewed_lab["test"]
    )
    train_val = pd.concat([open_store(stores / s).records for s in ("train", "val")])
    assert set(from_review[from_review["split"] != "test"].index) <= set(train_val["path"])

    # A later run puts each image in the same split; switched off, the reviews are not used.
    again = steps.split_step("reviews-2", conf)
    assert read_manifest(lab.run_dir("reviews-2") / "split").set_index("sha256")["split"].to_dict() == (
        manifest.set_index("sha256")["split"].to_dict()
    )
    assert again["reviewed"]["added"] == 5
    off = steps.split_step("reviews-3", {**conf, "include_reviewed": False})
    assert off["reviewed"] == {"included": False}
    assert set(read_manifest(lab.run_dir("reviews-3") / "split")["source"]) == {SOURCE_LABELLED}
    assert {p: p.read_bytes() for p in classify.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_reviewed_test_images_are_evaluated_apart_from_the_headline_metrics(settings, tmp_path, monkeypatch):
    data_dir = _labelled_set(tmp_path / "WBC", per_class=4)
    monkeypatch.setenv("WBC_DATA_DIR", str(data_dir))
    lab = get_settings()
    db.upgrade_database(lab.predictions_db_url)
    in_test = [
        i.name
        for i in sorted(drop_source(DROP).glob("*.jpg"))
        if split_of(sha(i), lab.test_fraction, lab.val_fraction) == "test"
    ][:3]
    for name in in_test:
        record_review(lab, _classified(lab, name), "neutrophils", reviewer="alice")
    conf = tiny_training_params(augment_per_class=8, smote=False).as_dict()

    evaluated = run_training_steps("reviews-eval", conf, last="evaluate_step")["evaluate_step"]

    manifest = read_manifest(lab.run_dir("reviews-eval") / "split")
    labelled_test = ((manifest["split"] == "test") & (manifest["source"] == SOURCE_LABELLED)).sum()
    assert evaluated["n_images"] == labelled_test
    assert evaluated["reviewed_test"]["images"] == 3 and evaluated["reviewed_test"]["metrics"]["n_images"] == 3
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import open_tracking_run

    metrics = configure_mlflow(lab).get_run(open_tracking_run(lab, "reviews-eval")).data.metrics
    assert metrics["test_n_images"] == labelled_test and metrics["test_reviewed_n_images"] == 3
    assert 0.0 <= metrics["test_reviewed_accuracy"] <= 1.0


@pytest.mark.slow
def test_a_nightly_drop_is_reviewed_exported_and_the_next_training_run_learns_from_it(
    settings, tmp_path, monkeypatch, capsys
):
    """Issue 16 end to end: a drop of real images classified by the champion, four of its cells
    reviewed (one unusable), the reviewed differential in ``wbc report`` and the images in
    ``wbc reviews export``, then every step of the next ``wbc_training`` run on a labelled folder of
    real images (symlinks into ../shared/data): the manifest lists the reviewed images as such."""
    import json

    from tests.serving.conftest import DROPS, copy_drop, register_tiny_model
    from wbc_tasks.cli.main import main as wbc
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import open_tracking_run
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_queue import review_queue

    source = shared_set("wbc-bench") / "WBC"
    data_dir = tmp_path / "labelled"
    for name in CLASS_NAMES:
        (data_dir / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:4]:
            (data_dir / name / image.name).symlink_to(image)
    monkeypatch.setenv("WBC_ALLOWED_ROOTS", f"{tmp_path}:{DROPS.parents[2]}")
    monkeypatch.setenv("WBC_REVIEW_THRESHOLD", "0.65")
    monkeypatch.setenv("WBC_SETTLE_MINUTES", "0")  # the drop was just copied in
    lab = get_settings()
    lab.classify_dir.mkdir(parents=True)
    register_tiny_model(lab, seed=1, alias="champion")
    copy_drop(DROP, lab)
    night = classify_new_images(lab)
    assert night["images_classified"] == 100, night

    queue = review_queue(lab, DROP)
    labels = ["neutrophils", "lymphocytes", "eosinophils", "unusable"]
    for cell, label in zip(queue, labels):
        record_review(lab, cell["path"], label, reviewer="tech")
    reviewed = {str(lab.classify_dir.resolve() / c["path"]): label for c, label in zip(queue, labels[:3])}

    capsys.readouterr()  # what classifying printed
    assert wbc(["report", DROP, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    after = report["reviewed"]
    assert (after["reviewed_cells"], after["unusable"], after["reviewers"]) == (4, 1, ["tech"])
    assert report["review"]["reviewed"] == 4 and after["cells"] == report["cells"] - 1  # unusable left out
    counts = {row["class"]: row["count"] for row in after["differential"]}
    assert sum(counts.values()) == after["cells"] and all(counts[label] >= 1 for label in labels[:3])
    assert "research use" in json.dumps(report).lower()

    out = tmp_path / "curated"
    assert wbc(["reviews", "export", "--out", str(out)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["exported"] == 3 and [u["path"] for u in exported["unusable"]] == [queue[3]["path"]]
    assert sorted(str(p.relative_to(out).parent) for p in out.rglob("*.jpg")) == sorted(labels[:3])

    conf = tiny_training_params(
        epochs_finetune=1,
        augment_per_class=0,
        smote=False,
        data_dir=str(data_dir),
        min_metric=0.0,
        min_class_recall=0.0,
        min_blast_recall=0.0,
    ).as_dict()
    run_id = "after-review"
    results = run_training_steps(run_id, conf)

    manifest = read_manifest(lab.run_dir(run_id) / "split")
    from_review = manifest[manifest["source"] == SOURCE_REVIEW].set_index("path")["class"].to_dict()
    assert from_review == reviewed
    assert (manifest["source"] == SOURCE_LABELLED).sum() == 36
    metrics = configure_mlflow(lab).get_run(open_tracking_run(lab, run_id)).data.metrics
    assert metrics["reviewed_images_added"] == 3 and metrics["reviewed_images_unusable"] == 1
    # The run went through: a new version, compared with the champion that classified the drop.
    assert results["register_step"]["version"] == "2"
    assert results["promote_step"]["compared_with_version"] == "1"
    # Compared image by image with the champion on the labelled test split (issue 30); with three
    # reviewed images, under WBC_PROMOTION_MIN_REVIEWED_TEST, the labelled rule decided, and says so.
    decided = results["promote_step"]
    labelled = decided["groups"]["labelled_test"]
    assert labelled["images"] == results["evaluate_step"]["metrics"]["n_images"]
    assert labelled["candidate_only"] + labelled["champion_only"] <= labelled["images"]
    assert decided["rule"] == "labelled_test" and "the labelled test split decided" in decided["reason"]
    tags = configure_mlflow(lab).get_model_version(lab.model_name, "2").tags
    assert json.loads(tags["promotion.groups"])["labelled_test"]["images"] == labelled["images"]
