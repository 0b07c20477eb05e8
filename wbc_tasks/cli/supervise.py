"""Run child processes (Airflow's components, ``airflow dags test``, ``mlflow server``) so that
none outlives the ``wbc`` command that started it.

Why not ``airflow standalone``: it never checks whether a component exited (a missing
executable leaves it hanging with nothing listening) and stops its children only on SIGINT, so
a SIGTERM leaves all four orphaned. Here every child runs in its own process group; a child that
exits while it should be serving ends the command with its exit status and its last lines;
SIGINT and SIGTERM stop every group (SIGTERM, then SIGKILL after a grace period) and the command
returns only when all of them are gone.

Written by hand: the process managers on the package index (supervisor, honcho, circus) run as
daemons with their own config files or do not stop process groups; this is ~150 lines of
``subprocess`` + psutil.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

import psutil

#: Lines of each child's output kept to explain why it exited.
TAIL_LINES = 40


@dataclass
class Child:
    """One command to run: its name (the output prefix) and its argv."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    known: set[psutil.Process] = field(default_factory=set)


class Supervisor:
    """Start ``children``, relay their output, stop them all together.

    ``serve=True``: the children are servers; one exiting, for any reason, is a failure that
    stops the others. ``serve=False``: the children run to completion; the result is the first
    non-zero exit status (or 0). ``ready`` is polled about once a second until it returns true,
    then ``on_ready`` runs once (e.g. to print the URL and the password).
    """

    def __init__(
        self,
        children: Sequence[Child],
        env: dict[str, str],
        *,
        serve: bool,
        ready: Callable[[], bool] | None = None,
        on_ready: Callable[[], None] | None = None,
        stop_grace: float = 20.0,
        prefix_output: bool = True,
        out: IO[str] | None = None,
    ) -> None:
        self.children = list(children)
        self.env = env
        self.serve = serve
        self.ready = ready
        self.on_ready = on_ready
        self.stop_grace = stop_grace
        self.prefix_output = prefix_output
        self.out = out or sys.stdout
        self._signal: int | None = None
        self._print_lock = threading.Lock()
        self._readers: list[threading.Thread] = []

    # -- output -------------------------------------------------------------------------------

    def say(self, name: str, line: str) -> None:
        with self._print_lock:
            text = f"{name:13} | {line}" if self.prefix_output else line
            print(text, file=self.out, flush=True)

    def _relay(self, child: Child) -> None:
        assert child.process is not None and child.process.stdout is not None
        for raw in child.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            child.tail.append(line)
            self.say(child.name, line)

    # -- life cycle ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def run(self) -> int:
        """Run until the children finish, one fails, or SIGINT/SIGTERM; returns the exit status
        (128 + signal number when stopped by a signal, as a shell would report it)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _start(self, child: Child) -> None:
        try:
            child.process = subprocess.Popen(
                child.argv,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own process group: a terminal's Ctrl-C reaches only us, and stop() can end the
                # child together with everything it started.
                start_new_session=True,
            )
        except OSError as exc:
            raise ChildFailed(child.name, None, f"cannot start {child.argv[0]}: {exc}") from exc
        reader = threading.Thread(target=self._relay, args=(child,), daemon=True)
        reader.start()
        self._readers.append(reader)

    def _run(self) -> int:
        for child in self.children:
            self._start(child)
        shown_ready = self.ready is None
        next_ready_check = 0.0
        while True:
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                self.say("wbc", f"{name} received: stopping {', '.join(c.name for c in self.children)}")
                return 128 + self._signal
            self._remember_descendants()
            codes = {c.name: c.process.poll() for c in self.children if c.process is not None}
            if self.serve:
                for child in self.children:
                    code = codes[child.name]
                    if code is not None:
                        raise ChildFailed(child.name, code, "\n".join(child.tail))
            else:
                failed = [(n, c) for n, c in codes.items() if c not in (None, 0)]
                if failed:
                    name, code = failed[0]
                    return int(code) if code is not None and code > 0 else 1
                if all(c == 0 for c in codes.values()):
                    return 0
            if not shown_ready and time.monotonic() >= next_ready_check:
                next_ready_check = time.monotonic() + 1.0
                if self.ready is not None and self.ready():
                    shown_ready = True
                    if self.on_ready is not None:
                        self.on_ready()
            time.sleep(0.2)

    def _remember_descendants(self) -> None:
        """Note every process a child started, so stop() finds them even if they left the
        child's process group or the child itself has exited."""
        for child in self.children:
            if child.process is None:
                continue
            try:
                root = psutil.Process(child.process.pid)
                child.known.update(root.children(recursive=True))
            except psutil.Error:
                continue

    def stop(self) -> None:
        """SIGTERM to every child's process group and known descendants, SIGKILL to whatever is
        left after ``stop_grace`` seconds; returns once all of them are gone."""
        self._remember_descendants()
        victims: list[psutil.Process] = []
        for child in self.children:
            if child.process is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGTERM)
            with contextlib.suppress(psutil.NoSuchProcess):
                victims.append(psutil.Process(child.process.pid))
            victims.extend(child.known)
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(victims, timeout=self.stop_grace)
        for child in self.children:
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.process.pid, signal.SIGKILL)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        for child in self.children:
            if child.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=2)


class ChildFailed(RuntimeError):
    """A supervised child exited when it should have kept running (or could not start)."""

    def __init__(self, name: str, code: int | None, tail: str) -> None:
        self.name = name
        self.code = code
        self.tail = tail
        status = "could not start" if code is None else f"exited with status {code}"
        super().__init__(f"{name} {status}")

    def report(self) -> str:
        """What to show the user: which component, how it ended, its last lines."""
        return f"{self} - its last output:\n{self.tail}" if self.tail else str(self)
