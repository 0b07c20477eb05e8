"""The split checks, preprocess and augment steps inside a Celery worker's task (issue 31): the
stack's prefork pool runs each task in a daemonic process, where ``multiprocessing`` may not start
children, so ``core.parallel.parallel_map`` ran these steps serially there, then on threads, then
on billiard's pool; now on the standard library's pool, with the daemonic mark lifted while it
starts its workers. Timed side by side on the same data, in one script, rounds interleaved:

- ``embedded``: the step in an ordinary process (worker processes), as the embedded default runs it;
- ``daemonic``: the same call in a daemonic billiard process (what a Celery prefork task is), now;
- ``daemonic-billiard``: the same with billiard's pool (``billiard_map`` below, as ``parallel_map``
  was from 7ea082e to e4a3e0f), the baseline for the change away from it;
- ``daemonic-serial``: the same in a daemonic process with one worker: what it was at first.

    .venv/bin/python bench/bench_worker_parallel.py [--data ../shared/data/wbc-bench/WBC] [--size 64]
        [--rounds 3] [--out bench-worker-parallel.json]

Prints the median seconds per step and mode, and each mode's ratio to ``embedded``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import billiard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"
MODES = {"embedded": (False, 0), "daemonic": (True, 0), "daemonic-billiard": (True, 0), "daemonic-serial": (True, 1)}
STEPS = ("split", "preprocess", "augment")
T = TypeVar("T")
R = TypeVar("R")


def _steps(data: Path, work: Path, size: int, workers: int) -> dict[str, float]:
    """The three steps on ``data`` into ``work``; seconds each."""
    from tests.serving.conftest import base_settings
    from wbc_tasks.core.workdir import run_step
    from wbc_tasks.data.augment import augment_training_set
    from wbc_tasks.data.dataset import split_dataset
    from wbc_tasks.data.preprocess import preprocess_splits

    settings = base_settings(work / "state").with_overrides(workers=workers)
    builds = {
        "split": lambda out: split_dataset(data, out, settings),
        "preprocess": lambda out: preprocess_splits(work / "split", out, settings, size),
        "augment": lambda out: augment_training_set(
            work / "preprocess" / "train", out, per_class=400, seed=0, settings=settings
        ),
    }
    seconds = {}
    for step in STEPS:  # as the pipeline runs them: each in its step folder, marked complete
        started = time.perf_counter()
        run_step(work / step, builds[step])
        seconds[step] = time.perf_counter() - started
    return seconds


def billiard_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, chunksize: int = 8) -> Iterator[R]:
    """``parallel_map`` as it was on billiard's pool (minus its fault-handler initializer)."""
    items = list(items)
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    with billiard.get_context("fork").Pool(processes=workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def _child(queue: Any, data: str, work: str, size: int, workers: int, baseline: bool) -> None:
    if baseline:  # this process only: a fresh fork per round
        from wbc_tasks.data import augment, dataset, preprocess

        for module in (augment, dataset, preprocess):
            module.parallel_map = billiard_map  # type: ignore[assignment]
    try:
        queue.put(_steps(Path(data), Path(work), size, workers))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def run_mode(mode: str, data: Path, size: int) -> dict[str, float]:
    """One round of the three steps in ``mode``, in a fresh process and work folder."""
    daemonic, workers = MODES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        context = billiard.get_context("fork")  # Celery's: its daemonic processes are the workers' own
        queue = context.Queue()
        args = (queue, str(data), tmp, size, workers, mode == "daemonic-billiard")
        process = context.Process(target=_child, args=args, daemon=daemonic)
        process.start()
        result = queue.get(timeout=3600)
        process.join(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(result, str):
        raise RuntimeError(f"{mode}: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STEPS} for m in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            for step, seconds in run_mode(mode, args.data, args.size).items():
                times[mode][step].append(seconds)
            print(json.dumps({"round": round_ + 1, mode: {s: round(v[-1], 2) for s, v in times[mode].items()}}))
    median = {m: {s: statistics.median(v) for s, v in steps.items()} for m, steps in times.items()}
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data": str(args.data),
        "image_size": args.size,
        "rounds": args.rounds,
        "median_s": {m: {s: round(v, 2) for s, v in steps.items()} for m, steps in median.items()},
        "ratio_to_embedded": {
            m: {s: round(median[m][s] / median["embedded"][s], 2) for s in STEPS} for m in MODES if m != "embedded"
        },
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
