"""Balance the augmented training split with SMOTE (imbalanced-learn), memory-bounded.

Every class is brought up to the largest class's count. The notebook this replaces flattened
every image into one float64 matrix and called ``SMOTE().fit_resample`` once: at 256 px that is
1.5 MB per image before SMOTE copies it, so memory grew with the dataset (see
``docs/benchmarks.md``). Here imbalanced-learn's ``SMOTE`` still draws every synthetic sample,
one class at a time, but on a small stand-in for each image:

- each image of the class is reduced to ``settings.smote_neighbour_size`` px (float32, flat);
  an identity block is appended as extra columns (sparse: a dense one would grow with the
  square of the class), plus one dummy row of another label (imbalanced-learn needs two
  classes);
- the neighbour search sees the reduced columns only (:class:`ReducedColumnsNeighbours`), so
  SMOTE's neighbours, base samples and gaps are exactly those of SMOTE on the reduced images;
- SMOTE interpolates the identity block like any feature, so a synthetic row holds ``1 - gap``
  in its base image's column and ``gap`` in its neighbour's: that names the two parents and
  the gap exactly (checked against the reduced columns, so a change in imbalanced-learn's
  sampling fails loudly rather than silently);
- the full-resolution image is then interpolated from the memory-mapped store, in chunks:
  ``x = x_a + gap * (x_b - x_a)`` in float32, rounded and clipped to uint8.

Kept from SMOTE: same-class k nearest neighbours, a uniformly random base sample and neighbour,
a uniform gap in [0, 1). Changed: neighbours are found on the reduced copy, not the full
images; interpolation happens afterwards at full resolution, chunk by chunk. Memory grows with
the largest class (its reduced copy), never with the dataset.

A class needs two distinct original images for SMOTE (copies of one cell interpolate into a
blur of itself): a class with one (or listed ``augmentation_only`` by the augment step) is
topped up by augmentation instead. Classes smaller than ``k + 1`` use ``k = n - 1``. Both
fallbacks are logged and listed in the summary.

Rows of the input keep their index in the output (new rows are appended), so ``parent_rows``
in records.csv index the same store. Synthetic rows: ``origin="synthetic"``,
``parents="<original sha of a>+<original sha of b>"`` (augmented parents are traced to their
original file), ``parent_rows="a+b"``, ``gap`` (the weight of b; interpolation is symmetric, so
a is taken as the parent the sample is nearer to and the recorded gap is at most 0.5), ``path``
of parent a, ``sha256`` empty (no file holds their pixels).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from imblearn.over_sampling import SMOTE
from PIL import Image
from scipy import sparse
from sklearn.neighbors import NearestNeighbors

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.augment import (
    CLASS_COUNTS_FILE,
    CLASS_COUNTS_PLOT,
    STAGE_BALANCE_FALLBACK,
    augment_into,
    augmented_records,
    class_rows,
    copy_images,
    count_by_class,
    plan_top_up,
)
from wbc_tasks.data.augment import SUMMARY_FILE as AUGMENT_SUMMARY_FILE
from wbc_tasks.data.figures import save_class_counts_plot, save_sample_grid
from wbc_tasks.data.store import (
    IMAGES_FILE,
    LABELS_FILE,
    RECORDS_FILE,
    create_store,
    finish_store,
    open_store,
    release_pages,
)

log = logging.getLogger(__name__)

SAMPLES_PLOT = "synthetic_samples.png"
#: Stages whose class counts the balance step reports, in pipeline order.
STAGES = ("split", "augment", "balance")
#: Distinct original images a class needs before SMOTE may interpolate between them.
MIN_DISTINCT_FOR_SMOTE = 2


class ReducedColumnsNeighbours(NearestNeighbors):
    """``NearestNeighbors`` that measures distance on the first ``n_features`` columns only.

    Given to ``SMOTE(k_neighbors=...)`` so the identity block that tags each row (to decode
    SMOTE's output) plays no part in choosing neighbours.
    """

    def __init__(self, *, n_neighbors: int = 6, n_features: int = 1) -> None:
        super().__init__(n_neighbors=n_neighbors)
        self.n_features = n_features

    def _leading(self, X):
        X = X[:, : self.n_features]
        return X.toarray() if sparse.issparse(X) else X

    def fit(self, X, y=None):
        return super().fit(self._leading(X))

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        return super().kneighbors(None if X is None else self._leading(X), n_neighbors, return_distance)


@dataclass(frozen=True)
class SmotePairs:
    """Decoded SMOTE samples, as row indices into the class's rows and the gap."""

    a: np.ndarray
    b: np.ndarray
    gap: np.ndarray


def reduced_copy(images: np.ndarray, rows: np.ndarray, size: int, chunk_size: int) -> np.ndarray:
    """``rows`` of a store shrunk to ``size`` px (box filter), float32 0..1, one row per image."""
    side = images.shape[1]
    out_side = min(size, side)
    features = np.empty((len(rows), out_side * out_side * 3), dtype=np.float32)
    step = max(1, chunk_size)
    for start in range(0, len(rows), step):
        block = np.asarray(images[rows[start : start + step]])
        for i, image in enumerate(block):
            if out_side != side:
                image = np.asarray(Image.fromarray(image).resize((out_side, out_side), Image.Resampling.BOX))
            features[start + i] = image.reshape(-1) / np.float32(255.0)
        release_pages(images)
    return features


def smote_pairs(features: np.ndarray, n_new: int, *, k: int, seed: int) -> SmotePairs:
    """Let imbalanced-learn's SMOTE draw ``n_new`` samples of one class; decode their parents.

    ``features``: the class's reduced images, one row each. Returns for every sample the two
    parents (row indices into ``features``; ``a`` the nearer, weight ``1 - gap``) and the gap.
    """
    n, f = features.shape
    tags = sparse.identity(n, dtype=np.float32, format="csr")
    X = sparse.vstack(
        [
            sparse.hstack([sparse.csr_matrix(features), tags], format="csr"),
            sparse.csr_matrix((1, f + n), dtype=np.float32),  # the dummy "other class" row
        ],
        format="csr",
    )
    y = np.r_[np.zeros(n, dtype=np.int64), 1]
    smote = SMOTE(
        sampling_strategy={0: n + n_new},
        k_neighbors=ReducedColumnsNeighbours(n_neighbors=k + 1, n_features=f),
        random_state=seed,
    )
    X_res, y_res = smote.fit_resample(X, y)
    new = sparse.csr_matrix(X_res[n + 1 :])
    if new.shape[0] != n_new or not np.all(y_res[n + 1 :] == 0):
        raise RuntimeError(f"SMOTE returned {new.shape[0]} samples, expected {n_new} of one class")
    weights = new[:, f:].tocsr()
    weights.eliminate_zeros()
    per_row = np.diff(weights.indptr)
    if np.any((per_row < 1) | (per_row > 2)):
        raise RuntimeError("cannot decode SMOTE's samples: a sample is not between two images")
    a = np.empty(n_new, dtype=np.int64)
    b = np.empty(n_new, dtype=np.int64)
    gap = np.zeros(n_new, dtype=np.float64)
    for r in range(n_new):
        lo, hi = weights.indptr[r], weights.indptr[r + 1]
        cols, vals = weights.indices[lo:hi], weights.data[lo:hi].astype(np.float64)
        if len(cols) == 1:  # gap == 0 (or a duplicate): the sample is its base image
            a[r] = b[r] = cols[0]
            continue
        order = np.argsort(-vals, kind="stable")
        a[r], b[r] = cols[order[0]], cols[order[1]]
        gap[r] = vals[order[1]] / vals.sum()
    # The reduced columns SMOTE interpolated must agree with the decoded parents and gap.
    expected = features[a] + gap[:, None].astype(np.float32) * (features[b] - features[a])
    drawn = new[:, :f].toarray()
    if np.abs(drawn - expected).max(initial=0.0) > 1e-4:
        raise RuntimeError("cannot decode SMOTE's samples: reduced features do not match")
    return SmotePairs(a=a, b=b, gap=gap)


def write_interpolations(
    source: np.ndarray,
    target: np.ndarray,
    first_row: int,
    a_rows: np.ndarray,
    b_rows: np.ndarray,
    gap: np.ndarray,
    chunk_size: int,
) -> None:
    """``target[first_row + i] = source[a_i] + gap_i * (source[b_i] - source[a_i])``, chunk by chunk."""
    step = max(1, chunk_size)
    for start in range(0, len(a_rows), step):
        stop = min(start + step, len(a_rows))
        mixed = np.asarray(source[a_rows[start:stop]], dtype=np.float32)
        other = np.asarray(source[b_rows[start:stop]], dtype=np.float32)
        other -= mixed
        other *= gap[start:stop, None, None, None].astype(np.float32)
        mixed += other
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, 255, out=mixed)
        target[first_row + start : first_row + stop] = mixed.astype(np.uint8)
        release_pages(source, target)


def _roots(records: pd.DataFrame) -> np.ndarray:
    """Per row, the original file it derives from (its own hash for originals)."""
    sha = records["sha256"].astype(str).to_numpy() if "sha256" in records else np.full(len(records), "")
    if "parents" not in records:
        return sha
    parents = records["parents"].astype(str).to_numpy()
    return np.where(parents != "", parents, sha)


def _stage_counts(augmented_store: Path, counts_in: dict[str, int]) -> dict[str, dict[str, int]]:
    """Counts by stage the augment step recorded, else just this step's input."""
    path = augmented_store / CLASS_COUNTS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if isinstance(recorded, dict) and recorded:
            # The JSON is written with sorted keys: restore the pipeline's order.
            order = [s for s in STAGES if s in recorded] + sorted(set(recorded) - set(STAGES))
            return {stage: dict(recorded[stage]) for stage in order if stage != "balance"}
    return {"augment": counts_in}


def _augmentation_only(augmented_store: Path) -> set[str]:
    path = augmented_store / AUGMENT_SUMMARY_FILE
    if path.is_file():
        return set(json.loads(path.read_text()).get("augmentation_only", []))
    return set()


def _link_store(source: Path, target: Path) -> str:
    """Reference an unchanged store: hard links (stores are never modified once finished), else copies."""
    target.mkdir(parents=True, exist_ok=True)
    how = "linked"
    for name in (IMAGES_FILE, LABELS_FILE, RECORDS_FILE):
        try:
            (target / name).hardlink_to(source / name)
        except OSError:
            shutil.copyfile(source / name, target / name)
            how = "copied"
    return how


def balance_with_smote(
    augmented_store: Path, out_dir: Path, *, enabled: bool, k: int, seed: int, settings: Settings
) -> dict:
    """Bring every class of ``augmented_store`` up to the largest class; write the store in ``out_dir``.

    With ``enabled=False`` the output is the augmented store unchanged (hard-linked, or copied
    where links are impossible) and classes stay unbalanced. Also writes ``class_counts.json``
    and ``.png`` (counts by stage: split, augment, balance) and a grid of synthetic samples.
    Returns a small summary (counts in and out, fallbacks, store path).
    """
    if k < 1:
        raise ValueError(f"SMOTE needs k >= 1 neighbours, got {k}")
    if not (augmented_store / IMAGES_FILE).is_file():
        raise FileNotFoundError(f"augmented store {augmented_store} has no {IMAGES_FILE}; run the augment step first")
    source = open_store(augmented_store)
    counts_in = count_by_class(source.labels)
    by_stage = _stage_counts(augmented_store, counts_in)
    summary: dict = {"store": str(out_dir), "smote": bool(enabled), "counts_in": counts_in}

    if not enabled:
        how = _link_store(augmented_store, out_dir)
        log.info("SMOTE is off: the balance store is the augmented store, %s unchanged", how)
        for name, count in counts_in.items():
            if count:
                log.info("balance %s: %d -> %d images (SMOTE off)", name, count, count)
        by_stage["balance"] = counts_in
        write_json_atomic(out_dir / CLASS_COUNTS_FILE, by_stage)
        save_class_counts_plot(by_stage, out_dir / CLASS_COUNTS_PLOT)
        summary.update(
            counts_out=counts_in,
            synthetic=0,
            note=f"SMOTE off: augmented store {how} unchanged from {augmented_store}",
        )
        return summary

    rows_by_class = class_rows(source.labels)
    target = max((len(r) for r in rows_by_class.values()), default=0)
    roots = _roots(source.records)
    origins = (
        source.records["origin"].astype(str).to_numpy()
        if "origin" in source.records
        else np.full(len(source), "original")
    )
    listed_aug_only = _augmentation_only(augmented_store)
    smote_classes: dict[int, tuple[np.ndarray, int, int]] = {}
    fallback_sources: dict[int, np.ndarray] = {}
    fallback_needed: dict[int, int] = {}
    k_used: dict[str, int] = {}
    fallbacks: list[str] = []
    for cls, rows in rows_by_class.items():
        name = CLASS_NAMES[cls]
        need = target - len(rows)
        if need <= 0:
            continue
        distinct = len(set(roots[rows]))
        if distinct < MIN_DISTINCT_FOR_SMOTE or name in listed_aug_only:
            originals = rows[origins[rows] == "original"]
            fallback_sources[cls] = originals if len(originals) else rows
            fallback_needed[cls] = need
            note = (
                f"{name}: {distinct} distinct original image(s); topped up by augmentation ({need} images), not SMOTE"
            )
            log.warning("balance fallback: %s", note)
            fallbacks.append(note)
            continue
        k_class = min(k, len(rows) - 1)
        if k_class < k:
            note = f"{name}: only {len(rows)} images, SMOTE uses k={k_class} instead of {k}"
            log.warning("balance fallback: %s", note)
            fallbacks.append(note)
        k_used[name] = k_class
        smote_classes[cls] = (rows, need, k_class)
    for name in CLASS_NAMES:
        if counts_in[name] == 0:
            log.warning("balance %s: no training images; it stays at 0", name)

    n_synthetic = sum(need for _, need, _ in smote_classes.values())
    n_fallback = sum(fallback_needed.values())
    total = len(source) + n_synthetic + n_fallback
    images = create_store(out_dir, total, source.image_size)
    copy_images(source.images, images, settings.chunk_size)

    new_labels = [source.labels]
    new_records = [source.records.assign(gap="")]
    row = len(source)
    for cls, (rows, need, k_class) in sorted(smote_classes.items()):
        name = CLASS_NAMES[cls]
        log.info("SMOTE %s: %d images -> %d (k=%d)", name, len(rows), len(rows) + need, k_class)
        features = reduced_copy(source.images, rows, settings.smote_neighbour_size, settings.chunk_size)
        class_seed = int(np.random.SeedSequence([seed, cls]).generate_state(1)[0])
        pairs = smote_pairs(features, need, k=k_class, seed=class_seed)
        del features
        a_rows, b_rows = rows[pairs.a], rows[pairs.b]
        write_interpolations(source.images, images, row, a_rows, b_rows, pairs.gap, settings.chunk_size)
        parents = source.records.iloc[a_rows].reset_index(drop=True)
        new_records.append(
            parents.assign(
                sha256="",
                origin="synthetic",
                parents=[f"{ra}+{rb}" for ra, rb in zip(roots[a_rows], roots[b_rows], strict=True)],
                parent_rows=[f"{ra}+{rb}" for ra, rb in zip(a_rows, b_rows, strict=True)],
                gap=np.round(pairs.gap, 6),
            )
        )
        new_labels.append(np.full(need, cls, dtype=np.int16))
        row += need
    if isinstance(images, np.memmap):
        images.flush()
    if fallback_needed:
        plan = plan_top_up(fallback_sources, fallback_needed, first_row=row)
        augment_into(augmented_store, out_dir, plan, seed=seed, stage=STAGE_BALANCE_FALLBACK, settings=settings)
        new_records.append(augmented_records(source.records, plan).assign(gap=""))
        new_labels.append(plan.class_indices.astype(np.int16))
    del images
    labels = np.concatenate(new_labels)
    records = pd.concat(new_records, ignore_index=True)
    finish_store(out_dir, np.load(out_dir / IMAGES_FILE, mmap_mode="r"), labels, records)

    counts_out = count_by_class(labels)
    for name in CLASS_NAMES:
        if counts_in[name]:
            log.info("balance %s: %d -> %d images", name, counts_in[name], counts_out[name])
    by_stage["balance"] = counts_out
    write_json_atomic(out_dir / CLASS_COUNTS_FILE, by_stage)
    save_class_counts_plot(by_stage, out_dir / CLASS_COUNTS_PLOT)
    save_sample_grid(out_dir, out_dir / SAMPLES_PLOT, origin="synthetic", per_class=6, seed=seed)
    summary.update(
        counts_out=counts_out,
        target=int(target),
        synthetic=int(n_synthetic),
        augmented_fallback=int(n_fallback),
        augmentation_only=sorted(CLASS_NAMES[c] for c in fallback_needed),
        k=int(k),
        k_used=k_used,
        fallbacks=fallbacks,
        images_out=int(total),
    )
    return summary
