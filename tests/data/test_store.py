"""Memory-mapped stores: streamed writes survive releasing pages; resident memory is given back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wbc_tasks.data.store import create_store, finish_store, open_store, release_pages, shrink_store


def _rss_file_bytes() -> int:
    """Resident file-backed memory of this process (memory-mapped pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_release_pages_gives_back_resident_memory_and_keeps_written_data(tmp_path):
    count, size = 256, 128  # 12 MiB
    images = create_store(tmp_path / "s", count, size)
    rng = np.random.default_rng(0)
    expected = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    before = _rss_file_bytes()
    images[:] = expected
    grown = _rss_file_bytes() - before
    assert grown > 8 * 2**20, f"writing 12 MiB through the map grew RssFile by only {grown} bytes"
    release_pages(images)
    assert _rss_file_bytes() - before < grown / 4, "release_pages left the written pages resident"
    finish_store(tmp_path / "s", images, np.zeros(count, np.int16), pd.DataFrame({"i": range(count)}))
    del images
    store = open_store(tmp_path / "s")
    np.testing.assert_array_equal(store.images, expected)  # nothing lost by dropping the pages
    release_pages(store.images, np.zeros(3))  # reading maps and plain arrays: no error


def test_shrink_store_keeps_the_first_rows_streamed(tmp_path):
    images = create_store(tmp_path / "s", 10, 4)
    images[:] = np.arange(10, dtype=np.uint8)[:, None, None, None]
    kept = shrink_store(tmp_path / "s", images, 7, chunk_size=3)
    assert kept.shape == (7, 4, 4, 3)
    np.testing.assert_array_equal(kept[:, 0, 0, 0], np.arange(7))
    assert not (tmp_path / "s" / "partial-images.npy").exists()
    assert shrink_store(tmp_path / "s", kept, 0, chunk_size=3).shape == (0, 4, 4, 3)
