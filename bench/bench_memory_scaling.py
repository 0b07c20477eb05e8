"""How the data stages' peak memory grows with the training set: 2,650 -> 5,000 -> 10,000 images.

    .venv/bin/python bench/bench_memory_scaling.py [--levels 2650 5000 10000] [--size 256] [--k 5]
        [--cap-gb 16] [--workers 0] [--no-baseline]

wbc-bench has 2,650 labelled images; larger training sets are built the way a lab's archive grows,
with its class proportions kept (neutrophils 600 : ... : blasts 150 of 2,650):

1. split and preprocess the 2,650 originals (once; they do not depend on the level);
2. per level N: the pipeline's augment step with ``per_class`` = the largest class's share of N
   (every class topped up to it), then a seeded subset with wbc-bench's proportions, N images in
   all: an imbalanced training set of N images at 256 px;
3. the pipeline's SMOTE step on it (every class brought up to the largest: about 2.04 N images).

Every stage runs in its own child process (``bench_data_stages.py``'s stage runner), sampled
every 50 ms over the child and its workers: peak RSS (all resident memory, memory-mapped store
pages included) and peak anonymous memory (heap and arrays). A level's pipeline peak is the
largest of its stages (each is its own Airflow task). Baseline, same run: the original notebook's
method (every image as float64, flattened, one ``SMOTE().fit_resample``) on the smallest level's
set, under an address-space cap so it fails with MemoryError rather than taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_data_stages as stages  # noqa: E402

from wbc_tasks.core.settings import CLASS_NAMES  # noqa: E402

GB = stages.GB
#: wbc-bench's labelled images per class (../shared/data/README.md): the proportions kept.
BENCH_COUNTS = {
    "bands": 250,
    "basophils": 150,
    "blasts": 150,
    "eosinophils": 300,
    "lymphocytes": 500,
    "metamyelocytes": 200,
    "monocytes": 300,
    "myelocytes": 200,
    "neutrophils": 600,
}


def class_targets(level: int) -> dict[int, int]:
    """Images per class index for a training set of ``level`` images with wbc-bench's proportions."""
    total = sum(BENCH_COUNTS.values())
    targets = {CLASS_NAMES.index(c): int(round(level * n / total)) for c, n in BENCH_COUNTS.items()}
    return targets


def proportional_subset(source: Path, target: Path, level: int, seed: int) -> int:
    """A store of ``level`` rows of ``source`` with wbc-bench's class proportions (streamed)."""
    import pandas as pd

    from wbc_tasks.data.store import create_store, finish_store, open_store, release_pages

    store = open_store(source)
    rng = np.random.default_rng(seed)
    rows = []
    for cls, want in class_targets(level).items():
        have = np.flatnonzero(store.labels == cls)
        if len(have) < want:
            raise SystemExit(f"class {CLASS_NAMES[cls]}: {len(have)} augmented images, {want} wanted")
        rows.append(rng.choice(have, size=want, replace=False))
    picked = np.sort(np.concatenate(rows))
    images = create_store(target, len(picked), store.image_size)
    for i in range(0, len(picked), 64):
        images[i : i + 64] = store.images[picked[i : i + 64]]
        release_pages(images, store.images)
    records = store.records.iloc[picked].reset_index(drop=True)
    records = records.assign(parent_rows="") if "parent_rows" in records else records
    finish_store(target, images, store.labels[picked], pd.DataFrame(records))
    return len(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[2650, 5000, 10000])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    import psutil

    if not stages.BENCH.is_dir():
        raise SystemExit(f"{stages.BENCH} not found: the benchmark needs ../shared/data/wbc-bench")
    workers = args.workers or os.cpu_count() or 1
    cap = int(min(args.cap_gb * GB, psutil.virtual_memory().available - 3 * GB))
    work = Path(tempfile.mkdtemp(prefix="wbc-bench-scaling-"))
    run = work / "runs" / "bench"
    rows: list[tuple[int | str, str, dict]] = []

    def stage(level, label: str, extra: list[str], per_class: int = 0, cap_b: int | None = None) -> dict:
        argv = [
            "--work",
            str(work),
            "--size",
            str(args.size),
            "--per-class",
            str(per_class),
            "--k",
            str(args.k),
            "--seed",
            str(args.seed),
            "--workers",
            str(workers),
            *extra,
        ]
        result = stages.measure(argv, cap_b)
        rows.append((level, label, result))
        print(f"# {level} / {label}: {json.dumps(result)}", file=sys.stderr, flush=True)
        if not label.startswith("notebook") and result.get("rc") != 0:
            raise SystemExit(f"{label} failed: {result}")
        return result

    try:
        stage("all", "split (2,650 originals)", ["--stage", "split"])
        stage("all", "preprocess (2,650 originals)", ["--stage", "preprocess"])
        train = run / "preprocess" / "train"
        largest = max(BENCH_COUNTS.values()) / sum(BENCH_COUNTS.values())
        for index, level in enumerate(args.levels):
            aug, subset, out = work / f"aug{level}", work / f"set{level}", work / f"smote{level}"
            per_class = math.ceil(level * largest) + 1
            stage(level, "augment", ["--stage", "augment", "--input", str(train), "--output", str(aug)], per_class)
            n = proportional_subset(aug, subset, level, args.seed)
            shutil.rmtree(aug)
            print(f"# level {level}: training set of {n} images", file=sys.stderr, flush=True)
            stage(level, "SMOTE", ["--stage", "smote", "--input", str(subset), "--output", str(out)])
            shutil.rmtree(out)
            if index == 0 and not args.no_baseline:
                stage(
                    level,
                    "notebook: float64 matrix + SMOTE().fit_resample",
                    ["--stage", "baseline", "--input", str(subset)],
                    cap_b=cap,
                )
            shutil.rmtree(subset)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"wbc-bench at {args.size} px, SMOTE k={args.k}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GB:.0f} GB RAM; baseline capped at {cap / GB:.1f} GB address space\n"
    )
    print("| training set | stage | images in -> out | stage s | peak RSS GB | peak anonymous GB | result |")
    print("|---|---|---|---|---|---|---|")
    for level, label, r in rows:
        io = f"{r.get('in', '')} -> {r.get('images', '')}" if "in" in r else str(r.get("images", ""))
        stage_s = f"{r['stage_s']:.1f}" if "stage_s" in r else "-"
        print(
            f"| {level} | {label} | {io} | {stage_s} | {r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | "
            f"{r.get('status', 'completed')} |"
        )
    shared = [r for level, _, r in rows if level == "all"]
    print("\n| training set | pipeline peak RSS GB | pipeline peak anonymous GB |")
    print("|---|---|---|")
    for level in args.levels:
        ours = shared + [r for lvl, label, r in rows if lvl == level and not label.startswith("notebook")]
        print(f"| {level} | {max(r['peak_rss_gb'] for r in ours):.2f} | {max(r['peak_anon_gb'] for r in ours):.2f} |")
    base = [r for _, label, r in rows if label.startswith("notebook")]
    if base:
        b = base[0]
        smallest = [r for lvl, label, r in rows if lvl == args.levels[0] and label == "SMOTE"][0]
        print(
            f"\nnotebook method on the {args.levels[0]}-image set: {b.get('status', 'completed')}, peak RSS "
            f"{b['peak_rss_gb']:.2f} GB, anonymous {b['peak_anon_gb']:.2f} GB (ours, SMOTE stage: "
            f"{smallest['peak_rss_gb']:.2f} / {smallest['peak_anon_gb']:.2f} GB; ratio of RSS "
            f"{b['peak_rss_gb'] / max(smallest['peak_rss_gb'], 1e-9):.1f}x)"
        )


if __name__ == "__main__":
    main()
