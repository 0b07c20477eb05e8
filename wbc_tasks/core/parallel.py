"""One way to spread CPU-bound per-image work over the machine's cores: worker processes, in the
embedded default and inside a Celery worker's task alike."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import billiard

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Faults no Python code can handle: the faulting instruction runs again when a handler returns.
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)


def die_on_faults() -> None:
    """In a worker process: let a fault kill the process. Airflow's DAG-file import sets a Python
    handler for SIGSEGV and leaves it, and a forked worker inherits it; a Python handler returns
    to the faulting instruction, so a worker that crashes would spin at full CPU for ever instead
    of dying (seen: a pool worker spinning for 20 minutes after a fault as the pool shut down)."""
    for fault in FATAL_SIGNALS:
        signal.signal(fault, signal.SIG_DFL)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, chunksize: int = 8) -> Iterator[R]:
    """``map(fn, items)`` in order, over ``workers`` processes (serially when 1).

    The pool is billiard's (Celery's fork of ``multiprocessing``), not the standard library's: a
    Celery prefork worker marks its processes daemonic, and Airflow's task process, forked from
    one, inherits the mark, so ``multiprocessing`` refuses to start children there ("daemonic
    processes are not allowed to have children"); billiard has no such rule. So a step uses the
    machine's cores on the stack's workers as in the embedded default (issue 31; threads before,
    bench/bench_worker_parallel.py). Uses ``fork``: ``spawn``/``forkserver`` would re-run the
    caller's ``__main__`` (a script, or Airflow's task runner) in every worker. Callers keep
    TensorFlow out of these steps, so there are no framework threads to inherit.
    """
    items = list(items)
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    try:
        pool = billiard.get_context("fork").Pool(processes=workers, initializer=die_on_faults)
    except OSError as exc:
        log.warning("cannot start worker processes (%s); running serially", exc)
        yield from map(fn, items)
        return
    with pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
