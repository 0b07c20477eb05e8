"""The differential report rendered: JSON, CSV (spreadsheet-safe cells) or one self-contained HTML
page from ``templates/report.html`` (autoescaped, with its own Content-Security-Policy), written to
a file or logged per drop; the report itself is :func:`wbc_tasks.serving.report.differential_report`."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wbc_tasks.core.html import render_template
from wbc_tasks.core.settings import Settings
from wbc_tasks.core.spreadsheet import spreadsheet_safe_frame
from wbc_tasks.serving.report import REPORT_FORMATS, differential_report

if TYPE_CHECKING:
    pass

CSV_COLUMNS = ["section", "item", "count", "percent", "reviewed_count", "reviewed_percent", "note"]


#: The HTML report's own Content-Security-Policy (a meta tag: the file is opened from disk or a
#: mail, where no server sends headers). It has no scripts, so none may run; its styles are inline.
#: Nonces and ``frame-ancestors`` mean nothing in a meta tag; served by the lab, the page also gets
#: the lab's header policy (both apply).
REPORT_META_POLICY = (
    "default-src 'none'; script-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; object-src 'none'"
)


def render_report(report: dict[str, Any], fmt: str, *, nav: dict[str, str] | None = None) -> str:
    """``report`` as ``json``, ``csv`` (one row per class, reason, flag and model) or ``html``
    (one self-contained page: no scripts, fonts or images from elsewhere). ``nav`` (html only):
    the lab's navigation bar above the report, ``drops`` and ``review`` links and the ``user``."""
    if fmt == "json":
        return json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n"
    if fmt == "csv":
        return _csv(report)
    if fmt == "html":
        return _html(report, nav)
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
    coverage = report["coverage"]
    if coverage["warning"]:
        rows.append({"section": "notice", "item": "not_meaningful", "note": coverage["warning"]})
    for key in ("unflagged", "unfamiliar", "reviewed", "speaks_for"):
        percent = coverage.get(f"{key}_percent")
        rows.append({"section": "coverage", "item": key, "count": coverage[key], "percent": percent})
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
                "note": f"{flag['rule']} Rests on: {flag['rests_on']}.",
            }
        )
    for model in report["models"]:
        item = f"{model['model_name']} v{model['model_version']}"
        rows.append({"section": "model", "item": item, "count": model["cells"]})
    buffer = io.StringIO()
    # Nullable integers: a count column with gaps would otherwise print 14 as 14.0.
    table = pd.DataFrame(rows, columns=CSV_COLUMNS).astype({"count": "Int64", "reviewed_count": "Int64"})
    spreadsheet_safe_frame(table).to_csv(buffer, index=False)
    return buffer.getvalue()


def _html(report: dict[str, Any], nav: dict[str, str] | None) -> str:
    reviewed = report["reviewed"]
    return render_template(
        "wbc_tasks.serving",
        "report.html",
        r=report,
        nav=nav,
        policy=REPORT_META_POLICY,
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
