"""Generated demo data: layout, determinism, no overwriting, and that VGG16 can learn it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.demo import generate_demo_dataset, generate_demo_drop
from wbc_tasks.data.images import load_image


def _hashes(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))
    }


def test_demo_dataset_layout_and_images(tmp_path):
    summary = generate_demo_dataset(tmp_path / "WBC", per_class=3, size=64, seed=0)

    assert summary["counts"] == {name: 3 for name in CLASS_NAMES}
    assert sorted(p.name for p in (tmp_path / "WBC").iterdir()) == sorted(CLASS_NAMES)
    for name in CLASS_NAMES:
        files = sorted(p.name for p in (tmp_path / "WBC" / name).iterdir())
        assert files == ["0.png", "1.png", "2.png"]
        pixels = load_image(tmp_path / "WBC" / name / "0.png", 64, max_pixels=10**6, min_side=8)
        assert pixels.shape == (64, 64, 3) and pixels.std() > 10  # an image, not a flat colour
    assert len(set(_hashes(tmp_path / "WBC").values())) == 27  # no duplicates (de-duplication would drop them)


def test_demo_dataset_is_deterministic_per_seed_and_grows_stably(tmp_path):
    generate_demo_dataset(tmp_path / "a", per_class=2, size=48, seed=5)
    generate_demo_dataset(tmp_path / "b", per_class=2, size=48, seed=5)
    generate_demo_dataset(tmp_path / "c", per_class=2, size=48, seed=6)
    generate_demo_dataset(tmp_path / "d", per_class=3, size=48, seed=5)
    a, d = _hashes(tmp_path / "a"), _hashes(tmp_path / "d")
    assert a == _hashes(tmp_path / "b")
    assert not set(a.values()) & set(_hashes(tmp_path / "c").values())
    assert {k: d[k] for k in a} == a  # more images per class: the first ones unchanged


def test_demo_classes_differ_on_average(tmp_path):
    """Class looks differ (mean colour alone already separates some), else nothing could learn them."""
    generate_demo_dataset(tmp_path, per_class=6, size=48, seed=1)
    means = np.array(
        [
            np.mean(
                [load_image(p, 48, max_pixels=10**6, min_side=8).mean(axis=(0, 1)) for p in (tmp_path / c).iterdir()],
                axis=0,
            )
            for c in CLASS_NAMES
        ]
    )
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[np.triu_indices(len(CLASS_NAMES), 1)].min() > 1.0


def test_existing_files_are_never_overwritten(tmp_path):
    generate_demo_dataset(tmp_path, per_class=1, size=32, seed=0)
    generate_demo_dataset(tmp_path, per_class=1, size=32, seed=0)  # identical again: fine
    someone_elses = tmp_path / "blasts" / "0.png"
    someone_elses.write_bytes(b"a lab's precious image")
    with pytest.raises(FileExistsError, match="blasts"):
        generate_demo_dataset(tmp_path, per_class=1, size=32, seed=0)
    assert someone_elses.read_bytes() == b"a lab's precious image"


def test_demo_drop(tmp_path):
    labelled = generate_demo_dataset(tmp_path / "WBC", per_class=4, size=96, seed=3)
    assert labelled["counts"]["blasts"] == 4
    drop = tmp_path / "classify-images" / "2026-11-24"

    paths = generate_demo_drop(drop, 5, seed=3)

    assert paths == [drop / f"demo-{i:04d}.png" for i in range(5)]
    assert all(load_image(p, 32, max_pixels=10**6, min_side=8).shape == (32, 32, 3) for p in paths)
    drop_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(drop_hashes) == 5
    assert not drop_hashes & set(_hashes(tmp_path / "WBC").values())  # never a training image
    again = generate_demo_drop(tmp_path / "again", 5, seed=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


# That the demo profile learns these images far above chance is asserted through the whole
# pipeline in tests/dags/test_training_end_to_end.py (the profile `make demo` runs).
