"""The differential report of one drop (a slide or sample): counts and percentages per class,
unreadable files, how many cells need review and why, the model version(s), and the flags a lab
acts on, each with its rule in words; beside it, once people reviewed cells, the reviewed
differential. As a dict (:func:`differential_report`) and rendered as JSON, CSV or a
self-contained HTML page (:func:`render_report`). Reads only. Imports ``core`` and
:mod:`.predictions`, :mod:`.reviews`.

Percentages of classes are of the drop's classified cells (a differential counts white cells,
not files); the unreadable share is of all the drop's files. In the reviewed differential a
cell counts under its latest review's label (cells nobody reviewed keep the model's class) and
cells reviewed ``unusable`` leave it.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES, REVIEW_REASONS
from wbc_tasks.serving.predictions import files_seen, open_engine, predictions, read_with_retries, utcnow
from wbc_tasks.serving.reviews import (
    BLAST_CLASS,
    BLAST_REASON,
    UNUSABLE,
    drop_cells,
    is_blast_suspected,
    reasons_of,
)

#: Said in every rendering of a report.
DISCLAIMER = (
    "For research use only; not a diagnostic device. Results need review by a qualified person before any clinical use."
)
#: The row of files that could not be classified.
UNREADABLE = "unreadable/rejected"
REPORT_FORMATS = ("html", "csv", "json")
#: The immature granulocytes whose share makes a left shift.
LEFT_SHIFT_CLASSES = ("bands", "metamyelocytes", "myelocytes")
CSV_COLUMNS = ["section", "item", "count", "percent", "reviewed_count", "reviewed_percent", "note"]


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
        f"Raised when any cell's predicted class is blasts, or the classifier marked it {BLAST_REASON} "
        f"because its blast probability reached {setting}. Any blast in peripheral blood needs urgent review."
    )


def _flags(
    settings: Settings, differential: list[dict[str, Any]], blast_cells: int, files: int, rejected: int
) -> list[dict[str, Any]]:
    by_class = {row["class"]: row for row in differential}
    cells = sum(row["count"] for row in differential if row["class"] != UNREADABLE)
    immature = sum(by_class[name]["count"] for name in LEFT_SHIFT_CLASSES if name in by_class)
    left_shift = _percent(immature, cells)
    unreadable = _percent(rejected, files)
    return [
        {
            "name": "blasts_suspected",
            "title": "Blasts suspected",
            "raised": blast_cells > 0,
            "value": blast_cells,
            "rule": _blast_rule(settings),
        },
        {
            "name": "left_shift",
            "title": "Left shift",
            "raised": left_shift is not None and left_shift > settings.left_shift_percent,
            "value": left_shift,
            "rule": f"Raised when bands + metamyelocytes + myelocytes are more than WBC_LEFT_SHIFT_PERCENT = "
            f"{settings.left_shift_percent:g} % of the classified cells.",
        },
        {
            "name": "many_unreadable_files",
            "title": "Many unreadable files",
            "raised": unreadable is not None and unreadable > settings.unreadable_flag_percent,
            "value": unreadable,
            "rule": f"Raised when more than WBC_UNREADABLE_FLAG_PERCENT = {settings.unreadable_flag_percent:g} % "
            "of the drop's files could not be classified (unreadable or rejected).",
        },
    ]


def differential_report(settings: Settings, drop: str, *, model_version: str | int | None = None) -> dict[str, Any]:
    """The report of ``drop`` (its name as in ``files_seen``; ``""`` for loose files) from the
    predictions database: with ``model_version``, that version's predictions (files it did not
    classify count as pending), else each image's newest prediction. :class:`ReportError` when
    the database holds no file of ``drop``."""
    cells = drop_cells(settings, drop, model_version=model_version)
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
    report: dict[str, Any] = {
        "drop": drop,
        "generated_at": utcnow().isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "files": files,
        "cells": len(classified),
        "rejected": rejected,
        "pending": sum(c["status"] == "pending" for c in cells),
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
            "rule": "A cell needs review when the classifier flagged it (reasons as recorded: low_confidence, "
            "unfamiliar, image_check, blast_suspected; flagged rows from before reasons were recorded count as "
            "low_confidence) or when it is a suspected blast.",
        },
        "flags": _flags(settings, automatic, blast_cells, files, rejected),
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_report(report: dict[str, Any], fmt: str) -> str:
    """``report`` as ``json``, ``csv`` (one row per class, reason, flag and model) or ``html``
    (one self-contained page: no scripts, fonts or images from elsewhere)."""
    if fmt == "json":
        return json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n"
    if fmt == "csv":
        return _csv(report)
    if fmt == "html":
        return _html(report)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(REPORT_FORMATS)}")


def write_report(
    settings: Settings, drop: str, fmt: str, out: Path | str | None = None, *, model_version: str | int | None = None
) -> str:
    """Render ``drop``'s report as ``fmt``; write it to ``out`` when given; return the text."""
    text = render_report(differential_report(settings, drop, model_version=model_version), fmt)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return text


def _csv(report: dict[str, Any]) -> str:
    import pandas as pd

    reviewed = report["reviewed"] or {}
    after = {row["class"]: row for row in reviewed.get("differential", [])}
    rows: list[dict[str, Any]] = [{"section": "notice", "item": "research_use", "note": report["disclaimer"]}]
    for key in ("files", "cells", "rejected", "pending"):
        rows.append({"section": "drop", "item": key, "count": report[key], "note": report["drop"]})
    for row in report["differential"]:
        other = after.get(row["class"], {})
        rows.append(
            {
                "section": "differential",
                "item": row["class"],
                "count": row["count"],
                "percent": row["percent"],
                "reviewed_count": other.get("count"),
                "reviewed_percent": other.get("percent"),
            }
        )
    rows.append({"section": "review", "item": "needs_review", "count": report["review"]["needs_review"]})
    rows.append({"section": "review", "item": "reviewed", "count": report["review"]["reviewed"]})
    for reason, n in report["review"]["reasons"].items():
        rows.append({"section": "review_reason", "item": reason, "count": n})
    reviewed_flags = {f["name"]: f for f in reviewed.get("flags", [])}
    for flag in report["flags"]:
        other = reviewed_flags.get(flag["name"], {})
        rows.append(
            {
                "section": "flag",
                "item": flag["name"],
                "count": int(flag["raised"]),
                "percent": flag["value"],
                "reviewed_count": None if not other else int(other["raised"]),
                "reviewed_percent": other.get("value"),
                "note": flag["rule"],
            }
        )
    for model in report["models"]:
        item = f"{model['model_name']} v{model['model_version']}"
        rows.append({"section": "model", "item": item, "count": model["cells"]})
    buffer = io.StringIO()
    # Nullable integers: a count column with gaps would otherwise print 14 as 14.0.
    table = pd.DataFrame(rows, columns=CSV_COLUMNS).astype({"count": "Int64", "reviewed_count": "Int64"})
    table.to_csv(buffer, index=False)
    return buffer.getvalue()


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Differential report: {{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.notice { background: #fff4ce; border: 1px solid #e0b400; padding: .7rem 1rem; border-radius: 4px; font-weight: 600; }
.meta { color: #555; }
table { border-collapse: collapse; width: 100%; margin-top: .5rem; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { background: #4a78b5; height: .7rem; display: inline-block; border-radius: 2px; }
.flag { border: 1px solid #ccc; border-radius: 4px; padding: .6rem 1rem; margin: .5rem 0; }
.flag.raised { border-color: #b3261e; background: #fdecea; }
.flag .state { font-weight: 700; } .flag.raised .state { color: #b3261e; }
.rule { color: #444; font-size: .92rem; }
</style>
</head>
<body>
<p class="notice">{{ r.disclaimer }}</p>
<h1>Differential report: {{ title }}</h1>
<p class="meta">Generated {{ r.generated_at }} (UTC) from the predictions database.
{{ r.files }} files: {{ r.cells }} cells classified, {{ r.rejected }} unreadable or rejected{% if r.pending %},
{{ r.pending }} not classified yet{% endif %}.
Model: {% for m in r.models %}{{ m.model_name }} version {{ m.model_version }} ({{ m.cells }} cells)
{%- if not loop.last %}; {% endif %}{% else %}none{% endfor %}.</p>

<h2>Flags</h2>
{% macro state(f) %}{{ "RAISED" if f.raised else "not raised" }}{% if f.value is not none %}
 ({{ f.value }}{{ " %" if f.name != "blasts_suspected" else (" cell" if f.value == 1 else " cells") }}){% endif %}
{%- endmacro %}
{% for f in r.flags %}
<div class="flag{% if f.raised %} raised{% endif %}">
<span class="state">{{ f.title }}: {{ state(f) }}</span>
{% if reviewed %} · after review: <strong>{{ state(reviewed_flags[f.name]) }}</strong>{% endif %}
<div class="rule">{{ f.rule }}</div>
</div>
{% endfor %}

<h2>Differential</h2>
<p class="rule">Percentages of classes are of the classified cells; the unreadable share is of all files.
{% if reviewed %}Reviewed: each cell under its latest review's label ({{ reviewed.reviewed_cells }} cells reviewed by
{{ reviewed.reviewers | join(", ") }}, last {{ reviewed.last_reviewed_at }}; {{ reviewed.changed }} changed,
{{ reviewed.unusable }} marked unusable and left out); unreviewed cells keep the model's class.{% else %}
No cell of this drop has been reviewed yet.{% endif %}</p>
<table>
<thead><tr><th>Class</th><th>Count</th><th>%</th><th></th>
{% if reviewed %}<th>Reviewed count</th><th>Reviewed %</th>{% endif %}</tr></thead>
<tbody>
{% for row in r.differential %}{% set other = reviewed_rows.get(row["class"]) %}
<tr><td>{{ row["class"] }}</td><td class="num">{{ row["count"] }}</td>
<td class="num">{{ "%.1f" % row.percent if row.percent is not none else "–" }}</td>
<td style="width: 25%"><span class="bar" style="width: {{ row.percent or 0 }}%"></span></td>
{% if reviewed %}<td class="num">{{ other["count"] if other else "–" }}</td>
<td class="num">{{ "%.1f" % other.percent if other and other.percent is not none else "–" }}</td>{% endif %}</tr>
{% endfor %}
</tbody>
</table>

<h2>Review</h2>
<p>{{ r.review.needs_review }} of {{ r.cells }} cells need review; {{ r.review.reviewed }} reviewed so far.</p>
<table>
<thead><tr><th>Reason</th><th>Cells</th></tr></thead>
<tbody>
{% for reason, n in r.review.reasons.items() %}<tr><td>{{ reason }}</td><td class="num">{{ n }}</td></tr>
{% endfor %}
</tbody>
</table>
<p class="rule">{{ r.review.rule }} A cell may have several reasons.</p>

<p class="notice">{{ r.disclaimer }}</p>
</body>
</html>
"""


def _html(report: dict[str, Any]) -> str:
    from jinja2 import Environment, StrictUndefined

    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    reviewed = report["reviewed"]
    return environment.from_string(_TEMPLATE).render(
        r=report,
        title=report["drop"] or "(files outside any drop folder)",
        reviewed=reviewed,
        reviewed_rows={row["class"]: row for row in reviewed["differential"]} if reviewed else {},
        reviewed_flags={f["name"]: f for f in reviewed["flags"]} if reviewed else {},
    )


def report_files(settings: Settings, drop: str, folder: Path, formats: Iterable[str] = REPORT_FORMATS) -> list[Path]:
    """Write ``drop``'s report into ``folder`` once per format (``differential.<fmt>``)."""
    report = differential_report(settings, drop)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = folder / f"differential.{fmt}"
        path.write_text(render_report(report, fmt), encoding="utf-8")
        written.append(path)
    return written
