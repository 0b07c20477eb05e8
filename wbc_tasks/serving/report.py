"""The differential report of one drop (a slide or sample): counts and percentages per class,
unreadable files, how many cells need review and why, the model version(s), and the flags a lab
acts on, each with its rule in words; beside it, once people reviewed cells, the reviewed
differential. As a dict (:func:`differential_report`) and rendered as JSON, CSV or a
self-contained HTML page (:func:`render_report`, the page's template is
``templates/report.html`` beside this module). Reads only.

Percentages of classes are of the drop's classified cells (a differential counts white cells,
not files); the unreadable share is of all the drop's files. In the reviewed differential a
cell counts under its latest review's label (cells nobody reviewed keep the model's class) and
cells reviewed ``unusable`` leave it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import BLAST_CLASS, CLASS_NAMES, REVIEW_REASONS, ReviewReason
from wbc_tasks.serving.predictions import files_seen, open_engine, predictions, read_with_retries, utcnow
from wbc_tasks.serving.review_decisions import UNUSABLE
from wbc_tasks.serving.review_queue import drop_cells, is_blast_suspected, reasons_of

if TYPE_CHECKING:
    pass

#: Said in every rendering of a report.
DISCLAIMER = (
    "For research use only; not a diagnostic device. Results need review by a qualified person before any clinical use."
)
#: The row of files that could not be classified.
UNREADABLE = "unreadable/rejected"
REPORT_FORMATS = ("html", "csv", "json")
#: Above this share of unfamiliar cells the automatic differential is said not to be meaningful.
MOSTLY_UNFAMILIAR_PERCENT = 50.0
#: The immature granulocytes whose share makes a left shift.
LEFT_SHIFT_CLASSES = ("bands", "metamyelocytes", "myelocytes")


class ReportError(PermanentError, LookupError):
    """No report can be made (a drop the predictions database has no file of)."""


def _percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def _differential(labels: Sequence[str], files: int, rejected: int) -> list[dict[str, Any]]:
    """One row per class (the nine, then any other class a model gave), then unreadable files."""
    counts = Counter(labels)
    names = [*CLASS_NAMES, *sorted(set(counts) - set(CLASS_NAMES))]
    rows = [
        {"class": name, "count": counts.get(name, 0), "percent": _percent(counts.get(name, 0), len(labels))}
        for name in names
    ]
    rows.append({"class": UNREADABLE, "count": rejected, "percent": _percent(rejected, files)})
    return rows


def _blast_rule(settings: Settings) -> str:
    probability = settings.blast_flag_probability
    setting = "WBC_BLAST_FLAG_PROBABILITY" + (
        f" = {probability:g}" if probability is not None else " (unset: the model version's fitted value)"
    )
    return (
        f"Raised when any cell's predicted class is {BLAST_CLASS}, or the classifier marked it "
        f"{ReviewReason.BLAST_SUSPECTED.value} "
        f"because its blast probability reached {setting}. Any blast in peripheral blood needs urgent review."
    )


def _flags(
    settings: Settings,
    differential: list[dict[str, Any]],
    blast_cells: int,
    files: int,
    rejected: int,
    rests_on: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The three flags; the left shift is computed on ``differential``'s cells, and ``rests_on``
    says in words which cells each flag was computed on (None: all classified cells)."""
    by_class = {row["class"]: row for row in differential}
    cells = sum(row["count"] for row in differential if row["class"] != UNREADABLE)
    immature = sum(by_class[name]["count"] for name in LEFT_SHIFT_CLASSES if name in by_class)
    left_shift = _percent(immature, cells)
    unreadable = _percent(rejected, files)
    said = rests_on or {}
    return [
        {
            "name": "blasts_suspected",
            "title": "Blasts suspected",
            "raised": blast_cells > 0,
            "value": blast_cells,
            "rule": _blast_rule(settings),
            "rests_on": said.get("blasts_suspected", "every classified cell"),
        },
        {
            "name": "left_shift",
            "title": "Left shift",
            "raised": left_shift is not None and left_shift > settings.left_shift_percent,
            "value": left_shift,
            "rule": f"Raised when bands + metamyelocytes + myelocytes are more than WBC_LEFT_SHIFT_PERCENT = "
            f"{settings.left_shift_percent:g} % of the cells it rests on.",
            "rests_on": said.get("left_shift", f"{cells} classified cells"),
        },
        {
            "name": "many_unreadable_files",
            "title": "Many unreadable files",
            "raised": unreadable is not None and unreadable > settings.unreadable_flag_percent,
            "value": unreadable,
            "rule": f"Raised when more than WBC_UNREADABLE_FLAG_PERCENT = {settings.unreadable_flag_percent:g} % "
            "of the drop's files could not be classified (unreadable or rejected).",
            "rests_on": f"all {files} files of the drop",
        },
    ]


def _needs_review(cell: dict[str, Any]) -> bool:
    return bool(cell["prediction"]["needs_review"]) or is_blast_suspected(cell["prediction"])


def _coverage(classified: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """How much of the drop the model can speak for, and the labels of those cells: each
    unflagged, unreviewed cell under the model's class and each reviewed cell under its latest
    review's label (``unusable`` left out). Flagged cells nobody reviewed are not among them."""
    cells = len(classified)
    unflagged = [c for c in classified if not _needs_review(c) and c["review"] is None]
    reviewed = [c for c in classified if c["review"] is not None]
    unfamiliar = sum(ReviewReason.UNFAMILIAR.value in reasons_of(c["prediction"]) for c in classified)
    labels = [c["prediction"]["predicted_class"] for c in unflagged]
    labels += [c["review"]["label"] for c in reviewed if c["review"]["label"] != UNUSABLE]
    unfamiliar_percent = _percent(unfamiliar, cells)
    meaningful = unfamiliar_percent is None or unfamiliar_percent <= MOSTLY_UNFAMILIAR_PERCENT
    coverage = {
        "cells": cells,
        "unflagged": sum(not _needs_review(c) for c in classified),
        "unflagged_percent": _percent(sum(not _needs_review(c) for c in classified), cells),
        "unfamiliar": unfamiliar,
        "unfamiliar_percent": unfamiliar_percent,
        "reviewed": len(reviewed),
        "speaks_for": len(labels),
        "speaks_for_percent": _percent(len(labels), cells),
        "meaningful": meaningful,
        "warning": None
        if meaningful
        else (
            f"{unfamiliar} of {cells} cells ({unfamiliar_percent} %) look unlike the images this model learned "
            "from (another scanner, stain or lab): the automatic differential below is not meaningful for this "
            "drop. Review the cells; the flags rest only on unflagged and reviewed cells."
        ),
    }
    return coverage, labels


def differential_report(settings: Settings, drop: str, *, model_version: str | int | None = None) -> dict[str, Any]:
    """The report of ``drop`` (its name as in ``files_seen``; ``""`` for loose files) from the
    predictions database: with ``model_version``, that version's predictions (files it did not
    classify count as pending), else each image's newest prediction. :class:`ReportError` when
    the database holds no file of ``drop``."""
    cells = drop_cells(settings, drop, model_version=model_version, with_probabilities=False)
    if not cells:
        raise ReportError(f"drop {drop!r} has no files in the predictions database {_shown_url(settings)}")
    classified = [c for c in cells if c["status"] == "classified"]
    rejected = sum(c["status"] == "rejected" for c in cells)
    files = len(cells)
    labels = [c["prediction"]["predicted_class"] for c in classified]
    automatic = _differential(labels, files, rejected)
    flagged = [c for c in classified if c["prediction"]["needs_review"] or is_blast_suspected(c["prediction"])]
    reasons: Counter[str] = Counter({name: 0 for name in REVIEW_REASONS})
    for c in classified:
        reasons.update(reasons_of(c["prediction"]))
    models = Counter((c["prediction"]["model_name"], c["prediction"]["model_version"]) for c in classified)
    blast_cells = sum(is_blast_suspected(c["prediction"]) for c in classified)
    coverage, trusted_labels = _coverage(classified)
    left_out = (
        len(classified)
        - coverage["speaks_for"]
        - sum(c["review"] is not None and c["review"]["label"] == UNUSABLE for c in classified)
    )
    rests_on = {
        "blasts_suspected": f"all {len(classified)} classified cells (a suspected blast counts even when flagged)",
        "left_shift": f"{coverage['speaks_for']} cells the model or a reviewer speaks for "
        f"({coverage['speaks_for'] - coverage['reviewed']} unflagged, {coverage['reviewed']} reviewed); "
        f"{left_out} flagged cells nobody reviewed left out",
    }
    trusted = _differential(trusted_labels, files, rejected)
    report: dict[str, Any] = {
        "drop": drop,
        "generated_at": utcnow().isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "files": files,
        "cells": len(classified),
        "rejected": rejected,
        "pending": sum(c["status"] == "pending" for c in cells),
        "coverage": coverage,
        "model_version_requested": None if model_version is None else str(model_version),
        "models": [
            {"model_name": name, "model_version": version, "cells": n}
            for (name, version), n in sorted(models.items(), key=lambda item: _version_key(item[0][1]))
        ],
        "differential": automatic,
        "review": {
            "needs_review": len(flagged),
            "reasons": dict(reasons),
            "reviewed": sum(c["review"] is not None for c in classified),
            "rule": f"A cell needs review when the classifier flagged it (reasons as recorded: "
            f"{', '.join(REVIEW_REASONS)}; flagged rows from before reasons were recorded count as "
            f"{ReviewReason.LOW_CONFIDENCE.value}) or when it is a suspected blast.",
        },
        "flags": _flags(settings, trusted, blast_cells, files, rejected, rests_on),
        "reviewed": _reviewed_part(settings, classified, files, rejected),
    }
    return report


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if str(version).isdigit() else (1 << 30, str(version))


def _reviewed_part(
    settings: Settings, classified: list[dict[str, Any]], files: int, rejected: int
) -> dict[str, Any] | None:
    """The differential after review, or None while no cell of the drop was reviewed."""
    reviewed = [c for c in classified if c["review"] is not None]
    if not reviewed:
        return None
    labels = []
    blast_cells = 0
    for c in classified:
        label = c["review"]["label"] if c["review"] is not None else c["prediction"]["predicted_class"]
        if label == UNUSABLE:
            continue
        labels.append(label)
        # A reviewed cell is a blast only if the reviewer says so; an unreviewed one by the model's rule.
        blast_cells += label == BLAST_CLASS if c["review"] is not None else is_blast_suspected(c["prediction"])
    differential = _differential(labels, files, rejected)
    return {
        "reviewed_cells": len(reviewed),
        "changed": sum(c["review"]["label"] != c["prediction"]["predicted_class"] for c in reviewed),
        "unusable": sum(c["review"]["label"] == UNUSABLE for c in reviewed),
        "cells": len(labels),
        "reviewers": sorted({c["review"]["reviewer"] for c in reviewed}),
        "last_reviewed_at": max(_iso(c["review"]["reviewed_at"]) for c in reviewed),
        "differential": differential,
        "flags": _flags(settings, differential, blast_cells, files, rejected),
    }


def _iso(value: datetime | str) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)


def _shown_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.predictions_db_url).render_as_string(hide_password=True)


def drops_of_run(settings: Settings, dag_run_id: str) -> list[str]:
    """The drops a nightly run classified or recorded files of."""

    def read(connection: Connection) -> list[str]:
        seen = select(files_seen.c.drop).where(files_seen.c.dag_run_id == dag_run_id)
        classified = (
            select(files_seen.c.drop)
            .join(predictions, predictions.c.sha256 == files_seen.c.sha256)
            .where(predictions.c.dag_run_id == dag_run_id)
        )
        return sorted(set(connection.execute(seen.union(classified)).scalars()))

    with open_engine(settings.predictions_db_url) as engine:
        return read_with_retries(settings, engine, read, what=f"finding the drops of run {dag_run_id}")
