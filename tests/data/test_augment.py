import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed

from tests.conftest import shared_set
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import run_step
from wbc_tasks.data.augment import augment_training_set, copy_rng
from wbc_tasks.data.dataset import split_dataset
from wbc_tasks.data.preprocess import preprocess_splits
from wbc_tasks.data.store import create_store, finish_store, open_store
from wbc_tasks.data.transforms import (
    AugmentParams,
    augment_image,
    jitter_stain,
    random_affine,
    stain_outliers,
    warp_reflect,
)

SIZE = 32


@pytest.fixture(scope="module")
def seed_train_store(tmp_path_factory) -> Path:
    """The seed-shaped set's training split, preprocessed at 32 px (built once per module)."""
    data = shared_set("wbc-seed-shaped") / "WBC"
    home = tmp_path_factory.mktemp("augment-home")
    settings = get_settings().with_overrides(home=home, work_dir=home / "work", workers=1)
    run = settings.run_dir("t")
    run_step(run / "split", lambda d: split_dataset(data, d, settings))
    run_step(run / "preprocess", lambda d: preprocess_splits(run / "split", d, settings, SIZE))
    return run / "preprocess" / "train"


@pytest.fixture
def quick_settings(tmp_path):
    return get_settings().with_overrides(home=tmp_path, work_dir=tmp_path / "work", workers=1, chunk_size=16)


def real_images(count: int, size: int = 64) -> list[np.ndarray]:
    folder = shared_set("wbc-seed-shaped") / "WBC"
    paths = [sorted((folder / c).iterdir())[0] for c in CLASS_NAMES][:count]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]


def make_store(path: Path, images: np.ndarray, labels: list[int]) -> Path:
    """A small store of given images, each an 'original' with a made-up hash."""
    out = create_store(path, len(images), images.shape[1])
    out[:] = images
    sha = [f"{i:064x}" for i in range(len(images))]
    records = pd.DataFrame(
        {
            "path": [f"{CLASS_NAMES[c]}/img{i}.png" for i, c in enumerate(labels)],
            "class": [CLASS_NAMES[c] for c in labels],
            "sha256": sha,
            "split": "train",
            "width": images.shape[2],
            "height": images.shape[1],
            "origin": "original",
            "parents": sha,
        }
    )
    finish_store(path, out, np.asarray(labels, dtype=np.int16), records)
    return path


def test_tops_classes_up_to_per_class_keeping_originals(seed_train_store, quick_settings, tmp_path):
    out = tmp_path / "augment"
    summary = augment_training_set(seed_train_store, out, per_class=30, seed=3, settings=quick_settings)
    source, result = open_store(seed_train_store), open_store(out)
    counts_in = source.class_counts(CLASS_NAMES)
    assert result.class_counts(CLASS_NAMES) == {c: max(n, 30) if n else 0 for c, n in counts_in.items()}
    assert counts_in["lymphocytes"] > 30 and summary["counts_out"]["lymphocytes"] == counts_in["lymphocytes"]
    assert result.images.dtype == np.uint8 and result.images.shape[1:] == (SIZE, SIZE, 3)
    # Originals first and untouched.
    n = len(source)
    assert np.array_equal(result.images[:n], source.images)
    assert np.array_equal(result.labels[:n], source.labels)
    assert list(result.records["sha256"][:n]) == list(source.records["sha256"])
    new = result.records.iloc[n:]
    assert set(new["origin"]) == {"augmented"} and len(new) == summary["augmented"] > 0
    parent_rows = new["parent_rows"].astype(int).to_numpy()
    assert list(new["parents"]) == list(source.records["sha256"].to_numpy()[parent_rows])
    assert np.array_equal(source.labels[parent_rows], result.labels[n:])
    # Cycling over the originals: within a class, sources are used equally often (+-1).
    for cls in np.unique(result.labels[n:]):
        used = np.bincount(parent_rows[result.labels[n:] == cls], minlength=n)
        used = used[np.flatnonzero(source.labels == cls)]
        assert used.max() - used.min() <= 1
    stages = json.loads((out / "class_counts.json").read_text())
    assert stages["split"] == counts_in and stages["augment"] == summary["counts_out"]
    assert (out / "class_counts.png").stat().st_size > 0
    assert (out / "augmented_samples.png").stat().st_size > 0


def test_augmented_copies_differ_from_their_sources(seed_train_store, quick_settings, tmp_path):
    augment_training_set(seed_train_store, tmp_path / "a", per_class=12, seed=1, settings=quick_settings)
    result = open_store(tmp_path / "a")
    n = len(open_store(seed_train_store))
    parents = result.records["parent_rows"].iloc[n:].astype(int).to_numpy()
    copies = result.images[n:].astype(np.int16)
    sources = result.images[parents].astype(np.int16)
    per_image = np.abs(copies - sources).mean(axis=(1, 2, 3))
    assert per_image.min() > 2.0, "every copy is visibly changed"


def test_output_depends_only_on_the_seed(tmp_path, quick_settings):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 24, 24, 3), dtype=np.uint8)
    store = make_store(tmp_path / "train", images, [0, 0, 0, 1, 1, 2])
    serial = quick_settings.with_overrides(workers=1, chunk_size=3)
    parallel = quick_settings.with_overrides(workers=2, chunk_size=4)
    augment_training_set(store, tmp_path / "a", per_class=20, seed=7, settings=serial)
    augment_training_set(store, tmp_path / "b", per_class=20, seed=7, settings=parallel)
    augment_training_set(store, tmp_path / "c", per_class=20, seed=8, settings=serial)
    a, b, c = (np.asarray(open_store(tmp_path / x).images) for x in "abc")
    assert a.shape == (60, 24, 24, 3)
    assert np.array_equal(a, b), "same seed: same images, whatever the chunks and processes"
    assert not np.array_equal(a[6:], c[6:]), "another seed: other images"
    assert np.array_equal(a[:6], c[:6]), "originals are kept as they are"


def test_single_original_class_is_marked_for_augmentation_only(tmp_path, quick_settings, caplog):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    store = make_store(tmp_path / "train", images, [0, 0, 0, 2, 4])
    caplog.set_level(logging.INFO, logger="wbc_tasks.data.augment")
    summary = augment_training_set(store, tmp_path / "a", per_class=0, seed=1, settings=quick_settings)
    assert summary["augmentation_only"] == ["blasts", "lymphocytes"]
    assert summary["counts_out"] == summary["counts_in"] and summary["augmented"] == 0
    assert "blasts: fewer than 2 original images" in caplog.text
    assert np.array_equal(open_store(tmp_path / "a").images, images)


def test_missing_store_is_a_clear_error(tmp_path, quick_settings):
    with pytest.raises(FileNotFoundError, match="run preprocess first"):
        augment_training_set(tmp_path / "nope", tmp_path / "a", per_class=5, seed=1, settings=quick_settings)


def test_identity_stain_jitter_returns_the_image():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    image[0, 0] = 0  # black and white survive too
    image[0, 1] = 255
    assert np.array_equal(jitter_stain(image, [1, 1, 1], [0, 0, 0]), image)


def test_stain_jitter_moves_the_named_stain_channel():
    """Checked with skimage's own colour deconvolution: scaling H moves H, not E, and vice versa."""
    for image in real_images(3):
        hed = rgb2hed(image)
        stained = hed[..., 0] > np.percentile(hed[..., 0], 75)
        for channel, other in ((0, 1), (1, 0)):
            alpha = [1.0, 1.0, 1.0]
            alpha[channel] = 1.3
            after = rgb2hed(jitter_stain(image, alpha, [0, 0, 0]))
            moved = np.median(after[..., channel][stained] / (hed[..., channel][stained] + 1e-9))
            kept = np.median((after[..., other][stained] + 1e-3) / (hed[..., other][stained] + 1e-3))
            assert moved == pytest.approx(1.3, abs=0.05)
            assert kept == pytest.approx(1.0, abs=0.05)


def _chromaticity(image: np.ndarray) -> np.ndarray:
    mean = image.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return mean / mean.sum()


def test_colour_augmentation_changes_hue_not_just_brightness():
    no_geometry = AugmentParams(
        rotation_degrees=0, flip_probability=0, shift_fraction=0, shear_degrees=0, zoom_fraction=0
    )
    shifts, brightness_shifts = [], []
    for i, image in enumerate(real_images(5)):
        for k in range(8):
            out = augment_image(image, copy_rng(0, 0, i, k), no_geometry)
            shifts.append(np.abs(_chromaticity(out) - _chromaticity(image)).max())
        for factor in (0.7, 0.85):  # the control: brightness alone barely moves chromaticity
            brighter = np.clip(np.rint(image * factor), 0, 255).astype(np.uint8)
            brightness_shifts.append(np.abs(_chromaticity(brighter) - _chromaticity(image)).max())
    assert np.median(shifts) > 0.005
    assert np.median(shifts) > 3 * max(brightness_shifts)


def test_warp_matches_scipy_affine_transform_with_reflect():
    image = real_images(1, size=48)[0]
    wild = AugmentParams(shift_fraction=0.3, zoom_fraction=0.3, shear_degrees=20)
    for k in range(10):
        matrix, offset = random_affine(image.shape[:2], copy_rng(5, 0, 0, k), wild)
        ours = warp_reflect(image, matrix, offset).astype(np.float64)
        reference = np.stack(
            [
                ndimage.affine_transform(
                    image[..., c].astype(np.float64), matrix, offset=offset, order=1, mode="reflect"
                )
                for c in range(3)
            ],
            axis=-1,
        )
        assert np.abs(ours - reference).max() <= 1.0


def test_geometry_keeps_dtype_and_shape_and_moves_pixels():
    image = real_images(1, size=40)[0]
    out = augment_image(image, copy_rng(1, 0, 0, 0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(out.astype(int) - image).mean() > 5


def test_stain_outliers_lie_beyond_the_augmentations_stain_range():
    """Outlier exposure must not teach doubt about a stain the augmentation calls familiar: in H, E
    and D stain units every outlier moves further than a typical augmented copy, most much further."""
    no_geometry = AugmentParams(
        rotation_degrees=0, flip_probability=0, shift_fraction=0, shear_degrees=0, zoom_fraction=0
    )
    for i, image in enumerate(real_images(5)):
        hed = rgb2hed(image)
        copies = [augment_image(image, copy_rng(0, 0, i, k), no_geometry) for k in range(40)]
        augmented = [np.abs(rgb2hed(copy) - hed).mean() for copy in copies]
        outliers = stain_outliers(np.stack([image] * 40), np.random.default_rng(i))
        moved = [np.abs(rgb2hed(o) - hed).mean() for o in outliers]
        assert outliers.dtype == np.uint8 and outliers.shape == (40, *image.shape)
        assert min(moved) > np.median(augmented)
        assert np.median(moved) > 3 * np.median(augmented)
