"""A lab's class mix from its own reviews (issue 30): does down-weighting the classes a lab's
reviews show to be rare there move the learning curve? Computed after the fact from the
learning-curve results, which keep every held-out cell's calibrated probabilities.

    .venv/bin/python bench/bench_review_prior.py /work/lc-f1 /work/lc-f2 [--trust-dir DIR] [--markdown]

The rule, fixed before any result was read (no parameter tuned on the held-out folds):

- the lab's reviews give each class a count ``n_c`` of ``N``; its share at the lab is at most the
  upper end of the Wilson 95 % interval, ``U_c``;
- a class the model was trained to expect more often than that (``m_c``) is down-weighted by
  ``U_c / m_c``; no class is ever up-weighted, and blasts are never touched (the safety class);
- the calibrated probabilities are multiplied by the weights and renormalised; ``low_confidence`` is
  decided again on the new top probability with the version's own review threshold; the other
  reasons (``unfamiliar``, ``blast_suspected``) stand as the product gave them.

With few reviews ``U_c`` is wide and nothing changes (at 25 reviews a class never reviewed still
has ``U_c`` = 0.133 > 1/9). ``m_c`` is the model's own prior: SMOTE balances the labelled classes
(1/K each), and with a reviewed share ``s`` of each batch the model also saw the reviews' mix, so
``m_c = (1 - s) / K + s * n_c / N`` ("implicit"); "uniform" uses 1/K alone (stronger).

Tuning runs (``<home>/tuning/``: the pool's first half reviewed, its second half measured) are
rows too, ordered ``tuning <label>``: a rule is to be decided on them, never on the held-out fold.

The review threshold of each version comes from the result (``held_out.trust``, recorded since this
bench was written) or, for older results, from the ``trust.json`` files in ``--trust-dir`` whose
threshold agrees with the stored ``low_confidence`` flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning_curve import MEASURED, tuning_halves, wilson  # noqa: E402

BLASTS = "blasts"
RULES = ("as served", "implicit", "uniform")


def weights(counts: Counter[str], n: int, classes: list[str], share: float, rule: str) -> np.ndarray:
    """Each class's weight under ``rule`` from the lab's review counts (see the module docstring)."""
    if rule == "as served" or n == 0:
        return np.ones(len(classes))
    k = len(classes)
    out = np.ones(k)
    for i, c in enumerate(classes):
        if c == BLASTS:
            continue
        upper = wilson(counts.get(c, 0), n)[1]  # type: ignore[index]
        expected = 1 / k if rule == "uniform" else (1 - share) / k + share * counts.get(c, 0) / n
        out[i] = min(1.0, upper / expected)
    return out


def _threshold(result: dict[str, Any], trust_files: list[Path]) -> float:
    """The version's review threshold: recorded, or the saved trust file consistent with the flags."""
    held = result["held_out"]
    if held.get("trust"):
        return float(held["trust"]["review_threshold"])
    top = {p: max(held["probabilities"][p].values()) for p in held["cells"]}
    flagged = [top[p] for p, (_, _, r) in held["cells"].items() if "low_confidence" in r]
    passed = [top[p] for p, (_, _, r) in held["cells"].items() if "low_confidence" not in r]
    low, high = max(flagged, default=0.0), min(passed, default=1.0)
    found = {json.loads(f.read_text())["review_threshold"] for f in trust_files}
    fits = sorted(t for t in found if low < t <= high + 1e-5)
    if not fits:
        where = f"fold {result['fold'] + 1} N={result['n']}"
        raise SystemExit(f"no saved trust.json fits {where}: its threshold is in ({low}, {high}]")
    return float(fits[0])


def evaluate(result: dict[str, Any], prepared: dict[str, Any], threshold: float, rule: str) -> dict[str, Any]:
    """The held-out fold's figures after the rule's weights."""
    held = result["held_out"]
    reviewed = result.get("reviewed") or prepared["orders"][result["order"]][: result["n"]]
    counts = Counter(prepared["truth"][p] for p in reviewed)
    classes = sorted(next(iter(held["probabilities"].values())))
    share = float(result.get("params", {}).get("reviewed_share", 0.0))
    w = weights(counts, len(reviewed), classes, share, rule)
    per_class = {c: {"n": 0, "right": 0} for c in MEASURED}
    unflagged = right = changed = 0
    for path, (true, served, reasons) in held["cells"].items():
        p = np.array([held["probabilities"][path][c] for c in classes]) * w
        p /= p.sum()
        predicted = classes[int(p.argmax())]
        changed += predicted != served
        others = [r for r in reasons if r != "low_confidence"]
        flagged = bool(others) or p.max() < threshold
        if true in per_class:
            per_class[true]["n"] += 1
            per_class[true]["right"] += predicted == true
        unflagged += not flagged
        right += (not flagged) and predicted == true
    recalls = [v["right"] / v["n"] for v in per_class.values() if v["n"]]
    return {
        "weights": {c: round(float(x), 3) for c, x in zip(classes, w) if x < 1},
        "per_class": per_class,
        "balanced_accuracy": sum(recalls) / len(recalls),
        "images": len(held["cells"]),
        "unflagged": unflagged,
        "unflagged_right": right,
        "changed": changed,
    }


def _tuning_as_result(path: Path, prepared: dict[str, Any]) -> dict[str, Any]:
    """A tuning run (the pool's first half reviewed in queue order, its second half measured) in
    the shape of a learning-curve result: where a rule is decided without the held-out fold."""
    tuned = json.loads(path.read_text())
    return {
        "fold": prepared["fold"],
        "n": tuned["n"],
        "order": f"tuning {tuned['label']}",
        "reviewed": tuning_halves(prepared)[0][: tuned["n"]],
        "params": tuned["adapt"],
        "held_out": tuned["measured"],
    }


def collect(homes: list[Path], trust_dir: Path | None) -> list[dict[str, Any]]:
    trust_files = sorted(trust_dir.glob("*")) if trust_dir else []
    rows = []
    for home in homes:
        prepared = json.loads((home / "prepared.json").read_text())
        runs = [(p, json.loads(p.read_text())) for p in sorted((home / "results").glob("adapt-*.json"))]
        runs += [(p, _tuning_as_result(p, prepared)) for p in sorted((home / "tuning").glob("*.json"))]
        for path, result in runs:
            if result["n"] == 0 or "probabilities" not in result["held_out"]:
                continue
            threshold = _threshold(result, trust_files)
            for rule in RULES:
                figures = evaluate(result, prepared, threshold, rule)
                held = result["held_out"]
                if rule == "as served" and (figures["unflagged"], figures["balanced_accuracy"]) != (
                    held["unflagged"],
                    held["balanced_accuracy"],
                ):  # the recomputation must give back what the product served before any rule
                    raise SystemExit(f"{path}: recomputed figures differ from the stored ones")
                rows.append({"fold": result["fold"] + 1, "order": result["order"], "n": result["n"], "rule": rule,
                             "threshold": round(threshold, 4), **figures})  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| fold | order | N | rule | weights under 1 | balanced accuracy (4 classes) | recall eos / lym / mono / neu "
        "| unflagged | unflagged accuracy | cells whose class changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["order"], r["n"], r["fold"], RULES.index(r["rule"]))):
        recall = " / ".join(f"{r['per_class'][c]['right']}/{r['per_class'][c]['n']}" for c in MEASURED)
        ua = wilson(r["unflagged_right"], r["unflagged"])
        lines.append(
            f"| {r['fold']} | {r['order']} | {r['n']} | {r['rule']} | {r['weights'] or '-'} "
            f"| {r['balanced_accuracy']:.3f} | {recall} | {r['unflagged']}/{r['images']} "
            f"| {r['unflagged_right']}/{r['unflagged']} {ua} | {r['changed']} |"
        )
    lines += [
        "",
        "| order | N | rule | folds | mean balanced accuracy | unflagged, pooled | unflagged accuracy, pooled |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["order"], r["n"], r["rule"]), []).append(r)
    for (order, n, rule), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], RULES.index(kv[0][2]))):
        images = sum(r["images"] for r in group)
        unflagged = sum(r["unflagged"] for r in group)
        right = sum(r["unflagged_right"] for r in group)
        mean = sum(r["balanced_accuracy"] for r in group) / len(group)
        lines.append(
            f"| {order} | {n} | {rule} | {','.join(str(r['fold']) for r in group)} | {mean:.3f} "
            f"| {unflagged}/{images}, {unflagged / images:.3f} {wilson(unflagged, images)} "
            f"| {right}/{unflagged} {wilson(right, unflagged)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("homes", nargs="+", type=Path, help="learning-curve fold folders")
    parser.add_argument("--trust-dir", type=Path, help="saved trust.json files (results without 'trust')")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = collect(args.homes, args.trust_dir)
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
