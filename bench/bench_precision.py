"""Training and inference speed of VGG16 per dtype policy on this machine, side by side.

    .venv/bin/python bench/bench_precision.py [--image-size 64] [--images 160] [--batch-size 32]
        [--repeats 2] [--policies float32,mixed_bfloat16]
    .venv/bin/python bench/bench_precision.py --policies mixed_bfloat16,mixed_bfloat16+ema   # weight averaging's cost

Builds the project's model (``wbc_tasks.training.model.build_model``, from scratch) once per
policy and times, in turns so that a busy moment hits every policy alike: one training epoch over
``--images`` random images (speed does not depend on the pixels) after a warm-up epoch, and
``predict`` over the same images. Reports images/s (best of ``--repeats``) and the ratio to
float32, with the CPU's bfloat16 support (AVX512_BF16 / AMX), which decides whether
``mixed_bfloat16`` is native or emulated. Answers: may ``precision=auto`` pick bfloat16 here?
A policy written ``POLICY+ema`` trains with the optimizer's weight average on
(``weight_averaging=ema``), for its cost beside the same policy without.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _build(variant: str, image_size: int):
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.training.model import build_model
    from wbc_tasks.training.precision import compile_model

    policy, _, extra = variant.partition("+")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = build_model(image_size, len(CLASS_NAMES), weights="none", settings=get_settings())
    finally:
        keras.mixed_precision.set_global_policy(previous)
    compile_model(model, 1e-4, policy=policy, xla=False, average_weights=extra == "ema")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.training.precision import cpu_has_bfloat16

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rng = np.random.default_rng(0)
    size = args.image_size
    x = rng.integers(0, 256, (args.images, size, size, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(args.images) % len(CLASS_NAMES), len(CLASS_NAMES))
    models = {p: _build(p, size) for p in policies}
    for model in models.values():  # warm-up: tracing and first-call costs out of the timings
        model.fit(x[: args.batch_size * 2], y[: args.batch_size * 2], batch_size=args.batch_size, verbose=0)
        model.predict(x[: args.batch_size], verbose=0)
    train: dict[str, list[float]] = {p: [] for p in policies}
    infer: dict[str, list[float]] = {p: [] for p in policies}
    for repeat in range(args.repeats):
        for policy, model in models.items():
            started = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
            train[policy].append(args.images / (time.perf_counter() - started))
            started = time.perf_counter()
            model.predict(x, batch_size=args.batch_size, verbose=0)
            infer[policy].append(args.images / (time.perf_counter() - started))
            print(
                f"repeat {repeat + 1}: {policy} train {train[policy][-1]:.1f}, "
                f"predict {infer[policy][-1]:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )

    base_train, base_infer = max(train[policies[0]]), max(infer[policies[0]])
    native = "native (AVX512_BF16/AMX)" if cpu_has_bfloat16() else "not native (no AVX512_BF16/AMX)"
    print(
        f"{_cpu()}, bfloat16 {native}; "
        f"{size} px, {args.images} images, batch {args.batch_size}, best of {args.repeats}\n"
    )
    print(f"| policy | training images/s | vs {policies[0]} | predict images/s | vs {policies[0]} |")
    print("|---|---|---|---|---|")
    for policy in policies:
        t, i = max(train[policy]), max(infer[policy])
        print(f"| {policy} | {t:.1f} | {t / base_train:.2f}x | {i:.1f} | {i / base_infer:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
