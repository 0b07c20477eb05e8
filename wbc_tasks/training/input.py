"""The training input: ``tf.data`` pipelines that read batches from the memory-mapped stores,
shuffled, flipped and given their outliers from (seed, epoch, batch) so that a resumed run sees
the same batches."""

from __future__ import annotations

import logging
import math

import numpy as np

from wbc_tasks.data.store import ImageStore, release_pages
from wbc_tasks.data.transforms import augment_image, stain_outliers

log = logging.getLogger(__name__)

#: The label of an outlier row inside ``read``: its target is uniform over the classes.
_OUTLIER = -1


def reviewed_rows(store: ImageStore) -> np.ndarray:
    """Rows of ``store`` that are reviewed images or copies of them (``source`` review)."""
    from wbc_tasks.data.dataset import SOURCE_REVIEW

    if "source" not in store.records:
        return np.empty(0, np.int64)
    return np.flatnonzero(store.records["source"].to_numpy() == SOURCE_REVIEW).astype(np.int64)


def batch_rows(labelled: int, reviewed_share: float, outlier_share: float) -> tuple[int, int]:
    """The reviewed and outlier-exposure rows a batch of ``labelled`` rows gets added: reviewed ones
    to make ``reviewed_share`` of the batch, then outlier copies of ``outlier_share`` of it all."""
    reviewed = math.ceil(reviewed_share * labelled / (1 - reviewed_share)) if reviewed_share > 0 else 0
    outliers = math.ceil(outlier_share * (labelled + reviewed)) if outlier_share > 0 else 0
    return reviewed, outliers


def _log_batch_makeup(batch_size: int, reviewed_share: float, outlier_share: float) -> None:
    """Say what each training batch holds beyond its own rows (nothing when it holds nothing more)."""
    reviewed, outliers = batch_rows(batch_size, reviewed_share, outlier_share)
    if reviewed or outliers:
        log.info(
            "each batch of %d rows gets %d reviewed rows added, then %d copies of its rows in a foreign stain "
            "with uniform targets (outlier exposure)",
            batch_size,
            reviewed,
            outliers,
        )


def _class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Draw probabilities that give each class of ``labels`` the same total."""
    classes, per_class = np.unique(labels, return_counts=True)
    counts = dict(zip(classes.tolist(), per_class.tolist(), strict=True))
    weights = np.array([1.0 / counts[int(c)] for c in labels])
    return weights / weights.sum()


class EpochClock:
    """The epoch the input pipeline is producing; set by the monitor at each epoch start.

    Shuffling and flips are drawn from (seed, epoch, batch), never from a running random state,
    so a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    epoch = 0


def make_dataset(
    store: ImageStore,
    batch_size: int,
    n_classes: int,
    *,
    shuffle: bool,
    seed: int,
    clock: EpochClock | None = None,
    flip_augment: bool = False,
    outlier_share: float = 0.0,
    guaranteed_rows: np.ndarray | None = None,
    guaranteed_share: float = 0.0,
    guaranteed_balanced: bool = False,
):
    """A ``tf.data`` pipeline of (uint8 images, one-hot labels) batches read from the memory map.

    Batches of indices come from a generator; the rows are read by ``tf.numpy_function`` (in
    parallel, order kept), so only a few batches are ever in memory. ``flip_augment`` applies a
    random one of the eight flips/right-angle rotations per image: a cell has no up or left.

    ``outlier_share`` > 0 is outlier exposure (Hendrycks et al., 2019): each batch gets
    ``ceil(share * batch)`` extra rows, copies of random rows of it in a stain far beyond the
    augmentation's (``stain_outliers``), whose target is uniform over the classes. The model
    learns to be unsure of a lab unlike the training labs' rather than to pick the class whose
    lab it resembles most.

    ``guaranteed_share`` > 0 with ``guaranteed_rows`` (a new lab's reviewed images among thousands
    of labelled ones): each batch gets extra rows drawn from ``guaranteed_rows`` (with repeats, from
    (seed, epoch, batch)) so that they are about that share of it, each a fresh random
    augmentation (stain jitter and an affine warp) so that repeats differ. ``guaranteed_balanced``
    draws them class-balanced (each class of ``guaranteed_rows`` equally often) rather than uniformly.
    """
    import tensorflow as tf

    n = len(store)
    clock = clock or EpochClock()
    images, labels = store.images, store.labels.astype(np.int32)

    guaranteed = np.asarray(guaranteed_rows if guaranteed_rows is not None else [], dtype=np.int64)
    share = guaranteed_share if len(guaranteed) else 0.0
    _log_batch_makeup(batch_size, share, outlier_share)
    draw_weights = _class_balanced_weights(labels[guaranteed]) if guaranteed_balanced and len(guaranteed) else None

    def index_batches():
        epoch = clock.epoch
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for number, start in enumerate(range(0, n, batch_size)):
            index = order[start : start + batch_size].astype(np.int64)
            extra = np.empty(0, np.int64)
            if share > 0:
                count, _ = batch_rows(len(index), share, 0.0)
                extra = np.random.default_rng([seed, epoch, number, 3]).choice(guaranteed, count, p=draw_weights)
            yield np.int64(epoch), np.int64(number), index, extra

    def read(epoch: np.int64, number: np.int64, index: np.ndarray, extra: np.ndarray):
        index = np.sort(index)  # ascending reads are kinder to the page cache; order is irrelevant
        batch = np.asarray(images[index])
        if len(extra):
            rng = np.random.default_rng([seed, int(epoch), int(number), 4])
            repeats = np.stack([augment_image(np.asarray(images[row]), rng) for row in extra])
            batch, index = np.concatenate([batch, repeats]), np.concatenate([index, extra])
        release_pages(images)  # resident memory stays at a few batches, whatever the store's size
        if flip_augment:
            rng = np.random.default_rng([seed, int(epoch), int(number), 1])
            batch = batch.copy()
            for i, (turns, mirror) in enumerate(zip(rng.integers(0, 4, len(index)), rng.random(len(index)) < 0.5)):
                view = np.rot90(batch[i], int(turns))
                batch[i] = view[:, ::-1] if mirror else view
        batch_labels = labels[index]
        if outlier_share > 0:
            rng = np.random.default_rng([seed, int(epoch), int(number), 2])
            picks = rng.choice(len(index), batch_rows(len(index), 0.0, outlier_share)[1], replace=False)
            batch = np.concatenate([batch, stain_outliers(batch[picks], rng)])
            batch_labels = np.concatenate([batch_labels, np.full(len(picks), _OUTLIER, np.int32)])
        return batch, batch_labels

    def load(epoch, number, index, extra):
        batch, batch_labels = tf.numpy_function(read, [epoch, number, index, extra], [tf.uint8, tf.int32])
        batch.set_shape((None, store.image_size, store.image_size, 3))
        batch_labels.set_shape((None,))
        # one_hot of -1 is all zeros: an outlier row's target becomes 1/n everywhere.
        outliers = tf.cast(batch_labels == _OUTLIER, tf.float32)[:, None]
        return batch, tf.one_hot(batch_labels, n_classes) + outliers / n_classes

    signature = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.int64),
    )
    dataset = tf.data.Dataset.from_generator(index_batches, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
