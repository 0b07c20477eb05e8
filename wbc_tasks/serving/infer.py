"""Classifying image files with a loaded model: files are hashed, checked and decoded in a
thread pool one batch ahead of the model, batches go through
:func:`wbc_tasks.training.predict.predict_batches`, and an output row becomes the fields of a
prediction (class, confidence, probabilities by class, review flag). Writes nothing. Imports
``core``, ``data``, ``training``, ``registry`` (the model reference) and :mod:`.scan` (the
folders links may lead into).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.data.images import (
    DISAPPEARED,
    ImageError,
    load_image,
    resolve_within,
    sha256_of_file,
)
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving.scan import allowed_roots
from wbc_tasks.training.predict import predict_batches

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One image's result: probabilities, or the reason it was rejected."""

    key: Any
    sha256: str
    probabilities: list[float] | None = None
    reason: str | None = None


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
    return "ok", (digest, array)


def predict_images(
    settings: Settings,
    model: Any,
    ref: ModelRef,
    jobs: Sequence[tuple[Any, Path, str | None]],
) -> Iterator[Outcome]:
    """Classify ``jobs`` (key, path, expected sha256 or None) in batches.

    Decoding runs in a thread pool (Pillow releases the GIL) one batch ahead of the model, so
    the CPU decodes the next batch while the model predicts this one. A file whose content no
    longer matches ``expected sha256`` is skipped (key yielded with neither result nor reason):
    it is new content, found by the next run.
    """
    import numpy as np

    batch_size = max(1, settings.classify_batch_size)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    n_classes = len(ref.class_names)
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
            arrays, owners = [], []
            for key, (status, value) in decoded:
                if status == "ok":
                    owners.append((key, value[0]))
                    arrays.append(value[1])
                elif status == "rejected":
                    yield Outcome(key, value[0], reason=value[1])
                else:
                    log.warning("%s changed since it was found; left for the next run", key)
                    yield Outcome(key, value)
            if not arrays:
                continue
            output = np.asarray(predict_batches(model, np.stack(arrays), batch_size), dtype=np.float64)
            if output.ndim != 2 or output.shape[1] != n_classes:
                raise ValueError(
                    f"model {ref.name} version {ref.version} returned shape {output.shape}, "
                    f"expected (batch, {n_classes}) for classes {ref.class_names}"
                )
            for (key, digest), row in zip(owners, output, strict=True):
                yield Outcome(key, digest, probabilities=[float(p) for p in row])


def prediction_fields(probabilities: Sequence[float], ref: ModelRef, threshold: float) -> dict[str, Any]:
    """Class, confidence, probabilities by class and the review flag of one output row."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    confidence = float(probabilities[best])
    return {
        "predicted_class": ref.class_names[best],
        "confidence": confidence,
        "probabilities": {name: float(p) for name, p in zip(ref.class_names, probabilities, strict=True)},
        "needs_review": confidence < threshold,
    }
