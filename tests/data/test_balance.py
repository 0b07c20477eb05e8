import json
import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from imblearn.over_sampling import SMOTE

from tests.conftest import shared_set
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import run_step
from wbc_tasks.data.augment import augment_training_set
from wbc_tasks.data.balance import balance_with_smote
from wbc_tasks.data.dataset import split_dataset
from wbc_tasks.data.preprocess import preprocess_splits
from wbc_tasks.data.smote import smote_pairs
from wbc_tasks.data.store import create_store, finish_store, open_store

BANDS, BASOPHILS, BLASTS, EOSINOPHILS = (CLASS_NAMES.index(c) for c in ("bands", "basophils", "blasts", "eosinophils"))


@pytest.fixture
def quick_settings(tmp_path):
    return get_settings().with_overrides(
        home=tmp_path, work_dir=tmp_path / "work", workers=1, chunk_size=5, smote_neighbour_size=8
    )


def write_store(path: Path, images: np.ndarray, labels: list[int], origins: list[str], parents: list[int]) -> Path:
    """A store whose rows are originals or augmented copies (``parents``: the original's row)."""
    out = create_store(path, len(images), images.shape[1])
    out[:] = images
    sha = [f"{i:064x}" if o == "original" else "" for i, o in enumerate(origins)]
    records = pd.DataFrame(
        {
            "path": [f"{CLASS_NAMES[c]}/img{p}.png" for c, p in zip(labels, parents)],
            "class": [CLASS_NAMES[c] for c in labels],
            "sha256": sha,
            "split": "train",
            "width": 16,
            "height": 16,
            "origin": origins,
            "parents": [f"{p:064x}" for p in parents],
        }
    )
    finish_store(path, out, np.asarray(labels, dtype=np.int16), records)
    return path


@pytest.fixture
def small_store(tmp_path) -> Path:
    """bands 12 images, basophils 2, blasts 1 original + 2 augmented copies, eosinophils 5."""
    rng = np.random.default_rng(0)
    labels = [BANDS] * 12 + [BASOPHILS] * 2 + [BLASTS] * 3 + [EOSINOPHILS] * 5
    origins = ["original"] * 15 + ["augmented"] * 2 + ["original"] * 5
    parents = list(range(15)) + [14, 14] + list(range(17, 22))
    images = rng.integers(0, 256, size=(len(labels), 16, 16, 3), dtype=np.uint8)
    return write_store(tmp_path / "augment", images, labels, origins, parents)


def fit_between(image: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """The gap placing ``image`` nearest the segment first..second, and the worst pixel error there."""
    x, a, b = (v.astype(np.float64).ravel() for v in (image, first, second))
    d = b - a
    gap = float(np.clip(np.dot(x - a, d) / max(np.dot(d, d), 1e-12), 0, 1))
    return gap, float(np.abs(a + gap * d - x).max())


def test_classes_reach_the_largest_count(small_store, tmp_path, quick_settings):
    summary = balance_with_smote(small_store, tmp_path / "b", enabled=True, k=5, seed=1, settings=quick_settings)
    source, result = open_store(small_store), open_store(tmp_path / "b")
    counts = result.class_counts(CLASS_NAMES)
    assert counts["bands"] == counts["basophils"] == counts["blasts"] == counts["eosinophils"] == 12
    assert sum(counts.values()) == 48 and summary["counts_out"] == counts
    assert result.images.dtype == np.uint8 and result.images.shape == (48, 16, 16, 3)
    assert np.array_equal(result.images[: len(source)], source.images), "inputs keep their rows"
    stages = json.loads((tmp_path / "b" / "class_counts.json").read_text())
    assert stages["balance"] == counts and stages["augment"] == source.class_counts(CLASS_NAMES)
    assert (tmp_path / "b" / "synthetic_samples.png").stat().st_size > 0


def test_every_synthetic_image_lies_between_two_images_of_its_class(small_store, tmp_path, quick_settings):
    balance_with_smote(small_store, tmp_path / "b", enabled=True, k=3, seed=4, settings=quick_settings)
    source, result = open_store(small_store), open_store(tmp_path / "b")
    synthetic = np.flatnonzero(result.records["origin"].to_numpy() == "synthetic")
    assert len(synthetic) == 10 + 7  # basophils and eosinophils; blasts has one original
    originals = np.asarray(source.images)
    for row in synthetic:
        # Search every pair of input images, without trusting the records.
        fits = [
            (i, j)
            for i, j in combinations(range(len(source)), 2)
            if fit_between(result.images[row], originals[i], originals[j])[1] <= 1.0
        ]
        assert fits, f"synthetic row {row} is not between any two input images"
        # A gap of ~0 makes the sample its base image, which then "fits" with any partner.
        same = np.abs(originals.astype(np.int16) - result.images[row]).max(axis=(1, 2, 3)) <= 1
        for i, j in fits:
            ends = [e for e in (i, j) if not same.any() or same[e]]
            assert all(source.labels[e] == result.labels[row] for e in ends)
        # The records name the same parents and gap.
        rec = result.records.iloc[row]
        a, b = (int(v) for v in rec["parent_rows"].split("+"))
        assert tuple(sorted((a, b))) in fits
        gap, error = fit_between(result.images[row], originals[a], originals[b])
        assert error <= 1.0 and gap == pytest.approx(float(rec["gap"]), abs=0.02)
        assert rec["parents"] == f"{source.records['parents'][a]}+{source.records['parents'][b]}"


def test_small_classes_fall_back_and_say_so(small_store, tmp_path, quick_settings, caplog):
    caplog.set_level(logging.INFO, logger="wbc_tasks.data.balance")
    summary = balance_with_smote(small_store, tmp_path / "b", enabled=True, k=5, seed=1, settings=quick_settings)
    assert summary["k_used"] == {"basophils": 1, "eosinophils": 4}
    assert "basophils: only 2 images, SMOTE uses k=1 instead of 5" in caplog.text
    assert "eosinophils: only 5 images, SMOTE uses k=4 instead of 5" in caplog.text
    assert "blasts: 1 distinct original image(s); topped up by augmentation" in caplog.text
    assert summary["augmentation_only"] == ["blasts"] and summary["augmented_fallback"] == 9
    result = open_store(tmp_path / "b")
    blasts_new = result.records.index[(result.labels == BLASTS) & (np.arange(len(result)) >= 22)]
    assert set(result.records.loc[blasts_new, "origin"]) == {"augmented"}
    assert set(result.records.loc[blasts_new, "parents"]) == {f"{14:064x}"}
    copies = result.images[blasts_new].astype(np.int16)
    assert np.abs(copies - result.images[14]).mean(axis=(1, 2, 3)).min() > 2, "copies are changed"
    assert len({c.tobytes() for c in copies}) == len(copies), "and differ from each other"


def test_smote_off_leaves_the_augmented_store_as_it_is(small_store, tmp_path, quick_settings):
    summary = balance_with_smote(small_store, tmp_path / "b", enabled=False, k=5, seed=1, settings=quick_settings)
    source, result = open_store(small_store), open_store(tmp_path / "b")
    assert result.class_counts(CLASS_NAMES) == source.class_counts(CLASS_NAMES)
    assert result.class_counts(CLASS_NAMES)["bands"] == 12 and result.class_counts(CLASS_NAMES)["basophils"] == 2
    assert np.array_equal(result.images, source.images) and result.images.dtype == np.uint8
    assert summary["synthetic"] == 0 and "SMOTE off" in summary["note"]


def test_decoded_pairs_reproduce_imblearn_smote_exactly():
    """SMOTE on the reduced images, decoded: the very samples imblearn's SMOTE draws on them."""
    rng = np.random.default_rng(3)
    features = rng.random((30, 12), dtype=np.float32)
    pairs = smote_pairs(features, 25, k=4, seed=9)
    X = np.vstack([features, np.zeros((1, 12), np.float32)])
    y = np.r_[np.zeros(30, int), 1]
    plain, _ = SMOTE(sampling_strategy={0: 55}, k_neighbors=4, random_state=9).fit_resample(X, y)
    decoded = features[pairs.a] + pairs.gap[:, None].astype(np.float32) * (features[pairs.b] - features[pairs.a])
    assert np.abs(plain[31:] - decoded).max() < 1e-5
    assert np.all(pairs.gap <= 0.5) and np.all(pairs.a != pairs.b)


def test_pipeline_on_real_images_balances_every_class(tmp_path):
    data = shared_set("wbc-seed-shaped") / "WBC"
    settings = get_settings().with_overrides(home=tmp_path, work_dir=tmp_path / "work", workers=1)
    run = settings.run_dir("r")
    run_step(run / "split", lambda d: split_dataset(data, d, settings))
    run_step(run / "preprocess", lambda d: preprocess_splits(run / "split", d, settings, 32))
    augment_training_set(run / "preprocess" / "train", run / "augment", per_class=10, seed=2, settings=settings)
    summary = balance_with_smote(run / "augment", run / "balance", enabled=True, k=5, seed=2, settings=settings)
    result = open_store(run / "balance")
    counts = [n for n in result.class_counts(CLASS_NAMES).values() if n]
    assert len(counts) == 9 and len(set(counts)) == 1 and summary["synthetic"] > 0
    records = result.records
    for row in np.flatnonzero(records["origin"].to_numpy() == "synthetic"):
        a, b = (int(v) for v in records["parent_rows"][row].split("+"))
        assert result.labels[a] == result.labels[b] == result.labels[row]
        gap, error = fit_between(result.images[row], result.images[a], result.images[b])
        assert error <= 1.0 and gap == pytest.approx(float(records["gap"][row]), abs=0.02)
    stages = json.loads((run / "balance" / "class_counts.json").read_text())
    assert set(stages) == {"split", "augment", "balance"}
