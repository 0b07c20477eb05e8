"""parallel_map: in order, over processes, and over threads where processes cannot be started."""

from __future__ import annotations

import multiprocessing
import threading
import time

from wbc_tasks.core.parallel import parallel_map


def _square(x: int) -> int:
    return x * x


def _in_a_daemonic_process(queue) -> None:
    try:
        queue.put(list(parallel_map(_square, range(40), workers=2, chunksize=2)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put(repr(exc))


def test_results_come_back_in_order_over_processes() -> None:
    assert list(parallel_map(_square, range(40), workers=2, chunksize=2)) == [x * x for x in range(40)]


def test_a_daemonic_parent_runs_instead_of_failing() -> None:
    """A task of a Celery worker (the stack) runs in a daemonic process, which may not start
    children: found on the first real start of the compose stack ("daemonic processes are not
    allowed to have children" from split_dataset)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_in_a_daemonic_process, args=(queue,), daemon=True)
    process.start()
    result = queue.get(timeout=60)
    process.join(timeout=60)
    assert result == [x * x for x in range(40)]


def _thread_of(_: int) -> int:
    time.sleep(0.005)  # as long as an image's decoding, with the GIL released
    return threading.get_ident()


def _threads_used(queue) -> None:
    used = list(parallel_map(_thread_of, range(64), workers=2, chunksize=1))
    queue.put((len(set(used)), threading.get_ident() in used))


def test_a_daemonic_parent_spreads_the_work_over_threads() -> None:
    """Inside a Celery worker's task the steps still use ``workers`` cores: threads, not the
    caller's thread alone (issue 31; before, it ran serially)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_threads_used, args=(queue,), daemon=True)
    process.start()
    threads, caller_used = queue.get(timeout=60)
    process.join(timeout=60)
    assert threads == 2 and not caller_used
