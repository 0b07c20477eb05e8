"""A golden run for restructures that must not change behaviour (issue 29).

In a fresh ``WBC_HOME``: two demo-profile trainings on the generated demo data with fixed seeds
(the first becomes champion, the second is judged against it), then a generated drop classified by
the nightly DAG. Writes one JSON of what must stay identical: each run's test metrics and trust
metrics, its promotion decision, and the drop's predictions (class and probabilities per file).

    .venv/bin/python bench/golden_run.py --out /tmp/golden-before.json
    .venv/bin/python bench/golden_run.py --compare /tmp/golden-before.json /tmp/golden-after.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WBC = REPO / ".venv" / "bin" / "wbc"
SEEDS = (7, 8)
DROP = "golden-drop"
#: Keys whose values change from run to run whatever the code (times, ids, paths).
VOLATILE = {"decided_at", "dir", "run_id", "mlflow_run_id", "work_dir"}


def wbc(home: Path, *args: str) -> str:
    # Settle time 0: the generated drop is classified at once (it is complete when written).
    env = {**os.environ, "WBC_HOME": str(home), "WBC_SETTLE_MINUTES": "0"}
    env.pop("WBC_DATA_DIR", None)
    done = subprocess.run([str(WBC), *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"wbc {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: stable(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def golden(home: Path) -> dict:
    result: dict = {"runs": []}
    for seed in SEEDS:
        wbc(home, "train", "--profile", "demo", "--param", f"seed={seed}")
        run = max((home / "work" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        result["runs"].append(
            {
                "seed": seed,
                "metrics": json.loads((run / "evaluate" / "metrics.json").read_text()),
                "trust": json.loads((run / "evaluate" / "trust_metrics.json").read_text()),
                "decision": stable(json.loads((run / "promote" / "_COMPLETE.json").read_text())),
            }
        )
    wbc(home, "demo-data", "--drop", DROP, "--count", "24")
    wbc(home, "classify-night")
    rows = json.loads(wbc(home, "predictions", "--drop", DROP, "--format", "json"))
    if len(rows) != 24:
        sys.exit(f"expected 24 predictions of {DROP}, got {len(rows)}")
    keep = ("path", "predicted_class", "confidence", "probabilities", "review_reasons", "model_version")
    result["predictions"] = sorted(({k: r.get(k) for k in keep} for r in rows), key=lambda r: r["path"])
    return result


def compare(before: dict, after: dict) -> list[str]:
    differences = []

    def walk(a: object, b: object, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{where}.{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            differences.append(f"{where}: {a!r} != {b!r}")

    walk(before, after, "")
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differences = compare(before, after)
        print(
            "\n".join(differences) or f"identical: {len(before['runs'])} runs, {len(before['predictions'])} predictions"
        )
        return 1 if differences else 0
    with tempfile.TemporaryDirectory(prefix="wbc-golden-") as home:
        result = golden(Path(home))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    outcomes = [r["decision"].get("outcome") for r in result["runs"]]
    print(f"{args.out}: {outcomes}, {len(result['predictions'])} predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
