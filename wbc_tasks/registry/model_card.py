"""The model card: what a registered version is, what it was trained on, how it tested, where
it falls short.

:func:`model_card` writes the markdown card of one version (intended use, training data per
split and source with the sets' required citations, test metrics, params, limitations);
registration stores it as the version's description and the run artifact ``model_card.md``, and
:func:`describe_registered_model` puts a version's card under a headline into the registered
model's description, cut to the registry's 5,000-character column.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings
from wbc_tasks.registry.client import call_with_retries, configure_mlflow
from wbc_tasks.registry.tags import is_number, param_text, per_class_values

log = logging.getLogger(__name__)

#: The registry stores descriptions in a 5,000-character column (PostgreSQL enforces it).
MAX_DESCRIPTION_CHARS = 5000
#: File name of the full model card among the run's artifacts.
MODEL_CARD_FILE = "model_card.md"

#: Citations of the public sets the shared development data comes from (their licences require
#: attribution wherever they are used), matched by the start of a SOURCES.csv ``source`` value.
KNOWN_SOURCE_CITATIONS: dict[str, str] = {
    "pbc": (
        'PBC dataset: A. Acevedo et al., "A dataset of microscopic peripheral blood cell images '
        'for development of automatic recognition systems", Data in Brief 30 (2020) 105474; '
        "CC BY 4.0."
    ),
    "matek": (
        'AML-Cytomorphology_LMU: C. Matek et al., "Human-level recognition of blast cells in '
        'acute myeloid leukaemia with convolutional neural networks", Nature Machine Intelligence '
        "1 (2019) 538-544; TCIA doi:10.7937/tcia.2019.36f5o9ld; CC BY."
    ),
}
#: Below this many test images a class's recall is a rough estimate; the card says so.
FEW_TEST_IMAGES = 30
SOURCES_FILE = "SOURCES.csv"


def source_counts(manifest: Any, data_dir: Path | str) -> dict[str, dict[str, int]] | None:
    """``{class: {source: images}}`` for the manifest's images, from a ``SOURCES.csv`` (columns
    ``sha256`` and ``source``) in ``data_dir`` or its parent; None where there is none."""
    import pandas as pd

    data_dir = Path(data_dir)
    for candidate in (data_dir / SOURCES_FILE, data_dir.parent / SOURCES_FILE):
        if candidate.is_file():
            sources = pd.read_csv(candidate, dtype=str, keep_default_na=False)
            break
    else:
        return None
    if not {"sha256", "source"} <= set(sources.columns):
        log.warning(
            "%s lacks the sha256/source columns; sources left out of the model card",
            candidate,
        )
        return None
    by_hash = dict(zip(sources["sha256"], sources["source"], strict=True))
    counts: dict[str, dict[str, int]] = {}
    for cls, sha in zip(manifest["class"], manifest["sha256"], strict=True):
        source = by_hash.get(sha, "unknown")
        counts.setdefault(str(cls), {}).setdefault(source, 0)
        counts[str(cls)][source] += 1
    return counts


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def model_card(
    *,
    model_name: str,
    version: str,
    dag_run_id: str,
    mlflow_run_id: str,
    image_size: int,
    class_names: tuple[str, ...],
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    params: Mapping[str, Any],
    registered_at: str | None = None,
) -> str:
    """The model card (markdown) of one version.

    ``data_summary`` is the split step's summary: ``counts`` (``{split: {class: n}}``),
    ``data_dir``, ``rejected``; optionally ``sources`` (``{class: {source: n}}``, see
    :func:`source_counts`), ``train_after_balancing`` (``{class: n}``) and ``attribution`` (text).
    """
    registered_at = registered_at or datetime.now(UTC).isoformat(timespec="seconds")
    counts: Mapping[str, Mapping[str, int]] = data_summary.get("counts") or {}
    sources: Mapping[str, Mapping[str, int]] = data_summary.get("sources") or {}
    lines = _intended_use(model_name, version, dag_run_id, mlflow_run_id, image_size, class_names, registered_at)
    lines += ["", "## Training data"]
    lines += _split_table(data_summary, counts, class_names)
    lines += _sources(data_summary, sources)
    lines += ["", "## Test metrics", ""]
    lines += _test_metrics(metrics, counts, class_names)
    lines += _trust(metrics)
    lines += ["", "## Training params", ""]
    lines.append("; ".join(f"{k}={param_text(v)}" for k, v in params.items()) or "(none recorded)")
    lines += ["", "## Limitations"]
    lines += _limitations(metrics, counts, sources, params)
    return "\n".join(lines) + "\n"


def _intended_use(
    model_name: str,
    version: str,
    dag_run_id: str,
    mlflow_run_id: str,
    image_size: int,
    class_names: tuple[str, ...],
    registered_at: str,
) -> list[str]:
    """The card's title, what the model takes and gives, and what it is (not) for."""
    return [
        f"# {model_name} version {version}: model card",
        "",
        (
            f"White-blood-cell classifier; input {image_size}x{image_size} RGB uint8 pixels "
            f"(normalisation inside the model); outputs probabilities for {len(class_names)} "
            f"classes: {', '.join(class_names)}. Registered {registered_at} by Airflow DAG run "
            f"`{dag_run_id}` (MLflow run `{mlflow_run_id}`)."
        ),
        "",
        "## Intended use",
        "- **Research use only. Not a diagnostic device**; not cleared or approved for clinical use.",
        (
            "- Suggests a class for single-cell images like the training images; **every result "
            "needs review by a qualified person** before it informs any decision about a patient."
        ),
        (
            "- Not for other cell types, whole slides, or classes outside the list above (it "
            "always answers one of them)."
        ),
    ]


def _split_table(
    data_summary: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]], class_names: tuple[str, ...]
) -> list[str]:
    """Where the images came from and the images per class and split (and after balancing)."""
    lines: list[str] = []
    splits = [s for s in ("train", "val", "test") if s in counts] + [
        s for s in counts if s not in ("train", "val", "test")
    ]
    balanced = data_summary.get("train_after_balancing") or {}
    if data_summary.get("data_dir"):
        lines.append(f"Images from `{data_summary['data_dir']}`, split by content hash.")
    if counts:
        header = ["class", *splits, "total"] + (["train after balancing"] if balanced else [])
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        classes = [c for c in class_names if any(c in counts[s] for s in splits)]
        for cls in classes:
            row = [int(counts[s].get(cls, 0)) for s in splits]
            cells = [cls, *map(str, row), str(sum(row))] + ([str(balanced.get(cls, ""))] if balanced else [])
            lines.append("| " + " | ".join(cells) + " |")
        totals = [sum(int(v) for v in counts[s].values()) for s in splits]
        lines.append("| **all** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |" + (" |" if balanced else ""))
    if data_summary.get("rejected"):
        lines.append(
            f"\n{data_summary['rejected']} files were rejected (unreadable, duplicate or conflicting labels; "
            "see the run's split artifacts)."
        )
    return lines


def _sources(data_summary: Mapping[str, Any], sources: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The images per source lab, the citations their licences require, or where to look."""
    lines: list[str] = []
    if sources:
        per_source: dict[str, int] = {}
        for by_source in sources.values():
            for source, n in by_source.items():
                per_source[source] = per_source.get(source, 0) + int(n)
        lines.append("\nSources: " + ", ".join(f"{s} ({n} images)" for s, n in sorted(per_source.items())) + ".")
        citations = [
            text
            for prefix, text in KNOWN_SOURCE_CITATIONS.items()
            if any(s.lower().startswith(prefix) for s in per_source)
        ]
        if citations:
            lines += ["", "Attribution (required by the sets' licences):"] + [f"- {c}" for c in citations]
    if data_summary.get("attribution"):
        lines += ["", str(data_summary["attribution"])]
    if not sources and not data_summary.get("attribution"):
        lines.append("\nSources and licences: see the data folder's own README / SOURCES file.")
    return lines


def _test_metrics(
    metrics: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]], class_names: tuple[str, ...]
) -> list[str]:
    """The headline test metrics and the per-class recall and precision table."""
    lines: list[str] = []
    headline = {
        k: v for k, v in metrics.items() if not isinstance(v, Mapping) and is_number(v) and k not in TRUST_METRICS
    }
    if headline:
        lines.append(", ".join(f"{k} **{_fmt(float(v))}**" for k, v in headline.items()) + " on the test split.")
    recall = per_class_values(metrics, "recall")
    precision = per_class_values(metrics, "precision")
    support = per_class_values(metrics, "support")
    if recall:
        lines += [
            "",
            "| class | recall | precision | test images |",
            "|---|---|---|---|",
        ]
        for cls in [c for c in class_names if c in recall] + sorted(set(recall) - set(class_names)):
            test_images: Any = support.get(cls, counts.get("test", {}).get(cls, ""))
            shown = _fmt(int(test_images)) if test_images != "" else ""
            lines.append(f"| {cls} | {_fmt(recall[cls])} | {_fmt(precision.get(cls, ''))} | {shown} |")
    return lines


def _trust(metrics: Mapping[str, Any]) -> list[str]:
    """The calibration and review-flag figures, in words; nothing when there are none."""
    trust = {k: float(metrics[k]) for k in TRUST_METRICS if is_number(metrics.get(k))}
    if not trust:
        return []
    return [
        "",
        "## Confidence and review flags (test split)",
        "",
        *(f"- {TRUST_METRICS[k]}: **{_fmt(v)}**" for k, v in trust.items()),
        "- Probabilities are calibrated (temperature scaling on the validation split, folded into the "
        "model; T stays 1 when the fitted T does not lower the validation NLL beyond its noise). "
        "A perfectly calibrated model scores an ECE of about 0.04 on ~500 test images by chance.",
    ]


def _limitations(
    metrics: Mapping[str, Any],
    counts: Mapping[str, Mapping[str, int]],
    sources: Mapping[str, Mapping[str, int]],
    params: Mapping[str, Any],
) -> list[str]:
    """Where the model falls short: lab shift, single-source classes, thin test classes, SMOTE."""
    lines = [
        "- Lab, stain and scanner shift: it has only seen the labs and scanners above. Cells from "
        "another lab, stain or magnification may be misclassified with high confidence; validate "
        "on local images before relying on it."
    ]
    single_source = sorted(
        (cls, next(iter(by_source))) for cls, by_source in sources.items() if len(by_source) == 1 and len(sources) > 1
    )
    if single_source:
        lines.append(
            "- Classes from a single source: "
            + ", ".join(f"{cls} (only {src})" for cls, src in single_source)
            + ". The model may have learnt that source's look instead of the cell: an unfamiliar "
            "stain can be called one of these classes."
        )
    support = per_class_values(metrics, "support")
    few = sorted(cls for cls, n in (support or counts.get("test", {})).items() if 0 < float(n) < FEW_TEST_IMAGES)
    if few:
        lines.append(
            f"- Few test images (under {FEW_TEST_IMAGES}) for {', '.join(few)}: their recall is a rough estimate."
        )
    lines.append(
        "- Neighbouring maturation stages (bands vs neutrophils, metamyelocytes vs myelocytes) are "
        "the most confused pairs."
    )
    if params.get("smote"):
        lines.append("- Minority classes were oversampled with SMOTE (synthetic training images).")
    return lines


#: Trust figures (from wbc_tasks.training.evaluate_trust) shown in their own section, in words.
TRUST_METRICS = {
    "ece": "expected calibration error (15 bins), calibrated",
    "ece_before_calibration": "expected calibration error before calibration",
    "nll": "negative log-likelihood, calibrated",
    "nll_before_calibration": "negative log-likelihood before calibration",
    "brier": "Brier score, calibrated",
    "temperature": "calibration temperature T",
    "review_threshold": "review threshold on calibrated confidence (fitted on validation)",
    "coverage": "share of test images with no review reason",
    "unflagged_accuracy": "accuracy of those images",
    "unfamiliar_or_image_check_share": "test images flagged unfamiliar or by the image check",
    "blast_flag_non_blast_share": "non-blasts flagged blast_suspected",
    "blasts_caught_share": "blasts predicted blasts or flagged",
    "mosaics_flagged_share": "corner mosaics without a white cell that are flagged",
    "non_cells_flagged_share": "generated non-cell frames (blank, uniform, noise, blobs) that are flagged",
}


def fit_description(text: str, note: str) -> str:
    """``text`` cut at a line to fit the registry's description column, ending with ``note``."""
    if len(text) <= MAX_DESCRIPTION_CHARS:
        return text
    budget = MAX_DESCRIPTION_CHARS - len(note) - 2
    cut = text[:budget].rsplit("\n", 1)[0]
    return f"{cut}\n\n{note}"


def describe_registered_model(settings: Settings, version: str, headline: str) -> None:
    """Set the registered model's description: ``headline`` and the card of ``version``."""
    client = configure_mlflow(settings)
    mv = call_with_retries(settings, client.get_model_version, settings.model_name, str(version))
    text = fit_description(
        f"**{headline}**\n\n{mv.description or ''}",
        f"(cut to fit; the full card is `{MODEL_CARD_FILE}` in MLflow run {mv.run_id})",
    )
    call_with_retries(settings, client.update_registered_model, settings.model_name, description=text)
