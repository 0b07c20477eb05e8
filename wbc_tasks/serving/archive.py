"""Moving committed files out of the classify folder into ``settings.archive_dir`` (same
relative path), once their rows are in the database; nothing is moved unless that folder is set.
A file that cannot be moved stays where it is, with a warning: its rows are committed, so the
next scan finds it done.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence

from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import Settings

log = logging.getLogger(__name__)


def archive_files(settings: Settings, rel_paths: Sequence[str]) -> int:
    """Move committed files into ``settings.archive_dir`` (no-op unless it is set); returns
    how many were moved."""
    if settings.archive_dir is None or not rel_paths:
        return 0
    moved = 0
    for rel in sorted(set(rel_paths)):
        source = settings.classify_dir / rel
        target = settings.archive_dir / rel
        if not os.path.lexists(source):
            continue
        if os.path.lexists(target):
            names = pseudonymiser(settings)
            log.warning(
                "not archiving %s: %s already exists",
                names.under(settings.classify_dir, rel),
                names.under(settings.archive_dir, rel),
            )
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
            moved += 1
        except OSError as exc:
            names = pseudonymiser(settings)
            log.warning(
                "could not archive %s to %s: %s (its rows are committed)",
                names.under(settings.classify_dir, rel),
                names.under(settings.archive_dir, rel),
                names.text(str(exc), [rel]),
            )
    log.info("archived %d files to %s", moved, settings.archive_dir)
    return moved
