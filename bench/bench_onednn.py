"""TensorFlow's oneDNN kernels on and off on this CPU, side by side: training and ``predict``
images/s of the project's VGG16 in float32 (``bench_precision.py``), one child process per
setting (``TF_ENABLE_ONEDNN_OPTS`` is read once, when TensorFlow loads), in turns.

    .venv/bin/python bench/bench_onednn.py [--rounds 3] [--image-size 64] [--images 160] [--repeats 4]

TensorFlow turns oneDNN on by itself only on CPUs with AVX512 VNNI/BF16 or AMX; ``wbc_tasks``
turns it on everywhere unless ``TF_ENABLE_ONEDNN_OPTS`` is set. This answers whether that pays on
the CPU at hand, and reports what TensorFlow would have chosen alone.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
ROW = re.compile(r"^\| float32 \| ([\d.]+) \| [\d.]+x \| ([\d.]+) \|", re.MULTILINE)


def measure(onednn: str, image_size: int, images: int, repeats: int) -> tuple[float, float]:
    """(training, predict) images/s of one child with ``TF_ENABLE_ONEDNN_OPTS=onednn``."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn}
    argv = [PYTHON, str(REPO / "bench" / "bench_precision.py"), "--policies", "float32", "--repeats", str(repeats)]
    argv += ["--image-size", str(image_size), "--images", str(images)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    found = ROW.search(out)
    if found is None:
        raise SystemExit(f"no float32 row in bench_precision's output:\n{out}")
    return float(found[1]), float(found[2])


def tensorflow_default() -> str:
    """Whether TensorFlow alone (the variable unset) turns oneDNN on here."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    code = "from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())"
    out = subprocess.run([PYTHON, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return "on" if out.strip().splitlines()[-1] == "True" else "off"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=160, help="per timed epoch (bench_precision's --images)")
    # This workplace's machines run at half speed for whole seconds at a time (a CPU quota of the
    # virtual machine, seen as train/predict rates exactly half the others): the best of several
    # short epochs is the machine's own speed.
    parser.add_argument("--repeats", type=int, default=4, help="epochs per child; its best counts")
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float]]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for onednn in ("0", "1"):
            runs[onednn].append(measure(onednn, args.image_size, args.images, args.repeats))
            print(f"TF_ENABLE_ONEDNN_OPTS={onednn}: training, predict images/s {runs[onednn][-1]}", flush=True)
    train = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    predict = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    print(f"\nTensorFlow's own default on this CPU: oneDNN {tensorflow_default()}\n")
    print("| oneDNN | training images/s (median) | vs off | predict images/s (median) | vs off |")
    print("|---|---|---|---|---|")
    for k, name in (("0", "off"), ("1", "on")):
        print(
            f"| {name} | {train[k]:.1f} | {train[k] / train['0']:.2f}x | {predict[k]:.1f} "
            f"| {predict[k] / predict['0']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
