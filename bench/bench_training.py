"""Training at a CPU profile on wbc-bench: SMOTE vs class weights vs neither.

    .venv/bin/python bench/bench_training.py [--image-size 32] [--epochs 4] [--augment-per-class 0]
        [--epochs-without-smote N] [--batch-size 32] [--learning-rate 1e-4] [--patience 2] [--seed 42] [--workers 1]
        [--home DIR]
    .venv/bin/python bench/bench_training.py --summarise HOME [HOME ...]   # mean/range over seeds

Runs the training pipeline's own steps (``wbc_tasks.pipelines.training``: split, preprocess, augment, balance,
train, evaluate), without Airflow, in three configurations with the same seed and params:

- ``smote``: SMOTE on, class weights off (the pipeline's default balancing);
- ``class_weights``: SMOTE off, loss weighted by inverse class frequency;
- ``neither``: SMOTE off, class weights off (the imbalanced training set as it is).

Split and preprocess do not depend on the configuration: they run once, in the first
configuration's run, and their folders (with their completion markers) are copied into the other
runs' folders, so all three train on the same images and are tested on the same untouched test
split. Everything (work folders, MLflow's sqlite store) goes to ``--home`` (default: a new
temporary folder, kept and printed at the end), set as ``WBC_HOME``; the user's own state is never
touched. Training is from scratch (``weights="none"``: ImageNet weights cannot be downloaded here).

Prints wall time per stage, test accuracy, balanced accuracy, macro F1 and per-class recall as
markdown tables, and writes them to ``<home>/bench_training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"

#: name -> the params that differ between configurations.
CONFIGS: dict[str, dict[str, bool]] = {
    "smote": {"smote": True, "class_weights": False},
    "class_weights": {"smote": False, "class_weights": True},
    "neither": {"smote": False, "class_weights": False},
}
SHARED_STEPS = ("split", "preprocess")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32, help="side in px (default 32)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tune epochs (from scratch: all of them)")
    parser.add_argument(
        "--epochs-without-smote",
        type=int,
        default=None,
        help="epochs of the configurations without SMOTE (default: --epochs); SMOTE doubles "
        "the training set, so twice the epochs compares them at equal images seen",
    )
    parser.add_argument(
        "--augment-per-class",
        type=int,
        default=0,
        help="augmentation target per class before SMOTE (default 0: originals only)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="learning_rate_finetune")
    parser.add_argument("--patience", type=int, default=2, help="early_stopping_patience")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=1, help="WBC_WORKERS for the data steps")
    parser.add_argument("--home", type=Path, default=None, help="WBC_HOME (default: a new temp folder)")
    parser.add_argument(
        "--stamp", default=None, help="resume the runs bench-<stamp>-<config> in --home (finished steps are reused)"
    )
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--summarise",
        nargs="+",
        type=Path,
        metavar="HOME",
        default=None,
        help="train nothing: print the mean and range over the finished benches in these "
        "--home folders (e.g. the same command run with several --seed values)",
    )
    return parser.parse_args(argv)


def base_params(args: argparse.Namespace) -> dict:
    """The params every configuration shares."""
    return {
        "data_dir": str(BENCH),
        "image_size": args.image_size,
        "weights": "none",
        "epochs_head": 0,
        "epochs_finetune": args.epochs,
        "learning_rate_finetune": args.learning_rate,
        "batch_size": args.batch_size,
        "augment_per_class": args.augment_per_class,
        "early_stopping_patience": args.patience,
        "seed": args.seed,
    }


def _timed(results: dict, stage: str, function, run_id: str, params: dict) -> dict:
    """Run one step; its wall time is kept in the run folder, so a resumed bench (``--stamp``)
    reports the time of the run that did the work, not of reusing its output."""
    from wbc_tasks.core.settings import get_settings

    times_file = get_settings().run_dir(run_id) / "bench_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    started = time.perf_counter()
    summary = function(run_id, params)
    if stage not in times:
        times[stage] = round(time.perf_counter() - started, 1)
        times_file.write_text(json.dumps(times))
    results["stage_seconds"][stage] = times[stage]
    logging.getLogger("bench").info("%s %s: %.1f s", run_id, stage, results["stage_seconds"][stage])
    return summary


def run_config(name: str, run_id: str, params: dict, shared_run: str | None, shared_seconds: dict) -> dict:
    """Run one configuration's steps; split+preprocess come from ``shared_run`` when given."""
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.pipelines import training as steps
    from wbc_tasks.registry.runs import open_tracking_run

    settings = get_settings()
    result: dict = {"config": name, "run_id": run_id, "params": params, "stage_seconds": {}}
    if shared_run is None:
        _timed(result, "split", steps.split_step, run_id, params)
        _timed(result, "preprocess", steps.preprocess_step, run_id, params)
    else:
        for step in SHARED_STEPS:
            if not (settings.run_dir(run_id) / step).exists():
                shutil.copytree(settings.run_dir(shared_run) / step, settings.run_dir(run_id) / step)
        result["stage_seconds"].update({f"{s} (shared)": shared_seconds[s] for s in SHARED_STEPS})
        open_tracking_run(settings, run_id, params)  # split_step would have opened it, with the params
    balance_in = _timed(result, "augment", steps.augment_step, run_id, params)
    balanced = _timed(result, "balance", steps.balance_step, run_id, params)
    keras.backend.clear_session()
    trained = _timed(result, "train", steps.train_step, run_id, params)
    _timed(result, "calibrate", steps.calibrate_step, run_id, params)
    evaluated = _timed(result, "evaluate", steps.evaluate_step, run_id, params)
    # The step's summary holds the headline metrics; metrics.json holds all of them.
    metrics = json.loads(Path(evaluated["artifacts"]["metrics"]).read_text())
    result.update(
        augment_summary={k: balance_in.get(k) for k in ("counts", "n_images") if k in balance_in},
        balance_summary={k: balanced.get(k) for k in ("counts", "n_images") if k in balanced},
        train={
            k: trained.get(k) for k in ("epochs_total", "best_epoch", "best_value", "stopped_early", "images_per_s")
        },
        accuracy=metrics["accuracy"],
        balanced_accuracy=metrics["balanced_accuracy"],
        macro_f1=metrics["macro_f1"],
        per_class_recall=metrics["per_class_recall"],
        n_test=metrics["n_images"],
    )
    result["n_train"] = _store_size(settings.run_dir(run_id) / "balance")
    return result


def _store_size(folder: Path) -> int:
    from wbc_tasks.data.store import open_store

    return len(open_store(folder))


def markdown(results: list[dict]) -> str:
    """The headline and per-class tables."""
    lines = [
        "| config | train images | augment s | balance s | train s | evaluate s | epochs (best) | images/s | "
        "test accuracy | balanced accuracy | macro F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["stage_seconds"]
        t = r["train"]
        lines.append(
            f"| {r['config']} | {r['n_train']} | {s['augment']} | {s['balance']} | {s['train']} | {s['evaluate']} | "
            f"{t['epochs_total']} ({t['best_epoch']}) | {t['images_per_s']:.1f} | {r['accuracy']:.3f} | "
            f"{r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} |"
        )
    classes = list(results[0]["per_class_recall"])
    lines += ["", "| test recall | " + " | ".join(r["config"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for c in classes:
        lines.append(
            f"| {c} | " + " | ".join(f"{r['per_class_recall'].get(c, float('nan')):.2f}" for r in results) + " |"
        )
    return "\n".join(lines)


def summarise(homes: list[Path]) -> str:
    """Mean [min-max] of each configuration's metrics over several benches (one per seed)."""
    import statistics

    runs = [json.loads((home / "bench_training.json").read_text()) for home in homes]
    seeds = [r[0]["params"]["seed"] for r in runs]
    by_config: dict[str, list[dict]] = {}
    for results in runs:
        for r in results:
            by_config.setdefault(r["config"], []).append(r)

    def cell(values: list[float], digits: int = 3) -> str:
        return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

    lines = [
        f"seeds {seeds}: mean [min-max]",
        "",
        "| config | runs | test accuracy | balanced accuracy | macro F1 | train s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in by_config.items():
        lines.append(
            f"| {name} | {len(rs)} | {cell([r['accuracy'] for r in rs])} | "
            f"{cell([r['balanced_accuracy'] for r in rs])} | "
            f"{cell([r['macro_f1'] for r in rs])} | {statistics.mean(r['stage_seconds']['train'] for r in rs):.0f} |"
        )
    classes = list(next(iter(by_config.values()))[0]["per_class_recall"])
    lines += ["", "| test recall, mean [min-max] | " + " | ".join(by_config) + " |", "|---|" + "---|" * len(by_config)]
    for c in classes:
        lines.append(
            f"| {c} | "
            + " | ".join(cell([r["per_class_recall"][c] for r in rs], 2) for rs in by_config.values())
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise))
        return 0
    if not BENCH.is_dir():
        print(
            f"bench_training: the benchmark images {BENCH} are absent (see ../shared/data/README.md)", file=sys.stderr
        )
        return 2
    home = (args.home or Path(tempfile.mkdtemp(prefix="wbc-bench-training-"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    # Before importing wbc_tasks: settings (and MLflow's sqlite store) come from the environment.
    os.environ["WBC_HOME"] = str(home)
    for name in ("WBC_WORK_DIR", "WBC_MLFLOW_TRACKING_URI", "WBC_MLFLOW_ARTIFACT_ROOT", "WBC_DATA_DIR"):
        os.environ.pop(name, None)
    os.environ["WBC_WORKERS"] = str(args.workers)
    os.environ["WBC_ALLOWED_ROOTS"] = str(BENCH.resolve())  # the data_dir param must lie in one
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    started = time.perf_counter()
    stamp = args.stamp or time.strftime("%Y%m%dT%H%M%S")
    results: list[dict] = []
    shared_run: str | None = None
    shared_seconds: dict = {}
    for name in args.configs:
        params = {**base_params(args), **CONFIGS[name]}
        if not CONFIGS[name]["smote"] and args.epochs_without_smote:
            params["epochs_finetune"] = args.epochs_without_smote
        run_id = f"bench-{stamp}-{name}"
        result = run_config(name, run_id, params, shared_run, shared_seconds)
        if shared_run is None:
            shared_run = run_id
            shared_seconds = {s: result["stage_seconds"][s] for s in SHARED_STEPS}
        results.append(result)
        (home / "bench_training.json").write_text(json.dumps(results, indent=2, default=str))
        print(markdown(results), flush=True)
    total = time.perf_counter() - started
    print(
        f"\nsplit {shared_seconds['split']} s, preprocess {shared_seconds['preprocess']} s (once, shared); "
        f"total {total:.0f} s; home {home}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
