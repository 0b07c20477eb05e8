"""Memory-mapped uint8 image stores: the data that moves between pipeline steps.

A store is a folder holding ``images.npy`` (N x S x S x 3 uint8, opened as a memory map, so no
step holds a whole split in RAM), ``labels.npy`` (N int16 class indices) and ``records.csv``
(one row per image: where it came from). Steps stream through a store in chunks.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
RECORDS_FILE = "records.csv"


@dataclass
class ImageStore:
    """An opened store. ``images`` is a read-only memory map."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    records: pd.DataFrame

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """(start, stop) index pairs covering the store."""
        for start in range(0, len(self), chunk_size):
            yield start, min(start + chunk_size, len(self))

    def class_counts(self, class_names: tuple[str, ...]) -> dict[str, int]:
        counts = np.bincount(self.labels.astype(np.int64), minlength=len(class_names))
        return {name: int(counts[i]) for i, name in enumerate(class_names)}


def create_store(path: Path, count: int, size: int) -> np.ndarray:
    """Create ``images.npy`` for ``count`` images and return it as a writable memory map."""
    path.mkdir(parents=True, exist_ok=True)
    shape = (count, size, size, 3)
    if count == 0:
        np.save(path / IMAGES_FILE, np.zeros(shape, dtype=np.uint8))
        return np.load(path / IMAGES_FILE)
    return _reserved_memmap(path / IMAGES_FILE, shape)


def _reserved_memmap(file: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new writable uint8 ``.npy`` memory map whose disk blocks are reserved before use.

    A memory map of a sparse file gets its blocks only when a page is written: on a full disk
    that write kills the process with SIGBUS, without a word. Reserving them first
    (``posix_fallocate``) turns a full disk into an ordinary ``OSError`` (ENOSPC) here.
    """
    images = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(file, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    del images
                    raise
    return images


def finish_store(path: Path, images: np.ndarray, labels: np.ndarray, records: pd.DataFrame) -> None:
    """Flush the images and write labels and records beside them."""
    if len(records) != len(labels) or images.shape[0] != len(labels):
        raise ValueError(f"store {path}: {images.shape[0]} images, {len(labels)} labels, {len(records)} records")
    if isinstance(images, np.memmap):
        images.flush()
    np.save(path / LABELS_FILE, labels.astype(np.int16))
    records.to_csv(path / RECORDS_FILE, index=False)


def open_store(path: Path) -> ImageStore:
    """Open a finished store read-only."""
    images = np.load(path / IMAGES_FILE, mmap_mode="r")
    labels = np.load(path / LABELS_FILE)
    records = pd.read_csv(path / RECORDS_FILE, keep_default_na=False)
    return ImageStore(path=path, images=images, labels=labels, records=records)


def release_pages(*arrays: np.ndarray) -> None:
    """Drop the pages a memory map has touched from this process's resident memory.

    Streaming through a store leaves every page it read or wrote mapped into the process, so its
    resident size grows with the store (the pages are page cache the kernel could reclaim, but
    container memory limits count them). ``MADV_DONTNEED`` unmaps them; written data stays in the
    page cache and reaches the file, and a later read maps the pages again. Arrays that are not
    memory maps are ignored.
    """
    for array in arrays:
        handle = getattr(array, "_mmap", None)
        if handle is None and isinstance(getattr(array, "base", None), np.memmap):
            handle = getattr(array.base, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            # A closed map, or a platform without madvise: harmless.
            with contextlib.suppress(OSError, ValueError):
                handle.madvise(mmap.MADV_DONTNEED)


def shrink_store(path: Path, images: np.ndarray, count: int, chunk_size: int) -> np.ndarray:
    """Keep the first ``count`` rows of ``path``'s images (streamed; returns the new memory map)."""
    partial = path / ("partial-" + IMAGES_FILE)
    shape = (count, *images.shape[1:])
    if count == 0:
        np.save(partial, np.zeros(shape, dtype=np.uint8))
    else:
        target = _reserved_memmap(partial, shape)
        for start in range(0, count, max(1, chunk_size)):
            stop = min(start + max(1, chunk_size), count)
            target[start:stop] = images[start:stop]
            release_pages(images, target)
        target.flush()
        del target
    del images
    partial.replace(path / IMAGES_FILE)
    return np.load(path / IMAGES_FILE, mmap_mode="r+") if count else np.load(path / IMAGES_FILE)
