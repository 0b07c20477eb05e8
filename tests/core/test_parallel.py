"""parallel_map: in order, over processes, and serially where processes cannot be started."""

from __future__ import annotations

import multiprocessing

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


def test_a_daemonic_parent_runs_serially_instead_of_failing() -> None:
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
