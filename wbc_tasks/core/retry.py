"""Retry a call that failed for a passing reason (a server restarting, a lost connection)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_with_backoff(
    fn: Callable[[], T],
    *,
    retries: int,
    first_wait: float,
    is_transient: Callable[[BaseException], bool],
    what: str,
    give_up: Callable[[BaseException, float], Exception],
    log: logging.Logger,
) -> T:
    """``fn()``, retried ``retries`` times while it fails transiently, the first retry after
    ``first_wait`` seconds and each wait doubled (at most 60 s). Each retry is logged as a
    warning on ``log``; other errors are raised at once. When every try failed transiently,
    raises ``give_up(last error, seconds spent)`` from that error."""
    import tenacity

    def warn(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        cause = str(getattr(error, "orig", None) or error).strip().splitlines() if error else []
        log.warning(
            "%s failed (%s); retry %d of %d in %.1f s",
            what,
            cause[0] if cause else "?",
            state.attempt_number,
            retries,
            state.next_action.sleep if state.next_action else 0.0,
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential(multiplier=first_wait, min=0, max=60),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=warn,
        reraise=True,
    )
    started = time.monotonic()
    try:
        return retrying(fn)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise give_up(exc, time.monotonic() - started) from exc
