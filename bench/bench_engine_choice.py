"""Which CPU inference engine: Keras, ONNX Runtime and OpenVINO on the served outputs model at
256 px, model compute only (pre-loaded arrays), each at the precisions it offers on this CPU.

    .venv/bin/python bench/bench_engine_choice.py [--images 64] [--repeats 2] [--batch-size 32]

The model is the project's VGG16 with random weights (speed does not depend on them) wrapped as
serving wraps it (probabilities, logits and the two feature outputs). ONNX comes from Keras'
own ``model.export(format="onnx")`` (tf2onnx, a dev dependency); OpenVINO converts the Keras
model directly. ONNX Runtime's CPU provider has no bfloat16 path on x86; OpenVINO's does, and is
its default on CPUs with AVX512_BF16, so both hints are set explicitly. Each timed run follows an
untimed batch; methods alternate in order. Prints images/s (agreement is measured on a trained
model by ``bench/bench_engine.py``: random weights say nothing about it).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import keras
    import onnxruntime as ort

    from wbc_tasks.training.export import OpenVinoEngine, convert_to_openvino
    from wbc_tasks.training.model import build_model
    from wbc_tasks.training.outputs import outputs_model

    keras.utils.set_random_seed(0)
    model = build_model(args.size, len(CLASS_NAMES), weights="none", settings=get_settings())
    outputs = outputs_model(model)
    x = np.random.default_rng(0).uniform(0, 255, (args.images, args.size, args.size, 3)).astype(np.float32)
    b = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        outputs.predict(x[:2], verbose=0)  # Keras' ONNX export needs a model that has been called
        onnx_file = Path(tmp) / "model.onnx"
        outputs.export(str(onnx_file), format="onnx", verbose=False)
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        xml = convert_to_openvino(outputs, args.size, Path(tmp) / "ov")
        ov = {p: OpenVinoEngine(xml, p) for p in ("f32", "bf16")}
        methods = {
            "Keras float32": lambda batch: outputs.predict_on_batch(batch),
            "ONNX Runtime f32": lambda batch: session.run(None, {session.get_inputs()[0].name: batch}),
            "OpenVINO f32": ov["f32"].predict_on_batch,
            "OpenVINO bf16": ov["bf16"].predict_on_batch,
        }

        def run(method, rows=slice(None)):
            parts = [method(x[rows][i : i + b]) for i in range(0, len(x[rows]), b)]
            return np.concatenate([np.asarray(p[0]) for p in parts])

        speeds: dict[str, list[float]] = {name: [] for name in methods}
        for repeat in range(args.repeats):
            for name in methods if repeat % 2 == 0 else reversed(methods):
                run(methods[name], slice(0, b))
                start = time.perf_counter()
                run(methods[name])
                speeds[name].append(len(x) / (time.perf_counter() - start))
                print(f"repeat {repeat} {name}: {speeds[name][-1]:.2f} images/s", flush=True)
    base = statistics.median(speeds["Keras float32"])
    print(f"\n{args.images} images at {args.size} px, batch {b}, {os.cpu_count()} cores; median of {args.repeats}")
    print("| engine | images/s (median) | best run | vs Keras float32 |")
    print("|---|---|---|---|")
    for name, s in speeds.items():
        print(f"| {name} | {statistics.median(s):.2f} | {max(s):.2f} | {statistics.median(s) / base:.2f}x |")


if __name__ == "__main__":
    main()
