"""call_with_backoff: transient failures retried with growing waits, others raised at once."""

from __future__ import annotations

import logging

import pytest

from wbc_tasks.core.retry import call_with_backoff

LOG = logging.getLogger("tests.retry")


class Flaky(Exception):
    pass


def calls(failures: list[Exception], result="done"):
    seen = []

    def fn():
        seen.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, seen


def give_up(exc, seconds):
    return RuntimeError(f"gave up after {seconds:.2f} s: {exc}")


def run(fn, retries=3):
    return call_with_backoff(
        fn,
        retries=retries,
        first_wait=0.01,
        is_transient=lambda e: isinstance(e, Flaky),
        what="test call",
        give_up=give_up,
        log=LOG,
    )


def test_transient_failures_are_retried_then_succeed(caplog):
    caplog.set_level(logging.WARNING, logger="tests.retry")
    fn, seen = calls([Flaky("a"), Flaky("b")])
    assert run(fn) == "done" and len(seen) == 3
    assert [r.getMessage().split(";")[1].strip()[:10] for r in caplog.records] == ["retry 1 of", "retry 2 of"]
    assert "test call failed (a)" in caplog.records[0].getMessage()


def test_other_errors_are_raised_at_once():
    fn, seen = calls([ValueError("bad input"), Flaky("never reached")])
    with pytest.raises(ValueError, match="bad input"):
        run(fn)
    assert len(seen) == 1


def test_exhausted_retries_raise_the_callers_error_from_the_last_one():
    fn, seen = calls([Flaky(str(i)) for i in range(10)])
    with pytest.raises(RuntimeError, match="gave up after .* s: 2") as raised:
        run(fn, retries=2)
    assert len(seen) == 3 and isinstance(raised.value.__cause__, Flaky)
