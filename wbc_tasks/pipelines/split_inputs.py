"""What the split step splits: the labelled folder plus, with ``include_reviewed``, the images people
reviewed; and the registered version the run starts from (``init_from``), resolved with it."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from wbc_tasks.core.settings import Settings
from wbc_tasks.training.params import TrainingParams

log = logging.getLogger(__name__)


def split_with_reviews(data_dir: Path, out: Path, settings: Settings, params: TrainingParams) -> dict:
    """The split of the labelled folder plus, with ``include_reviewed``, every image's latest
    review (``unusable`` ones and files no longer found are listed, not used)."""
    from wbc_tasks.data.dataset import ExtraImage, split_dataset

    if not params.include_reviewed:
        summary = split_dataset(data_dir, out, settings)
        summary["reviewed"] = {"included": False}
        return summary
    from wbc_tasks.serving.adaptation_requests import review_backlog
    from wbc_tasks.serving.review_export import reviewed_images

    # Read first: a review recorded while the split reads them counts for the next adaptation.
    seen = review_backlog(settings)
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
        "backlog": asdict(seen),
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


def split_and_init(data_dir: Path, out: Path, settings: Settings, params: TrainingParams) -> dict:
    """The split, and the registered version the run starts from (``init_from``) resolved first
    to one number, recorded with the split so a retried task keeps it."""
    from wbc_tasks.pipelines.init_from import resolve_init_from

    init_from_version = resolve_init_from(settings, params)
    return {**split_with_reviews(data_dir, out, settings, params), "init_from_version": init_from_version}
