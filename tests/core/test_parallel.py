"""parallel_map: in order, over worker processes, also where the caller is a daemonic process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import billiard
import pytest

from tests.conftest import put_back_fault_handlers
from wbc_tasks.core.parallel import FATAL_SIGNALS, parallel_map


def _square(x: int) -> int:
    return x * x


def _pid_of(_: int) -> int:
    time.sleep(0.005)  # as long as an image's decoding: both workers get items
    return os.getpid()


def _fault_handlers(_: int) -> list[object]:
    time.sleep(0.005)
    return [signal.getsignal(fault) for fault in FATAL_SIGNALS]


def _fails_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("cell-7.jpg is not an image")
    return x


def _spread(queue) -> None:
    try:
        used = list(parallel_map(_pid_of, range(64), workers=2, chunksize=1))
        squares = list(parallel_map(_square, range(40), workers=2, chunksize=2))
        queue.put((len(set(used)), os.getpid() in used, squares == [x * x for x in range(40)]))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put(repr(exc))


def _forked_task(queue) -> None:
    """What Airflow's supervisor does inside a Celery prefork worker: a plain fork runs the task."""
    child = os.fork()
    if child == 0:
        _spread(queue)
        queue.close()
        queue.join_thread()
        os._exit(0)
    os.waitpid(child, 0)


def test_results_come_back_in_order_over_worker_processes() -> None:
    assert list(parallel_map(_square, range(40), workers=2, chunksize=2)) == [x * x for x in range(40)]
    used = list(parallel_map(_pid_of, range(64), workers=2, chunksize=1))
    assert len(set(used)) == 2 and os.getpid() not in used


def test_workers_die_on_a_fault_even_where_the_caller_set_a_python_handler_for_it() -> None:
    """Airflow's DAG-file import leaves a Python SIGSEGV handler in the process; inherited by a
    worker, it would turn a crash into an endless loop."""
    before: dict[int, Any] = {fault: signal.getsignal(fault) for fault in FATAL_SIGNALS}
    try:
        for fault in FATAL_SIGNALS:
            signal.signal(fault, lambda *_: None)
        handlers = list(parallel_map(_fault_handlers, range(8), workers=2, chunksize=1))
    finally:
        put_back_fault_handlers(before)
    assert handlers == [[signal.SIG_DFL] * len(FATAL_SIGNALS)] * 8


def test_a_worker_s_error_reaches_the_caller_as_raised() -> None:
    with pytest.raises(ValueError, match="cell-7.jpg"):
        list(parallel_map(_fails_on_seven, range(40), workers=2, chunksize=2))


@pytest.mark.parametrize(
    ("library", "target"),
    [
        (multiprocessing, _spread),  # a daemonic process of the standard library
        (billiard, _spread),  # a Celery prefork worker's pool process
        (billiard, _forked_task),  # Airflow's task process, forked inside one (the stack's case)
    ],
    ids=["multiprocessing-daemon", "celery-pool-process", "airflow-task-in-celery-worker"],
)
def test_a_daemonic_parent_still_uses_worker_processes(library, target) -> None:
    """A Celery worker's task runs in a process marked daemonic, where ``multiprocessing`` refuses
    to start children: found on the first real start of the compose stack ("daemonic processes
    are not allowed to have children" from split_dataset); then threads ran the steps there
    (issue 31), now worker processes do, as in the embedded default."""
    context = library.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue,), daemon=True)
    process.start()
    result = queue.get(timeout=60)
    process.join(timeout=60)
    assert result == (2, False, True)
