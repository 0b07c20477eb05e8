"""The CPU inference engine at 256 px: does the exported OpenVINO engine predict what Keras
predicts, on a trained model, on the training labs' test images and on another lab's, and how
much faster is the nightly task with it?

    .venv/bin/python bench/bench_engine.py [--per-class 40] [--epochs 1] [--drop-images 96] [--repeats 2]

1. Stores at 256 px from ``../shared/data/wbc-bench/WBC`` (``--per-class`` images per class for
   training, half as many each for validation and test, disjoint) and all of
   ``../shared/data/wbc-other-lab/WBC`` (measured, never trained on).
2. A VGG16 trained from scratch (``--epochs``, mixed_bfloat16 to save time; the saved model is
   float32), calibrated and given its trust policy, as the DAG's train and calibrate steps do.
3. The registration export (:func:`wbc_tasks.training.export.export_engine`) on the test store:
   its check (bf16 first, then f32) and the agreement of the accepted engine on the other lab.
   Every precision's agreement is also measured on both sets, accepted or not.
4. The nightly task (``predict_images``: hash, decode, resize overlapped with the model, the
   trust policy applied) on ``--drop-images`` files of an unlabelled drop, alternating order,
   ``--repeats`` times: Keras float32 (what the nightly run used before), Keras mixed_bfloat16,
   the engine in bf16 and in f32. Images/s and the ratio to Keras float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_tasks.core.settings import get_settings  # noqa: E402
from wbc_tasks.core.vocabulary import CLASS_NAMES  # noqa: E402
from wbc_tasks.data.image_checks import check_image  # noqa: E402
from wbc_tasks.data.images import load_image  # noqa: E402
from wbc_tasks.data.store import create_store, finish_store  # noqa: E402
from wbc_tasks.registry.versions import ModelRef  # noqa: E402
from wbc_tasks.serving.infer import ServingModel, predict_images  # noqa: E402

DATA = REPO.parent / "shared" / "data"
BENCH = DATA / "wbc-bench" / "WBC"
OTHER_LAB = DATA / "wbc-other-lab" / "WBC"
DROP = DATA / "wbc-bench" / "classify-images" / "2026-11-24"
SIZE = 256


def build_store(out: Path, rows: list[tuple[str, Path]], settings) -> Path:
    """A 256 px store of ``rows`` (class, file), as the preprocess step builds one."""
    images = create_store(out, len(rows), SIZE)
    records = []
    for i, (name, path) in enumerate(rows):
        images[i] = load_image(path, SIZE, max_pixels=settings.max_image_pixels)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        records.append(
            {
                "path": str(path),
                "class": name,
                "sha256": digest,
                "split": out.name,
                "width": 0,
                "height": 0,
                "origin": "original",
                "parents": digest,
            }
        )
    labels = np.array([CLASS_NAMES.index(name) for name, _ in rows], dtype=np.int16)
    finish_store(out, images, labels, pd.DataFrame(records))
    return out


def splits(per_class: int) -> dict[str, list[tuple[str, Path]]]:
    """Disjoint train/val/test rows from wbc-bench, every n-th file so each spans the folder."""
    out: dict[str, list[tuple[str, Path]]] = {"train": [], "val": [], "test": []}
    sizes = {"train": per_class, "val": per_class // 2, "test": per_class // 2}
    for name in CLASS_NAMES:
        files = sorted((BENCH / name).iterdir())
        step = max(1, len(files) // sum(sizes.values()))
        picked = files[::step][: sum(sizes.values())]
        start = 0
        for split, n in sizes.items():
            out[split] += [(name, p) for p in picked[start : start + n]]
            start += n
    return out


def agreement_on(store: Path, outputs, engines: dict, policy, stats, settings, batch: int) -> dict:
    from wbc_tasks.data.store import open_store
    from wbc_tasks.training.export import compare_outputs
    from wbc_tasks.training.outputs import predict_all

    images = np.asarray(open_store(store).images)
    checks = [check_image(i, settings) for i in images]
    reference = predict_all(outputs, images, batch)
    found = {}
    for precision, engine in engines.items():
        candidate = predict_all(engine, images, batch)
        found[precision] = compare_outputs(reference, candidate, checks, policy, stats, settings)
    return {"images": len(images), **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--drop-images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    for needed in (BENCH, OTHER_LAB, DROP):
        if not needed.is_dir():
            raise SystemExit(f"{needed} not found: the benchmark needs ../shared/data")
    import keras

    from wbc_tasks.training.export import OpenVinoEngine, export_engine
    from wbc_tasks.training.outputs import outputs_model
    from wbc_tasks.training.params import training_params
    from wbc_tasks.training.train import train_model
    from wbc_tasks.training.trust_fitting import calibrate_model
    from wbc_tasks.training.trust_policy import load_trust

    settings = get_settings().with_overrides(
        classify_batch_size=args.batch_size, allowed_roots=(DROP.resolve(),), engine_check_images=10**6
    )
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wbc-bench-engine-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        rows = splits(args.per_class)
        stores = {split: build_store(root / split, r, settings) for split, r in rows.items()}
        other = [(p.parent.name, p) for p in sorted(OTHER_LAB.glob("*/*")) if p.parent.name in CLASS_NAMES]
        stores["other_lab"] = build_store(root / "other_lab", other, settings)
        timings["stores"] = time.perf_counter() - started

        started = time.perf_counter()
        params = training_params(
            {
                "image_size": SIZE,
                "weights": "none",
                "epochs_head": 0,
                "epochs_finetune": args.epochs,
                "batch_size": 16,
                "learning_rate_finetune": 1e-4,
                "early_stopping_patience": 0,
                "precision": "mixed_bfloat16",
                "seed": 1,
            }
        )
        trained = train_model(stores["train"], stores["val"], root / "train", params, settings)
        timings["train"] = time.perf_counter() - started
        started = time.perf_counter()
        calibrated = calibrate_model(
            trained["model_path"],
            stores["val"],
            stores["train"],
            root / "calibrate",
            class_names=CLASS_NAMES,
            training_counts=dict.fromkeys(CLASS_NAMES, args.per_class),
            review_target_accuracy=0.95,
            blast_recall_target=0.95,
            unfamiliar_rate=0.05,
            batch_size=args.batch_size,
            seed=0,
        )
        timings["calibrate"] = time.perf_counter() - started
        started = time.perf_counter()
        export = export_engine(
            Path(calibrated["model_path"]),
            stores["test"],
            root / "export",
            trust_dir=Path(calibrated["trust_dir"]),
            settings=settings,
            batch_size=args.batch_size,
        )
        timings["export"] = time.perf_counter() - started
        print(json.dumps(export, indent=1), flush=True)

        # Both precisions measured on both sets, whatever the export accepted.
        model = keras.models.load_model(calibrated["model_path"])
        outputs = outputs_model(model)
        policy, stats = load_trust(Path(calibrated["trust_dir"]))
        xml = root / "engine-files"
        from wbc_tasks.training.export import convert_to_openvino

        model_file = convert_to_openvino(outputs, SIZE, xml)
        engines = {p: OpenVinoEngine(model_file, p) for p in ("bf16", "f32")}
        agreement = {
            name: agreement_on(stores[name], outputs, engines, policy, stats, settings, args.batch_size)
            for name in ("test", "other_lab")
        }
        print(json.dumps(agreement, indent=1), flush=True)

        # The nightly task, decode included.
        paths = sorted(DROP.glob("*.jpg"))[: args.drop_images]
        for p in paths:
            p.read_bytes()
        ref = ModelRef(name="bench", version="1", run_id="", uri="", image_size=SIZE, class_names=CLASS_NAMES)
        jobs = [(str(p), p, None) for p in paths]
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        from wbc_tasks.training.model import build_model

        bf16_model = build_model(SIZE, len(CLASS_NAMES), weights="none", settings=settings, dense_units=256)
        keras.mixed_precision.set_global_policy("float32")
        bf16_model.set_weights(model.get_weights())
        variants = {
            "Keras float32 (before)": ServingModel(model, outputs, policy, stats),
            "Keras mixed_bfloat16": ServingModel(bf16_model, outputs_model(bf16_model), policy, stats),
            "OpenVINO bf16": ServingModel(model, engines["bf16"], policy, stats),
            "OpenVINO f32": ServingModel(model, engines["f32"], policy, stats),
        }
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                list(predict_images(settings, variants[name], ref, jobs[: args.batch_size]))  # warm-up
                start = time.perf_counter()
                done = sum(o.probabilities is not None for o in predict_images(settings, variants[name], ref, jobs))
                elapsed = time.perf_counter() - start
                assert done == len(paths), f"{name} classified {done} of {len(paths)}"
                speeds[name].append(done / elapsed)
                print(f"repeat {repeat} {name}: {done / elapsed:.2f} images/s", flush=True)

    base = statistics.median(speeds["Keras float32 (before)"])
    print(
        f"\n{os.cpu_count()} cores; trained {args.epochs} epoch(s) from scratch on {len(rows['train'])} images "
        f"at {SIZE} px; stage seconds: { {k: round(v) for k, v in timings.items()} }"
    )
    print("| set | images | precision | top class agrees | review reasons agree | max probability difference |")
    print("|---|---|---|---|---|---|")
    for name, found in agreement.items():
        for precision in ("bf16", "f32"):
            a = found[precision]
            print(
                f"| {name} | {found['images']} | {precision} | {a['argmax_agreement']:.4f} | "
                f"{a['review_agreement']:.4f} | {a['max_probability_difference']:.4f} |"
            )
    print(f"\nnightly task on {len(paths)} files of {DROP.relative_to(REPO.parent)}, median of {args.repeats}")
    print("| engine | images/s (median) | best run | vs Keras float32 |")
    print("|---|---|---|---|")
    for name, s in speeds.items():
        print(f"| {name} | {statistics.median(s):.2f} | {max(s):.2f} | {statistics.median(s) / base:.2f}x |")


if __name__ == "__main__":
    main()
