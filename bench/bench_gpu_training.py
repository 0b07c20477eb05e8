"""Training and inference throughput at 256 px on a GPU: fp32 against mixed precision, share of peak.

    .venv/bin/python bench/bench_gpu_training.py [--size 256] [--batch-size 32] [--steps 30]
        [--modes fp32 fp32+xla mixed mixed+xla bf16 bf16+xla] [--peak-tflops N]
        [--inference-images 256] [--json FILE]

Meant for a GPU worker (install with ``uv sync --extra gpu``); it also runs on a CPU, slowly, with
``--size 64 --steps 5`` as a smoke test (fp32 and bf16 modes only: a CPU emulates float16).
It runs on whichever Keras 3 backend ``KERAS_BACKEND`` names: ``tensorflow`` (the product's, and
the default) or ``jax`` / ``torch`` (the same Keras model and training step, for a GPU machine
where TensorFlow's CUDA build cannot be installed). Under ``jax`` every step is XLA-compiled, so
only the ``+xla`` modes run; under ``torch`` ``+xla`` means ``torch.compile``.

Training: builds the production model (``wbc_tasks.training.model``: VGG16 from scratch,
``weights=none``, every layer trainable, which costs what fine-tuning all layers costs) and
trains it on one batch of random uint8 images held on the device, so the number is the model's
speed, not the input pipeline's (``bench_training_input.py`` measures that). Each mode compiles
the way ``wbc_tasks.training.train`` does (mixed: ``mixed_float16`` policy with a loss-scale
optimizer; bf16: ``mixed_bfloat16``, no loss scaling, the policy the CPU profile trains in;
XLA: ``jit_compile=True``).

Inference (``--inference-images``, 0 to skip): the same model per precision, ``predict_on_batch``
over batches of ``--batch-size`` against one image at a time, both from images already decoded
and on the host (``bench_inference.py`` times the nightly task's decoding too, with TensorFlow).

FLOPs: counted from the model's own layers (2 x multiply-adds of every conv and dense layer;
VGG16 at 256 x 256 is about 20 G multiply-adds, 40 GFLOP, forward;
vendors' peak figures count a fused multiply-add as 2 FLOPs too), and a training step as 3x the forward pass. The
share of peak uses ``--peak-tflops`` or, for known GPUs, the vendor's dense peak for the mode's
arithmetic (fp32 modes: TF32 tensor cores, which TensorFlow uses for fp32 matmuls/convolutions
on Ampere and later; mixed and bf16 modes: FP16/BF16 tensor cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Dense (no sparsity) peak TFLOP/s by device-name fragment: (TF32 tensor, FP16/BF16 tensor), vendor data sheets.
PEAK_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100 80GB HBM3": (494.7, 989.4),  # SXM
    "H100 PCIe": (378.0, 756.0),
    "H100 NVL": (417.5, 835.0),
    "H100": (494.7, 989.4),
    "A100": (156.0, 312.0),
    "L40S": (183.0, 362.0),
    "L4": (60.0, 121.0),
    "A10": (62.5, 125.0),
}

MODES = ("fp32", "fp32+xla", "mixed", "mixed+xla", "bf16", "bf16+xla")
#: Keras dtype policy per precision (the part of a mode before ``+xla``).
POLICIES = {"fp32": "float32", "mixed": "mixed_float16", "bf16": "mixed_bfloat16"}


def forward_flops(model) -> float:
    """2 x multiply-adds of the conv and dense layers, per image."""
    import keras

    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2.0 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


def accelerator() -> str | None:
    """The GPU's name as the running backend sees it, or None on a CPU."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform == "gpu" else None
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return None


def device_peak(mode: str, name: str | None, override: float | None) -> float | None:
    if override or not name:
        return override
    for fragment, (tf32, half) in PEAK_TFLOPS.items():
        if fragment in name:
            return tf32 if mode.startswith("fp32") else half
    return None


@contextmanager
def _policy(precision: str) -> Iterator[None]:
    """Keras' global dtype policy for ``precision`` inside, then the previous one and a fresh session."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
        keras.backend.clear_session()


def _build(size: int, seed: int):
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.training.model import build_model

    keras.utils.set_random_seed(seed)
    return build_model(size, len(CLASS_NAMES), weights="none", settings=get_settings())


def run_mode(mode: str, size: int, batch: int, steps: int, seed: int) -> tuple[float, float]:
    """(images/s over ``steps`` timed steps after warm-up, forward GFLOP per image)."""
    import keras

    from wbc_tasks.core.vocabulary import CLASS_NAMES

    precision, xla = mode.split("+")[0], mode.endswith("+xla")
    with _policy(precision):
        model = _build(size, seed)
        optimizer = keras.optimizers.Adam(1e-4)
        if precision == "mixed":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", jit_compile=xla)
        rng = np.random.default_rng(seed)
        # On the device once: the number is the model's speed, not a host-to-device copy per step.
        x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
        y = keras.ops.one_hot(keras.ops.convert_to_tensor(rng.integers(0, len(CLASS_NAMES), batch)), len(CLASS_NAMES))
        for _ in range(3):  # trace/compile, autotune
            model.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss).ravel()[0])  # wait for the device
        elapsed = time.perf_counter() - start
        return steps * batch / elapsed, forward_flops(model) / 1e9


def run_inference(precision: str, size: int, batch: int, n_images: int, seed: int) -> tuple[float, float]:
    """(batched images/s, one-at-a-time images/s) of ``predict_on_batch`` on host arrays."""

    with _policy(precision):
        model = _build(size, seed)
        x = np.random.default_rng(seed).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
        batches = [x[i : i + batch] for i in range(0, n_images - batch + 1, batch)]  # one shape: one trace
        singles = [x[i : i + 1] for i in range(min(n_images, 4 * batch))]
        model.predict_on_batch(batches[0])  # trace each shape untimed
        model.predict_on_batch(singles[0])

        def timed(chunks: list) -> float:
            start = time.perf_counter()
            for chunk in chunks:
                np.asarray(model.predict_on_batch(chunk))  # back on the host, as the task needs it
            return sum(len(c) for c in chunks) / (time.perf_counter() - start)

        return timed(batches), timed(singles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, when not in the table")
    parser.add_argument("--inference-images", type=int, default=256, help="0 skips the inference table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    backend = keras.config.backend()
    name = accelerator()
    modes = args.modes
    if backend == "jax":
        modes = [m for m in modes if m.endswith("+xla")]
        print("# jax: every step is XLA-compiled, so only the +xla modes run", flush=True)
    if name is None:
        # float16 is emulated on CPUs (one 64 px step took minutes here): not worth measuring.
        modes = [m for m in modes if not m.startswith("mixed")]
        print("# no GPU: float16 modes skipped", flush=True)
    device = name or f"CPU ({os.cpu_count()} cores)"
    rows = []
    for mode in modes:
        speed, gflop = run_mode(mode, args.size, args.batch_size, args.steps, args.seed)
        peak = device_peak(mode, name, args.peak_tflops)
        achieved = speed * 3 * gflop / 1e3  # TFLOP/s: a training step ~ 3x the forward pass
        rows.append({"mode": mode, "images_per_s": speed, "gflop": gflop, "tflops": achieved, "peak": peak})
        print(f"# {mode}: {speed:.1f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    print(
        f"\n{device}; Keras {keras.__version__} on {backend}; VGG16 + head at {args.size} px, batch "
        f"{args.batch_size}, {args.steps} timed steps; forward {rows[0]['gflop']:.1f} GFLOP/image, "
        "a training step counted as 3x\n"
    )
    print("| mode | training images/s | vs first | achieved TFLOP/s | peak TFLOP/s (dense) | share of peak |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        share = f"{row['tflops'] / row['peak']:.0%}" if row["peak"] else "-"
        print(
            f"| {row['mode']} | {row['images_per_s']:.1f} | {row['images_per_s'] / base:.2f}x | "
            f"{row['tflops']:.1f} | {row['peak'] or '-'} | {share} |"
        )
    inference = []
    if args.inference_images:
        precisions = dict.fromkeys(m.split("+")[0] for m in modes)
        print(f"\nInference, {args.inference_images} images on the host, predict_on_batch:\n")
        print(f"| precision | batched ({args.batch_size}) images/s | one at a time images/s | ratio |")
        print("|---|---|---|---|")
        for precision in precisions:
            batched, single = run_inference(precision, args.size, args.batch_size, args.inference_images, args.seed)
            inference.append({"precision": precision, "batched": batched, "one_at_a_time": single})
            print(f"| {precision} | {batched:.1f} | {single:.1f} | {batched / single:.1f}x |", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "backend": backend,
                    "keras": keras.__version__,
                    "size": args.size,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "training": rows,
                    "inference": inference,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
