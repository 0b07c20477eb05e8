"""Time `wbc backup` and `wbc restore` on an embedded state of issue 28's size: 3 registered model
versions, 10,000 predictions (with their files seen) and 1,000 reviews. The databases are filled
with bulk inserts (rows need not point at images: backup copies rows, it does not read images);
the three versions are real registered Keras models with their artifacts. Both commands run as
processes, the way a lab runs them.

    .venv/bin/python bench/bench_backup.py [--predictions 10000 --reviews 1000 --versions 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serving.conftest import base_settings, register_tiny_model  # noqa: E402
from wbc_tasks.core.vocabulary import CLASS_NAMES  # noqa: E402
from wbc_tasks.serving import predictions as db  # noqa: E402


def fill(settings, predictions: int, reviews: int, versions: int) -> None:
    for seed in range(versions):
        register_tiny_model(settings, seed=seed, alias="champion" if seed == versions - 1 else None)
    db.upgrade_database(settings.predictions_db_url)
    now = db.utcnow()
    probabilities = {name: 1 / len(CLASS_NAMES) for name in CLASS_NAMES}
    prediction_rows, seen_rows, review_rows = [], [], []
    for i in range(predictions):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        drop = f"2026-{1 + i // 1000 % 12:02d}-{1 + i // 100 % 28:02d}"
        path = f"{drop}/cell-{i:06d}.jpg"
        prediction_rows.append({"sha256": sha, "predicted_class": CLASS_NAMES[i % 9], "confidence": 0.9,
                                "probabilities": probabilities, "model_name": "wbc-classifier",
                                "model_version": str(versions), "model_run_id": "bench", "dag_run_id": "night",
                                "created_at": now, "needs_review": i % 3 == 0,
                                "review_reasons": ["low_confidence"] if i % 3 == 0 else []})  # fmt: skip
        seen_rows.append({"path": path, "drop": drop, "sha256": sha, "size": 30_000, "mtime": 1.0,
                          "seen_at": now, "dag_run_id": "night"})  # fmt: skip
        if i < reviews:
            review_rows.append({"sha256": sha, "drop": drop, "path": path, "reviewer": "bench", "reviewed_at": now,
                                "model_name": "wbc-classifier", "model_version": str(versions),
                                "predicted_class": CLASS_NAMES[i % 9], "label": CLASS_NAMES[(i + 1) % 9],
                                "note": None})  # fmt: skip
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        connection.execute(db.predictions.insert(), prediction_rows)
        connection.execute(db.files_seen.insert(), seen_rows)
        connection.execute(db.reviews.insert(), review_rows)


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=10_000)
    parser.add_argument("--reviews", type=int, default=1_000)
    parser.add_argument("--versions", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wbc-bench-backup-") as scratch:
        home = Path(scratch) / "wbc-home"
        settings = base_settings(home)
        fill(settings, args.predictions, args.reviews, args.versions)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WBC_")} | {"WBC_HOME": str(home)}
        wbc = str(REPO / ".venv" / "bin" / "wbc")
        out = Path(scratch) / "backup"
        backup_s = timed([wbc, "backup", "--out", str(out)], env)
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
        shutil.rmtree(home)
        restore_s = timed([wbc, "restore", str(out)], env)
        # The command's own floor: `wbc --help` (Python, the CLI's imports) on the same machine.
        floor_s = timed([wbc, "--help"], env)
    print(json.dumps({"predictions": args.predictions, "reviews": args.reviews, "versions": args.versions,
                      "backup_s": round(backup_s, 2), "restore_s": round(restore_s, 2),
                      "wbc_help_s": round(floor_s, 2), "backup_mb": round(size_mb, 1)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
