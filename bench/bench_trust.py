"""Can the predictions be trusted? Train on wbc-bench, then measure calibration, review flags,
unfamiliar images and drift on the test split, the training labs' nightly drops and a third lab.

    .venv/bin/python bench/bench_trust.py [--profile cpu] [--param NAME=VALUE ...] [--seed 42] [--home DIR]
    .venv/bin/python bench/bench_trust.py --summarise HOME [HOME ...]   # mean/range over seeds, per setting

Runs the training pipeline's own steps without Airflow (``wbc_tasks.pipelines.training``: split,
preprocess, augment, balance, train, calibrate, evaluate, register, promote) on
``../shared/data/wbc-bench/WBC``, then one nightly classification (``classify_new_images``) over a
classify folder holding copies of the training labs' two drops (``wbc-bench/classify-images``)
and of every ``wbc-other-lab`` image as drop ``other-lab`` (copies in ``--home``; the shared data
is only read). ``wbc-other-lab`` is never trained or tuned on: it is only measured here.

Reports (markdown on stdout, JSON in ``<home>/bench_trust.json``):

- test split: balanced accuracy, ECE / NLL / Brier before and after calibration with bootstrap 95 %
  intervals, coverage and unflagged accuracy (interval, per class), the unfamiliar / image-check
  share, the blast flag's cost on non-blasts, corner mosaics and generated non-cells flagged;
- other lab: accuracy and balanced accuracy over its classes with >= 20 images, per-class recall,
  share flagged, share unflagged and right, share called blasts, AUROC of the unfamiliar score
  against the test split;
- drift per drop (alerts and their measures).
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

SHARED = REPO.parent / "shared" / "data"
BENCH = SHARED / "wbc-bench" / "WBC"
DROPS = SHARED / "wbc-bench" / "classify-images"
OTHER_LAB = SHARED / "wbc-other-lab" / "WBC"
OTHER_DROP = "other-lab"
STEPS = ("split", "preprocess", "augment", "balance", "train", "calibrate", "evaluate", "export", "register", "promote")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", help="training profile (default cpu)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="param override")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--home", type=Path, help="WBC_HOME (default: a new temporary folder, kept)")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="HOME", help="summarise earlier runs")
    return parser.parse_args(argv)


def _params(args: argparse.Namespace) -> dict:
    from wbc_tasks.training.profiles import PROFILES

    params = {**PROFILES[args.profile], "seed": args.seed, "data_dir": None}
    for pair in args.param:
        name, _, value = pair.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def _fill_classify_folder(classify: Path) -> dict[str, str]:
    """Copy the drops and the other lab's images; return {relative path: true class} of the latter."""
    truth = {}
    for drop in sorted(DROPS.iterdir()):
        shutil.copytree(drop, classify / drop.name, dirs_exist_ok=True)
    target = classify / OTHER_DROP
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(OTHER_LAB.glob("*/*")):
        name = f"{path.parent.name}-{path.name}"  # names are not inputs to the model; kept unique
        shutil.copy2(path, target / name)
        truth[f"{OTHER_DROP}/{name}"] = path.parent.name
    return truth


def _other_lab_report(table, truth: dict[str, str], test_scores) -> dict:
    import numpy as np

    from wbc_tasks.core.vocabulary import BLAST_CLASS, ReviewReason
    from wbc_tasks.training.unfamiliar import auroc

    rows = table[table["drop"] == OTHER_DROP].copy()
    rows = rows[rows["status"] == "classified"]
    rows["true"] = rows["path"].map(truth)
    counts = rows["true"].value_counts()
    big = [c for c, n in counts.items() if n >= 20]
    recall = {c: float((rows[rows["true"] == c]["predicted_class"] == c).mean()) for c in counts.index}
    flagged = rows["needs_review"].astype(bool)
    right = rows["predicted_class"] == rows["true"]
    scores = rows["unfamiliar_score"].astype(float).to_numpy()
    return {
        "images": len(rows),
        "accuracy": float(right.mean()),
        "balanced_accuracy_classes_ge_20": float(np.mean([recall[c] for c in big])),
        "per_class_recall": recall,
        "class_counts": {c: int(n) for c, n in counts.items()},
        "flagged_share": float(flagged.mean()),
        "unfamiliar_share": float(rows["review_reasons"].map(lambda r: ReviewReason.UNFAMILIAR in r).mean()),
        "unflagged_share": float((~flagged).mean()),
        "unflagged_accuracy": float(right[~flagged].mean()) if (~flagged).any() else None,
        "called_blasts_share": float((rows["predicted_class"] == BLAST_CLASS).mean()),
        "mean_confidence": float(rows["confidence"].mean()),
        "unfamiliar_auroc_vs_test": auroc(np.asarray(test_scores, float), scores)
        if np.isfinite(scores).all()
        else None,
    }


def run(args: argparse.Namespace) -> dict:
    home = args.home or Path(tempfile.mkdtemp(prefix="wbc-bench-trust-"))
    home.mkdir(parents=True, exist_ok=True)
    classify = home / "classify-images"
    os.environ.update(
        {
            "WBC_HOME": str(home),
            "WBC_DATA_DIR": str(BENCH),
            "WBC_CLASSIFY_DIR": str(classify),
            "WBC_ALLOWED_ROOTS": str(SHARED),
            # The copies were just written: classify them now rather than wait for them to settle.
            "WBC_SETTLE_MINUTES": "0",
        }
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import pandas as pd

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.core.workdir import require_complete
    from wbc_tasks.pipelines import training as steps
    from wbc_tasks.serving.export import PredictionFilter
    from wbc_tasks.serving.export_stream import stream_predictions
    from wbc_tasks.serving.nightly import classify_new_images

    settings = get_settings()
    params = _params(args)
    run_id = f"bench-trust-{args.seed}"
    timings = {}
    for step in STEPS:
        started = time.perf_counter()
        getattr(steps, f"{step}_step")(run_id, params)
        timings[step] = round(time.perf_counter() - started, 1)
        print(f"{step}: {timings[step]} s", flush=True)
    evaluated = json.loads((settings.run_dir(run_id) / "evaluate" / "trust_metrics.json").read_text())
    metrics = json.loads((settings.run_dir(run_id) / "evaluate" / "metrics.json").read_text())
    test_rows = pd.read_csv(settings.run_dir(run_id) / "evaluate" / "test_review_reasons.csv")

    truth = _fill_classify_folder(classify)
    started = time.perf_counter()
    # The version this run registered, champion or not (a weak model may fail the floors).
    registered = require_complete(settings.run_dir(run_id) / "register")
    night = classify_new_images(settings, model=str(registered["version"]))
    timings["classify"] = round(time.perf_counter() - started, 1)
    table = pd.DataFrame(list(stream_predictions(settings, PredictionFilter(latest=True))))
    result = {
        "profile": args.profile,
        "params": params,
        "seed": args.seed,
        "home": str(home),
        "timings_s": timings,
        "test": {
            "balanced_accuracy": metrics["balanced_accuracy"],
            "accuracy": metrics["accuracy"],
            **evaluated["metrics"],
            "detail": evaluated["detail"],
        },
        "other_lab": _other_lab_report(table, truth, test_rows["unfamiliar_score"]),
        "drift": night["drift"],
        "night": {k: night[k] for k in ("images_classified", "needs_review", "review_reasons", "images_per_second")},
    }
    (home / "bench_trust.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _print(result: dict) -> None:
    t, o = result["test"], result["other_lab"]
    d = t["detail"]
    print(f"\n## seed {result['seed']} ({result['profile']}), {result['home']}\n")
    print("| test split | value |\n|---|---|")
    for key in (
        "balanced_accuracy",
        "ece_before_calibration",
        "ece",
        "nll_before_calibration",
        "nll",
        "brier",
        "temperature",
        "fitted_temperature",
        "ece_at_fitted_temperature",
        "nll_at_fitted_temperature",
        "review_threshold",
        "coverage",
        "unflagged_accuracy",
        "unfamiliar_or_image_check_share",
        "blast_flag_non_blast_share",
        "blasts_caught_share",
        "mosaics_flagged_share",
        "non_cells_flagged_share",
    ):
        if key in t:
            print(f"| {key} | {t[key]:.3f} |")
    print(
        f"| ECE 95 % before / after | {d['calibration_intervals_95']['before']['ece']} / "
        f"{d['calibration_intervals_95']['after']['ece']} |"
    )
    print(f"| unflagged accuracy 95 % | {d['unflagged_accuracy_interval_95']} |")
    print(f"| method | {d['unfamiliar_method']} |")
    print("\n| other lab | value |\n|---|---|")
    for key, value in o.items():
        print(f"| {key} | {value if not isinstance(value, float) else round(value, 3)} |")
    print("\n| drop | images | divergence | mean conf | unfamiliar | alerts |\n|---|---|---|---|---|---|")
    for e in result["drift"]:
        print(
            f"| {e['drop']} | {e['images']} | {e['class_mix_divergence']} | {e['mean_confidence']} | "
            f"{e['unfamiliar_share']} | {'; '.join(e['alerts']) or 'none'} |"
        )
    print(f"\ntimings (s): {result['timings_s']}")


#: What the summary compares across seeds: (label, section, key).
SUMMARY_ROWS = (
    ("test balanced accuracy", "test", "balanced_accuracy"),
    ("test ECE after calibration", "test", "ece"),
    ("test ECE at the fitted temperature, guard or not", "test", "ece_at_fitted_temperature"),
    ("test NLL after calibration", "test", "nll"),
    ("test NLL at the fitted temperature, guard or not", "test", "nll_at_fitted_temperature"),
    ("fitted temperature", "test", "fitted_temperature"),
    ("test coverage (unflagged share)", "test", "coverage"),
    ("test unflagged accuracy", "test", "unflagged_accuracy"),
    ("test coverage, threshold by expected accuracy (the rule since 2026-12-04)", "test", "coverage_by_expected"),
    ("test unflagged accuracy, threshold by expected accuracy", "test", "unflagged_accuracy_by_expected"),
    ("test coverage, threshold by counted accuracy (the rule before)", "test", "coverage_by_count"),
    ("test unflagged accuracy, threshold by counted accuracy", "test", "unflagged_accuracy_by_count"),
    ("test best coverage at >= 0.94 unflagged accuracy (the test split's own curve)", "test", "best_coverage_at_094"),
    ("test area under the risk-coverage curve", "test", "aurc"),
    ("test share unfamiliar or image check", "test", "unfamiliar_or_image_check_share"),
    ("other lab balanced accuracy (classes >= 20 images)", "other_lab", "balanced_accuracy_classes_ge_20"),
    ("other lab accuracy", "other_lab", "accuracy"),
    ("other lab flagged", "other_lab", "flagged_share"),
    ("other lab unflagged and right", "other_lab", "unflagged_accuracy"),
    ("other lab called blasts", "other_lab", "called_blasts_share"),
    ("other lab unfamiliar AUROC vs test", "other_lab", "unfamiliar_auroc_vs_test"),
)


def _run_dir(home: Path) -> Path:
    """The one training run a bench home holds."""
    (run_dir,) = (home / "work" / "runs").iterdir()
    return run_dir


def review_rules(home: Path, target: float) -> dict[str, float]:
    """Each review-threshold rule, fitted on the run's validation curve (``trust_report.json``),
    applied to its test split with the other review reasons as they came; and what the model's
    ranking allows: the test split's own best coverage at >= 0.94 unflagged accuracy (not usable by
    a version; a property of the ranking) and the area under its risk-coverage curve."""
    import numpy as np
    import pandas as pd

    from wbc_tasks.core.vocabulary import ReviewReason
    from wbc_tasks.training.review_thresholds import (
        review_threshold_by_count,
        review_threshold_for_accuracy,
        risk_coverage,
    )

    run_dir = _run_dir(home)
    curve = json.loads((run_dir / "calibrate" / "trust_report.json").read_text())["risk_coverage"]
    val_conf = np.asarray(curve["threshold"])
    n = np.arange(1, len(val_conf) + 1)
    val_correct = np.diff(np.r_[0, np.round(np.asarray(curve["accuracy"]) * n).astype(int)]).astype(bool)
    test = pd.read_csv(run_dir / "evaluate" / "test_review_reasons.csv", keep_default_na=False)
    other = (
        test["review_reasons"]
        .map(lambda r: any(x not in ("", ReviewReason.LOW_CONFIDENCE) for x in r.split(";")))
        .to_numpy()
    )
    right, conf = (test["true"] == test["predicted"]).to_numpy(), test["confidence"].to_numpy()
    out: dict[str, float] = {}
    for name, rule in (("expected", review_threshold_for_accuracy), ("count", review_threshold_by_count)):
        kept = (conf >= rule(val_conf, val_correct, target)) & ~other
        out[f"coverage_by_{name}"] = float(kept.mean())
        out[f"unflagged_accuracy_by_{name}"] = float(right[kept].mean()) if kept.any() else float("nan")
    best = 0.0
    for t in np.unique(conf):
        kept = (conf >= t) & ~other
        if kept.any() and right[kept].mean() >= 0.94:
            best = max(best, float(kept.mean()))
    out["best_coverage_at_094"] = best
    out["aurc"] = float(np.mean(1 - np.asarray(risk_coverage(conf, right)["accuracy"])))
    return out


def fitted_temperature_on_test(home: Path) -> dict[str, float]:
    """The test split's NLL and ECE at the temperature fitted on validation, whether or not the
    guard kept it: what the guard's choice cost or saved. The served probabilities are at the
    kept T, so softmax(z / T_fitted) is softmax(log p / (T_fitted / T_kept))."""
    import numpy as np
    import pandas as pd

    from wbc_tasks.training.calibration import expected_calibration_error, negative_log_likelihood, softmax

    run_dir = _run_dir(home)
    report = json.loads((run_dir / "calibrate" / "trust" / "trust.json").read_text())
    fitted, kept = report["fitted_on"]["fitted_temperature"], report["temperature"]
    test = pd.read_csv(run_dir / "evaluate" / "predictions.csv")
    names = [c.removeprefix("prob_") for c in test.columns if c.startswith("prob_")]
    y = test["true"].map({n: i for i, n in enumerate(names)}).to_numpy()
    # Log-probabilities are the served logits up to a per-row constant, which softmax ignores.
    log_p = np.log(np.clip(test[[f"prob_{n}" for n in names]].to_numpy(float), 1e-12, 1.0))
    p_fitted = softmax(log_p, temperature=fitted / kept)
    return {
        "fitted_temperature": float(fitted),
        "nll_at_fitted_temperature": negative_log_likelihood(p_fitted, y),
        "ece_at_fitted_temperature": expected_calibration_error(p_fitted, y),
    }


def _with_test_measures(home: Path, result: dict) -> dict:
    result["test"].update(review_rules(home, result["params"].get("review_target_accuracy", 0.95)))
    result["test"].update(fitted_temperature_on_test(home))
    return result


def _varying_params(results: list[dict]) -> list[str]:
    """Params (other than the seed) that differ between runs: what the summary groups by."""
    names = sorted({k for r in results for k in r["params"]} - {"seed"})
    return [n for n in names if len({json.dumps(r["params"].get(n)) for r in results}) > 1]


def _summarise(results: list[dict]) -> None:
    """Mean and range over seeds per configuration; per-class recall on the other lab; the
    difference of each configuration from the first, seed by seed."""
    import numpy as np

    by = _varying_params(results)
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(", ".join(f"{n}={r['params'].get(n)}" for n in by) or "all", []).append(r)
    names = list(groups)
    seeds = ", ".join(f"{n} (seeds {sorted(r['seed'] for r in groups[n])})" for n in names)
    print(f"\n## Over seeds: {seeds}\n")
    print("| measure | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))

    def values(group: list[dict], section: str, key: str) -> list[float]:
        return [float(r[section][key]) for r in group if r[section].get(key) is not None]

    for label, section, key in SUMMARY_ROWS:
        cells = []
        for n in names:
            v = values(groups[n], section, key)
            cells.append(f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    classes = sorted({c for r in results for c, k in r["other_lab"]["class_counts"].items() if k >= 20})
    for c in classes:
        cells = [f"{np.mean([r['other_lab']['per_class_recall'][c] for r in groups[n]]):.3f}" for n in names]
        print(f"| other lab recall {c} | " + " | ".join(cells) + " |")
    base = {r["seed"]: r for r in groups[names[0]]}
    for n in names[1:]:
        paired = [(base[r["seed"]], r) for r in groups[n] if r["seed"] in base]
        if not paired:
            continue
        d_other = np.mean(
            [
                r["other_lab"]["balanced_accuracy_classes_ge_20"] - b["other_lab"]["balanced_accuracy_classes_ge_20"]
                for b, r in paired
            ]
        )
        d_test = np.mean([r["test"]["balanced_accuracy"] - b["test"]["balanced_accuracy"] for b, r in paired])
        kept = d_other >= 0.10 and d_test >= -0.01
        print(
            f"\n{n} against {names[0]} over {len(paired)} paired seeds: other lab balanced accuracy "
            f"{d_other * 100:+.1f} points, test balanced accuracy {d_test * 100:+.1f} points: "
            f"{'passes' if kept else 'fails'} the keep rule (>= +10 and >= -1)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        results = [json.loads((home / "bench_trust.json").read_text()) for home in args.summarise]
        for home, result in zip(args.summarise, results):
            _print(_with_test_measures(home, result))
        _summarise(results)
        return 0
    result = run(args)
    _print(_with_test_measures(Path(result["home"]), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
