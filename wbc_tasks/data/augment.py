"""Augment the training split: geometric transforms plus stain (HED) colour jitter.

Only the training store is augmented. Originals are always kept; a class with fewer than
``per_class`` originals is topped up with augmented copies, cycling over its originals so each
gets a fair share; a class already at or above ``per_class`` is left as it is.

Every augmented copy draws its parameters from its own generator, seeded by
``(seed, stage, class, copy number)``, so the output depends on the seed alone: not on the chunk
size, the number of worker processes or the order in which chunks finish.

The input store is streamed in chunks and the output written into a memory-mapped store; worker
processes open both stores themselves and write disjoint rows, so no process holds the split.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wbc_tasks.core.parallel import parallel_map
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.figures import save_class_counts_plot, save_sample_grid
from wbc_tasks.data.store import IMAGES_FILE, create_store, finish_store, open_store, release_pages
from wbc_tasks.data.transforms import DEFAULT_PARAMS, AugmentParams, augment_image

log = logging.getLogger(__name__)

CLASS_COUNTS_FILE = "class_counts.json"
CLASS_COUNTS_PLOT = "class_counts.png"
SUMMARY_FILE = "augment_summary.json"
SAMPLES_PLOT = "augmented_samples.png"

#: Stage tags mixed into the per-copy seeds, so the balance step's augmentation fallback never
#: repeats the copies the augment step made from the same original.
STAGE_AUGMENT = 0
STAGE_BALANCE_FALLBACK = 1


def copy_rng(seed: int, stage: int, class_index: int, copy_index: int) -> np.random.Generator:
    """The generator of one augmented copy: a function of these four numbers only."""
    return np.random.default_rng(np.random.SeedSequence([seed, stage, class_index, copy_index]))


# --- streaming into stores ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    source: str
    target: str
    target_rows: np.ndarray
    source_rows: np.ndarray
    class_indices: np.ndarray
    copy_indices: np.ndarray
    seed: int
    stage: int
    params: AugmentParams


def _augment_chunk(chunk: _Chunk) -> int:
    """Worker: augment one chunk, writing straight into the target store's memory map."""
    source = np.load(chunk.source, mmap_mode="r")
    target = np.load(chunk.target, mmap_mode="r+")
    for out_row, src_row, cls, copy in zip(
        chunk.target_rows, chunk.source_rows, chunk.class_indices, chunk.copy_indices, strict=True
    ):
        rng = copy_rng(chunk.seed, chunk.stage, int(cls), int(copy))
        target[out_row] = augment_image(np.asarray(source[src_row]), rng, chunk.params)
    target.flush()
    del target
    return len(chunk.target_rows)


@dataclass(frozen=True)
class AugmentPlan:
    """Which augmented copies to make: one entry per copy."""

    target_rows: np.ndarray
    source_rows: np.ndarray
    class_indices: np.ndarray
    copy_indices: np.ndarray

    def __len__(self) -> int:
        return int(self.target_rows.shape[0])


def plan_top_up(
    sources_by_class: dict[int, np.ndarray], needed_by_class: dict[int, int], first_row: int
) -> AugmentPlan:
    """Copies cycling over each class's sources, written from ``first_row`` on, class by class."""
    target, source, classes, copies = [], [], [], []
    row = first_row
    for cls in sorted(needed_by_class):
        need = needed_by_class[cls]
        sources = sources_by_class[cls]
        if need <= 0:
            continue
        if len(sources) == 0:
            raise ValueError(f"class {CLASS_NAMES[cls]}: no images to augment")
        copy = np.arange(need)
        target.append(np.arange(row, row + need))
        source.append(sources[copy % len(sources)])
        classes.append(np.full(need, cls))
        copies.append(copy)
        row += need
    if not target:
        empty = np.zeros(0, dtype=np.int64)
        return AugmentPlan(empty, empty, empty, empty)
    return AugmentPlan(*(np.concatenate(a).astype(np.int64) for a in (target, source, classes, copies)))


def augment_into(
    source_store: Path,
    target_store: Path,
    plan: AugmentPlan,
    *,
    seed: int,
    stage: int,
    settings: Settings,
    params: AugmentParams = DEFAULT_PARAMS,
) -> None:
    """Write ``plan``'s augmented copies of ``source_store`` images into ``target_store`` rows.

    ``target_store`` must already hold an ``images.npy`` with room for the target rows (made by
    :func:`~wbc_tasks.data.store.create_store`); chunks of ``settings.chunk_size`` copies go to
    ``settings.worker_count()`` processes.
    """
    if len(plan) == 0:
        return
    step = max(1, settings.chunk_size)
    chunks = [
        _Chunk(
            source=str(source_store / IMAGES_FILE),
            target=str(target_store / IMAGES_FILE),
            target_rows=plan.target_rows[i : i + step],
            source_rows=plan.source_rows[i : i + step],
            class_indices=plan.class_indices[i : i + step],
            copy_indices=plan.copy_indices[i : i + step],
            seed=seed,
            stage=stage,
            params=params,
        )
        for i in range(0, len(plan), step)
    ]
    done = 0
    for count in parallel_map(_augment_chunk, chunks, workers=settings.worker_count(), chunksize=1):
        done += count
        log.info("augmented %d of %d images", done, len(plan))


def augmented_records(source_records: pd.DataFrame, plan: AugmentPlan) -> pd.DataFrame:
    """records.csv rows for ``plan``'s copies: the source's path, class and size; its hash as parent.

    ``sha256`` stays empty (no file holds these pixels); ``parent_rows`` is the source's row,
    which is the same in the source and the target store (inputs keep their rows).
    """
    rows = source_records.iloc[plan.source_rows].reset_index(drop=True)
    return rows.assign(
        sha256="",
        origin="augmented",
        parents=rows["sha256"].to_numpy(),
        parent_rows=plan.source_rows.astype(str),
    )


def copy_images(source: np.ndarray, target: np.ndarray, chunk_size: int) -> None:
    """Copy a store's images into the first rows of another, one chunk in memory at a time."""
    step = max(1, chunk_size)
    for start in range(0, source.shape[0], step):
        stop = min(start + step, source.shape[0])
        target[start:stop] = source[start:stop]
        release_pages(source, target)


def class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of each class present."""
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def count_by_class(labels: np.ndarray) -> dict[str, int]:
    """Images per class name, every class listed."""
    counts = np.bincount(labels.astype(np.int64), minlength=len(CLASS_NAMES))
    return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}


def _original_rows(records: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """The rows among ``rows`` that are original images (all of them if none is marked)."""
    if "origin" not in records.columns:
        return rows
    originals = rows[records["origin"].to_numpy()[rows] == "original"]
    return originals if len(originals) else rows


# --- the pipeline step -------------------------------------------------------------------------


def augment_training_set(
    train_store: Path,
    out_dir: Path,
    *,
    per_class: int,
    seed: int,
    settings: Settings,
    min_images_for_smote: int = 2,
    params: AugmentParams = DEFAULT_PARAMS,
) -> dict:
    """Top every class of the training store up to ``per_class`` images; write the store in ``out_dir``.

    Originals come first, unchanged, then the augmented copies. Classes with fewer than
    ``min_images_for_smote`` originals are listed as ``augmentation_only``: the balance step tops
    them up by augmentation instead of SMOTE (interpolating between copies of one cell only
    blurs it). Also writes ``class_counts.json``/``.png`` and a grid of augmented samples.
    Returns a small summary (counts per class in and out, store path).
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if not (train_store / IMAGES_FILE).is_file():
        raise FileNotFoundError(f"training store {train_store} has no {IMAGES_FILE}; run preprocess first")
    source = open_store(train_store)
    rows_by_class = class_rows(source.labels)
    originals = {c: _original_rows(source.records, rows) for c, rows in rows_by_class.items()}
    needed = {c: max(0, per_class - len(rows)) for c, rows in rows_by_class.items()}
    plan = plan_top_up(originals, needed, first_row=len(source))
    total = len(source) + len(plan)

    images = create_store(out_dir, total, source.image_size)
    copy_images(source.images, images, settings.chunk_size)
    if isinstance(images, np.memmap):
        images.flush()
    augment_into(train_store, out_dir, plan, seed=seed, stage=STAGE_AUGMENT, settings=settings, params=params)
    labels = np.concatenate([source.labels, plan.class_indices.astype(np.int16)])
    records = pd.concat([source.records, augmented_records(source.records, plan)], ignore_index=True)
    # Re-open so the finished store reflects what the workers wrote, not this process's view.
    del images
    finish_store(out_dir, np.load(out_dir / IMAGES_FILE, mmap_mode="r"), labels, records)

    counts_in = count_by_class(source.labels)
    counts_out = count_by_class(labels)
    augmentation_only = sorted(CLASS_NAMES[c] for c, rows in originals.items() if 0 < len(rows) < min_images_for_smote)
    for name in CLASS_NAMES:
        if counts_in[name] or counts_out[name]:
            log.info("augment %s: %d -> %d images", name, counts_in[name], counts_out[name])
        else:
            log.warning("augment %s: no training images", name)
    for name in augmentation_only:
        log.warning(
            "augment %s: fewer than %d original images; the balance step will top it up by augmentation, not SMOTE",
            name,
            min_images_for_smote,
        )
    by_stage = {"split": counts_in, "augment": counts_out}
    write_json_atomic(out_dir / CLASS_COUNTS_FILE, by_stage)
    save_class_counts_plot(by_stage, out_dir / CLASS_COUNTS_PLOT)
    save_sample_grid(out_dir, out_dir / SAMPLES_PLOT, origin="augmented", per_class=6, seed=seed)
    summary = {
        "store": str(out_dir),
        "image_size": int(source.image_size),
        "per_class": int(per_class),
        "seed": int(seed),
        "images_in": int(len(source)),
        "images_out": int(total),
        "augmented": int(len(plan)),
        "counts_in": counts_in,
        "counts_out": counts_out,
        "min_images_for_smote": int(min_images_for_smote),
        "augmentation_only": augmentation_only,
        "params": asdict(params),
    }
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary
