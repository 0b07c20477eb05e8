"""The training DAG's steps, one function per task in the DAG's order: split, preprocess,
augment, balance, train, calibrate, evaluate, export (the CPU engine), register, promote; and
:func:`mark_run_failed` for its failure callback.

Each step reads the settings and params, runs in its folder of the run's work folder
(:class:`~wbc_tasks.core.vocabulary.Step`) and returns the small dict its completion marker holds
(counts, locations, metrics): that, and nothing bigger, is what Airflow's XCom carries. A step
that already completed in this run returns its recorded summary instead of running again
(retries are safe).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings, get_settings
from wbc_tasks.core.vocabulary import Step
from wbc_tasks.core.workdir import read_marker, require_complete, run_step
from wbc_tasks.pipelines.data_folder import resolve_data_dir
from wbc_tasks.pipelines.split_inputs import split_and_init
from wbc_tasks.pipelines.step_helpers import groups_csv, log_step_artifacts, split_summary_for_logs, step_context

log = logging.getLogger(__name__)


def split_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Validate, de-duplicate and split the labelled images; open the run's MLflow run."""
    from wbc_tasks.data.dataset import read_manifest
    from wbc_tasks.registry.artifacts import log_metrics, log_split_manifest
    from wbc_tasks.registry.runs import open_tracking_run

    settings, p, run = step_context(run_id, params)
    if p.weights == "imagenet":
        # Fail in seconds, before any data step, not after an hour of preprocessing.
        from wbc_tasks.training.model import vgg16_weights_file

        vgg16_weights_file(settings)
    data_dir = resolve_data_dir(settings, p)
    summary = run_step(run / Step.SPLIT, lambda out: split_and_init(data_dir, out, settings, p))
    tracked = {**p.as_dict(), "data_dir": str(data_dir), "init_from_version": summary.get("init_from_version")}
    open_tracking_run(settings, run_id, tracked)
    manifest = read_manifest(run / Step.SPLIT)
    log_split_manifest(settings, run_id, manifest, data_dir)
    reviewed = summary.get("reviewed", {})
    if reviewed.get("included"):
        counts = {"added": reviewed["added"], **{split: n for split, n in reviewed["per_split"].items()}}
        counts.update(unusable=len(reviewed["unusable"]), missing=len(reviewed["missing"]))
        log_metrics(settings, run_id, counts, prefix="reviewed_images")
        if "backlog" in reviewed:  # the reviews it learns count as adapted to (the asset's watermark)
            from wbc_tasks.serving.adaptation_requests import ReviewBacklog, record_training_on_reviews

            record_training_on_reviews(settings, run_id, ReviewBacklog(**reviewed["backlog"]))
    log_step_artifacts(settings, run_id, run / Step.SPLIT, "data/split", data_dir)
    return split_summary_for_logs(settings, summary, data_dir, manifest)


def preprocess_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Decode and resize every split into memory-mapped uint8 stores."""
    from wbc_tasks.data.preprocess import preprocess_splits

    settings, p, run = step_context(run_id, params)
    require_complete(run / Step.SPLIT)
    return run_step(run / Step.PREPROCESS, lambda out: preprocess_splits(run / Step.SPLIT, out, settings, p.image_size))


def augment_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Top up every training class with augmented copies (train split only)."""
    from wbc_tasks.data.augment import augment_training_set

    settings, p, run = step_context(run_id, params)
    require_complete(run / Step.PREPROCESS)
    summary = run_step(
        run / Step.AUGMENT,
        lambda out: augment_training_set(
            run / Step.PREPROCESS / "train", out, per_class=p.augment_per_class, seed=p.seed, settings=settings
        ),
    )
    log_step_artifacts(settings, run_id, run / Step.AUGMENT, "data/augment")
    return summary


def balance_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Balance the augmented training classes with SMOTE (or pass them through when off)."""
    from wbc_tasks.data.balance import balance_with_smote

    settings, p, run = step_context(run_id, params)
    require_complete(run / Step.AUGMENT)
    summary = run_step(
        run / Step.BALANCE,
        lambda out: balance_with_smote(
            run / Step.AUGMENT, out, enabled=p.smote, k=p.smote_k, seed=p.seed, settings=settings
        ),
    )
    log_step_artifacts(settings, run_id, run / Step.BALANCE, "data/balance")
    return summary


def train_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Fine-tune VGG16 on the balanced training store; resumes from its last checkpoint."""
    from wbc_tasks.pipelines.init_from import initial_weights
    from wbc_tasks.registry.runs import tracking_run
    from wbc_tasks.training.train import train_model

    settings, p, run = step_context(run_id, params)
    require_complete(run / Step.BALANCE)
    # The version the split step resolved init_from to (a run whose stores were made another way
    # has no split step: it starts from scratch).
    init_from_version = (read_marker(run / Step.SPLIT) or {}).get("init_from_version")
    with tracking_run(settings, run_id):
        return run_step(
            run / Step.TRAIN,
            lambda out: train_model(
                run / Step.BALANCE,
                run / Step.PREPROCESS / "val",
                out,
                p,
                settings,
                checkpoint_dir=run / Step.TRAIN_CHECKPOINTS,
                init_from_version=init_from_version,
                init_weights=None
                if init_from_version is None
                else lambda: initial_weights(settings, init_from_version),
            ),
        )


def calibrate_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Calibrate the trained model on the validation split and fit its trust policy (review
    threshold, blast flag, unfamiliar score, drift limits); log them to the run."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.registry.artifacts import log_metrics, log_stage_artifacts
    from wbc_tasks.training.trust_fitting import calibrate_model
    from wbc_tasks.training.trust_policy import TRUST_ARTIFACT_PATH

    settings, p, run = step_context(run_id, params)
    trained = require_complete(run / Step.TRAIN)
    split = require_complete(run / Step.SPLIT)
    summary = run_step(
        run / Step.CALIBRATE,
        lambda out: calibrate_model(
            Path(trained["model_path"]),
            run / Step.PREPROCESS / "val",
            run / Step.PREPROCESS / "train",
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
            run / Step.CALIBRATE / TRUST_ARTIFACT_PATH,
            TRUST_ARTIFACT_PATH,
            suffixes=(".json", ".npz", ".png"),
        )
    return summary


def evaluate_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Evaluate the calibrated model on the untouched test split (argmax) and measure its trust
    policy there (calibration, coverage, flags); log metrics and figures."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.registry.artifacts import log_metrics
    from wbc_tasks.training.evaluate import evaluate_model
    from wbc_tasks.training.evaluate_trust import evaluate_trust

    settings, p, run = step_context(run_id, params)
    calibrated = require_complete(run / Step.CALIBRATE)
    data_dir = Path(require_complete(run / Step.SPLIT)["data_dir"])

    def build(out: Path) -> dict:
        summary = evaluate_model(
            Path(calibrated["model_path"]),
            run / Step.PREPROCESS / "test",
            out,
            class_names=CLASS_NAMES,
            groups_csv=groups_csv(data_dir),
            batch_size=p.batch_size,
        )
        if not calibrated.get("trust_dir"):  # no validation images: nothing was fitted to measure
            return summary
        trust = evaluate_trust(
            Path(calibrated["model_path"]),
            Path(calibrated["trust_dir"]),
            run / Step.PREPROCESS / "test",
            out,
            settings,
            class_names=CLASS_NAMES,
            batch_size=p.batch_size,
        )
        # Flat numbers join the headline metrics: version tags, the model card, the comparison.
        summary["metrics"].update(trust["metrics"])
        summary["trust"] = trust["metrics"]
        return summary

    summary = run_step(run / Step.EVALUATE, build)
    log_metrics(settings, run_id, summary["metrics"], prefix="test")
    log_step_artifacts(settings, run_id, run / Step.EVALUATE, "evaluation", data_dir)
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

    store = run / Step.PREPROCESS / REVIEWED_TEST_STORE
    if not store.is_dir() or len(open_store(store)) == 0:
        return None
    summary = run_step(
        run / "evaluate_reviewed",
        lambda out: evaluate_model(model_path, store, out, class_names=CLASS_NAMES, batch_size=batch_size),
    )
    log_metrics(settings, run_id, summary["metrics"], prefix="test_reviewed")
    log_step_artifacts(settings, run_id, run / "evaluate_reviewed", "evaluation/reviewed", data_dir)
    return {"images": len(open_store(store)), "metrics": summary["metrics"]}


def export_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Export the calibrated model to the CPU inference engine, checked against Keras on the test
    split, and log it to the run (``engine/``). A failed export is recorded as refused and the run
    goes on: the engine only makes classification faster; Keras remains the reference."""
    from wbc_tasks.registry.artifacts import log_metrics, log_stage_artifacts
    from wbc_tasks.training.export import ENGINE_ARTIFACT_PATH, export_engine

    settings, p, run = step_context(run_id, params)
    calibrated = require_complete(run / Step.CALIBRATE)
    require_complete(run / Step.EVALUATE)

    def build(out: Path) -> dict:
        try:
            return export_engine(
                Path(calibrated["model_path"]),
                run / Step.PREPROCESS / "test",
                out,
                trust_dir=Path(calibrated["trust_dir"]) if calibrated.get("trust_dir") else None,
                settings=settings,
                batch_size=p.batch_size,
            )
        except Exception as exc:  # noqa: BLE001 - any export failure leaves classification on Keras
            log.exception("exporting the engine failed; the version will classify with Keras")
            return {"engine": "openvino", "accepted": False, "reason": f"export failed: {type(exc).__name__}: {exc}"}

    engine = run_step(run / Step.EXPORT, build)
    for check in engine.get("checks", []):
        log_metrics(
            settings,
            run_id,
            {k: v for k, v in check.items() if k not in ("precision", "accepted", "reason")},
            prefix=f"engine_{check['precision']}",
        )
    log_stage_artifacts(settings, run_id, run / Step.EXPORT, ENGINE_ARTIFACT_PATH, suffixes=(".json", ".xml", ".bin"))
    return engine


def engine_tags(engine: dict) -> dict[str, str]:
    """Version tags saying which engine the version classifies with, and why."""
    if engine.get("accepted"):
        return {"engine": f"{engine['engine']} {engine['precision']}", "engine.reason": str(engine.get("reason", ""))}
    return {"engine": "keras", "engine.reason": f"export refused: {engine.get('reason', '')}"[:5000]}


def _origin_tags(split: dict[str, Any]) -> dict[str, str]:
    """What a version learned from beyond the labelled folder: the lab's reviewed images per split
    and the version it started from (what the lab's learning page lists)."""
    from wbc_tasks.registry.tags import TAG_INIT_FROM_VERSION, TAG_REVIEWED_IMAGES

    tags = {}
    reviewed = split.get("reviewed", {})
    if reviewed.get("included"):
        tags[TAG_REVIEWED_IMAGES] = json.dumps(reviewed["per_split"], sort_keys=True)
    if split.get("init_from_version") is not None:
        tags[TAG_INIT_FROM_VERSION] = str(split["init_from_version"])
    return tags


def register_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Log the model with its signature and model card; register a new version, tagged with the
    engine the export step accepted (or why it refused it)."""
    import keras

    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.data.dataset import read_manifest
    from wbc_tasks.registry.model_card import source_counts
    from wbc_tasks.registry.registration import register_model

    settings, p, run = step_context(run_id, params)
    trained = require_complete(run / Step.CALIBRATE)
    evaluated = require_complete(run / Step.EVALUATE)
    split = require_complete(run / Step.SPLIT)
    engine = require_complete(run / Step.EXPORT)

    def build(out: Path) -> dict:
        model = keras.models.load_model(trained["model_path"])
        data_summary = {"counts": split["counts"], "data_dir": split["data_dir"], "rejected": split["rejected"]}
        # The card credits each source lab (and the citations their licences require) when the
        # data folder has a SOURCES.csv.
        sources = source_counts(read_manifest(run / Step.SPLIT), split["data_dir"])
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
            extra_tags={**engine_tags(engine), **_origin_tags(split)},
        )
        return {
            "model_name": ref.name,
            "version": ref.version,
            "uri": ref.uri,
            "mlflow_run_id": ref.run_id,
            "engine": engine_tags(engine)["engine"],
        }

    return run_step(run / Step.REGISTER, build)


def promote_step(run_id: str, params: dict[str, Any] | None = None) -> dict:
    """Promote the new version to champion only if it beats the champion on the same test images."""
    from wbc_tasks.pipelines.champion import champion_metrics_on_this_test_split, compare_on_both_groups
    from wbc_tasks.registry.promotion import promote_if_better
    from wbc_tasks.registry.runs import finish_tracking_run
    from wbc_tasks.registry.versions import resolve_model

    settings, p, run = step_context(run_id, params)
    registered = require_complete(run / Step.REGISTER)
    evaluated = require_complete(run / Step.EVALUATE)
    reviewed = require_complete(run / Step.SPLIT).get("reviewed", {})
    trained_on_reviews = bool(reviewed.get("per_split", {}).get("train"))

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
            compare_groups=compare_on_both_groups(
                settings, run, p.batch_size, trained_on_reviews=trained_on_reviews, seed=p.seed
            ),
        )

    summary = run_step(run / Step.PROMOTE, build)
    finish_tracking_run(settings, run_id, "FINISHED")
    return summary


def mark_run_failed(run_id: str) -> None:
    """Close the DAG run's MLflow run as FAILED (called by the DAG's failure callback)."""
    from wbc_tasks.registry.runs import finish_tracking_run

    finish_tracking_run(get_settings(), run_id, "FAILED")
