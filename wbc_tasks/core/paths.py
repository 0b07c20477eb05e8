"""Paths from users (params, the command line, drop folders) checked against the configured
folders, and file-system-safe names: the one place these rules live."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from wbc_tasks.core.errors import PermanentError


def is_inside(target: Path, roots: Iterable[Path]) -> bool:
    """True when ``target`` is one of ``roots`` or lies under one (no resolving: callers pass
    resolved paths when links matter)."""
    return any(target == root or target.is_relative_to(root) for root in roots)


class OutsideAllowedFoldersError(PermanentError, ValueError):
    """A path from a param or the command line lies outside the configured folders."""


def resolve_inside(path: str | Path, roots: tuple[Path, ...], what: str) -> Path:
    """``path`` resolved (links followed); :class:`OutsideAllowedFoldersError` unless it lies
    under one of ``roots``. Params come from anyone who may trigger a DAG: they must not be able
    to point the pipeline at arbitrary folders of the workers."""
    try:
        target = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise OutsideAllowedFoldersError(f"{what} {path} cannot be resolved: {exc}") from exc
    if not is_inside(target, roots):
        allowed = ", ".join(str(r) for r in roots)
        raise OutsideAllowedFoldersError(
            f"{what} {path} resolves to {target}, outside the configured folders ({allowed}); "
            "add its folder to WBC_ALLOWED_ROOTS to allow it"
        )
    return target


def safe_name(text: str) -> str:
    """A file-system-safe version of an Airflow run id or similar label."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return cleaned.strip("._") or "run"
