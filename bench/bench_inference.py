"""Inference at 256 px: the classification task's decode + predict against plain Keras ``predict``.

    .venv/bin/python bench/bench_inference.py [--size 256] [--images 96] [--repeats 2] [--batch-size 32]

Reads the unlabelled drop ``../shared/data/wbc-bench/classify-images/2026-11-24``. One VGG16
(random weights: the cost of a forward pass does not depend on them) is saved as ``.keras`` and
loaded back, and that load is timed apart. Then, alternating order, ``--repeats`` times:

- ``plain predict``: the files already decoded into one array (decoding not timed), then
  ``model.predict(x, batch_size)``: the compute bound, the baseline;
- ``task``: ``wbc_tasks.serving.infer.predict_images`` on the files: hashing, decoding and resizing
  in a thread pool one batch ahead of the model, batches through ``predict_on_batch`` (what the
  nightly ``classify_chunk`` task runs between loading the model and writing rows);
- ``one at a time``: a loop decoding one file and predicting it alone (the notebook's way).

Each timed run follows an untimed batch of the same method (graph tracing for its batch
shape). Reports images/s and the ratio to ``plain predict``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_tasks.core.settings import get_settings  # noqa: E402
from wbc_tasks.core.vocabulary import CLASS_NAMES  # noqa: E402
from wbc_tasks.data.images import load_image  # noqa: E402
from wbc_tasks.registry.versions import ModelRef  # noqa: E402
from wbc_tasks.serving.infer import ServingModel, predict_images  # noqa: E402

DROP = REPO.parent / "shared" / "data" / "wbc-bench" / "classify-images" / "2026-11-24"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not DROP.is_dir():
        raise SystemExit(f"{DROP} not found: the benchmark needs ../shared/data/wbc-bench")
    import keras

    from wbc_tasks.training.model import build_model

    # The drop is read where it lies: allowed like a lab share mounted outside the classify folder.
    settings = get_settings().with_overrides(classify_batch_size=args.batch_size, allowed_roots=(DROP.resolve(),))
    paths = sorted(DROP.glob("*.jpg"))[: args.images]
    n = len(paths)
    for p in paths:
        p.read_bytes()  # page cache warm for every method

    with tempfile.TemporaryDirectory() as tmp:
        keras.utils.set_random_seed(0)
        model_file = Path(tmp) / "model.keras"
        build_model(args.size, len(CLASS_NAMES), weights="none", settings=settings).save(model_file)
        start = time.perf_counter()
        model = keras.models.load_model(model_file)
        load_s = time.perf_counter() - start

    ref = ModelRef(name="bench", version="1", run_id="", uri="", image_size=args.size, class_names=CLASS_NAMES)
    jobs = [(str(p), p, None) for p in paths]
    x = np.stack([load_image(p, args.size, max_pixels=settings.max_image_pixels) for p in paths])

    def plain(rows: slice = slice(None)) -> int:
        return len(model.predict(x[rows], batch_size=args.batch_size, verbose=0))

    def task(rows: slice = slice(None)) -> int:
        return sum(
            o.probabilities is not None for o in predict_images(settings, ServingModel(model, None), ref, jobs[rows])
        )

    def one_at_a_time(rows: slice = slice(None)) -> int:
        for p in paths[rows]:
            image = load_image(p, args.size, max_pixels=settings.max_image_pixels)
            model.predict_on_batch(image[None])
        return len(paths[rows])

    methods = {
        "plain predict (preloaded arrays)": plain,
        "task: predict_images (decode overlapped)": task,
        "one image at a time": one_at_a_time,
    }
    speeds: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for name in order:
            # Right before each timed run, one batch of the same shape, untimed: switching between
            # batch shapes makes TensorFlow retrace VGG16 (about 9 s here), which is not inference.
            methods[name](slice(0, args.batch_size))
            start = time.perf_counter()
            done = methods[name]()
            elapsed = time.perf_counter() - start
            assert done == n, f"{name} classified {done} of {n}"
            speeds[name].append(n / elapsed)
            print(f"repeat {repeat} {name}: {n / elapsed:.2f} images/s", flush=True)
    base = statistics.median(speeds["plain predict (preloaded arrays)"])
    print(
        f"\n{n} images of {DROP.relative_to(REPO.parent)} at {args.size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} cores, VGG16 (.keras) loaded in {load_s:.1f} s; median of {args.repeats}"
    )
    best = max(speeds["plain predict (preloaded arrays)"])
    # This machine's speed jumps between two levels from one run to the next whatever the method,
    # so the best run is shown beside the median: slowdowns are noise, speed-ups are not.
    print("| method | images/s (median) | best run | median vs plain median | best vs plain best |")
    print("|---|---|---|---|---|")
    for name, s in speeds.items():
        print(
            f"| {name} | {statistics.median(s):.2f} | {max(s):.2f} | {statistics.median(s) / base:.2f}x | "
            f"{max(s) / best:.2f}x |"
        )


if __name__ == "__main__":
    main()
