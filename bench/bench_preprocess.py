"""Preprocessing throughput: decode + resize with every core, against a one-image-at-a-time loop.

    .venv/bin/python bench/bench_preprocess.py [--size 256] [--limit 2650]

Both read the same files of ../shared/data/wbc-bench. The baseline is the notebook's way: a plain
Python loop, Pillow open -> RGB -> resize, one image after another, into a list.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_tasks.core.parallel import parallel_map  # noqa: E402
from wbc_tasks.core.settings import get_settings  # noqa: E402
from wbc_tasks.data.images import load_image  # noqa: E402

BENCH = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"


def baseline(paths: list[Path], size: int) -> float:
    start = time.perf_counter()
    out = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    assert len(out) == len(paths)
    return time.perf_counter() - start


def ours(paths: list[Path], size: int, workers: int) -> float:
    settings = get_settings()
    load = partial(load_image, size=size, max_pixels=settings.max_image_pixels)
    target = Path(tempfile.mkdtemp()) / "images.npy"
    store = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    start = time.perf_counter()
    for i, array in enumerate(parallel_map(load, [str(p) for p in paths], workers=workers, chunksize=16)):
        store[i] = array
    store.flush()
    elapsed = time.perf_counter() - start
    del store
    target.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=2650)
    args = parser.parse_args()
    if not BENCH.is_dir():
        raise SystemExit(f"{BENCH} not found: the benchmark needs ../shared/data/wbc-bench")
    paths = sorted(BENCH.rglob("*.jpg"))[: args.limit]
    cores = os.cpu_count() or 1
    # Warm the page cache so both read files from memory.
    for p in paths:
        p.read_bytes()
    t_base = baseline(paths, args.size)
    t_one = ours(paths, args.size, 1)
    t_all = ours(paths, args.size, cores)
    n = len(paths)
    print(f"{n} images of wbc-bench at {args.size} px, {cores} cores")
    print("| method | images/s | vs baseline |")
    print("|---|---|---|")
    for name, t in [
        ("baseline: one-at-a-time Pillow loop", t_base),
        ("load_image, 1 process", t_one),
        (f"load_image, {cores} processes (preprocess step)", t_all),
    ]:
        print(f"| {name} | {n / t:.0f} | {t_base / t:.2f}x |")


if __name__ == "__main__":
    main()
