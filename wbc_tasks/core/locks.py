"""The one file lock of the project: ``<work dir>/locks/<name>``, shared by every process and host
that shares the work folder, with a timeout that says who to look for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the timeout."""


@contextmanager
def file_lock(path: Path, *, timeout: float, holder: str) -> Iterator[None]:
    """Hold the lock file ``path`` (made with its folder when missing) for the ``with`` block.

    ``holder`` names what holds such a lock ("another promotion"), for the log line written when
    it has to wait and for the :class:`LockTimeout` raised after ``timeout`` seconds
    (``WBC_LOCK_TIMEOUT``).
    """
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, timeout=timeout)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        log.info("%s holds %s; waiting up to %.0f s", holder, path, timeout)
        try:
            lock.acquire()
        except filelock.Timeout as exc:
            raise LockTimeout(
                f"{holder} held {path} for over {timeout:.0f} s (WBC_LOCK_TIMEOUT); if none is running, "
                "check the process that last took it"
            ) from exc
    try:
        yield
    finally:
        lock.release()
