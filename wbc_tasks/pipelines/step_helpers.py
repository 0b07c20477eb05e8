"""What the training steps share: each step's context (settings, params, the run's work folder),
logging a step folder's files to the run, and what a summary may show in Airflow's logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import Settings, get_settings
from wbc_tasks.training.params import TrainingParams, training_params


def step_context(run_id: str, params: dict[str, Any] | None) -> tuple[Settings, TrainingParams, Path]:
    """The settings (read now), the validated training params and the run's work folder."""
    settings = get_settings()
    return settings, training_params(params), settings.run_dir(run_id)


def log_step_artifacts(
    settings: Settings, run_id: str, folder: Path, artifact_path: str, data_dir: Path | None = None
) -> None:
    """Log a step folder's result files (pseudonymised copies when ``WBC_PSEUDONYMISE_NAMES``;
    reviewed images' paths lie in the classify folder, so that is a root too)."""
    from wbc_tasks.registry.artifacts import log_stage_artifacts

    roots = (data_dir, settings.classify_dir) if data_dir else ()
    log_stage_artifacts(settings, run_id, folder, artifact_path, roots=roots)


def split_summary_for_logs(settings: Settings, summary: dict, data_dir: Path, manifest: Any) -> dict:
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


def groups_csv(data_dir: Path) -> Path | None:
    """An optional ``groups.csv`` beside the data (lab, scanner...) for broken-down metrics."""
    for candidate in (data_dir / "groups.csv", data_dir.parent / "groups.csv"):
        if candidate.is_file():
            return candidate
    return None
