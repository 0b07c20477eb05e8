"""Decode and resize every split into memory-mapped uint8 stores: ``train``, ``val``, ``test``
(labelled images only: the headline metrics and the champion comparison) and, when reviewed
images fell in the test split, ``test_reviewed`` (their metrics are reported apart)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_tasks.core.parallel import parallel_map
from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import require_complete
from wbc_tasks.data.dataset import REJECTED_COLUMNS, SPLITS, read_manifest, reviewed_test, split_table
from wbc_tasks.data.images import ImageError, load_image
from wbc_tasks.data.store import create_store, finish_store, release_pages, shrink_store

log = logging.getLogger(__name__)

PREPROCESS_REJECTED_FILE = "rejected.csv"
#: The store of reviewed images in the test split.
REVIEWED_TEST_STORE = "test_reviewed"


def _load(path: str, *, size: int, max_pixels: int, min_side: int) -> np.ndarray | str:
    try:
        return load_image(path, size, max_pixels=max_pixels, min_side=min_side)
    except ImageError as exc:
        return exc.reason


def build_split_store(
    table: pd.DataFrame, data_dir: Path, out_dir: Path, size: int, settings: Settings
) -> tuple[int, list[dict[str, str]]]:
    """Decode ``table``'s images into a store at ``out_dir``; return (count, rejections)."""
    images = create_store(out_dir, len(table), size)
    load = partial(_load, size=size, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    paths = [str(data_dir / p) for p in table["path"]]
    kept: list[int] = []
    rejected: list[dict[str, str]] = []
    for i, result in enumerate(parallel_map(load, paths, workers=settings.worker_count())):
        if isinstance(result, str):
            row = table.iloc[i]
            rejected.append({"path": row["path"], "class": row["class"], "sha256": row["sha256"], "reason": result})
            continue
        images[len(kept)] = result
        kept.append(i)
        if len(kept) % settings.chunk_size == 0:
            release_pages(images)
    records = table.iloc[kept].reset_index(drop=True)
    if len(kept) < len(table):
        # A file changed or vanished since validation: the kept rows are the first ones; drop the rest.
        images = shrink_store(out_dir, images, len(kept), settings.chunk_size)
    labels = np.array([CLASS_NAMES.index(c) for c in records["class"]], dtype=np.int16)
    records = records.assign(origin="original", parents=records["sha256"])
    finish_store(out_dir, images, labels, records)
    return len(kept), rejected


def preprocess_splits(split_dir: Path, out_dir: Path, settings: Settings, image_size: int) -> dict:
    """Build one store per split (``out_dir/train``, ``val``, ``test``) from the manifest."""
    manifest = read_manifest(split_dir)
    data_dir = Path(require_complete(split_dir)["data_dir"])
    counts: dict[str, dict[str, int]] = {}
    all_rejected: list[dict[str, str]] = []
    tables = {split: split_table(manifest, split) for split in SPLITS}
    if len(reviewed_test(manifest)):
        tables[REVIEWED_TEST_STORE] = reviewed_test(manifest)
    for split, table in tables.items():
        kept, rejected = build_split_store(table, data_dir, out_dir / split, image_size, settings)
        all_rejected.extend(rejected)
        counts[split] = {
            str(name): int(n)
            for name, n in table[~table["path"].isin({r["path"] for r in rejected})]["class"]
            .value_counts()
            .sort_index()
            .items()
        }
        log.info("%s: %d of %d images stored at %d px %s", split, kept, len(table), image_size, counts[split])
    pd.DataFrame(all_rejected, columns=REJECTED_COLUMNS).to_csv(out_dir / PREPROCESS_REJECTED_FILE, index=False)
    names = pseudonymiser(settings, data_dir)  # pseudonyms in log lines when the option is on
    known = names.known(r["path"] for r in all_rejected)
    for row in all_rejected:
        log.warning("rejected %s: %s", names.path(row["path"]), names.text(row["reason"], known))
    return {
        "image_size": image_size,
        "counts": {s: {c: int(n) for c, n in v.items()} for s, v in counts.items()},
        "rejected": len(all_rejected),
        "stores": {s: str(out_dir / s) for s in tables},
    }
