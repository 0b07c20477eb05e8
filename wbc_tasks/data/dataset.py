"""Find labelled images, validate them, drop duplicates and split by content hash.

Layout: ``<data dir>/<class>/<images>``. Sub-folders inside a class folder are used: their
images take the class of the top-level folder (``blasts/2024/a.png`` is a blast). Symlinks (to
files or folders, at any depth) are followed only when their target lies under the data folder
or ``settings.allowed_roots``; links out of them, broken links and symlink loops are rejected.
Every file found ends up in the manifest or in the rejections, each rejection with its reason;
the input folder is only read. What a data folder must look like, and walking one class
folder, are :mod:`wbc_tasks.data.labelled_folder`'s; the split ledger (splits earlier runs
assigned, kept so an image never changes split) is here.

Images people reviewed in the predictions database may join the labelled ones (``extra``, built
by the pipeline layer): the same checks and the same hash-stable split, their absolute path in
the manifest and ``source`` ``review``. The labelled folder wins over a review of the same image.
The headline test split (:func:`headline_test`) holds labelled images only, so models trained
before and after reviews are compared on the same images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from wbc_tasks.core.parallel import parallel_map
from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import IMAGE_EXTENSIONS, Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.images import ImageError, inspect_image, resolve_within
from wbc_tasks.data.labelled_folder import DatasetError, check_data_folder, walk_class_folder

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
REJECTED_FILE = "rejected.csv"
LEDGER_FILE = "split_ledger.csv"
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "class", "sha256", "split", "width", "height", "source"]
#: ``source`` of images from the labelled folder and of images a person reviewed.
SOURCE_LABELLED = "labelled"
SOURCE_REVIEW = "review"
REJECTED_COLUMNS = ["path", "class", "sha256", "reason"]


@dataclass(frozen=True)
class Rejection:
    """A file (or folder) left out, and why."""

    path: str
    reason: str
    label: str = ""
    sha256: str = ""
    source: str = SOURCE_LABELLED

    def as_row(self) -> dict[str, str]:
        return {"path": self.path, "class": self.label, "sha256": self.sha256, "reason": self.reason}


@dataclass(frozen=True)
class ExtraImage:
    """An image from outside the labelled folder with its class, e.g. a reviewed cell."""

    path: Path
    label: str
    source: str = SOURCE_REVIEW


def find_labelled_images(data_dir: Path, settings: Settings) -> tuple[list[tuple[Path, str]], list[Rejection]]:
    """Candidate (file, class) pairs under ``data_dir`` and everything that cannot be one."""
    data_dir = data_dir.resolve()
    check_data_folder(data_dir)
    roots = (data_dir, *settings.allowed_roots)
    known = {name.lower(): name for name in CLASS_NAMES}
    found: list[tuple[Path, str]] = []
    rejected: list[Rejection] = []
    for entry in sorted(data_dir.iterdir()):
        rel = entry.relative_to(data_dir)
        try:
            # A class folder may itself be a link (labs mount shares that way): same rules.
            resolve_within(entry, roots)
        except ImageError as exc:
            rejected.append(Rejection(str(rel), exc.reason))
            continue
        if entry.is_file():
            rejected.append(Rejection(str(rel), "file outside any class folder"))
            continue
        if not entry.is_dir():
            rejected.append(Rejection(str(rel), "not a file or folder"))
            continue
        label = known.get(entry.name.lower())
        files, problems = walk_class_folder(entry, roots)
        rejected.extend(Rejection(str(p.relative_to(data_dir)), reason, label or "") for p, reason in problems)
        if label is None:
            reason = f"unknown class folder '{entry.name}'; known classes: {', '.join(CLASS_NAMES)}"
            rejected.extend(Rejection(str(p.relative_to(data_dir)), reason) for p in files)
            if not files and not problems:
                rejected.append(Rejection(str(rel), reason))
            continue
        if not files and not problems:
            rejected.append(Rejection(str(rel), "empty class folder", label=label))
            continue
        for path in files:
            prel = str(path.relative_to(data_dir))
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                rejected.append(Rejection(prel, f"unsupported file type '{path.suffix}'", label))
                continue
            found.append((path, label))
    return found, rejected


def split_of(sha256: str, test_fraction: float, val_fraction: float) -> str:
    """The split an image belongs to, from its content hash alone."""
    u = int(sha256[:16], 16) / float(1 << 64)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_fractions(settings: Settings, source: str) -> tuple[float, float]:
    """(test, validation) fractions of an image from ``source``: a lab's reviewed images keep a
    larger share out of training while they are few (they measure and calibrate the model on that
    lab's cells); fixed, so that an image never changes split as the reviews grow."""
    if source == SOURCE_REVIEW:
        return settings.reviewed_test_fraction, settings.reviewed_val_fraction
    return settings.test_fraction, settings.val_fraction


def _hash_position(sha256: str) -> int:
    return int(sha256[:16], 16)


def _inspect(path: Path, *, max_pixels: int, min_side: int) -> tuple[str, Any]:
    try:
        return "ok", inspect_image(path, max_pixels=max_pixels, min_side=min_side)
    except ImageError as exc:
        return "rejected", exc.reason


def load_ledger(work_dir: Path) -> dict[str, str]:
    """Splits earlier runs assigned, by content hash."""
    path = work_dir / LEDGER_FILE
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str)
    return dict(zip(table["sha256"], table["split"], strict=True))


def save_ledger(work_dir: Path, ledger: dict[str, str]) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(sorted(ledger.items()), columns=["sha256", "split"])
    tmp = work_dir / f".{LEDGER_FILE}.tmp-{os.getpid()}"
    table.to_csv(tmp, index=False)
    os.replace(tmp, work_dir / LEDGER_FILE)


def _ensure_test_and_train(manifest: pd.DataFrame, ledger: dict[str, str]) -> list[str]:
    """Give each class of two or more images a test image and a training image.

    A hash threshold leaves tiny classes (4 blasts) with no test image about 40 % of the time.
    The image moved is the one nearest the threshold; the move is recorded in the ledger so it
    holds in later runs (images already in the ledger are never moved).
    """
    notes = []
    for label, group in manifest.groupby("class"):
        if len(group) < 2:
            continue
        order = group.assign(pos=group["sha256"].map(_hash_position)).sort_values("pos")
        if not (group["split"] == "test").any():
            movable = order[~order["sha256"].isin(ledger)]
            if len(movable):
                idx = movable.index[0]
                manifest.loc[idx, "split"] = "test"
                notes.append(f"{label}: no test image by hash; moved {manifest.loc[idx, 'path']} to test")
        if not manifest.loc[group.index, "split"].isin(["train", "val"]).any():
            movable = order[~order["sha256"].isin(ledger)]
            if len(movable):
                idx = movable.index[-1]
                manifest.loc[idx, "split"] = "train"
                notes.append(f"{label}: every image fell in test; moved {manifest.loc[idx, 'path']} to train")
    return notes


def split_dataset(data_dir: Path, out_dir: Path, settings: Settings, extra: Sequence[ExtraImage] = ()) -> dict:
    """Validate, de-duplicate and split ``data_dir`` and the ``extra`` images; write the manifest
    and rejections.

    Returns a small summary (counts per class and split, rejections, file locations; with
    ``extra``, their counts per split under ``extra``).
    """
    candidates, rejected = find_labelled_images(data_dir, settings)
    data_dir = data_dir.resolve()
    log.info("found %d candidate images, %d entries rejected while listing", len(candidates), len(rejected))
    sources = [SOURCE_LABELLED] * len(candidates)
    for image in extra:
        if image.label not in CLASS_NAMES:
            rejected.append(Rejection(str(image.path), f"unknown class '{image.label}'", source=image.source))
            continue
        candidates.append((Path(image.path), image.label))
        sources.append(image.source)
    table = _inspected_images(candidates, sources, data_dir, settings, rejected)
    manifest = _drop_unusable_copies(table, rejected)

    ledger = load_ledger(settings.work_dir)
    manifest["split"] = [
        ledger.get(sha, split_of(sha, *split_fractions(settings, source)))
        for sha, source in zip(manifest["sha256"], manifest["source"], strict=True)
    ]
    notes = _ensure_test_and_train(manifest, ledger)
    # Log lines name files by pseudonym when WBC_PSEUDONYMISE_NAMES is on (the files written
    # here keep the real paths: they stay in the work folder).
    names = pseudonymiser(settings, data_dir)
    known = names.known([*table["path"], *(r.path for r in rejected)])
    for note in notes:
        log.warning("split fallback: %s", names.text(note, known))
    classes_present = sorted(manifest["class"].unique())
    if len(classes_present) < 2:
        raise DatasetError(
            f"{data_dir}: training needs images in at least two classes; found "
            f"{len(classes_present)} ({', '.join(classes_present) or 'none'}) after "
            f"{len(rejected)} rejections (see the log)"
        )
    ledger.update(zip(manifest["sha256"], manifest["split"], strict=True))
    save_ledger(settings.work_dir, ledger)

    manifest = manifest[MANIFEST_COLUMNS].sort_values(["source", "class", "path"]).reset_index(drop=True)
    manifest.to_csv(out_dir / MANIFEST_FILE, index=False)
    rejected_table = pd.DataFrame([r.as_row() for r in rejected], columns=REJECTED_COLUMNS)
    rejected_table.to_csv(out_dir / REJECTED_FILE, index=False)
    counts = {
        split: {c: int(n) for c, n in manifest[manifest["split"] == split]["class"].value_counts().sort_index().items()}
        for split in SPLITS
    }
    for row in rejected_table.to_dict("records"):
        log.warning("rejected %s: %s", names.path(row["path"]), names.text(row["reason"], known))
    for split in SPLITS:
        log.info("%s: %d images %s", split, sum(counts[split].values()), counts[split])
    summary = {
        "data_dir": str(data_dir),
        "manifest": str(out_dir / MANIFEST_FILE),
        "rejected_file": str(out_dir / REJECTED_FILE),
        "images": int(len(manifest)),
        "rejected": int(len(rejected_table)),
        "classes": classes_present,
        "counts": counts,
        "split_fallbacks": notes,
    }
    if extra:
        summary["extra"] = _extra_summary(manifest, extra, rejected)
    write_json_atomic(out_dir / "class_counts.json", counts)
    return summary


def _inspected_images(
    candidates: list[tuple[Path, str]],
    sources: list[str],
    data_dir: Path,
    settings: Settings,
    rejected: list[Rejection],
) -> pd.DataFrame:
    """Each candidate's header read (in worker processes): the usable ones as a table (path,
    class, sha256, size, source); the others appended to ``rejected`` with the reason."""
    check = partial(_inspect, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    results = parallel_map(check, [p for p, _ in candidates], workers=settings.worker_count())
    rows = []
    for (path, label), source, (status, value) in zip(candidates, sources, results, strict=True):
        # Extra images keep their absolute path: the preprocess step's data_dir / path is then that path.
        rel = str(path.relative_to(data_dir)) if source == SOURCE_LABELLED else str(path)
        if status == "rejected":
            rejected.append(Rejection(rel, str(value), label, source=source))
            continue
        size = {"width": value.width, "height": value.height}
        rows.append({"path": rel, "class": label, "sha256": value.sha256, **size, "source": source})
    return pd.DataFrame(rows, columns=["path", "class", "sha256", "width", "height", "source"])


def _drop_unusable_copies(table: pd.DataFrame, rejected: list[Rejection]) -> pd.DataFrame:
    """The table without second copies of an image, each appended to ``rejected`` with why."""
    # A reviewed image also in the labelled folder: the curated label stands, the review is noted.
    labelled = table[table["source"] == SOURCE_LABELLED].drop_duplicates("sha256").set_index("sha256")
    repeated = (table["source"] != SOURCE_LABELLED) & table["sha256"].isin(labelled.index)
    for row in table[repeated].to_dict("records"):
        first = labelled.loc[row["sha256"]]
        reason = f"already in the labelled folder as {first['path']} ({first['class']}); the labelled folder wins"
        rejected.append(Rejection(row["path"], reason, row["class"], row["sha256"], row["source"]))
    table = table[~repeated]

    # One image under two classes: nobody knows which label is right, so neither copy is used.
    labels_per_hash = table.groupby("sha256")["class"].nunique()
    conflicted = set(labels_per_hash[labels_per_hash > 1].index)
    for row in table[table["sha256"].isin(conflicted)].to_dict("records"):
        classes = sorted(table.loc[table["sha256"] == row["sha256"], "class"].unique())
        reason = f"label conflict: the same image is filed under {', '.join(classes)}"
        rejected.append(Rejection(row["path"], reason, row["class"], row["sha256"]))
    table = table[~table["sha256"].isin(conflicted)]
    # Exact duplicates within a class: keep the first path, record the others.
    dupes = table.duplicated("sha256", keep="first")
    first_path = table.drop_duplicates("sha256").set_index("sha256")["path"]
    for row in table[dupes].to_dict("records"):
        reason = f"duplicate of {first_path[row['sha256']]}"
        rejected.append(Rejection(row["path"], reason, row["class"], row["sha256"]))
    return table[~dupes].reset_index(drop=True)


def _extra_summary(manifest: pd.DataFrame, extra: Sequence[ExtraImage], rejected: list[Rejection]) -> dict:
    """How many of the ``extra`` images were offered, added (per split) and left out (why)."""
    added = manifest[manifest["source"] != SOURCE_LABELLED]
    return {
        "offered": len(extra),
        "added": int(len(added)),
        "per_split": {split: int((added["split"] == split).sum()) for split in SPLITS},
        "left_out": [r.as_row() for r in rejected if r.source != SOURCE_LABELLED],
    }


def read_manifest(split_dir: Path) -> pd.DataFrame:
    """The manifest a split step wrote (one written before ``source`` existed reads as labelled)."""
    manifest = pd.read_csv(split_dir / MANIFEST_FILE, dtype={"sha256": str}, keep_default_na=False)
    if "source" not in manifest.columns:
        manifest["source"] = SOURCE_LABELLED
    return manifest


def split_table(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The manifest rows a split's store is built from: train and val take every source, the
    headline test split only labelled images (:func:`headline_test`)."""
    if split == "test":
        return headline_test(manifest)
    return manifest[manifest["split"] == split].reset_index(drop=True)


def headline_test(manifest: pd.DataFrame) -> pd.DataFrame:
    """The labelled test images: the ones a model's headline metrics and the champion
    comparison use, unchanged by reviews."""
    source = manifest["source"] if "source" in manifest.columns else SOURCE_LABELLED
    return manifest[(manifest["split"] == "test") & (source == SOURCE_LABELLED)].reset_index(drop=True)


def reviewed_test(manifest: pd.DataFrame) -> pd.DataFrame:
    """The reviewed images that fell in the test split (their metrics are reported apart)."""
    if "source" not in manifest.columns:
        return manifest.iloc[0:0]
    return manifest[(manifest["split"] == "test") & (manifest["source"] != SOURCE_LABELLED)].reset_index(drop=True)
