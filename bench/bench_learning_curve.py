"""A new lab learned from its own reviews (issue 30): the learning curve over the number of cells a
lab reviews, measured on `wbc-other-lab` cells that are never reviewed nor trained on.

    .venv/bin/python bench/bench_learning_curve.py --fold 1 --home /work/lc-f1 [--n 0 25 50 100 150]
        [--order queue random spanning interleaved onboarding] [--adapt NAME=VALUE ...]
        [--setting NAME=VALUE ...] [--scratch]
    .venv/bin/python bench/bench_learning_curve.py --summarise /work/lc-f1 /work/lc-f2 /work/lc-f3
    .venv/bin/python bench/bench_learning_curve.py --markdown /work/lc-f1 [...]     # the docs' tables
    .venv/bin/python bench/bench_learning_curve.py --fold 1 --home /work/lc-f1 --tune LABEL --n 50 [--adapt ...]
    .venv/bin/python bench/bench_learning_curve.py --fold 1 --home /tmp/lc-smoke --smoke   # the code path, minutes

Folds: `wbc-other-lab` is split once into three folds by content hash, stratified by class (each
class's images in hash order, dealt round-robin). Fold k is held out (never reviewed, never trained
on); the other two are the lab's review pool. Per fold, in ``--home``:

1. the `cpu`-profile champion is trained once on `wbc-bench` (the training labs), then one night
   classifies the review pool (drop ``review-pool``) and the held-out fold (drop ``held-out``);
   the review orders are fixed from that night: ``queue`` (the champion's review queue, as the
   lab's page shows it) and ``random`` (seeded); the state is backed up (``wbc backup``);
   ``spanning`` (farthest-first over the champion's features of the pool, see
   bench_review_orders.py), ``interleaved`` (the queue and the random order taken in turn) and
   ``onboarding`` (blasts first, then the queue and a content-hash draw in turn) are added to the
   fold the first time they are asked for;
2. for each N and order, the state is restored, the first N cells of the order are reviewed with
   their true class through the product's own ``record_review`` (as the review page does, with a
   user name), an adaptation run trains from the champion (``init_from=champion``, the reviews
   included, ``--adapt`` params over the `cpu` profile), and the held-out fold is classified by the
   nightly code with the new version (whether it was promoted or not; the promotion is recorded).

One file over 400 lines on purpose: it is one benchmark's whole protocol (folds, champion, orders,
reviews, adaptation, figures, tables), read top to bottom next to docs/benchmarks.md.

Results: one JSON per (N, order) in ``<home>/results/``; ``--summarise`` pools the folds with Wilson
95 % intervals. Resumable: finished steps and results are kept and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
BENCH = SHARED / "wbc-bench" / "WBC"
OTHER_LAB = SHARED / "wbc-other-lab" / "WBC"
POOL, HELD_OUT = "review-pool", "held-out"
FOLDS = 3
#: The held-out classes with enough images to measure (basophils: 1 image in the whole set).
MEASURED = ("eosinophils", "lymphocytes", "monocytes", "neutrophils")
REVIEWER = "bench-lab"
#: Orders fixed from the champion's night, and orders derived from them when first asked for.
BASE_ORDERS, DERIVED_ORDERS = ("queue", "random"), ("spanning", "interleaved", "onboarding")
SMOKE = {
    "image_size": 32,
    "epochs_finetune": 1,
    "augment_per_class": 0,
    "smote": False,
    "early_stopping_patience": 0,
    "min_metric": 0.0,
    "min_class_recall": 0.0,
    "min_blast_recall": 0.0,
}
#: The ``--setting`` values of this invocation, recorded in each result.
SETTINGS: dict[str, str] = {}
#: The params the tuning table shows.
TUNED = (
    "epochs_finetune",
    "batch_size",
    "learning_rate_finetune",
    "reviewed_share",
    "reviewed_balance",
    "outlier_exposure",
)
STEPS = ("split", "preprocess", "augment", "balance", "train", "calibrate", "evaluate", "export", "register", "promote")


def folds() -> dict[str, int]:
    """Each wbc-other-lab image's fold (0, 1, 2): per class, in content-hash order, round-robin."""
    assigned = {}
    for folder in sorted(OTHER_LAB.iterdir()):
        images = sorted(folder.iterdir(), key=lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
        for rank, image in enumerate(images):
            assigned[str(image)] = rank % FOLDS
    return assigned


def _environment(home: Path, data_dir: Path) -> None:
    os.environ.update(
        {
            "WBC_HOME": str(home / "wbc"),
            "WBC_DATA_DIR": str(data_dir),
            "WBC_CLASSIFY_DIR": str(home / "wbc" / "classify-images"),
            "WBC_ALLOWED_ROOTS": f"{SHARED}{os.pathsep}{home}",
            "WBC_SETTLE_MINUTES": "0",
            "WBC_WORKERS": "1",
        }
    )


def _train(run_id: str, params: dict[str, Any]) -> tuple[dict, float, dict[str, float]]:
    """Run the training DAG's steps in order: their markers, the total seconds and each step's."""
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.core.workdir import read_marker
    from wbc_tasks.pipelines import training as steps

    started = time.perf_counter()
    step_seconds = {}
    for step in STEPS:
        step_started = time.perf_counter()
        getattr(steps, f"{step}_step")(run_id, params)
        step_seconds[step] = round(time.perf_counter() - step_started, 1)
    run = get_settings().run_dir(run_id)
    markers = {step: read_marker(run / step) for step in ("evaluate", "register", "promote")}
    return markers, time.perf_counter() - started, step_seconds


def _smoke_data(home: Path) -> Path:
    """A small labelled folder (links to 10 images per class) for --smoke."""
    folder = home / "smoke-WBC"
    if not folder.is_dir():
        for class_folder in sorted(BENCH.iterdir()):
            (folder / class_folder.name).mkdir(parents=True)
            for image in sorted(class_folder.iterdir())[:10]:
                (folder / class_folder.name / image.name).symlink_to(image)
    return folder


def _cell_name(image: Path) -> str:
    """A cell's file name in the lab's drop: no class in it (the lab does not know it), and not its
    content hash either: the queue breaks ties of confidence by path and the split of reviewed
    images goes by content hash, so names sorted like the hashes would send the queue's first
    cells all to one split (they did, in a first run: 17 of 25 to the test split)."""
    return f"{hashlib.sha256(b'cell-name:' + image.read_bytes()).hexdigest()[:16]}{image.suffix.lower()}"


def prepare(home: Path, fold: int, base: dict[str, Any]) -> dict[str, Any]:
    """Train the champion, classify the pool and the held-out fold, fix the orders, back up."""
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.ops.backup import backup_embedded
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_queue import review_queue

    state = home / "prepared.json"
    if state.is_file():
        return json.loads(state.read_text())
    settings = get_settings()
    truth: dict[str, str] = {}
    for source, k in folds().items():
        image = Path(source)
        drop = HELD_OUT if k == fold else POOL
        name = _cell_name(image)
        target = settings.classify_dir / drop / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        truth[f"{drop}/{name}"] = image.parent.name
    steps, seconds, step_seconds = _train("champion", base)
    classify_new_images(settings)
    queue = [cell["path"] for cell in review_queue(settings, POOL)]
    pool = sorted(p for p in truth if p.startswith(f"{POOL}/"))
    unqueued = [p for p in pool if p not in set(queue)]  # cells the champion did not flag, last
    import numpy as np

    prepared = {
        "fold": fold,
        "params": base,
        "champion": steps,
        "champion_seconds": round(seconds, 1),
        "champion_step_seconds": step_seconds,
        "truth": truth,
        "orders": {
            "queue": queue + unqueued,
            "random": [pool[i] for i in np.random.default_rng(fold).permutation(len(pool))],
        },
    }
    backup_embedded(settings, home / "base-backup")
    state.write_text(json.dumps(prepared, indent=1, default=str))
    return prepared


def with_derived_order(home: Path, prepared: dict[str, Any], order: str) -> dict[str, Any]:
    """``prepared`` with a derived order added and saved: ``spanning``, farthest-first over the
    champion's features of the pool (``kcentre-features`` of bench_review_orders.py, which chose
    it); ``interleaved``, the queue and the random order in turn (its ``queue+random``); or
    ``onboarding``, the order the review page would have offered (measured, not kept): the pool's
    queue as the champion's night left it, suspected blasts first, then the rest of the queue and
    a draw of it by content hash in turn, then the cells it did not flag."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_review_orders import feature_order, interleaved

    from wbc_tasks.serving.review_queue import review_queue

    orders = prepared["orders"]
    if order == "spanning":
        orders[order] = feature_order(home)
    elif order == "interleaved":
        orders[order] = interleaved(orders["queue"], orders["random"])
    else:
        queue = review_queue(_restored_base(home), POOL)
        rest = [c for c in queue if not c["blast_suspected"]]
        drawn = [c["path"] for c in sorted(rest, key=lambda c: (c["sha256"], c["path"]))]
        queued = [c["path"] for c in queue if c["blast_suspected"]] + interleaved([c["path"] for c in rest], drawn)
        seen = set(queued)
        orders[order] = queued + [p for p in orders["queue"] if p not in seen]
    (home / "prepared.json").write_text(json.dumps(prepared, indent=1, default=str))
    return prepared


def held_out_figures(
    version: str, truth: dict[str, str], drop: str = HELD_OUT, only: set[str] | None = None
) -> dict[str, Any]:
    """``drop`` (the held-out fold; in tuning, ``only`` the pool's measured half) as classified by
    ``version``: per-class recall, shares, raw counts."""
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.registry.versions import resolve_model
    from wbc_tasks.serving.export import PredictionFilter
    from wbc_tasks.serving.export_stream import stream_predictions
    from wbc_tasks.serving.model import load_policy

    where = PredictionFilter(drop=drop, model_version=version, latest=True)
    streamed = [r for r in stream_predictions(get_settings(), where) if only is None or r["path"] in only]
    found = [(r["path"], r["predicted_class"], r["review_reasons"]) for r in streamed]
    # Each cell's probabilities too: what a decision rule tried later is computed from.
    probabilities = {
        r["path"]: {k: round(float(v), 5) for k, v in (r["probabilities"] or {}).items()} for r in streamed
    }
    rows = [(truth[p], c, r) for p, c, r in found]
    policy, _ = load_policy(get_settings(), resolve_model(get_settings(), version))
    per_class = {c: {"n": 0, "right": 0} for c in MEASURED}
    unflagged = right_unflagged = unfamiliar = blasts = 0
    for true, predicted, reasons in rows:
        reasons = list(reasons) if reasons is not None else []
        if true in per_class:
            per_class[true]["n"] += 1
            per_class[true]["right"] += predicted == true
        unflagged += not reasons
        right_unflagged += (not reasons) and predicted == true
        unfamiliar += "unfamiliar" in reasons
        blasts += predicted == "blasts"
    recalls = [v["right"] / v["n"] for v in per_class.values() if v["n"]]
    return {
        # Each image: its true class, the class given and the review reasons (to compare runs).
        "cells": {p: [truth[p], c, list(r) if r is not None else []] for p, c, r in found},
        "probabilities": probabilities,
        # The version's thresholds: what a decision rule tried later decides flags with.
        "trust": None
        if policy is None
        else {k: getattr(policy, k) for k in ("review_threshold", "blast_flag_probability", "training_class_mix")},
        "images": len(rows),
        "per_class": per_class,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "unflagged": unflagged,
        "unflagged_right": right_unflagged,
        "unfamiliar": unfamiliar,
        "called_blasts": blasts,
    }


def _restored_base(home: Path) -> Any:
    """The state as the champion's night left it (``base-backup``), restored; its settings."""
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.ops.backup import restore_embedded

    settings = get_settings()
    restored = restore_embedded(home / "base-backup", settings, replace=True)
    if restored["moved_aside"]:
        shutil.rmtree(restored["moved_aside"])
    return settings


def tuning_halves(prepared: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Fold 1's review pool in two (its two folds): the first is reviewed in queue order, the
    second measured. Tuning sees neither the held-out fold nor the other seeds' folds."""
    fold_of = {f"{POOL}/{_cell_name(Path(p))}": k for p, k in folds().items()}
    reviewed_fold = (prepared["fold"] + 1) % FOLDS
    queue = [p for p in prepared["orders"]["queue"] if fold_of.get(p) == reviewed_fold]
    measured = {p for p, k in fold_of.items() if k == (prepared["fold"] + 2) % FOLDS}
    return queue, measured


def tune(home: Path, prepared: dict[str, Any], n: int, adapt: dict[str, Any], label: str) -> Path:
    """One tuning configuration: the first ``n`` of the pool's first half reviewed, the adaptation
    run, the pool's second half classified again by the new version and measured."""
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_decisions import record_review

    out = home / "tuning" / f"{label}-{n}.json"
    if out.is_file():
        return out
    settings = _restored_base(home)
    queue, measured = tuning_halves(prepared)
    for path in queue[:n]:
        record_review(settings, path, prepared["truth"][path], reviewer=REVIEWER)
    params = {**prepared["params"], **adapt}
    steps, seconds, step_seconds = _train(f"tune-{label}-{n}", params)
    version = str(steps["register"]["version"])
    classify_new_images(settings, model=version, drop=POOL, reclassify=True)
    result = {
        "label": label,
        "n": n,
        "adapt": adapt,
        "settings": dict(SETTINGS),
        "seconds": round(seconds, 1),
        "step_seconds": step_seconds,
        "measured": held_out_figures(version, prepared["truth"], POOL, measured),
        "champion_on_measured": held_out_figures("1", prepared["truth"], POOL, measured),
        "candidate_test": steps["evaluate"]["metrics"],
        "guard": guard(steps["evaluate"]["metrics"], prepared["champion"]["evaluate"]["metrics"]),
        "promotion": steps["promote"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return out


def variant(home: Path, prepared: dict[str, Any], n: int, order: str, adapt: dict[str, Any], scratch: bool) -> Path:
    """One point of the curve; returns its result file (kept: a rerun skips it)."""
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_decisions import record_review

    name = f"{'scratch' if scratch else 'adapt'}-{order}-{n}"
    out = home / "results" / f"{name}.json"
    if out.is_file():
        return out
    settings = _restored_base(home)
    result: dict[str, Any] = {
        "fold": prepared["fold"],
        "n": n,
        "order": order,
        "scratch": scratch,
        "settings": dict(SETTINGS),
    }
    if n == 0:
        result["held_out"] = held_out_figures("1", prepared["truth"])
    else:
        for path in prepared["orders"][order][:n]:
            record_review(settings, path, prepared["truth"][path], reviewer=REVIEWER)
        params = {**prepared["params"], **adapt}
        if scratch:  # what starting from the champion buys: the champion's own recipe, the same reviews
            params = {**prepared["params"], "include_reviewed": True, "reviewed_share": adapt["reviewed_share"]}
        steps, seconds, step_seconds = _train(name, params)
        version = str(steps["register"]["version"])
        # Already seen by the champion's night: classified again, by this version.
        classify_new_images(settings, model=version, drop=HELD_OUT, reclassify=True)
        result.update(params=params, seconds=round(seconds, 1), step_seconds=step_seconds, version=version)
        result["promotion"] = steps["promote"]
        result["held_out"] = held_out_figures(version, prepared["truth"])
        result["candidate_test"] = steps["evaluate"]["metrics"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return out


def wilson(successes: int, trials: int) -> list[float] | None:
    """Wilson 95 % interval (scipy's binomtest), None without trials."""
    from scipy.stats import binomtest

    if trials == 0:
        return None
    interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(interval.low), 3), round(float(interval.high), 3)]


#: The labelled test split's figures the guard compares, candidate against its champion.
GUARD = (
    "balanced_accuracy",
    "ece",
    "coverage",
    "blasts_caught_share",
    "stain_shifted_flagged_share",
    "non_cells_flagged_share",
)


def guard(candidate: dict[str, Any], champion: dict[str, Any]) -> dict[str, Any]:
    """The candidate's and the champion's figures on the labelled test split, and whether the
    guard holds: balanced accuracy at most 1 point lower, blasts caught >= 95 %, stain-shifted
    copies and generated non-cells flagged at least as often as by the champion."""
    figures = {k: [candidate.get(k), champion.get(k)] for k in GUARD}

    def at_least(key: str) -> bool | None:
        c, k = figures[key]
        return None if c is None or k is None else c >= k

    ba_c, ba_k = figures["balanced_accuracy"]
    figures["holds"] = {
        "balanced_accuracy_within_1_point": None if ba_c is None or ba_k is None else ba_c >= ba_k - 0.01,
        "blasts_caught_95": None
        if figures["blasts_caught_share"][0] is None
        else figures["blasts_caught_share"][0] >= 0.95,
        "stain_shifted_flagged_as_often": at_least("stain_shifted_flagged_share"),
        "non_cells_flagged_as_often": at_least("non_cells_flagged_share"),
    }
    return figures


def summarise(homes: list[Path]) -> dict[str, Any]:
    """Per (kind, order, N), pooled over the folds given."""
    pooled: dict[str, dict[str, Any]] = {}
    for home in homes:
        prepared = json.loads((home / "prepared.json").read_text()) if (home / "prepared.json").is_file() else {}
        champion_test = prepared.get("champion", {}).get("evaluate", {}).get("metrics", {})
        for path in sorted((home / "results").glob("*.json")):
            result = json.loads(path.read_text())
            key = f"{'scratch' if result['scratch'] else 'adapt'} {result['order']} N={result['n']}"
            entry = pooled.setdefault(key, {"folds": 0, "per_class": {}, "images": 0, "unflagged": 0,
                                            "unflagged_right": 0, "unfamiliar": 0, "called_blasts": 0,
                                            "promoted": 0, "seconds": []})  # fmt: skip
            held = result["held_out"]
            entry["folds"] += 1
            for cls, counts in held["per_class"].items():
                total = entry["per_class"].setdefault(cls, {"n": 0, "right": 0})
                total["n"] += counts["n"]
                total["right"] += counts["right"]
            for k in ("images", "unflagged", "unflagged_right", "unfamiliar", "called_blasts"):
                entry[k] += held[k]
            entry["promoted"] += bool(result.get("promotion", {}).get("promote"))
            if "seconds" in result:
                entry["seconds"].append(result["seconds"])
            if "candidate_test" in result:
                entry.setdefault("guard", []).append(guard(result["candidate_test"], champion_test))
            entry.setdefault("champion_seconds", []).append(prepared.get("champion_seconds"))
    for entry in pooled.values():
        if not entry["images"]:
            continue
        recalls = {c: v["right"] / v["n"] for c, v in entry["per_class"].items() if v["n"]}
        entry["balanced_accuracy"] = round(sum(recalls.values()) / len(recalls), 3) if recalls else None
        entry["recall"] = {c: [round(r, 3), wilson(entry["per_class"][c]["right"], entry["per_class"][c]["n"])]
                           for c, r in recalls.items()}  # fmt: skip
        entry["unflagged_share"] = [
            round(entry["unflagged"] / entry["images"], 3),
            wilson(entry["unflagged"], entry["images"]),
        ]
        entry["unflagged_accuracy"] = [
            round(entry["unflagged_right"] / entry["unflagged"], 3) if entry["unflagged"] else None,
            wilson(entry["unflagged_right"], entry["unflagged"]),
        ]
        entry["unfamiliar_share"] = round(entry["unfamiliar"] / entry["images"], 3)
        entry["called_blasts_share"] = round(entry["called_blasts"] / entry["images"], 3)
    return pooled


def _pct(count: int, total: int) -> str:
    return f"{count}/{total}" if total else "-"


def markdown(homes: list[Path]) -> str:
    """The tuning runs and the curve as markdown tables (what docs/benchmarks.md shows)."""
    lines = [
        "| tuning run | settings | measured half: balanced accuracy (4 classes) | unflagged (right) | unfamiliar "
        "| labelled test: balanced accuracy vs champion | guard holds | promoted | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for home in homes:
        for path in sorted((home / "tuning").glob("*.json")):
            r = json.loads(path.read_text())
            m, c, g = r["measured"], r["champion_on_measured"], r["guard"]
            changed = {k: v for k, v in r["adapt"].items() if k in TUNED}
            lines.append(
                f"| {r['label']} (N={r['n']}) | {changed} "
                f"| {m['balanced_accuracy']:.3f} (champion {c['balanced_accuracy']:.3f}) "
                f"| {_pct(m['unflagged'], m['images'])} ({m['unflagged_right']}) "
                f"| {_pct(m['unfamiliar'], m['images'])} "
                f"| {g['balanced_accuracy'][0]:.3f} vs {g['balanced_accuracy'][1]:.3f} | {all(g['holds'].values())} "
                f"| {bool(r['promotion'].get('promote'))} | {r['seconds'] / 60:.1f} |"
            )
    lines += [
        "",
        "| order | N | folds | held-out balanced accuracy (4 classes) | recall eos / lym / mono / neu "
        "| unflagged share | unflagged accuracy | unfamiliar | called blasts | promoted | minutes (champion) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pooled = summarise(homes)
    for key in sorted(pooled, key=lambda k: (k.split()[0], k.split()[1], int(k.split("N=")[1]))):
        e = pooled[key]
        kind, order, n = key.split()
        recall = " / ".join(f"{e['recall'][c][0]:.2f}" if c in e["recall"] else "-" for c in MEASURED)
        ua = e["unflagged_accuracy"]
        minutes = f"{sum(e['seconds']) / len(e['seconds']) / 60:.1f}" if e["seconds"] else "-"
        champion = [x for x in e["champion_seconds"] if x]
        minutes += f" ({sum(champion) / len(champion) / 60:.1f})" if champion else ""
        lines.append(
            f"| {order}{' (scratch)' if kind == 'scratch' else ''} | {n.removeprefix('N=')} | {e['folds']} "
            f"| {e['balanced_accuracy']:.3f} | {recall} | {e['unflagged_share'][0]:.3f} {e['unflagged_share'][1]} "
            f"| {'-' if ua[0] is None else f'{ua[0]:.3f} {ua[1]}'} | {e['unfamiliar_share']:.3f} "
            f"| {e['called_blasts_share']:.3f} | {e['promoted']}/{e['folds'] if e['seconds'] else 0} | {minutes} |"
        )
    lines += [
        "",
        "| run | labelled test: balanced accuracy (champion) | ECE (champion) | unflagged share (champion) "
        "| blasts caught | stain-shifted copies flagged (champion) | non-cells flagged (champion) | guard holds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for home in homes:
        prepared = json.loads((home / "prepared.json").read_text())
        champion = prepared["champion"]["evaluate"]["metrics"]
        for path in sorted((home / "results").glob("*.json")):
            r = json.loads(path.read_text())
            if "candidate_test" not in r:
                continue
            g = guard(r["candidate_test"], champion)

            def pair(key: str, g: dict[str, Any] = g) -> str:
                c, k = g[key]
                return "-" if c is None else f"{c:.3f} ({k:.3f})"

            lines.append(
                f"| fold {r['fold'] + 1} {'scratch' if r['scratch'] else 'adapt'} {r['order']} N={r['n']} "
                f"| {pair('balanced_accuracy')} | {pair('ece')} | {pair('coverage')} "
                f"| {g['blasts_caught_share'][0]:.3f} | {pair('stain_shifted_flagged_share')} "
                f"| {pair('non_cells_flagged_share')} | {all(v is not False for v in g['holds'].values())} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", type=int, choices=range(1, FOLDS + 1), help="the held-out fold (1-3)")
    parser.add_argument("--home", type=Path, help="this fold's folder (kept: the run resumes)")
    parser.add_argument("--n", type=int, nargs="+", default=[0, 25, 50, 100, 150])
    parser.add_argument("--order", nargs="+", default=["queue", "random"], choices=[*BASE_ORDERS, *DERIVED_ORDERS])
    parser.add_argument("--adapt", action="append", default=[], metavar="NAME=VALUE", help="adaptation param")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a WBC_ setting, e.g. reviewed_test_fraction=0.2",
    )
    parser.add_argument("--scratch", action="store_true", help="also N=100 in queue order from scratch")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the code path in minutes")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="HOME")
    parser.add_argument("--markdown", nargs="+", type=Path, metavar="HOME", help="the tables of docs/benchmarks.md")
    parser.add_argument("--tune", metavar="LABEL", help="tune on the review pool alone: a name for the --adapt set")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        print(json.dumps(summarise(args.summarise), indent=1))
        return 0
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    if args.fold is None or args.home is None:
        sys.exit("give --fold and --home (or --summarise)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.home.mkdir(parents=True, exist_ok=True)
    _environment(args.home, _smoke_data(args.home) if args.smoke else BENCH)
    for setting in args.setting:  # after the fold's preparation these change only the runs
        name, _, value = setting.partition("=")
        os.environ[f"WBC_{name.upper()}"] = value
        SETTINGS[name] = value
    from wbc_tasks.cli.params import parse_params
    from wbc_tasks.pipelines.params import training_param_specs
    from wbc_tasks.training.profiles import PROFILES

    base = {**PROFILES["cpu"], "seed": args.fold, **(SMOKE if args.smoke else {})}
    # The adapt profile (tuned with --tune on fold 1's review pool), then any --adapt overrides.
    adapt = {**PROFILES["adapt"], **(SMOKE if args.smoke else {}), **parse_params(args.adapt, training_param_specs())}
    prepared = prepare(args.home, args.fold - 1, base)
    for order in set(args.order) & set(DERIVED_ORDERS) - set(prepared["orders"]):
        prepared = with_derived_order(args.home, prepared, order)
    if args.tune:
        for n in args.n:
            print(tune(args.home, prepared, n, adapt, args.tune).read_text(), flush=True)
        return 0
    for order in args.order:
        for n in args.n:
            print(variant(args.home, prepared, n, order, adapt, scratch=False), flush=True)
    if args.scratch:
        print(variant(args.home, prepared, 100, "queue", adapt, scratch=True), flush=True)
    print(json.dumps(summarise([args.home]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
