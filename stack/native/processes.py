"""The supervisor: start each service in its own session, tell by pid file whether it runs, stop it.

A service starts in a new session, so its pid is also its process group id and its session id.
Its pid file (``pids/<name>.pid`` in the state folder) holds the pid and the process's start time
in clock ticks since boot, so a pid the system reused for another process does not match. Stop
signals whole process groups (workers first), escalates to SIGKILL after a timeout, then kills
strays: children that left their process group but not the session. Processes are inspected by
reading ``/proc/<pid>/stat``.

Imports: ``config`` of this package.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from .config import ProcessSpec, StackConfig, StackError, load_topology


def _pid_file(config: StackConfig, name: str) -> Path:
    return config.pid_dir / f"{name}.pid"


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(process group, session, start time in clock ticks) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Fields after the command name, which may itself contain spaces and parentheses.
    rest = text[text.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    return int(rest[2]), int(rest[3]), int(rest[19])


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
    stat = _proc_stat(pid)
    if stat is not None and stat[1] == pid and stat[2] == started:
        return pid
    path.unlink(missing_ok=True)
    return None


def start_process(config: StackConfig, spec: ProcessSpec) -> int:
    """Start one service in its own session (= process group); returns its pid."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    config.pid_dir.mkdir(parents=True, exist_ok=True)
    with (config.log_dir / f"{spec.name}.log").open("ab") as log:
        log.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(spec.argv)}\n".encode()
        )
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
    stat = _proc_stat(proc.pid)
    if stat is None:
        raise StackError(
            f"{spec.name} exited at once: see {config.log_dir / (spec.name + '.log')}"
        )
    _pid_file(config, spec.name).write_text(f"{proc.pid} {stat[2]}\n")
    return proc.pid


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in this process group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] == pgid:
                return True
    return False


def _session_members(session_ids: set[int]) -> list[int]:
    """Live processes in any of these sessions (children that left their process group)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] in session_ids:
                members.append(int(entry.name))
    return members


def stop_stack(config: StackConfig, timeout: float = 30.0) -> list[str]:
    """Stop every service by process group: TERM (workers first), then KILL after ``timeout``."""
    names = [spec["name"] for spec in load_topology()["services"]]
    groups: dict[str, int] = {}
    for name in reversed(names):
        pid = running_pid(config, name)
        if pid is not None:
            groups[name] = pid
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(_group_alive(p) for p in groups.values()) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pgid in groups.values():
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    sessions = set(groups.values())
    for pid in _session_members(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # SIGKILL is delivered asynchronously: return only once the processes are really gone, so a
    # start right after a stop cannot meet them (ports, pid files) and a check sees none alive.
    deadline = time.monotonic() + 10
    while _session_members(sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    if config.pid_dir.is_dir():
        for path in config.pid_dir.glob("*.pid"):
            path.unlink(missing_ok=True)
    return list(groups)
