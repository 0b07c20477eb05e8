"""One way to spread CPU-bound per-image work over the machine's cores: worker processes, in the
embedded default and inside a Celery worker's task alike."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Faults no Python code can handle: the faulting instruction runs again when a handler returns.
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LAUNCHING = threading.Lock()


class WorkerLost(RuntimeError):
    """A worker process died (killed, or crashed in native code) while working on some items."""


def prepare_worker(parent_pid: int) -> None:
    """In a worker process, first thing.

    Signals: the caller's Python handlers are inherited through fork, and two of them do harm
    here. Airflow's DAG-file import leaves a handler for SIGSEGV: a Python handler returns to the
    faulting instruction, so a crashing worker spun at full CPU for ever (seen: 20 minutes in a
    test run) instead of dying. Airflow's task runner leaves one for SIGTERM that does nothing in
    a child, so a worker could not be stopped. Both go back to the default.

    Parent death: the worker is killed when the process that started it dies (Linux), so a task
    killed mid-step (a timeout, the OOM killer, a stopped container) leaves no workers behind.
    """
    for handled in (*FATAL_SIGNALS, signal.SIGTERM):
        signal.signal(handled, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(1)


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process start worker processes, and put its mark back afterwards.

    A Celery prefork worker marks its processes daemonic and Airflow's task process, forked from
    one, inherits the mark; ``multiprocessing`` then refuses to start children ("daemonic
    processes are not allowed to have children"; found on the first real start of the compose
    stack). Its reason is orphans: a daemonic process is killed without cleanup. Our workers die
    with their parent (``prepare_worker``), which answers that reason.
    """
    with _LAUNCHING:  # another thread's launch must not put the mark back under this one
        me = multiprocessing.current_process()
        daemonic = me.daemon
        if daemonic:
            me.daemon = False
        try:
            yield
        finally:
            if daemonic:
                me.daemon = True


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, chunksize: int = 8) -> Iterator[R]:
    """``map(fn, items)`` in order, over ``workers`` processes (serially when 1).

    The standard library's process pool, started with ``fork`` (``spawn``/``forkserver`` would
    re-run the caller's ``__main__``, a script or Airflow's task runner, in every worker). A
    worker that dies raises :class:`WorkerLost` naming the items it may have held. Billiard's
    pool, used before, hung on a lost worker, and when a worker exited while a map was still
    pending (after an item raised, on a loaded machine) its result thread hit an
    AttributeError and ended the whole calling process with ``os._exit(1)``: a test-suite
    worker died so in CI. Callers keep TensorFlow out of these steps, so there are no
    framework threads to inherit.
    """
    items = list(items)
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=prepare_worker, initargs=(os.getpid(),))
    try:
        with _children_allowed():
            # With fork, the first submit starts every worker: inside the block.
            results = executor.map(fn, items, chunksize=chunksize)
    except OSError as exc:
        executor.shutdown(wait=True, cancel_futures=True)
        log.warning("cannot start worker processes (%s); running serially", exc)
        yield from map(fn, items)
        return
    done = 0
    try:
        for result in results:
            yield result
            done += 1
    except BrokenProcessPool as exc:
        raise WorkerLost(
            f"a worker process died (killed, or crashed in native code): {len(items) - done} of "
            f"{len(items)} items were not returned, from {items[done]!r} on"
        ) from exc
    finally:
        # Also where an item raised or the caller stopped early: what has not started is dropped.
        executor.shutdown(wait=True, cancel_futures=True)
