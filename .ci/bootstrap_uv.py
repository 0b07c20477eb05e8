#!/usr/bin/env python3
"""Get uv onto a stock machine without touching its Python: `make setup` and `.ci/run` call this
when no uv is on PATH.

Debian 12, Ubuntu 23.04+ and Fedora 38+ mark their Python as externally managed (PEP 668), so
`pip install uv` is refused there; Debian's python3 also comes without pip and, unless
python3-venv is installed, without `venv`'s ensurepip. This script needs neither: with the
standard library alone it reads uv's release files from the package index (the PEP 691 JSON
simple API, or its HTML form from a mirror), downloads the wheel for this platform, checks it
against the sha256 the index publishes, and unpacks the `uv` and `uvx` binaries into a
project-local folder (`.tools/uv-<version>/`, linked as `.tools/bin/uv`). Nothing outside the
checkout is written. The index is PyPI unless UV_DEFAULT_INDEX, UV_INDEX_URL or PIP_INDEX_URL
names another; certificates come from SSL_CERT_FILE when set, else the system store.

A second job: `--python-of pyproject.toml` makes sure uv can find a Python that the project's
`requires-python` allows (on PATH, or one uv manages) and, when it cannot, asks uv to install one
(uv downloads CPython builds from GitHub); a failure is one line saying what to do.

Written by hand, on purpose: the only well-kept installers of uv are pip (refused here) and
astral's shell installer (downloads from GitHub, which not every lab's network reaches).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

#: The uv this project is built and tested with; the same version as docker/'s UV_IMAGE
#: (tests/test_bootstrap_uv.py keeps the two equal).
UV_VERSION = "0.13.9"
DEFAULT_INDEX = "https://pypi.org/simple/"
OLDEST_PYTHON = (3, 8)
TIMEOUT_S = 120


class BootstrapError(Exception):
    """Something this script cannot fix from inside: its message says what to run."""


def index_url() -> str:
    for name in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.rstrip("/") + "/"
    return DEFAULT_INDEX


def wheel_tags() -> tuple[str, list[str]]:
    """(platform family, machine names) that a uv wheel's filename must carry for this machine."""
    machine = platform.machine().lower()
    machines = {"amd64": ["x86_64"], "x86_64": ["x86_64"], "arm64": ["aarch64", "arm64"], "aarch64": ["aarch64"]}
    if machine not in machines:
        raise BootstrapError(f"no uv wheel for this processor ({machine}): install uv by hand (docs.astral.sh/uv)")
    if sys.platform.startswith("linux"):
        family = "manylinux" if platform.libc_ver()[0] == "glibc" else "musllinux"
    elif sys.platform == "darwin":
        family = "macosx"
    else:
        raise BootstrapError(f"no bootstrap for {sys.platform}: install uv by hand (docs.astral.sh/uv)")
    return family, machines[machine]


class _Anchors(HTMLParser):
    """The files of a PEP 503 HTML simple page: (filename, url with its #sha256= fragment)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href:
            self.files.append((data.strip(), self._href))
            self._href = None


def ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile if cafile and Path(cafile).is_file() else None)


def fetch(url: str, accept: str = "*/*") -> tuple[bytes, str]:
    """(body, content type) of ``url``, or a BootstrapError naming the index and what to do."""
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": f"wbc-bootstrap-uv/{UV_VERSION}"})
    try:
        if url.startswith("file:"):
            path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
            if path.is_dir():
                path = path / "index.html"
            return path.read_bytes(), "text/html"
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=ssl_context()) as response:
            return response.read(), response.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BootstrapError(
            f"cannot download {url} ({reason}): check the network or proxy (HTTPS_PROXY, SSL_CERT_FILE), "
            "or set PIP_INDEX_URL to a reachable package index, or install uv yourself "
            "(pipx install uv, or docs.astral.sh/uv), then run the command again"
        ) from exc


def release_files(index: str, version: str) -> list[tuple[str, str, str]]:
    """(filename, absolute url, sha256) of every file of uv ``version`` on ``index``."""
    page = urllib.parse.urljoin(index, "uv/")
    body, content_type = fetch(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    found: list[tuple[str, str, str]] = []
    if "json" in content_type:
        for entry in json.loads(body)["files"]:
            found.append(
                (entry["filename"], urllib.parse.urljoin(page, entry["url"]), entry["hashes"].get("sha256", ""))
            )
    else:
        anchors = _Anchors()
        anchors.feed(body.decode("utf-8", "replace"))
        for name, href in anchors.files:
            url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
            digest = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else ""
            found.append((name, url, digest))
    return [f for f in found if f[0].startswith(f"uv-{version}-") and f[0].endswith(".whl")]


def choose_wheel(files: list[tuple[str, str, str]], version: str) -> tuple[str, str, str]:
    family, machines = wheel_tags()
    for name, url, digest in sorted(files):
        platform_tags = name[: -len(".whl")].split("-")[-1]
        if family in platform_tags and any(m in platform_tags for m in machines):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise BootstrapError(f"the index gives no sha256 for {name}: refusing an unchecked download")
            return name, url, digest
    raise BootstrapError(f"no uv {version} wheel for {family} {machines[0]} on the index: install uv by hand")


def install_uv(tools: Path, version: str = UV_VERSION) -> Path:
    """``tools/bin/uv``, downloaded and checked unless it is there already at ``version``."""
    target = tools / f"uv-{version}"
    link = tools / "bin" / "uv"
    if not (target / "uv").is_file():
        index = index_url()
        name, url, digest = choose_wheel(release_files(index, version), version)
        print(f"bootstrap: downloading {name} from {urllib.parse.urlsplit(url).netloc or index}", flush=True)
        wheel, _ = fetch(url)
        if hashlib.sha256(wheel).hexdigest() != digest:
            raise BootstrapError(f"{name}: sha256 differs from the index's; not installed (download again)")
        tools.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".uv-{version}-", dir=tools))
        staging.chmod(0o755)
        with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
            for member in archive.namelist():
                if member.endswith(("/scripts/uv", "/scripts/uvx")):
                    out = staging / member.rsplit("/", 1)[1]
                    out.write_bytes(archive.read(member))
                    out.chmod(out.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if not (staging / "uv").is_file():
            shutil.rmtree(staging)
            raise BootstrapError(f"{name} holds no uv binary: install uv by hand")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a killed download never leaves half a binary at target
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..") / target.name / "uv")
    return link


def ensure_python(uv: str, request: str) -> None:
    """uv finds a Python matching ``request`` (on PATH or managed), else installs one."""
    found = subprocess.run([uv, "python", "find", request], capture_output=True, text=True, check=False)
    if found.returncode == 0:
        return
    print(f"bootstrap: no Python {request} on this machine; asking uv for a managed one", flush=True)
    installed = subprocess.run([uv, "python", "install", request], capture_output=True, text=True, check=False)
    if installed.returncode != 0:
        last = (installed.stderr.strip().splitlines() or ["no output"])[-1].strip()
        raise BootstrapError(
            f"this project needs Python {request}; none is installed and uv could not download one ({last}): "
            f"install such a Python (e.g. apt install python3.11, or pyenv install 3.11) or let uv reach "
            f"github.com (uv python install '{request}'), then run the command again"
        )


def required_python(pyproject: Path) -> str:
    """The ``requires-python`` of ``pyproject`` (read with a pattern: tomllib is 3.11+)."""
    match = re.search(r'^requires-python\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    if not match:
        raise BootstrapError(f"{pyproject} names no requires-python")
    return match.group(1)


def main(argv: list[str]) -> int:
    if sys.version_info < OLDEST_PYTHON:
        print(f"error: bootstrap_uv needs Python {'.'.join(map(str, OLDEST_PYTHON))} or newer to run; "
              f"this is {platform.python_version()}: install a newer python3", file=sys.stderr)  # fmt: skip
        return 1
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", type=Path, default=Path(".tools"), help="project-local folder for uv")
    parser.add_argument("--uv", help="use this uv instead of downloading one")
    parser.add_argument("--python-of", type=Path, metavar="PYPROJECT", help="make sure uv finds a Python it allows")
    args = parser.parse_args(argv)
    try:
        uv = args.uv or str(install_uv(args.tools))
        if args.python_of:
            ensure_python(uv, required_python(args.python_of))
    except BootstrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
