"""The images of the container test: local stand-ins for the public base images, then the
project's own images built from its Dockerfiles as they are.

No registry is reachable here, so the public images the Dockerfiles and the compose file name
(``python:3.11-slim-bookworm``, ``ghcr.io/astral-sh/uv:<version>``, ``postgres:16-bookworm``,
``redis:7.2-bookworm``) are built locally under those exact names, read from the project's files:

- a Debian bookworm base from ``debootstrap --variant=minbase`` (the mirror apt already uses);
- Python: Debian's Python 3.11 on it, ``python`` on PATH, and the host's extra CA certificates
  (this machine reaches the Python package index through a TLS-intercepting proxy). That CA goes
  into this stand-in only, never into the project's Dockerfiles;
- uv: ``/uv`` and ``/uvx`` from the uv wheel on the Python package index, like the official image;
- PostgreSQL and Redis: Debian bookworm's (15 and 7.0, not the 16 and 7.2 the compose file
  names), the PostgreSQL one behind an entry point with the official image's contract.

Stand-ins are kept between runs (rebuilt when missing); ``WBC_CONTAINER_TEST_COLD=1`` removes
them and the project's images first, to measure a cold build.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import yaml

from .engine import Engine, EngineError, run

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
DEBIAN_BASE = "localhost/wbc-standin-debian:bookworm"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def qualified(name: str) -> str:
    """``postgres:16`` -> ``docker.io/library/postgres:16`` (how Docker resolves a short name)."""
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


def dockerfile_arg(dockerfile: Path, arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    if not match:
        raise EngineError(f"{dockerfile} declares no default for ARG {arg}")
    return match.group(1)


def base_image_names() -> dict[str, str]:
    """The public images the project's Dockerfiles and compose file name."""
    airflow = REPO_ROOT / "docker" / "airflow.Dockerfile"
    mlflow = REPO_ROOT / "mlflow" / "Dockerfile"
    names = {
        "python": dockerfile_arg(airflow, "PYTHON_IMAGE"),
        "uv": dockerfile_arg(airflow, "UV_IMAGE"),
    }
    for key in ("PYTHON_IMAGE", "UV_IMAGE"):
        if dockerfile_arg(mlflow, key) != dockerfile_arg(airflow, key):
            raise EngineError(f"mlflow/Dockerfile and docker/airflow.Dockerfile name different {key}s")
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    names["postgres"] = services["postgres"]["image"]
    names["redis"] = services["redis"]["image"]
    return names


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (the stand-ins' packages come from it)."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not source.is_file():
            continue
        text = source.read_text()
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.MULTILINE) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.MULTILINE
        )
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def _timed(times: dict[str, float], key: str, started: float) -> None:
    times[key] = round(time.monotonic() - started, 1)
    print(f"[containers] {key}: {times[key]:.0f} s", flush=True)


DEBOOTSTRAP_ATTEMPTS = 2


def debootstrap(rootfs: Path) -> None:
    """A minimal bookworm in ``rootfs``, tried twice: a mirror's hiccup should not fail the suite.

    debootstrap's own reasons go to ``debootstrap/debootstrap.log`` inside the target, not to its
    output, so a failure's error carries that log's tail (a CI run once failed with only the
    "Extracting ..." lines to go on).
    """
    failures = []
    for attempt in range(1, DEBOOTSTRAP_ATTEMPTS + 1):
        shutil.rmtree(rootfs, ignore_errors=True)
        try:
            run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()], timeout=900)
            return
        except EngineError as exc:
            log = rootfs / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no debootstrap.log)"
            failures.append(f"attempt {attempt}: {exc}\n--- debootstrap.log (tail) ---\n{tail}")
            print(f"[containers] debootstrap attempt {attempt} failed; log tail:\n{tail}", flush=True)
    raise EngineError("\n\n".join(failures))


def build_debian_base(engine: Engine, work: Path) -> None:
    rootfs = work / "rootfs"
    debootstrap(rootfs)
    try:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-q", "-", DEBIAN_BASE], stdin=tar.stdout,
                                  env=engine.env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise EngineError(f"importing the debootstrap base failed: {imported.stderr}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def build_uv_image(engine: Engine, name: str, work: Path) -> None:
    version = name.rsplit(":", 1)[1]
    context = work / "uv"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    wheels = work / "uv-wheel"
    run(["python3", "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux2014_x86_64", f"uv=={version}", "-d", str(wheels)], timeout=600)  # fmt: skip
    wheel = next(wheels.glob(f"uv-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith(("/scripts/uv", "/scripts/uvx")):
                target = context / member.rsplit("/", 1)[1]
                target.write_bytes(archive.read(member))
                target.chmod(0o755)
    shutil.copy(STANDINS / "uv.Containerfile", context / "Containerfile")
    engine.podman(
        "build",
        "-q",
        "--label",
        f"wbc.standin={standin_digest('uv')}",
        "-t",
        qualified(name),
        str(context),
        timeout=600,
    )


def build_standin(engine: Engine, kind: str, name: str, work: Path) -> None:
    context = work / kind
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    shutil.copy(STANDINS / f"{kind}.Containerfile", context / "Containerfile")
    if kind in ("python", "stock-debian"):
        (context / "host-ca").mkdir()
        for cert in HOST_CA_DIR.glob("**/*.crt"):
            shutil.copy(cert, context / "host-ca" / cert.name)
    if kind == "postgres":
        shutil.copy(STANDINS / "postgres-entrypoint.sh", context / "postgres-entrypoint.sh")
    engine.podman(
        "build",
        "-q",
        "--label",
        f"wbc.standin={standin_digest(kind)}",
        "-t",
        qualified(name),
        str(context),
        timeout=900,
    )


def standin_digest(kind: str) -> str:
    """What a stand-in is built from (its Containerfile and files): rebuilt when this changes."""
    files = sorted(STANDINS.glob(f"{kind}*"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def standin_is_current(engine: Engine, name: str, kind: str) -> bool:
    done = engine.podman("image", "inspect", name, "--format", '{{index .Labels "wbc.standin"}}', check=False)
    return done.returncode == 0 and done.stdout.strip() == standin_digest(kind)


def build_standins(engine: Engine, work: Path, times: dict[str, float]) -> dict[str, str]:
    """Every stand-in base image that is missing or out of date; returns their names."""
    names = base_image_names()
    started = time.monotonic()
    if not engine.image_exists(DEBIAN_BASE):
        build_debian_base(engine, work)
        _timed(times, "debootstrap base", started)
    for kind, name in names.items():
        if standin_is_current(engine, qualified(name), kind):
            continue
        started = time.monotonic()
        if kind == "uv":
            build_uv_image(engine, name, work)
        else:
            build_standin(engine, kind, name, work)
        _timed(times, f"stand-in {name}", started)
    return names


STOCK_DEBIAN = "localhost/wbc-stock-debian:bookworm"


def build_stock_debian(engine: Engine, work: Path, times: dict[str, float]) -> str:
    """The stock Debian 12 machine of the README test (standins/stock-debian.Containerfile)."""
    if not engine.image_exists(DEBIAN_BASE):
        started = time.monotonic()
        build_debian_base(engine, work)
        _timed(times, "debootstrap base", started)
    if not standin_is_current(engine, STOCK_DEBIAN, "stock-debian"):
        started = time.monotonic()
        build_standin(engine, "stock-debian", STOCK_DEBIAN, work)
        _timed(times, f"stand-in {STOCK_DEBIAN}", started)
    return STOCK_DEBIAN


def project_context(work: Path) -> Path:
    """The build context: the working tree's files as a fresh clone has them (tracked, and new
    files git does not ignore), without .venv, .wbc or other local state."""
    context = work / "context"
    shutil.rmtree(context, ignore_errors=True)
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT)
    for relative in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / relative
        if source.is_file():
            target = context / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return context


def build_project_images(engine: Engine, work: Path, images: dict[str, str], times: dict[str, float]) -> None:
    """The project's images from its Dockerfiles, unmodified, each with its .dockerignore."""
    context = project_context(work)
    builds = [
        ("airflow", "docker/airflow.Dockerfile", images["airflow"], {"WBC_EXTRA": "cpu"}),
        ("mlflow", "mlflow/Dockerfile", images["mlflow"], {}),
    ]
    for key, dockerfile, tag, args in builds:
        started = time.monotonic()
        argv = ["build", "-f", dockerfile, "--ignorefile", f"{dockerfile}.dockerignore", "-t", tag]
        for arg, value in args.items():
            argv += ["--build-arg", f"{arg}={value}"]
        log = work / f"build-{key}.log"
        done = engine.podman(*argv, ".", cwd=context, timeout=1800, check=False)
        log.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise EngineError(f"building {tag} from {dockerfile} failed ({done.returncode}):\n"
                              f"{(done.stdout + done.stderr)[-6000:]}")  # fmt: skip
        _timed(times, f"build {tag}", started)
    # The previous builds' images (now untagged) and their layers: gigabytes each time otherwise.
    engine.podman("image", "prune", "--force", check=False, timeout=600)


def remove_images(engine: Engine, names: list[str]) -> None:
    for name in names:
        if engine.image_exists(name):
            engine.podman("rmi", "-f", name, check=False, timeout=300)


def image_size_mb(engine: Engine, name: str) -> float:
    done = engine.podman("image", "inspect", name, "--format", "{{.Size}}", check=False)
    return round(int(done.stdout.strip() or 0) / 1e6, 1)


def cold_requested() -> bool:
    return os.environ.get("WBC_CONTAINER_TEST_COLD") == "1"
