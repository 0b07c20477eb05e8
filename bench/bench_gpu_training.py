"""Training throughput at 256 px: fp32 against mixed precision (+ XLA), and the share of peak FLOP/s.

    .venv/bin/python bench/bench_gpu_training.py [--size 256] [--batch-size 32] [--steps 30]
        [--modes fp32 fp32+xla mixed mixed+xla] [--peak-tflops N]

Meant for a GPU worker (install with ``uv sync --extra gpu``); it also runs on a CPU, slowly, with
``--size 64 --steps 5`` as a smoke test (fp32 modes only: a CPU emulates float16).
Builds the production model (``wbc_tasks.training.model``: VGG16
from scratch, ``weights=none``, every layer trainable, which costs what fine-tuning all layers
costs) and trains it on one batch of random uint8 images held on the device, so the number is
the model's speed, not the input pipeline's (``bench_training_input.py`` measures that). Each
mode compiles the way ``wbc_tasks.training.train`` does (mixed precision: ``mixed_float16`` policy with
a loss-scale optimizer; XLA: ``jit_compile=True``).

FLOPs: counted from the model's own layers (2 x multiply-adds of every conv and dense layer;
VGG16 at 256 x 256 is about 20 G multiply-adds, 40 GFLOP, forward;
vendors' peak figures count a fused multiply-add as 2 FLOPs too), and a training step as 3x the forward pass. The
share of peak uses ``--peak-tflops`` or, for known GPUs, the vendor's dense peak for the mode's
arithmetic (fp32 modes: TF32 tensor cores, which TensorFlow uses for fp32 matmuls/convolutions
on Ampere and later; mixed modes: FP16 tensor cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Dense (no sparsity) peak TFLOP/s by device-name fragment: (TF32 tensor, FP16 tensor), vendor data sheets.
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


def device_peak(mode: str, override: float | None) -> tuple[str, float | None]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({os.cpu_count()} cores)", override
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    if override:
        return name, override
    for fragment, (tf32, fp16) in PEAK_TFLOPS.items():
        if fragment in name:
            return name, fp16 if mode.startswith("mixed") else tf32
    return name, None


def run_mode(mode: str, size: int, batch: int, steps: int, seed: int) -> tuple[float, float]:
    """(images/s over ``steps`` timed steps after warm-up, forward GFLOP per image)."""
    import keras
    import tensorflow as tf

    from wbc_tasks.core.settings import CLASS_NAMES, get_settings
    from wbc_tasks.training.model import build_model

    mixed, xla = mode.startswith("mixed"), mode.endswith("+xla")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        keras.utils.set_random_seed(seed)
        model = build_model(size, len(CLASS_NAMES), weights="none", settings=get_settings())
        optimizer = keras.optimizers.Adam(1e-4)
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", jit_compile=xla)
        rng = np.random.default_rng(seed)
        x = tf.constant(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
        y = tf.one_hot(rng.integers(0, len(CLASS_NAMES), batch), len(CLASS_NAMES))
        for _ in range(3):  # trace/compile, autotune
            model.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss).ravel()[0])  # wait for the device
        elapsed = time.perf_counter() - start
        return steps * batch / elapsed, forward_flops(model) / 1e9
    finally:
        keras.mixed_precision.set_global_policy(previous)
        keras.backend.clear_session()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["fp32", "fp32+xla", "mixed", "mixed+xla"],
        choices=["fp32", "fp32+xla", "mixed", "mixed+xla"],
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, when not in the table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tensorflow as tf

    modes = args.modes
    if not tf.config.list_physical_devices("GPU"):
        # float16 is emulated on CPUs (one 64 px step took minutes here): not worth measuring.
        modes = [m for m in modes if not m.startswith("mixed")]
        print("# no GPU: mixed precision modes skipped", flush=True)
    rows = []
    for mode in modes:
        speed, gflop = run_mode(mode, args.size, args.batch_size, args.steps, args.seed)
        device, peak = device_peak(mode, args.peak_tflops)
        achieved = speed * 3 * gflop / 1e3  # TFLOP/s: a training step ~ 3x the forward pass
        rows.append((mode, speed, gflop, achieved, peak))
        print(f"# {mode}: {speed:.1f} images/s", flush=True)
    base = rows[0][1]
    print(
        f"\n{device}; VGG16 + head at {args.size} px, batch {args.batch_size}, {args.steps} timed steps; "
        f"forward {rows[0][2]:.1f} GFLOP/image, a training step counted as 3x\n"
    )
    print("| mode | training images/s | vs fp32 | achieved TFLOP/s | peak TFLOP/s (dense) | share of peak |")
    print("|---|---|---|---|---|---|")
    for mode, speed, _, achieved, peak in rows:
        share = f"{achieved / peak:.0%}" if peak else "-"
        print(f"| {mode} | {speed:.1f} | {speed / base:.2f}x | {achieved:.1f} | {peak or '-'} | {share} |")


if __name__ == "__main__":
    main()
