"""The champion on a training run's own test images, which promotion compares the candidate with:
the training pipeline rebuilds the images (from the run's split and preprocess folders) and the
answers image by image; the registry only decides (:func:`wbc_tasks.registry.promotion.promote_if_better`).

Two groups: the labelled test split (``test``) and the lab's reviewed test images
(``test_reviewed``). The champion's answers are kept in ``<run>/promote_inputs/`` so the metrics
and the image-by-image comparison read one evaluation, and a retried task none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import Step
from wbc_tasks.registry.decision import PromotionDecision
from wbc_tasks.registry.versions import ModelRef

LABELLED_TEST = "test"


def _test_store(settings: Settings, run: Path, ref: ModelRef, group: str) -> Path:
    """The run's store of ``group`` at the champion's image size (rebuilt when the run's differs)."""
    from wbc_tasks.core.workdir import require_complete
    from wbc_tasks.data.dataset import headline_test, read_manifest, reviewed_test
    from wbc_tasks.data.preprocess import build_split_store
    from wbc_tasks.data.store import open_store

    store = run / Step.PREPROCESS / group
    if open_store(store).image_size == ref.image_size:
        return store
    rebuilt = run / "promote_inputs" / f"{group}-{ref.image_size}px"
    if not (rebuilt / "labels.npy").exists():
        manifest = read_manifest(run / Step.SPLIT)
        data_dir = Path(require_complete(run / Step.SPLIT)["data_dir"])
        table = headline_test(manifest) if group == LABELLED_TEST else reviewed_test(manifest)
        build_split_store(table, data_dir, rebuilt, ref.image_size, settings)
    return rebuilt


def champion_answers(settings: Settings, run: Path, batch_size: int, ref: ModelRef, group: str) -> pd.DataFrame:
    """The champion ``ref``'s answers on the run's ``group`` images: ``sha256``, ``true``,
    ``predicted`` and one ``prob_<class>`` column per class of the champion (kept on disk)."""
    import numpy as np

    from wbc_tasks.data.store import open_store
    from wbc_tasks.registry.versions import load_keras_model
    from wbc_tasks.training.predict import predict_store

    kept = run / "promote_inputs" / f"champion-v{ref.version}-{group}.csv"
    if kept.is_file():
        return pd.read_csv(kept)
    store = open_store(_test_store(settings, run, ref, group))
    missing = sorted(set(store.records["class"]) - set(ref.class_names))
    if missing:
        raise ValueError(f"champion {ref.uri} cannot classify test classes {missing}")
    probabilities = predict_store(load_keras_model(settings, ref), store, batch_size)
    answers = pd.DataFrame(
        {
            "sha256": store.records["sha256"],
            "true": store.records["class"],
            "predicted": [ref.class_names[i] for i in np.argmax(probabilities, axis=1)],
            **{f"prob_{name}": probabilities[:, i] for i, name in enumerate(ref.class_names)},
        }
    )
    kept.parent.mkdir(parents=True, exist_ok=True)
    answers.to_csv(kept.with_suffix(".partial"), index=False)
    kept.with_suffix(".partial").rename(kept)
    return answers


def champion_metrics_on_this_test_split(
    settings: Settings, run: Path, batch_size: int
) -> Callable[[ModelRef], dict[str, Any]]:
    """A function giving a registered model's metrics on a training run's test images.

    The champion is evaluated on the SAME images as the candidate (the current hash-stable test
    split in ``run``, the run's work folder), at its own image size and with its own class list.
    """

    def evaluate(ref: ModelRef) -> dict[str, Any]:
        import numpy as np

        from wbc_tasks.training.evaluate import compute_metrics

        answers = champion_answers(settings, run, batch_size, ref, LABELLED_TEST)
        known = {name: i for i, name in enumerate(ref.class_names)}
        y_true = np.array([known[c] for c in answers["true"]], dtype=np.int64)
        probabilities = answers[[f"prob_{name}" for name in ref.class_names]].to_numpy()
        return compute_metrics(y_true, probabilities, tuple(ref.class_names))

    return evaluate


def compare_on_both_groups(
    settings: Settings, run: Path, batch_size: int, *, trained_on_reviews: bool, seed: int
) -> Callable[[PromotionDecision, ModelRef], PromotionDecision]:
    """The image-by-image comparison promotion applies under its lock: the candidate's answers
    (the evaluate step's ``predictions.csv``, and the reviewed test images') against the champion's
    on the same images, decided by :func:`~wbc_tasks.registry.decision.decide_on_two_groups`."""
    from wbc_tasks.data.preprocess import REVIEWED_TEST_STORE
    from wbc_tasks.registry.decision import decide_on_two_groups
    from wbc_tasks.registry.paired_comparison import compare_paired

    def paired(name: str, candidate_csv: Path, group: str, champion: ModelRef):
        ours = pd.read_csv(candidate_csv)
        theirs = champion_answers(settings, run, batch_size, champion, group).set_index("sha256")
        theirs = theirs.loc[ours["sha256"]]
        return compare_paired(name, list(ours["true"]), list(ours["predicted"]), list(theirs["predicted"]), seed=seed)

    def decide(decision: PromotionDecision, champion: ModelRef) -> PromotionDecision:
        labelled = paired("labelled_test", run / Step.EVALUATE / "predictions.csv", LABELLED_TEST, champion)
        reviewed_csv = run / "evaluate_reviewed" / "predictions.csv"
        reviewed = (
            paired("reviewed_test", reviewed_csv, REVIEWED_TEST_STORE, champion) if reviewed_csv.is_file() else None
        )
        return decide_on_two_groups(
            decision,
            labelled,
            reviewed,
            trained_on_reviews=trained_on_reviews,
            min_reviewed=settings.promotion_min_reviewed_test,
            noninferiority_margin=settings.promotion_noninferiority_margin,
        )

    return decide
