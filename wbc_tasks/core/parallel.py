"""One way to spread CPU-bound per-image work over the machine's cores."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, chunksize: int = 8) -> Iterator[R]:
    """``map(fn, items)`` in order, over ``workers`` processes (serially when 1).

    Uses ``fork``: ``spawn``/``forkserver`` would re-run the caller's ``__main__`` (a script, or
    Airflow's task runner) in every worker. Callers keep TensorFlow out of these steps, so there
    are no framework threads to inherit. Falls back to a serial loop where processes cannot be
    started (a daemonic parent).
    """
    items = list(items)
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    if multiprocessing.current_process().daemon:
        # A Celery worker's task (the stack): its pool process is daemonic, and multiprocessing
        # refuses children only when the pool starts them, inside pool.map below.
        log.warning("running in a daemonic process (a Celery worker's task): no worker processes; running serially")
        yield from map(fn, items)
        return
    try:
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    except (OSError, ValueError, AssertionError) as exc:  # e.g. a daemonic parent process
        log.warning("cannot start worker processes (%s); running serially", exc)
        yield from map(fn, items)
        return
    with pool:
        yield from pool.map(fn, items, chunksize=chunksize)
