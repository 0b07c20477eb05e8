"""parallel_map: in order, over worker processes, also where the caller is a daemonic process; a
worker's error, a lost worker and a killed caller."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import billiard
import pytest

from tests.conftest import put_back_fault_handlers
from wbc_tasks.core.parallel import FATAL_SIGNALS, WorkerLost, parallel_map

#: What a worker must be able to die of, whatever Python handlers its caller had.
DEADLY = (*FATAL_SIGNALS, signal.SIGTERM)


def _square(x: int) -> int:
    return x * x


def _pid_of(_: int) -> int:
    time.sleep(0.005)  # as long as an image's decoding: both workers get items
    return os.getpid()


def _deadly_signal_handlers(_: int) -> list[object]:
    time.sleep(0.005)
    return [signal.getsignal(deadly) for deadly in DEADLY]


def _fails_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("cell-7.jpg is not an image")
    return x


def _fails_on_zero(x: int) -> int:
    if x == 0:
        raise ValueError("cell-0.jpg is not an image")
    return x


def _killed_on_seven(x: int) -> int:
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer or a crash in native code does
    return x


def _touch_slowly(path: str) -> str:
    Path(path).touch()
    time.sleep(0.05)
    return path


def _slow_pid(_: int) -> int:
    time.sleep(0.2)
    return os.getpid()


def _report_workers_then_wait(queue) -> None:
    results = parallel_map(_slow_pid, range(400), workers=2, chunksize=1)
    pids: set[int] = set()
    while len(pids) < 2:  # both workers busy (on a loaded machine one may start late)
        pids.add(next(results))
    queue.put(sorted(pids))
    time.sleep(600)  # killed by the test while its workers are busy


def _spread(queue) -> None:
    try:
        used = list(parallel_map(_pid_of, range(64), workers=2, chunksize=1))
        squares = list(parallel_map(_square, range(40), workers=2, chunksize=2))
        still_daemonic = multiprocessing.current_process().daemon
        queue.put((len(set(used)), os.getpid() in used, squares == [x * x for x in range(40)], still_daemonic))
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


def test_workers_die_of_faults_and_sigterm_even_where_the_caller_set_python_handlers() -> None:
    """Airflow's DAG-file import leaves a Python SIGSEGV handler in the process (inherited by a
    worker, it turned a crash into an endless loop), and its task runner a SIGTERM handler that
    does nothing in a child."""
    before: dict[int, Any] = {deadly: signal.getsignal(deadly) for deadly in DEADLY}
    try:
        for deadly in DEADLY:
            signal.signal(deadly, lambda *_: None)
        handlers = list(parallel_map(_deadly_signal_handlers, range(8), workers=2, chunksize=1))
    finally:
        put_back_fault_handlers(before)
    assert handlers == [[signal.SIG_DFL] * len(DEADLY)] * 8


@pytest.mark.parametrize("fn", [_fails_on_seven, _fails_on_zero], ids=["mid-map", "first-item"])
def test_a_worker_s_error_reaches_the_caller_as_raised_every_time(fn) -> None:
    """First item: the other worker may not have taken any work yet when the pool stops, the case
    that made billiard's pool end the calling process (a CI test worker died of it)."""
    for _ in range(10):
        with pytest.raises(ValueError, match=r"cell-\d\.jpg"):
            list(parallel_map(fn, range(16), workers=2, chunksize=8 if fn is _fails_on_zero else 2))
    assert list(parallel_map(_square, range(40), workers=2, chunksize=2)) == [x * x for x in range(40)]


def test_a_lost_worker_raises_naming_what_was_not_returned() -> None:
    """Billiard's pool waited for ever here."""
    returned: list[int] = []
    with pytest.raises(WorkerLost, match=r"items were not returned, from \d+ on") as lost:
        returned.extend(parallel_map(_killed_on_seven, range(40), workers=2, chunksize=2))
    assert returned == list(range(len(returned))) and len(returned) <= 7
    assert f"{40 - len(returned)} of 40 items" in str(lost.value)


def test_a_caller_that_stops_early_leaves_the_rest_undone(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{i:03}") for i in range(200)]
    results = parallel_map(_touch_slowly, paths, workers=2, chunksize=2)
    assert [next(results) for _ in range(3)] == paths[:3]
    results.close()
    started = len(list(tmp_path.iterdir()))
    assert started < 50, f"{started} of 200 items ran after the caller stopped at 3"


def test_workers_die_with_a_killed_caller() -> None:
    """A task killed mid-step (a timeout, the OOM killer) leaves no workers behind."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    caller = context.Process(target=_report_workers_then_wait, args=(queue,))
    caller.start()
    workers: list[int] = []
    try:
        workers = queue.get(timeout=60)
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        os.kill(caller.pid, signal.SIGKILL)
        caller.join(timeout=10)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in workers)
    finally:  # a caller or orphans left by a failure would keep pytest waiting
        for pid in (caller.pid, *workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        caller.join(timeout=10)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopts it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


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
    assert result == (2, False, True, True)
