"""Which unfamiliar score catches which kind of unfamiliar image? Every candidate method on one
trained model: the share of the test split, recipe-B mosaics and the third lab each flags.

    .venv/bin/python bench/bench_unfamiliar_methods.py RUN_DIR [--out DIR]

``RUN_DIR`` is a finished training run's folder (``<WBC_HOME>/work/runs/<run id>``, e.g. from
``bench/bench_trust.py``): its trained (uncalibrated) model and its preprocessed stores. The
calibrate step is refitted on them into ``--out`` (the run is only read), then each method's
threshold is set the way a version's is (the validation quantile flagging ``unfamiliar_rate``)
and applied to the test split, the recipe-B mosaics of the test images and every
``wbc-other-lab`` image (measured only: nothing here is fitted on them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OTHER_LAB = REPO.parent / "shared" / "data" / "wbc-other-lab" / "WBC"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="where the refitted calibration goes (default: a new temp folder)")
    parser.add_argument("--unfamiliar-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import keras

    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.core.workdir import require_complete
    from wbc_tasks.data.image_checks import corner_mosaics
    from wbc_tasks.data.images import load_image
    from wbc_tasks.data.store import open_store
    from wbc_tasks.training import unfamiliar as uf
    from wbc_tasks.training.outputs import outputs_model, predict_all
    from wbc_tasks.training.trust_fitting import calibrate_model
    from wbc_tasks.training.trust_policy import load_trust

    run, out = args.run_dir, args.out or Path(tempfile.mkdtemp(prefix="wbc-unfamiliar-"))
    summary = calibrate_model(
        run / "train" / "model.keras",
        run / "preprocess" / "val",
        run / "preprocess" / "train",
        out,
        class_names=CLASS_NAMES,
        training_counts=require_complete(run / "split")["counts"].get("train", {}),
        review_target_accuracy=0.95,
        blast_recall_target=0.95,
        unfamiliar_rate=args.unfamiliar_rate,
        batch_size=32,
        seed=args.seed,
    )
    policy, stats = load_trust(out / "trust")
    assert policy is not None and stats is not None
    standard = uf.standardiser_from_json(policy.standardiser)
    outputs = outputs_model(keras.models.load_model(out / "model.keras"))
    test = np.asarray(open_store(run / "preprocess" / "test").images)
    size = test.shape[1]
    sets = {
        "validation": np.asarray(open_store(run / "preprocess" / "val").images),
        "test": test,
        "mosaics": corner_mosaics(test),
        "other_lab": np.stack([load_image(p, size, max_pixels=10**8) for p in sorted(OTHER_LAB.glob("*/*"))]),
    }
    scored = {name: uf.scores(predict_all(outputs, images, 32), stats, standard) for name, images in sets.items()}

    print(f"\nchosen: {summary['unfamiliar_method']}; images: { ({k: len(v) for k, v in sets.items()}) }\n")
    print("| method | test flagged | mosaics flagged | other lab flagged | AUROC test vs mosaics / other lab |")
    print("|---|---|---|---|---|")
    for method in uf.METHODS:
        if method not in scored["validation"]:
            continue
        threshold = uf.threshold_for_rate(scored["validation"][method], args.unfamiliar_rate)
        share = {name: float((s[method] > threshold).mean()) for name, s in scored.items()}
        aurocs = [uf.auroc(scored["test"][method], scored[k][method]) for k in ("mosaics", "other_lab")]
        print(
            f"| `{method}` | {share['test']:.1%} | {share['mosaics']:.1%} | {share['other_lab']:.1%} "
            f"| {aurocs[0]:.3f} / {aurocs[1]:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
