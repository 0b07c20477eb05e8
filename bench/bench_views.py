"""Does averaging test-time views rank predictions better? One trained model, its trust policy
refitted and measured with 1, 2 and 4 views (the image; its transpose; its two mirror images),
side by side in one process.

    .venv/bin/python bench/bench_views.py RUN_DIR [--views 1 2 4] [--out DIR]

``RUN_DIR`` is a finished training run's folder (``<WBC_HOME>/work/runs/<run id>``, e.g. from
``bench/bench_trust.py``): its trained (uncalibrated) model and preprocessed stores, only read.
For each view count the calibrate step (:func:`~wbc_tasks.training.trust.calibrate_model`) and
the evaluate step's trust measurement (:func:`~wbc_tasks.training.evaluate_trust.evaluate_trust`)
run as the pipeline runs them, into ``--out``/``views-N``; then every ``wbc-other-lab`` image is
assessed (measured only: nothing is fitted on them). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OTHER_LAB = REPO.parent / "shared" / "data" / "wbc-other-lab" / "WBC"


def _balanced_accuracy(true: list[str], predicted: list[str], min_images: int = 1) -> float:
    classes = [c for c in sorted(set(true)) if true.count(c) >= min_images]
    recalls = [np.mean([p == c for t, p in zip(true, predicted) if t == c]) for c in classes]
    return float(np.mean(recalls))


def measure(run: Path, out: Path, views: int, seed: int) -> dict[str, float]:
    """Calibrate, evaluate and assess the third lab with ``views`` test-time views."""
    import keras
    import pandas as pd

    from wbc_tasks.core.settings import CLASS_NAMES, Settings
    from wbc_tasks.core.workdir import require_complete
    from wbc_tasks.data.image_checks import check_image
    from wbc_tasks.data.images import load_image
    from wbc_tasks.training.evaluate_trust import evaluate_trust, flagged_share
    from wbc_tasks.training.trust import BLAST_CLASS, assess, calibrate_model, load_trust, outputs_model, predict_all
    from wbc_tasks.training.unfamiliar import auroc

    settings = Settings()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    calibrate_model(
        run / "train" / "model.keras",
        run / "preprocess" / "val",
        run / "preprocess" / "train",
        out,
        class_names=CLASS_NAMES,
        training_counts=require_complete(run / "split")["counts"].get("train", {}),
        review_target_accuracy=0.95,
        blast_recall_target=0.95,
        unfamiliar_rate=0.05,
        batch_size=32,
        seed=seed,
        views=views,
    )
    calibrate_s = time.perf_counter() - started
    (out / "eval").mkdir(exist_ok=True)
    trust = evaluate_trust(
        out / "model.keras", out / "trust", run / "preprocess" / "test", out / "eval", settings, class_names=CLASS_NAMES
    )
    rows = pd.read_csv(out / "eval" / "test_review_reasons.csv")
    policy, stats = load_trust(out / "trust")
    outputs = outputs_model(keras.models.load_model(out / "model.keras"), views)
    size = int(outputs.input_shape[1])
    paths = sorted(OTHER_LAB.glob("*/*"))
    images = np.stack([load_image(p, size, max_pixels=10**8) for p in paths])
    started = time.perf_counter()
    other = predict_all(outputs, images, 32)
    speed = len(images) / (time.perf_counter() - started)
    verdict = assess(other, [check_image(i, settings) for i in images], policy, stats, settings)
    predicted = [CLASS_NAMES[i] for i in verdict.probabilities.argmax(axis=1)]
    truth = [p.parent.name for p in paths]
    m = trust["metrics"]
    return {
        "views": views,
        "test balanced accuracy": _balanced_accuracy(list(rows["true"]), list(rows["predicted"])),
        "temperature kept": m["temperature"],
        "test ECE before / after": f"{m['ece_before_calibration']:.3f} / {m['ece']:.3f}",
        "test NLL before / after": f"{m['nll_before_calibration']:.3f} / {m['nll']:.3f}",
        "review threshold": m["review_threshold"],
        "test coverage": m["coverage"],
        "test unflagged accuracy": m.get("unflagged_accuracy", float("nan")),
        "test `unfamiliar` or `image_check`": m["unfamiliar_or_image_check_share"],
        "blasts caught (non-blasts flagged)": f"{m.get('blasts_caught_share', float('nan')):.1%} "
        f"({m.get('blast_flag_non_blast_share', float('nan')):.1%})",
        "mosaics flagged": m["mosaics_flagged_share"],
        "non-cells flagged": m["non_cells_flagged_share"],
        "other lab balanced accuracy (classes >= 20)": _balanced_accuracy(truth, predicted, 20),
        "other lab flagged": flagged_share(verdict.reasons),
        "other lab `unfamiliar`": float(np.mean(["unfamiliar" in r for r in verdict.reasons])),
        "other lab called blasts": float(np.mean([p == BLAST_CLASS for p in predicted])),
        "other lab unfamiliar AUROC vs test": auroc(rows["unfamiliar_score"].to_numpy(), verdict.unfamiliar_score),
        "calibrate step (s)": calibrate_s,
        "images/s (outputs model, batch 32)": speed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, help="where the refitted policies go (default: a new temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out or Path(tempfile.mkdtemp(prefix="wbc-views-"))
    results = [measure(args.run_dir, out / f"views-{v}", v, args.seed) for v in args.views]
    print(f"\n{args.run_dir}\n")
    print("| measure | " + " | ".join(f"{r['views']} view{'s' if r['views'] > 1 else ''}" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for key in results[0]:
        if key == "views":
            continue
        cells = [r[key] if isinstance(r[key], str) else f"{r[key]:.3f}" for r in results]
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
