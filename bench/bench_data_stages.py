"""Peak memory and wall time of the data stages (split, preprocess, augment, SMOTE) on wbc-bench,
beside the original notebook's SMOTE on the same images.

    .venv/bin/python bench/bench_data_stages.py [--size 256] [--per-class 300] [--k 5]
        [--cap-gb 16] [--subset 934] [--workers 0]

Every measured thing runs in its own child process; a sampler in this process adds up the
memory of the child and its workers every 50 ms:

- peak RSS: resident memory, including pages of memory-mapped stores (page cache the kernel can
  drop at any time, so it overstates what a memory-mapped step needs);
- peak anonymous: resident memory that is not a file mapping (heap, arrays): what a step really
  holds and what runs a machine out of memory.

The baseline is the notebook's method: every image of the augmented training store loaded as
float64 and flattened into one (N, S*S*3) matrix, then one ``SMOTE().fit_resample`` call
(default k=5, every class up to the largest). It runs under ``RLIMIT_AS`` (``--cap-gb``, lowered
to what the machine has free) so it fails with MemoryError instead of taking the machine down;
the table then says where it failed. It is tried on the whole augmented store and on a seeded
random ``--subset`` of it (934 images, the notebook's size), and our SMOTE step runs on that
same subset too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"
GB = 1024**3


# --- children ------------------------------------------------------------------------------------


def _settings(work: Path, workers: int):
    from wbc_tasks.core.settings import get_settings

    return get_settings().with_overrides(home=work, work_dir=work, workers=workers)


def _import_everything() -> None:
    """Import what the stages use first, so a stage's own time excludes Python's start-up."""
    import imblearn.over_sampling  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401
    import sklearn.neighbors  # noqa: F401

    import wbc_tasks.data.augment
    import wbc_tasks.data.balance
    import wbc_tasks.data.dataset
    import wbc_tasks.data.preprocess  # noqa: F401


def child(args: argparse.Namespace) -> dict:
    """Run one stage in this (child) process; return what to report, with the stage's own time."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    _import_everything()
    start = time.perf_counter()
    result = _stage(args)
    result["stage_s"] = time.perf_counter() - start
    return result


def _stage(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    run = work / "runs" / "bench"
    settings = _settings(work, args.workers)
    if args.stage == "split":
        from wbc_tasks.core.workdir import run_step
        from wbc_tasks.data.dataset import split_dataset

        summary = run_step(run / "split", lambda d: split_dataset(BENCH, d, settings), force=True)
        return {"images": summary["images"]}
    if args.stage == "preprocess":
        from wbc_tasks.core.workdir import run_step
        from wbc_tasks.data.preprocess import preprocess_splits

        summary = run_step(
            run / "preprocess", lambda d: preprocess_splits(run / "split", d, settings, args.size), force=True
        )
        return {"images": sum(sum(c.values()) for c in summary["counts"].values())}
    if args.stage == "augment":
        from wbc_tasks.data.augment import augment_training_set

        out = Path(args.output)
        shutil.rmtree(out, ignore_errors=True)
        summary = augment_training_set(
            Path(args.input), out, per_class=args.per_class, seed=args.seed, settings=settings
        )
        return {"images": summary["images_out"], "in": summary["images_in"]}
    if args.stage == "smote":
        from wbc_tasks.data.balance import balance_with_smote

        out = Path(args.output)
        shutil.rmtree(out, ignore_errors=True)
        summary = balance_with_smote(Path(args.input), out, enabled=True, k=args.k, seed=args.seed, settings=settings)
        return {"images": summary["images_out"], "in": sum(summary["counts_in"].values())}
    if args.stage == "baseline":
        return baseline(Path(args.input), args.k, args.seed)
    if args.stage == "imports":
        return {}
    raise SystemExit(f"unknown stage {args.stage}")


def baseline(store_path: Path, k: int, seed: int) -> dict:
    """The notebook's SMOTE: one float64 matrix of every flattened image, one fit_resample."""
    from imblearn.over_sampling import SMOTE

    from wbc_tasks.data.store import open_store

    store = open_store(store_path)
    n = len(store)
    where = "loading"
    try:
        X = np.empty((n, int(np.prod(store.images.shape[1:]))), dtype=np.float64)
        for start in range(0, n, 64):
            X[start : start + 64] = store.images[start : start + 64].reshape(len(X[start : start + 64]), -1)
        y = store.labels.astype(np.int64)
        where = "fit_resample"
        X_res, y_res = SMOTE(k_neighbors=k, random_state=seed).fit_resample(X, y)
        return {"status": "completed", "images": int(len(y_res)), "in": n, "matrix_gb": X.nbytes / GB}
    except MemoryError as exc:
        return {"status": f"MemoryError in {where}", "in": n, "error": str(exc)[:200]}


# --- measuring -----------------------------------------------------------------------------------


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, summed over ``pid`` and its descendants."""
    import psutil

    total_rss = total_anon = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        total_rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        total_anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total_rss, total_anon


def measure(argv: list[str], cap_bytes: int | None = None) -> dict:
    """Run this script as a child with ``argv``; wall time, peak memory and its JSON answer."""

    def limit() -> None:
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    # Byte-code cached outside the venv, so only the first child pays for compiling imports.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "wbc-bench-pycache")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit, env=env)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    result: dict = {"wall_s": wall, "peak_rss_gb": peak[0] / GB, "peak_anon_gb": peak[1] / GB, "rc": proc.returncode}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    else:
        result["status"] = f"died (exit {proc.returncode})"
        result["stderr"] = err[-2000:]
    if proc.returncode not in (0, None) and "status" not in result:
        result["status"] = f"failed (exit {proc.returncode})"
    return result


def make_subset(source: Path, target: Path, count: int, seed: int) -> None:
    """A store of ``count`` random rows of ``source`` (records kept), for the notebook-sized run."""
    import pandas as pd

    from wbc_tasks.data.store import create_store, finish_store, open_store

    store = open_store(source)
    rows = np.sort(np.random.default_rng(seed).choice(len(store), size=min(count, len(store)), replace=False))
    images = create_store(target, len(rows), store.image_size)
    for i in range(0, len(rows), 64):
        images[i : i + 64] = store.images[rows[i : i + 64]]
    records = store.records.iloc[rows].reset_index(drop=True)
    # Row references of the full store do not hold in the subset.
    records = records.assign(parent_rows="") if "parent_rows" in records else records
    finish_store(target, images, store.labels[rows], pd.DataFrame(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--subset", type=int, default=934)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(child(args)))
        return

    import psutil

    if not BENCH.is_dir():
        raise SystemExit(f"{BENCH} not found: the benchmark needs ../shared/data/wbc-bench")
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    free = psutil.virtual_memory().available
    cap = int(min(args.cap_gb * GB, free - 3 * GB))
    work = Path(tempfile.mkdtemp(prefix="wbc-bench-data-"))
    run = work / "runs" / "bench"
    common = [
        "--work",
        str(work),
        "--size",
        str(args.size),
        "--per-class",
        str(args.per_class),
        "--k",
        str(args.k),
        "--seed",
        str(args.seed),
    ]
    rows: list[tuple[str, str, dict]] = []

    def stage(label: str, method: str, extra: list[str], n_workers: int = workers, cap_b: int | None = None):
        result = measure([*common, "--workers", str(n_workers), *extra], cap_b)
        rows.append((label, method, result))
        print(f"# {label} / {method}: {json.dumps(result)}", file=sys.stderr, flush=True)
        if not method.startswith("notebook") and result.get("rc") != 0:
            raise SystemExit(f"{label} failed: {result}")
        return result

    try:
        stage("(python + imports, no work)", "-", ["--stage", "imports"], 1)
        stage("split", f"ours, {workers} processes", ["--stage", "split"])
        stage("preprocess", f"ours, {workers} processes", ["--stage", "preprocess"])
        train = run / "preprocess" / "train"
        aug = run / "augment"
        stage("augment", "ours, 1 process", ["--stage", "augment", "--input", str(train), "--output", str(aug)], 1)
        stage(
            "augment", f"ours, {workers} processes", ["--stage", "augment", "--input", str(train), "--output", str(aug)]
        )
        stage(
            "SMOTE (whole augmented store)",
            "ours",
            ["--stage", "smote", "--input", str(aug), "--output", str(run / "balance")],
        )
        stage(
            "SMOTE (whole augmented store)",
            "notebook: float64 matrix + SMOTE().fit_resample",
            ["--stage", "baseline", "--input", str(aug)],
            1,
            cap,
        )
        subset = work / f"subset{args.subset}"
        make_subset(aug, subset, args.subset, args.seed)
        stage(
            f"SMOTE ({args.subset} images)",
            "ours",
            ["--stage", "smote", "--input", str(subset), "--output", str(work / "subset-balance")],
        )
        stage(
            f"SMOTE ({args.subset} images)",
            "notebook: float64 matrix + SMOTE().fit_resample",
            ["--stage", "baseline", "--input", str(subset)],
            1,
            cap,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"wbc-bench at {args.size} px, augment per_class={args.per_class}, SMOTE k={args.k}, "
        f"{cores} cores, {psutil.virtual_memory().total / GB:.0f} GB RAM; baseline capped at "
        f"{cap / GB:.1f} GB address space"
    )
    print()
    print("| stage | method | images in -> out | stage s | process s | peak RSS GB | peak anonymous GB | result |")
    print("|---|---|---|---|---|---|---|---|")
    for label, method, r in rows:
        io = f"{r.get('in', '')} -> {r.get('images', '')}" if "in" in r else str(r.get("images", ""))
        stage_s = f"{r['stage_s']:.1f}" if "stage_s" in r else "-"
        print(
            f"| {label} | {method} | {io} | {stage_s} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['peak_anon_gb']:.2f} | {r.get('status', 'completed')} |"
        )
    by_key = {(label, method.split(":")[0].split(",")[0]): r for label, method, r in rows}
    print()
    for label in [lbl for lbl, m, _ in rows if m == "ours" and lbl.startswith("SMOTE")]:
        ours, base = by_key[(label, "ours")], by_key[(label, "notebook")]
        if base.get("status") == "completed":
            print(
                f"- {label}: notebook / ours = {base['stage_s'] / ours['stage_s']:.1f}x stage time, "
                f"{base['peak_anon_gb'] / max(ours['peak_anon_gb'], 1e-9):.1f}x peak anonymous memory"
            )
        else:
            print(
                f"- {label}: the notebook's method failed ({base.get('status')}) on {base.get('in')} "
                f"images after {base['wall_s']:.0f} s, at {base['peak_anon_gb']:.1f} GB anonymous "
                f"(ours: {ours['peak_anon_gb']:.2f} GB)"
            )
    aug1 = next(r for lbl, m, r in rows if lbl == "augment" and m == "ours, 1 process")
    augn = next(r for lbl, m, r in rows if lbl == "augment" and m != "ours, 1 process")
    print(f"- augment: {workers} processes vs 1: {aug1['stage_s'] / augn['stage_s']:.2f}x as fast")


if __name__ == "__main__":
    main()
