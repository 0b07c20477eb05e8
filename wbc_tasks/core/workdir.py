"""Per-run work folders whose steps mark their output complete last.

A step writes everything into ``<run dir>/<step>/`` and only then the marker
(:data:`~wbc_tasks.core.settings.COMPLETE_MARKER`, holding the step's summary). A retried task finds
either a marker, and reuses the finished output, or no marker, and starts the folder afresh: it
never reads half an output. Writing the marker last, instead of renaming a folder into place,
works the same on object storage, which has no atomic rename.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wbc_tasks.core.settings import COMPLETE_MARKER

log = logging.getLogger(__name__)


class NoSpaceError(OSError):
    """A step ran out of disk space in its work folder (errno ENOSPC or EDQUOT)."""


def _space(folder: Path) -> str:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def read_marker(step_dir: Path) -> dict[str, Any] | None:
    """The summary a finished step left, or None if the step is not complete."""
    marker = step_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    summary: dict[str, Any] = json.loads(marker.read_text())
    return summary


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def mark_complete(step_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the marker: the last thing a step does."""
    write_json_atomic(step_dir / COMPLETE_MARKER, summary)
    return summary


def require_complete(step_dir: Path) -> dict[str, Any]:
    """The summary of an upstream step, or a clear error if it never finished."""
    summary = read_marker(step_dir)
    if summary is None:
        raise RuntimeError(f"{step_dir} has no {COMPLETE_MARKER}: its step did not finish; re-run that step first")
    return summary


def run_step(step_dir: Path, build: Callable[[Path], dict[str, Any]], *, force: bool = False) -> dict[str, Any]:
    """Run ``build(step_dir)`` unless the step already completed; return its summary.

    Leftovers of an interrupted attempt are removed first, so ``build`` always starts from an
    empty folder. A full disk (or quota) raises :class:`NoSpaceError` naming the folder; the
    marker is then not written, and the next attempt starts afresh.
    """
    if not force:
        done = read_marker(step_dir)
        if done is not None:
            log.info("step %s already complete; reusing its output", step_dir.name)
            return done
    if step_dir.exists():
        log.info("removing leftovers of an unfinished attempt in %s", step_dir)
        shutil.rmtree(step_dir)
    try:
        step_dir.mkdir(parents=True)
        summary = build(step_dir)
        summary = {"step": step_dir.name, "dir": str(step_dir), **summary}
        return mark_complete(step_dir, summary)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, NoSpaceError):
            raise
        raise NoSpaceError(
            exc.errno,
            f"no space left on device: step '{step_dir.name}' could not write its output in "
            f"{step_dir} ({_space(step_dir.parent)}; {exc}). The step is not marked complete. Free "
            f"space there (or point WBC_WORK_DIR at a larger volume) and retry: the next attempt "
            f"removes this unfinished output first",
        ) from exc
