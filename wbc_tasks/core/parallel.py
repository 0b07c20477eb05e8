"""One way to spread CPU-bound per-image work over the machine's cores: worker processes, or
threads inside a Celery worker's task, whose daemonic process may not start children."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, chunksize: int = 8) -> Iterator[R]:
    """``map(fn, items)`` in order, over ``workers`` processes (serially when 1).

    Uses ``fork``: ``spawn``/``forkserver`` would re-run the caller's ``__main__`` (a script, or
    Airflow's task runner) in every worker. Callers keep TensorFlow out of these steps, so there
    are no framework threads to inherit. In a daemonic process (a Celery worker's task on the
    stack), which may not start children, ``workers`` threads run it instead: the per-image work
    is decoding, resizing, hashing and array copies, which release the GIL (measured in
    bench/bench_worker_parallel.py).
    """
    items = list(items)
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    pool: Executor
    if multiprocessing.current_process().daemon:
        # multiprocessing refuses a daemonic process's children only when the pool starts them,
        # inside map below, so this is decided here.
        log.info("in a daemonic process (a Celery worker's task): %d threads instead of processes", workers)
        pool = ThreadPoolExecutor(max_workers=workers)
    else:
        try:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        except (OSError, ValueError, AssertionError) as exc:
            log.warning("cannot start worker processes (%s); running serially", exc)
            yield from map(fn, items)
            return
    with pool:
        yield from pool.map(fn, items, chunksize=chunksize)
