"""The training input pipeline: batches read from the memory map, one-hot, reshuffled per epoch
from the seed (so a resumed run sees the same batches)."""

from __future__ import annotations

import numpy as np

from tests.demo_stores import build_demo_stores
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.store import open_store
from wbc_tasks.training.input import EpochClock, batch_rows, make_dataset


def test_dataset_batches_one_hot_and_reshuffles_per_epoch(tmp_path):
    stores = build_demo_stores(tmp_path, splits={"train": 2}, size=32, render_size=48)
    store = open_store(stores["train"])
    clock = EpochClock()
    dataset = make_dataset(store, 8, len(CLASS_NAMES), shuffle=True, seed=3, clock=clock)
    epoch0 = [(x.numpy(), y.numpy()) for x, y in dataset]
    clock.epoch = 1
    epoch1 = [(x.numpy(), y.numpy()) for x, y in dataset]
    clock.epoch = 0
    again = [(x.numpy(), y.numpy()) for x, y in dataset]

    assert [len(x) for x, _ in epoch0] == [8, 8, 2]
    images = np.concatenate([x for x, _ in epoch0])
    labels = np.concatenate([y for _, y in epoch0])
    assert images.dtype == np.uint8 and labels.shape == (18, len(CLASS_NAMES))
    # every image exactly once, with its own label
    order = [int(np.flatnonzero((store.images.reshape(18, -1) == img.reshape(1, -1)).all(1))[0]) for img in images]
    assert sorted(order) == list(range(18))
    assert list(labels.argmax(1)) == [int(store.labels[i]) for i in order]
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))  # a new order
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(epoch0, again))  # same epoch, same order


def _is_recolouring(source: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``image`` is a function of ``source``'s colour, pixel by pixel."""
    pairs = np.unique(np.concatenate([source.reshape(-1, 3), image.reshape(-1, 3)], axis=1), axis=0)
    return len(pairs) == len(np.unique(source.reshape(-1, 3), axis=0))


def test_outlier_exposure_adds_stain_outliers_with_uniform_targets_per_batch(tmp_path):
    stores = build_demo_stores(tmp_path, splits={"train": 2}, size=32, render_size=48)
    store = open_store(stores["train"])
    n = len(CLASS_NAMES)
    plain = [(x.numpy(), y.numpy()) for x, y in make_dataset(store, 8, n, shuffle=True, seed=3)]
    exposed = [(x.numpy(), y.numpy()) for x, y in make_dataset(store, 8, n, shuffle=True, seed=3, outlier_share=0.25)]

    # ceil(0.25 * batch) extra rows after each batch's own images, which are unchanged.
    assert [len(x) for x, _ in exposed] == [10, 10, 3]
    for (x, y), (px, py) in zip(exposed, plain):
        own = len(px)
        assert np.array_equal(x[:own], px) and np.array_equal(y[:own], py)
        # The extra rows: uniform targets, copies of rows of the same batch in another stain.
        assert np.allclose(y[own:], 1 / n)
        for outlier in x[own:]:
            # A recoloured copy of one of the batch's images: pixels of one colour there share one here ...
            assert sum(_is_recolouring(src, outlier) for src in px) == 1
            # ... in colours none of them has.
            assert all(np.abs(outlier.astype(int) - src).mean() > 5 for src in px)
    again = [(x.numpy(), y.numpy()) for x, y in make_dataset(store, 8, n, shuffle=True, seed=3, outlier_share=0.25)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(exposed, again))  # drawn from the seed


def test_reviewed_rows_get_their_guaranteed_share_of_every_batch_as_fresh_augmentations(tmp_path):
    """Issue 30: a few reviewed cells among many labelled ones are each batch's given share, each
    repeat a new augmentation of one of them, with its own label; without the share, nothing changes."""
    stores = build_demo_stores(tmp_path, splits={"train": 2}, size=32, render_size=48)
    store = open_store(stores["train"])
    n = len(CLASS_NAMES)
    reviewed = np.flatnonzero(store.labels == 4)  # the "reviewed" cells: one class, so labels are known
    plain = [(x.numpy(), y.numpy()) for x, y in make_dataset(store, 8, n, shuffle=True, seed=3)]
    unchanged = [
        (x.numpy(), y.numpy())
        for x, y in make_dataset(store, 8, n, shuffle=True, seed=3, guaranteed_rows=reviewed, guaranteed_share=0.0)
    ]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plain, unchanged))

    shared = [
        (x.numpy(), y.numpy())
        for x, y in make_dataset(store, 8, n, shuffle=True, seed=3, guaranteed_rows=reviewed, guaranteed_share=0.25)
    ]
    repeats = []
    for (own, _), (mixed, mixed_labels) in zip(plain, shared):
        rows = len(own)
        assert len(mixed) - rows == int(np.ceil(0.25 * rows / 0.75))  # a quarter of the batch, or just over
        assert np.array_equal(mixed[:rows], own)  # the batch's own images come first, unchanged
        assert (mixed_labels[rows:].argmax(1) == 4).all()
        for image in mixed[rows:]:
            assert not any(np.array_equal(image, store.images[r]) for r in reviewed)  # augmented, not copied
            repeats.append(image.tobytes())
    assert len(set(repeats)) == len(repeats)  # every repeat differs


def test_a_batch_with_reviewed_rows_and_outlier_exposure_has_the_rows_batch_rows_says(tmp_path):
    """The training log states each batch's make-up from ``batch_rows``: reviewed rows first make
    their share, then outlier copies are drawn from the whole batch, reviewed rows included."""
    stores = build_demo_stores(tmp_path, splits={"train": 2}, size=32, render_size=48)
    store = open_store(stores["train"])
    n = len(CLASS_NAMES)
    reviewed = np.flatnonzero(store.labels == 4)
    both = make_dataset(
        store, 8, n, shuffle=True, seed=3, outlier_share=0.25, guaranteed_rows=reviewed, guaranteed_share=0.5
    )
    assert batch_rows(8, 0.5, 0.25) == (8, 4) and batch_rows(2, 0.5, 0.25) == (2, 1)
    assert batch_rows(8, 0.0, 0.0) == (0, 0) and batch_rows(8, 0.25, 0.0) == (3, 0)
    sizes, outliers = [], []
    for x, y in both:
        sizes.append(len(x))
        outliers.append(int(np.isclose(y.numpy(), 1 / n).all(1).sum()))
    assert sizes == [8 + 8 + 4, 8 + 8 + 4, 2 + 2 + 1] and outliers == [4, 4, 1]


def test_the_reviewed_share_can_be_drawn_class_balanced(tmp_path):
    """Issue 30: with 9 reviewed cells of one class and 1 of another, a uniform draw gives the rare
    one about a tenth of the reviewed share; a class-balanced draw about half."""
    stores = build_demo_stores(tmp_path, splits={"train": 2}, size=32, render_size=48)
    store = open_store(stores["train"])
    n = len(CLASS_NAMES)
    common, rare = np.flatnonzero(store.labels == 4), np.flatnonzero(store.labels == 7)
    reviewed = np.concatenate([np.resize(common, 9), rare[:1]])  # repeats of a row stand for copies of it

    def rare_share(balanced: bool) -> float:
        drawn = []
        for seed in range(6):
            for _images, y in make_dataset(
                store, 8, n, shuffle=True, seed=seed, guaranteed_rows=reviewed, guaranteed_share=0.5,
                guaranteed_balanced=balanced,
            ):  # fmt: skip
                drawn.extend(y.numpy()[8:].argmax(1) if len(y) > 8 else [])
        return float(np.mean(np.asarray(drawn) == 7))

    assert rare_share(False) < 0.25
    assert 0.3 < rare_share(True) < 0.7
