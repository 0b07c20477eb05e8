"""Balance the augmented training split: every class brought up to the largest class's count by
SMOTE at full resolution, memory-bounded (the algorithm and why: :mod:`wbc_tasks.data.smote`).

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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
from wbc_tasks.data.smote import (
    reduced_copy,
    smote_pairs,
    write_interpolations,
)
from wbc_tasks.data.store import (
    IMAGES_FILE,
    LABELS_FILE,
    RECORDS_FILE,
    ImageStore,
    create_store,
    finish_store,
    open_store,
)

log = logging.getLogger(__name__)

SAMPLES_PLOT = "synthetic_samples.png"
#: Stages whose class counts the balance step reports, in pipeline order.
STAGES = ("split", "augment", "balance")
#: Distinct original images a class needs before SMOTE may interpolate between them.
MIN_DISTINCT_FOR_SMOTE = 2


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
        return {**summary, **_pass_through_unbalanced(augmented_store, out_dir, counts_in, by_stage)}

    plan = _plan_balance(source, augmented_store, k)
    for name in CLASS_NAMES:
        if counts_in[name] == 0:
            log.warning("balance %s: no training images; it stays at 0", name)
    total = len(source) + plan.n_synthetic + plan.n_fallback
    labels = _write_balanced_store(source, augmented_store, out_dir, plan, total, seed, settings)
    counts_out = count_by_class(labels)
    for name in CLASS_NAMES:
        if counts_in[name]:
            log.info("balance %s: %d -> %d images", name, counts_in[name], counts_out[name])
    _write_class_counts(out_dir, by_stage, counts_out)
    save_sample_grid(out_dir, out_dir / SAMPLES_PLOT, origin="synthetic", per_class=6, seed=seed)
    summary.update(
        counts_out=counts_out,
        target=int(plan.target),
        synthetic=int(plan.n_synthetic),
        augmented_fallback=int(plan.n_fallback),
        augmentation_only=sorted(CLASS_NAMES[c] for c in plan.fallback_needed),
        k=int(k),
        k_used=plan.k_used,
        fallbacks=plan.fallbacks,
        images_out=int(total),
    )
    return summary


def _write_class_counts(out_dir: Path, by_stage: dict[str, dict[str, int]], counts_out: dict[str, int]) -> None:
    """``class_counts.json`` and ``.png``: the counts by stage, this step's last."""
    by_stage["balance"] = counts_out
    write_json_atomic(out_dir / CLASS_COUNTS_FILE, by_stage)
    save_class_counts_plot(by_stage, out_dir / CLASS_COUNTS_PLOT)


def _pass_through_unbalanced(
    augmented_store: Path, out_dir: Path, counts_in: dict[str, int], by_stage: dict[str, dict[str, int]]
) -> dict:
    """SMOTE off: the augmented store becomes the balance store as it is; the summary's rest."""
    how = _link_store(augmented_store, out_dir)
    log.info("SMOTE is off: the balance store is the augmented store, %s unchanged", how)
    for name, count in counts_in.items():
        if count:
            log.info("balance %s: %d -> %d images (SMOTE off)", name, count, count)
    _write_class_counts(out_dir, by_stage, counts_in)
    return {
        "counts_out": counts_in,
        "synthetic": 0,
        "note": f"SMOTE off: augmented store {how} unchanged from {augmented_store}",
    }


@dataclass(frozen=True)
class _SmoteClass:
    """One class SMOTE tops up: its rows in the input, how many samples to draw, with which k."""

    rows: np.ndarray
    need: int
    k: int


@dataclass
class _BalancePlan:
    """What each class below the largest gets: SMOTE samples, or augmented copies instead."""

    #: The largest class's count, every class's count afterwards.
    target: int
    smote_classes: dict[int, _SmoteClass] = field(default_factory=dict)
    #: class index -> the rows its augmented copies are made from / how many it needs.
    fallback_sources: dict[int, np.ndarray] = field(default_factory=dict)
    fallback_needed: dict[int, int] = field(default_factory=dict)
    k_used: dict[str, int] = field(default_factory=dict)
    #: One line per fallback (too few distinct images for SMOTE, a smaller k), as logged.
    fallbacks: list[str] = field(default_factory=list)

    @property
    def n_synthetic(self) -> int:
        return sum(smote.need for smote in self.smote_classes.values())

    @property
    def n_fallback(self) -> int:
        return sum(self.fallback_needed.values())


def _plan_balance(source: ImageStore, augmented_store: Path, k: int) -> _BalancePlan:
    """Decide, class by class, how it reaches the largest class's count (and log the fallbacks)."""
    rows_by_class = class_rows(source.labels)
    plan = _BalancePlan(target=max((len(r) for r in rows_by_class.values()), default=0))
    roots = _roots(source.records)
    origins = _origins(source.records)
    listed_aug_only = _augmentation_only(augmented_store)
    for cls, rows in rows_by_class.items():
        name = CLASS_NAMES[cls]
        need = plan.target - len(rows)
        if need <= 0:
            continue
        distinct = len(set(roots[rows]))
        if distinct < MIN_DISTINCT_FOR_SMOTE or name in listed_aug_only:
            originals = rows[origins[rows] == "original"]
            plan.fallback_sources[cls] = originals if len(originals) else rows
            plan.fallback_needed[cls] = need
            _note_fallback(
                plan,
                f"{name}: {distinct} distinct original image(s); topped up by augmentation ({need} images), not SMOTE",
            )
            continue
        k_class = min(k, len(rows) - 1)
        if k_class < k:
            _note_fallback(plan, f"{name}: only {len(rows)} images, SMOTE uses k={k_class} instead of {k}")
        plan.k_used[name] = k_class
        plan.smote_classes[cls] = _SmoteClass(rows, need, k_class)
    return plan


def _note_fallback(plan: _BalancePlan, note: str) -> None:
    log.warning("balance fallback: %s", note)
    plan.fallbacks.append(note)


def _origins(records: pd.DataFrame) -> np.ndarray:
    """Per row, how it was made (``original``, ``augmented``, ...); all original without the column."""
    if "origin" in records:
        return records["origin"].astype(str).to_numpy()
    return np.full(len(records), "original")


def _write_balanced_store(
    source: ImageStore,
    augmented_store: Path,
    out_dir: Path,
    plan: _BalancePlan,
    total: int,
    seed: int,
    settings: Settings,
) -> np.ndarray:
    """The input rows, then the SMOTE samples, then the augmented fallbacks, as one finished
    store in ``out_dir``; returns its labels."""
    images = create_store(out_dir, total, source.image_size)
    copy_images(source.images, images, settings.chunk_size)
    new_labels = [source.labels]
    new_records = [source.records.assign(gap="")]
    row = len(source)
    roots = _roots(source.records)
    for cls, smote in sorted(plan.smote_classes.items()):
        new_records.append(_write_smote_class(source, images, row, cls, smote, roots, seed, settings))
        new_labels.append(np.full(smote.need, cls, dtype=np.int16))
        row += smote.need
    if isinstance(images, np.memmap):
        images.flush()
    if plan.fallback_needed:
        top_up = plan_top_up(plan.fallback_sources, plan.fallback_needed, first_row=row)
        augment_into(augmented_store, out_dir, top_up, seed=seed, stage=STAGE_BALANCE_FALLBACK, settings=settings)
        new_records.append(augmented_records(source.records, top_up).assign(gap=""))
        new_labels.append(top_up.class_indices.astype(np.int16))
    del images
    labels = np.concatenate(new_labels)
    records = pd.concat(new_records, ignore_index=True)
    finish_store(out_dir, np.load(out_dir / IMAGES_FILE, mmap_mode="r"), labels, records)
    return labels


def _write_smote_class(
    source: ImageStore,
    images: np.ndarray,
    first_row: int,
    cls: int,
    smote: _SmoteClass,
    roots: np.ndarray,
    seed: int,
    settings: Settings,
) -> pd.DataFrame:
    """Draw one class's SMOTE samples, write them from ``first_row`` on; return their records."""
    rows = smote.rows
    log.info("SMOTE %s: %d images -> %d (k=%d)", CLASS_NAMES[cls], len(rows), len(rows) + smote.need, smote.k)
    features = reduced_copy(source.images, rows, settings.smote_neighbour_size, settings.chunk_size)
    class_seed = int(np.random.SeedSequence([seed, cls]).generate_state(1)[0])
    pairs = smote_pairs(features, smote.need, k=smote.k, seed=class_seed)
    del features
    a_rows, b_rows = rows[pairs.a], rows[pairs.b]
    write_interpolations(source.images, images, first_row, a_rows, b_rows, pairs.gap, settings.chunk_size)
    parents = source.records.iloc[a_rows].reset_index(drop=True)
    return parents.assign(
        sha256="",
        origin="synthetic",
        parents=[f"{ra}+{rb}" for ra, rb in zip(roots[a_rows], roots[b_rows], strict=True)],
        parent_rows=[f"{ra}+{rb}" for ra, rb in zip(a_rows, b_rows, strict=True)],
        gap=np.round(pairs.gap, 6),
    )
