"""Training input: does the tf.data pipeline keep VGG16 fed? Against ``fit`` on preloaded arrays.

    .venv/bin/python bench/bench_training_input.py [--size 64] [--images 512] [--epochs 3] [--repeats 2]

Builds one uint8 store (``wbc_tasks.data.store``) of ``--images`` wbc-bench images at ``--size`` px,
then trains the same VGG16 (from scratch, same seed) in alternating order, ``--repeats`` times:

- ``pipeline``: ``model.fit`` on ``wbc_tasks.training.input.make_dataset`` (the training step's input:
  batches read from the memory map by ``tf.numpy_function``, shuffled per epoch, random flips);
- ``pipeline, no flips``: the same without the flip augmentation;
- ``preloaded``: ``model.fit(x, y)`` on the whole store already in memory as arrays (the
  upper bound: no input work at all during training).

Reports training images/s per epoch (the first epoch, which traces the graph, is left out),
the ratio to ``preloaded``, and the input pipeline alone (iterated without a model) in images/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_tasks.core.parallel import parallel_map  # noqa: E402
from wbc_tasks.core.settings import get_settings  # noqa: E402
from wbc_tasks.core.vocabulary import CLASS_NAMES  # noqa: E402
from wbc_tasks.data.images import load_image  # noqa: E402
from wbc_tasks.data.store import create_store, finish_store, open_store  # noqa: E402

BENCH = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"
BATCH = 32


def build_store(folder: Path, size: int, n_images: int, seed: int) -> Path:
    """A store of ``n_images`` wbc-bench images (a seeded sample over all classes)."""
    settings = get_settings()
    paths = sorted(BENCH.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), size=min(n_images, len(paths)), replace=False))]
    labels = np.array([CLASS_NAMES.index(p.parent.name) for p in chosen], dtype=np.int16)
    images = create_store(folder, len(chosen), size)
    load = partial(load_image, size=size, max_pixels=settings.max_image_pixels)
    for i, array in enumerate(parallel_map(load, [str(p) for p in chosen], workers=os.cpu_count() or 1)):
        images[i] = array
    finish_store(folder, images, labels, pd.DataFrame({"path": [str(p) for p in chosen]}))
    return folder


def timed_fit(method: str, store_path: Path, size: int, epochs: int, seed: int) -> list[float]:
    """Train a fresh model for ``epochs`` epochs; images/s of each epoch."""
    import keras

    from wbc_tasks.training.input import make_dataset
    from wbc_tasks.training.model import build_model

    store = open_store(store_path)
    n = len(store)
    keras.utils.set_random_seed(seed)
    model = build_model(size, len(CLASS_NAMES), weights="none", settings=get_settings())
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"])

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    if method == "preloaded":
        x = np.array(store.images)  # a real in-memory copy, not the memory map
        y = keras.utils.to_categorical(store.labels, len(CLASS_NAMES))
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0, callbacks=[Clock()])
    else:
        data = make_dataset(
            store, BATCH, len(CLASS_NAMES), shuffle=True, seed=seed, flip_augment=(method == "pipeline")
        )
        model.fit(data, epochs=epochs, shuffle=False, verbose=0, callbacks=[Clock()])
    return [n / t for t in times]


def pipeline_alone(store_path: Path, seed: int) -> float:
    """Images/s of iterating the input pipeline with no model (what it can deliver)."""
    from wbc_tasks.training.input import make_dataset

    store = open_store(store_path)
    data = make_dataset(store, BATCH, len(CLASS_NAMES), shuffle=True, seed=seed, flip_augment=True)
    for _ in data:  # warm-up epoch
        pass
    start = time.perf_counter()
    count = sum(int(batch.shape[0]) for batch, _ in data)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="per fit; the first is left out")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if not BENCH.is_dir():
        raise SystemExit(f"{BENCH} not found: the benchmark needs ../shared/data/wbc-bench")
    with tempfile.TemporaryDirectory() as tmp:
        store_path = build_store(Path(tmp) / "store", args.size, args.images, args.seed)
        methods = ["pipeline", "preloaded", "pipeline, no flips"]
        speeds: dict[str, list[float]] = {m: [] for m in methods}
        for repeat in range(args.repeats):
            for method in methods if repeat % 2 == 0 else list(reversed(methods)):
                per_epoch = timed_fit(method, store_path, args.size, args.epochs, args.seed)
                print(
                    f"repeat {repeat} {method}: " + ", ".join(f"{s:.1f}" for s in per_epoch) + " images/s", flush=True
                )
                speeds[method].extend(per_epoch[1:])
        alone = pipeline_alone(store_path, args.seed)
    base = statistics.median(speeds["preloaded"])
    print(
        f"\n{args.images} wbc-bench images at {args.size} px, batch {BATCH}, VGG16 from scratch, "
        f"{os.cpu_count()} cores; median of {args.repeats} x {args.epochs - 1} epochs "
        "(first epoch of each fit left out)"
    )
    best = max(speeds["preloaded"])
    # Per-epoch speed here jumps between two levels whatever the input, so the best epoch is
    # shown beside the median: slowdowns are noise, speed-ups are not.
    print("| input | training images/s (median) | min-max | median vs preloaded | best vs preloaded best |")
    print("|---|---|---|---|---|")
    for method in ["preloaded", "pipeline", "pipeline, no flips"]:
        s = speeds[method]
        print(
            f"| {method} | {statistics.median(s):.1f} | {min(s):.1f}-{max(s):.1f} | "
            f"{statistics.median(s) / base:.2f}x | {max(s) / best:.2f}x |"
        )
    print(f"| input pipeline alone (no model) | {alone:.0f} | | {alone / base:.0f}x |")


if __name__ == "__main__":
    main()
