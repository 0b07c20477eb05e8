"""One function per DAG task: read settings and params, run one step in the run's work folder.

Each returns the small dict the step's completion marker holds (counts, locations, metrics):
that, and nothing bigger, is what Airflow's XCom carries. A step that already completed in this
run returns its recorded summary instead of running again (retries are safe).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wbc_tasks.core.paths import resolve_inside
from wbc_tasks.core.settings import Settings, get_settings
from wbc_tasks.core.workdir import require_complete, run_step
from wbc_tasks.training.params import TrainingParams, training_params

log = logging.getLogger(__name__)


def _context(run_id: str, params: dict[str, Any] | None) -> tuple[Settings, TrainingParams, Path]:
    settings = get_settings()
    return settings, training_params(params), settings.run_dir(run_id)


def resolve_data_dir(settings: Settings, params: TrainingParams) -> Path:
    """The labelled folder: the param (inside :meth:`Settings.input_roots`), else ``WBC_DATA_DIR``,
    else generated demo data."""
    if params.data_dir:
        return resolve_inside(params.data_dir, settings.input_roots(), "data_dir")
    if settings.data_dir is not None:
        return settings.data_dir
    from wbc_tasks.data.demo import generate_demo_dataset

    demo = settings.home / "demo-data" / "WBC"
    if not demo.is_dir():
        log.info("no data folder configured: generating demo images in %s", demo)
        generate_demo_dataset(demo, seed=params.seed)
    return demo


def _log_artifacts(
    settings: Settings, run_id: str, folder: Path, artifact_path: str, data_dir: Path | None = None
) -> None:
    """Log a step folder's result files (pseudonymised copies when ``WBC_PSEUDONYMISE_NAMES``;
    reviewed images' paths lie in the classify folder, so that is a root too)."""
    from wbc_tasks.registry.artifacts import log_stage_artifacts

    roots = (data_dir, settings.classify_dir) if data_dir else ()
    log_stage_artifacts(settings, run_id, folder, artifact_path, roots=roots)


def _for_logs(settings: Settings, summary: dict, data_dir: Path, manifest) -> dict:
    """The split summary as returned to Airflow (which logs return values): the fallback notes,
    which name files, pseudonymised when the option is on. The marker keeps the real text."""
    from wbc_tasks.core.privacy import pseudonymiser

    names = pseudonymiser(settings, data_dir, settings.classify_dir)
    if not names.enabled:
        return summary
    known = names.known(manifest["path"])
    shown = {**summary, "split_fallbacks": [names.text(n, known) for n in summary.get("split_fallbacks", [])]}
    if "reviewed" in summary:
        shown["reviewed"] = names.json(summary["reviewed"], known)
    return shown


def _split_with_reviews(data_dir: Path, out: Path, settings: Settings, params: TrainingParams) -> dict:
    """The split of the labelled folder plus, with ``include_reviewed``, every image's latest
    review (``unusable`` ones and files no longer found are listed, not used)."""
    from wbc_tasks.data.dataset import ExtraImage, split_dataset

    if not params.include_reviewed:
        summary = split_dataset(data_dir, out, settings)
        summary["reviewed"] = {"included": False}
        return summary
    from wbc_tasks.serving.reviews import reviewed_images

    found = reviewed_images(settings)
    summary = split_dataset(data_dir, out, settings, [ExtraImage(i.path, i.label) for i in found.images])
    added = summary.pop("extra", {"added": 0, "per_split": {}, "left_out": []})
    summary["reviewed"] = {
        "included": True,
        "added": added["added"],
        "per_split": added["per_split"],
        "left_out": added["left_out"],
        "unusable": found.unusable,
        "missing": found.missing,
    }
    log.info(
        "reviewed images: %d added %s, %d reviewed unusable (left out), %d no longer found, %d left out by the split",
        added["added"],
        added["per_split"],
        len(found.unusable),
        len(found.missing),
        len(added["left_out"]),
    )
    return summary


def split_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Validate, de-duplicate and split the labelled images; open the run's MLflow run."""
    from wbc_tasks.data.dataset import read_manifest
    from wbc_tasks.registry.artifacts import log_metrics, log_split_manifest
    from wbc_tasks.registry.runs import open_tracking_run

    settings, p, run = _context(run_id, params)
    if p.weights == "imagenet":
        # Fail in seconds, before any data step, not after an hour of preprocessing.
        from wbc_tasks.training.model import vgg16_weights_file

        vgg16_weights_file(settings)
    data_dir = resolve_data_dir(settings, p)
    summary = run_step(run / "split", lambda out: _split_with_reviews(data_dir, out, settings, p))
    open_tracking_run(settings, run_id, {**p.as_dict(), "data_dir": str(data_dir)})
    manifest = read_manifest(run / "split")
    log_split_manifest(settings, run_id, manifest, data_dir)
    reviewed = summary.get("reviewed", {})
    if reviewed.get("included"):
        counts = {"added": reviewed["added"], **{split: n for split, n in reviewed["per_split"].items()}}
        counts.update(unusable=len(reviewed["unusable"]), missing=len(reviewed["missing"]))
        log_metrics(settings, run_id, counts, prefix="reviewed_images")
    _log_artifacts(settings, run_id, run / "split", "data/split", data_dir)
    return _for_logs(settings, summary, data_dir, manifest)


def preprocess_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Decode and resize every split into memory-mapped uint8 stores."""
    from wbc_tasks.data.preprocess import preprocess_splits

    settings, p, run = _context(run_id, params)
    require_complete(run / "split")
    return run_step(run / "preprocess", lambda out: preprocess_splits(run / "split", out, settings, p.image_size))


def augment_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Top up every training class with augmented copies (train split only)."""
    from wbc_tasks.data.augment import augment_training_set

    settings, p, run = _context(run_id, params)
    require_complete(run / "preprocess")
    summary = run_step(
        run / "augment",
        lambda out: augment_training_set(
            run / "preprocess" / "train", out, per_class=p.augment_per_class, seed=p.seed, settings=settings
        ),
    )
    _log_artifacts(settings, run_id, run / "augment", "data/augment")
    return summary


def balance_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Balance the augmented training classes with SMOTE (or pass them through when off)."""
    from wbc_tasks.data.balance import balance_with_smote

    settings, p, run = _context(run_id, params)
    require_complete(run / "augment")
    summary = run_step(
        run / "balance",
        lambda out: balance_with_smote(
            run / "augment", out, enabled=p.smote, k=p.smote_k, seed=p.seed, settings=settings
        ),
    )
    _log_artifacts(settings, run_id, run / "balance", "data/balance")
    return summary


def train_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Fine-tune VGG16 on the balanced training store; resumes from its last checkpoint."""
    from wbc_tasks.registry.runs import tracking_run
    from wbc_tasks.training.train import train_model

    settings, p, run = _context(run_id, params)
    require_complete(run / "balance")
    with tracking_run(settings, run_id):
        return run_step(
            run / "train",
            lambda out: train_model(
                run / "balance",
                run / "preprocess" / "val",
                out,
                p,
                settings,
                checkpoint_dir=run / "train_checkpoints",
            ),
        )


def calibrate_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Calibrate the trained model on the validation split and fit its trust policy (review
    threshold, blast flag, unfamiliar score, drift limits); log them to the run."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.registry.artifacts import log_metrics, log_stage_artifacts
    from wbc_tasks.training.trust import TRUST_ARTIFACT_PATH, calibrate_model

    settings, p, run = _context(run_id, params)
    trained = require_complete(run / "train")
    split = require_complete(run / "split")
    summary = run_step(
        run / "calibrate",
        lambda out: calibrate_model(
            Path(trained["model_path"]),
            run / "preprocess" / "val",
            run / "preprocess" / "train",
            out,
            class_names=CLASS_NAMES,
            # The class mix of the labelled training split, before augmentation and SMOTE: what a
            # drop from the same labs should look like.
            training_counts=split["counts"].get("train", {}),
            review_target_accuracy=p.review_target_accuracy,
            blast_recall_target=p.blast_recall_target,
            unfamiliar_rate=p.unfamiliar_rate,
            batch_size=p.batch_size,
            seed=p.seed,
            drift_class_mix_concentration=settings.drift_class_mix_concentration,
        ),
    )
    log_metrics(
        settings,
        run_id,
        {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        prefix="calibration",
    )
    if summary.get("trust_dir"):
        log_stage_artifacts(
            settings,
            run_id,
            run / "calibrate" / TRUST_ARTIFACT_PATH,
            TRUST_ARTIFACT_PATH,
            suffixes=(".json", ".npz", ".png"),
        )
    return summary


def _groups_csv(data_dir: Path) -> Path | None:
    """An optional ``groups.csv`` beside the data (lab, scanner...) for broken-down metrics."""
    for candidate in (data_dir / "groups.csv", data_dir.parent / "groups.csv"):
        if candidate.is_file():
            return candidate
    return None


def evaluate_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Evaluate the calibrated model on the untouched test split (argmax) and measure its trust
    policy there (calibration, coverage, flags); log metrics and figures."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.registry.artifacts import log_metrics
    from wbc_tasks.training.evaluate import evaluate_model
    from wbc_tasks.training.evaluate_trust import evaluate_trust

    settings, p, run = _context(run_id, params)
    calibrated = require_complete(run / "calibrate")
    data_dir = Path(require_complete(run / "split")["data_dir"])

    def build(out: Path) -> dict:
        summary = evaluate_model(
            Path(calibrated["model_path"]),
            run / "preprocess" / "test",
            out,
            class_names=CLASS_NAMES,
            groups_csv=_groups_csv(data_dir),
            batch_size=p.batch_size,
        )
        if not calibrated.get("trust_dir"):  # no validation images: nothing was fitted to measure
            return summary
        trust = evaluate_trust(
            Path(calibrated["model_path"]),
            Path(calibrated["trust_dir"]),
            run / "preprocess" / "test",
            out,
            settings,
            class_names=CLASS_NAMES,
            batch_size=p.batch_size,
        )
        # Flat numbers join the headline metrics: version tags, the model card, the comparison.
        summary["metrics"].update(trust["metrics"])
        summary["trust"] = trust["metrics"]
        return summary

    summary = run_step(run / "evaluate", build)
    log_metrics(settings, run_id, summary["metrics"], prefix="test")
    _log_artifacts(settings, run_id, run / "evaluate", "evaluation", data_dir)
    reviewed = _evaluate_reviewed(settings, run_id, run, Path(calibrated["model_path"]), p.batch_size, data_dir)
    return {**summary, "reviewed_test": reviewed} if reviewed is not None else summary


def _evaluate_reviewed(
    settings: Settings, run_id: str, run: Path, model_path: Path, batch_size: int, data_dir: Path
) -> dict | None:
    """Metrics on the reviewed images in the test split, apart from the headline ones (which
    stay on labelled images, comparable across models); None when there are none."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.data.preprocess import REVIEWED_TEST_STORE
    from wbc_tasks.data.store import open_store
    from wbc_tasks.registry.artifacts import log_metrics
    from wbc_tasks.training.evaluate import evaluate_model

    store = run / "preprocess" / REVIEWED_TEST_STORE
    if not store.is_dir() or len(open_store(store)) == 0:
        return None
    summary = run_step(
        run / "evaluate_reviewed",
        lambda out: evaluate_model(model_path, store, out, class_names=CLASS_NAMES, batch_size=batch_size),
    )
    log_metrics(settings, run_id, summary["metrics"], prefix="test_reviewed")
    _log_artifacts(settings, run_id, run / "evaluate_reviewed", "evaluation/reviewed", data_dir)
    return {"images": len(open_store(store)), "metrics": summary["metrics"]}


def _export_engine(settings: Settings, run_id: str, run: Path, calibrated: dict, p: TrainingParams) -> dict:
    """Export the calibrated model to the CPU inference engine, checked against Keras on the test
    split, and log it to the run (``engine/``). A failed export is logged and registration goes
    on: the engine only makes classification faster; Keras remains the reference."""
    from wbc_tasks.registry.artifacts import log_metrics, log_stage_artifacts
    from wbc_tasks.training.export import ENGINE_ARTIFACT_PATH, export_engine

    def build(out: Path) -> dict:
        try:
            return export_engine(
                Path(calibrated["model_path"]),
                run / "preprocess" / "test",
                out,
                trust_dir=Path(calibrated["trust_dir"]) if calibrated.get("trust_dir") else None,
                settings=settings,
                batch_size=p.batch_size,
            )
        except Exception as exc:  # noqa: BLE001 - any export failure leaves classification on Keras
            log.exception("exporting the engine failed; the version will classify with Keras")
            return {"engine": "openvino", "accepted": False, "reason": f"export failed: {type(exc).__name__}: {exc}"}

    engine = run_step(run / "export", build)
    for check in engine.get("checks", []):
        log_metrics(
            settings,
            run_id,
            {k: v for k, v in check.items() if k not in ("precision", "accepted", "reason")},
            prefix=f"engine_{check['precision']}",
        )
    log_stage_artifacts(settings, run_id, run / "export", ENGINE_ARTIFACT_PATH, suffixes=(".json", ".xml", ".bin"))
    return engine


def engine_tags(engine: dict) -> dict[str, str]:
    """Version tags saying which engine the version classifies with, and why."""
    if engine.get("accepted"):
        return {"engine": f"{engine['engine']} {engine['precision']}", "engine.reason": str(engine.get("reason", ""))}
    return {"engine": "keras", "engine.reason": f"export refused: {engine.get('reason', '')}"[:5000]}


def register_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Log the model with its signature and model card; register a new version."""
    import keras

    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.data.dataset import read_manifest
    from wbc_tasks.registry.model_card import source_counts
    from wbc_tasks.registry.registration import register_model

    settings, p, run = _context(run_id, params)
    trained = require_complete(run / "calibrate")
    evaluated = require_complete(run / "evaluate")
    split = require_complete(run / "split")
    engine = _export_engine(settings, run_id, run, trained, p)

    def build(out: Path) -> dict:
        model = keras.models.load_model(trained["model_path"])
        data_summary = {"counts": split["counts"], "data_dir": split["data_dir"], "rejected": split["rejected"]}
        # The card credits each source lab (and the citations their licences require) when the
        # data folder has a SOURCES.csv.
        sources = source_counts(read_manifest(run / "split"), split["data_dir"])
        if sources:
            data_summary["sources"] = sources
        ref = register_model(
            settings,
            run_id,
            model,
            image_size=p.image_size,
            class_names=CLASS_NAMES,
            metrics=evaluated["metrics"],
            data_summary=data_summary,
            params=p.as_dict(),
            extra_tags=engine_tags(engine),
        )
        return {
            "model_name": ref.name,
            "version": ref.version,
            "uri": ref.uri,
            "mlflow_run_id": ref.run_id,
            "engine": engine_tags(engine)["engine"],
        }

    return run_step(run / "register", build)


def promote_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Promote the new version to champion only if it beats the champion on the same test images."""
    from wbc_tasks.registry.promotion import champion_metrics_on_this_test_split, promote_if_better
    from wbc_tasks.registry.runs import finish_tracking_run
    from wbc_tasks.registry.versions import resolve_model

    settings, p, run = _context(run_id, params)
    registered = require_complete(run / "register")
    evaluated = require_complete(run / "evaluate")

    def build(out: Path) -> dict:
        candidate = resolve_model(settings, registered["version"])
        return promote_if_better(
            settings,
            candidate,
            evaluated["metrics"],
            champion_metrics_on_this_test_split(settings, run, p.batch_size),
            metric=p.promotion_metric,
            margin=p.promotion_margin,
            min_metric=p.min_metric,
            min_class_recall=p.min_class_recall,
            min_blast_recall=p.min_blast_recall,
            max_ece=p.max_ece,
        )

    summary = run_step(run / "promote", build)
    finish_tracking_run(settings, run_id, "FINISHED")
    return summary


def mark_run_failed(run_id: str) -> None:
    """Close the DAG run's MLflow run as FAILED (called by the DAG's failure callback)."""
    from wbc_tasks.registry.runs import finish_tracking_run

    finish_tracking_run(get_settings(), run_id, "FAILED")
