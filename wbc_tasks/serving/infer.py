"""Classifying image files with a loaded model: files are hashed, checked and decoded in a
thread pool one batch ahead of the model, each decoded image gets the cheap image check, batches
go through the model's outputs (probabilities, logits, features) and the version's trust policy
(:func:`wbc_tasks.training.trust_policy.assess`), and an output becomes the fields of a prediction
(class, calibrated confidence, probabilities by class, unfamiliar score, review reasons). Writes
nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.data.image_checks import check_image
from wbc_tasks.data.images import (
    DISAPPEARED,
    ImageError,
    load_image,
    resolve_within,
    sha256_of_file,
)
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving.scan import allowed_roots
from wbc_tasks.training.outputs import predict_all
from wbc_tasks.training.predict import predict_batches
from wbc_tasks.training.trust_policy import assess

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    """A registered version ready to classify: its Keras model, the same layers returning the
    features the unfamiliar score needs, and its trust policy (None for versions registered
    before policies existed: then only low confidence and the image check apply)."""

    keras_model: Any
    outputs: Any | None
    policy: Any | None = None
    stats: Any | None = None


@dataclass
class Outcome:
    """One image's result: probabilities and verdicts, or the reason it was rejected."""

    key: Any
    sha256: str
    probabilities: list[float] | None = None
    reason: str | None = None
    unfamiliar_score: float | None = None
    review_reasons: list[str] = field(default_factory=list)
    image_check: str | None = None


def _decode(path: Path, size: int, settings: Settings, expected_sha: str | None) -> tuple[str, Any]:
    """("ok", (sha, array)), ("rejected", (sha, reason)) or ("changed", sha)."""
    # A file not read is rejected with no content hash (""): a (path, sha256) rejection is final,
    # and the expected hash here would have kept a vanished file that comes back (a drop folder
    # renamed mid-run and renamed back) from ever being classified.
    try:
        # Links out, broken links, loops, gone.
        resolve_within(path, allowed_roots(settings))
        digest = sha256_of_file(path)
    except ImageError as exc:
        return "rejected", ("", exc.reason)
    except FileNotFoundError:
        return "rejected", ("", DISAPPEARED)
    except OSError as exc:
        return "rejected", ("", f"cannot read file: {exc}")
    if expected_sha is not None and digest != expected_sha:
        return "changed", digest
    try:
        array = load_image(
            path,
            size,
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
        )
    except ImageError as exc:
        return "rejected", ("" if exc.reason == DISAPPEARED else digest, exc.reason)
    return "ok", (digest, array, check_image(array, settings))


def _model_outputs(model: ServingModel, images: Any, batch_size: int) -> dict[str, Any]:
    import numpy as np

    if model.outputs is not None:
        return predict_all(model.outputs, images, batch_size)
    return {"probabilities": np.asarray(predict_batches(model.keras_model, images, batch_size), dtype=np.float64)}


def _decoded_batches(
    settings: Settings, ref: ModelRef, jobs: Sequence[tuple[Any, Path, str | None]], batch_size: int
) -> Iterator[list[tuple[Any, tuple[str, Any]]]]:
    """``jobs`` in batches of ``batch_size``, each job as (key, what :func:`_decode` gave), decoded
    in a thread pool (Pillow releases the GIL) one batch ahead of the caller: the next batch is
    being decoded while the caller works on this one."""
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(max_workers=settings.worker_count()) as pool:
        pending: deque[list[tuple[Any, Future]]] = deque()

        def submit(batch):
            return [(key, pool.submit(_decode, Path(path), ref.image_size, settings, sha)) for key, path, sha in batch]

        queue = iter(batches)
        for batch in (next(queue, None), next(queue, None)):
            if batch is not None:
                pending.append(submit(batch))
        while pending:
            decoded = [(key, future.result()) for key, future in pending.popleft()]
            upcoming = next(queue, None)
            if upcoming is not None:
                pending.append(submit(upcoming))
            yield decoded


def _predicted(
    settings: Settings,
    model: ServingModel,
    ref: ModelRef,
    images: Any,
    owners: list[tuple[Any, str]],
    checks: list[str | None],
    *,
    batch_size: int,
    review_threshold: float | None,
) -> Iterator[Outcome]:
    """The outcomes of one batch of decoded ``images`` (``owners``: key and content hash of each):
    the model's outputs, checked against the version's class list, through its trust policy."""
    n_classes = len(ref.class_names)
    outputs = _model_outputs(model, images, batch_size)
    output = outputs["probabilities"]
    if output.ndim != 2 or output.shape[1] != n_classes:
        raise ValueError(
            f"model {ref.name} version {ref.version} returned shape {output.shape}, "
            f"expected (batch, {n_classes}) for classes {ref.class_names}"
        )
    verdict = assess(outputs, checks, model.policy, model.stats, settings, review_threshold=review_threshold)
    for i, (key, digest) in enumerate(owners):
        score = float(verdict.unfamiliar_score[i])
        yield Outcome(
            key,
            digest,
            probabilities=[float(p) for p in verdict.probabilities[i]],
            unfamiliar_score=None if score != score else score,  # NaN: no score for this version
            review_reasons=verdict.reasons[i],
            image_check=checks[i],
        )


def predict_images(
    settings: Settings,
    model: ServingModel,
    ref: ModelRef,
    jobs: Sequence[tuple[Any, Path, str | None]],
    *,
    review_threshold: float | None = None,
) -> Iterator[Outcome]:
    """Classify ``jobs`` (key, path, expected sha256 or None) in batches.

    ``review_threshold`` overrides the version's (and ``WBC_REVIEW_THRESHOLD``) for this call.

    Decoding runs in a thread pool (Pillow releases the GIL) one batch ahead of the model, so
    the CPU decodes the next batch while the model predicts this one. A file whose content no
    longer matches ``expected sha256`` is skipped (key yielded with neither result nor reason):
    it is new content, found by the next run.
    """
    import numpy as np

    batch_size = max(1, settings.classify_batch_size)
    for decoded in _decoded_batches(settings, ref, jobs, batch_size):
        arrays, owners, checks = [], [], []
        for key, (status, value) in decoded:
            if status == "ok":
                owners.append((key, value[0]))
                arrays.append(value[1])
                checks.append(value[2])
            elif status == "rejected":
                yield Outcome(key, value[0], reason=value[1])
            else:
                log.warning("%s changed since it was found; left for the next run", key)
                yield Outcome(key, value)
        if arrays:
            yield from _predicted(
                settings,
                model,
                ref,
                np.stack(arrays),
                owners,
                checks,
                batch_size=batch_size,
                review_threshold=review_threshold,
            )


def prediction_fields(outcome: Outcome, ref: ModelRef) -> dict[str, Any]:
    """Class, calibrated confidence, probabilities by class, unfamiliar score and review reasons
    of one predicted image (``needs_review``: any reason applies)."""
    probabilities = outcome.probabilities
    assert probabilities is not None, "a rejected image has no prediction"
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {
        "predicted_class": ref.class_names[best],
        "confidence": float(probabilities[best]),
        "probabilities": {name: float(p) for name, p in zip(ref.class_names, probabilities, strict=True)},
        "needs_review": bool(outcome.review_reasons),
        "review_reasons": list(outcome.review_reasons),
        "unfamiliar_score": outcome.unfamiliar_score,
        "image_check": outcome.image_check,
    }
