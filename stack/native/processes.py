"""The supervisor: start each service in its own session, tell by pid file whether it runs, stop it.

A service starts in a new session, so its pid is also its process group id and its session id.
Its pid file (``pids/<name>.pid`` in the state folder) holds the pid and the process's start time
in clock ticks since boot, so a pid the system reused for another process does not match. Stop
signals whole process groups (workers first), escalates to SIGKILL after a timeout, then kills
strays: children that left their process group but not the session. Processes are inspected with
psutil; their process group and session with ``os.getpgid``/``os.getsid``, which psutil lacks.

Imports: ``config`` of this package; psutil.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil

from .config import ProcessSpec, StackConfig, StackError, load_topology

#: Clock ticks per second, the unit of start times in pid files (that of /proc/<pid>/stat).
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Exited processes that their parent has not reaped yet: they hold a pid but run no more.
_EXITED = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _pid_file(config: StackConfig, name: str) -> Path:
    return config.pid_dir / f"{name}.pid"


def _live_process(pid: int) -> psutil.Process | None:
    """The process with this pid, unless there is none or it has exited."""
    try:
        process = psutil.Process(pid)
        if process.status() in _EXITED:
            return None
    except (
        psutil.Error,
        ValueError,
    ):  # gone, or no valid pid (psutil refuses negative ones)
        return None
    return process


def alive(pid: int) -> bool:
    """Whether a process with this pid runs (an exited one not yet reaped does not)."""
    return _live_process(pid) is not None


def _start_ticks(process: psutil.Process) -> int:
    """When the process started, in clock ticks since boot.

    psutil gives seconds since the epoch (boot time + ticks / tick rate); counting from boot
    again keeps pid files as they always were, and independent of later changes to the clock.
    """
    return round((process.create_time() - psutil.boot_time()) * _CLOCK_TICKS)


def running_pid(config: StackConfig, name: str) -> int | None:
    """The pid of a running service of this stack, or None (a stale pid file is removed).

    A pid file holds the pid and the process's start time: a pid the system reused for another
    process does not match (setproctitle overwrites /proc/<pid>/environ and cmdline, so those
    cannot tell). The process leads its own session, which stop uses to find every child.
    """
    path = _pid_file(config, name)
    try:
        pid_text, started_text = path.read_text().split()
        pid, started = int(pid_text), int(started_text)
    except (FileNotFoundError, ValueError):
        path.unlink(missing_ok=True)
        return None
    process = _live_process(pid)
    try:
        if process is not None and os.getsid(pid) == pid and _start_ticks(process) == started:
            return pid
    except (ProcessLookupError, psutil.Error):  # exited meanwhile
        pass
    path.unlink(missing_ok=True)
    return None


def start_process(config: StackConfig, spec: ProcessSpec) -> int:
    """Start one service in its own session (= process group); returns its pid."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    config.pid_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.log_dir / f"{spec.name}.log"
    with log_path.open("ab") as log:
        started_at = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {started_at} start: {shlex.join(spec.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=config.state_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = _live_process(proc.pid)
    try:
        started = _start_ticks(process) if process is not None else None
    except psutil.Error:
        started = None
    if started is None:
        raise StackError(f"{spec.name} exited at once: see {log_path}")
    _pid_file(config, spec.name).write_text(f"{proc.pid} {started}\n")
    return proc.pid


def _live_processes() -> list[tuple[int, int, int]]:
    """(pid, process group, session) of every process that has not exited."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() in _EXITED:
                continue
            found.append((process.pid, os.getpgid(process.pid), os.getsid(process.pid)))
        except (psutil.Error, ProcessLookupError):  # exited meanwhile
            pass
    return found


def _live_groups(pgids: set[int]) -> set[int]:
    """Those of these process groups that still hold a process that has not exited."""
    return {pgid for _, pgid, _ in _live_processes() if pgid in pgids}


def _session_members(session_ids: set[int]) -> list[int]:
    """Live processes in any of these sessions (also children that left their process group)."""
    return [pid for pid, _, sid in _live_processes() if sid in session_ids]


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    """Send a signal to a process or process group that may have gone already."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_stack(config: StackConfig, timeout: float = 30.0) -> list[str]:
    """Stop every service by process group: TERM (workers first), then KILL after ``timeout``."""
    names = [spec["name"] for spec in load_topology()["services"]]
    groups: dict[str, int] = {}
    for name in reversed(names):
        pid = running_pid(config, name)
        if pid is not None:
            groups[name] = pid
            _signal(pid, signal.SIGTERM, group=True)
    pgids = set(groups.values())
    deadline = time.monotonic() + timeout
    while _live_groups(pgids) and time.monotonic() < deadline:
        time.sleep(0.3)
    alive_groups = _live_groups(pgids)
    for pgid in groups.values():
        if pgid in alive_groups:
            _signal(pgid, signal.SIGKILL, group=True)
    for pid in _session_members(pgids):
        _signal(pid, signal.SIGKILL, group=False)
    # SIGKILL is delivered asynchronously: return only once the processes are really gone, so a
    # start right after a stop cannot meet them (ports, pid files) and a check sees none alive.
    deadline = time.monotonic() + 10
    while _session_members(pgids) and time.monotonic() < deadline:
        time.sleep(0.05)
    if config.pid_dir.is_dir():
        for path in config.pid_dir.glob("*.pid"):
            path.unlink(missing_ok=True)
    return list(groups)
