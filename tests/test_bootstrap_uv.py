"""`.ci/bootstrap_uv.py`, the uv bootstrap of `make setup` and CI on a stock machine (issue 32):
against a package index served here (both the PEP 691 JSON and the HTML simple API), a wheel
whose checksum differs is refused and nothing is installed, an unreachable index or a missing
Python is one line saying what to do. The whole route on a stock Debian 12 container, as a new
user: tests/containers/test_stock_machine.py."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_unless_required

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / ".ci" / "bootstrap_uv.py"


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("bootstrap_uv", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()
VERSION = bootstrap.UV_VERSION
FAMILY, MACHINES = bootstrap.wheel_tags()
WHEEL = f"uv-{VERSION}-py3-none-{FAMILY}_2_17_{MACHINES[0]}.whl"


def fake_wheel(marker: str) -> bytes:
    """A uv wheel whose ``uv`` is a shell script printing ``marker``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(f"uv-{VERSION}.data/scripts/uv", f"#!/bin/sh\necho {marker}\n")
        archive.writestr(f"uv-{VERSION}.data/scripts/uvx", "#!/bin/sh\nexit 0\n")
        archive.writestr(f"uv-{VERSION}.dist-info/METADATA", f"Name: uv\nVersion: {VERSION}\n")
    return out.getvalue()


class Index:
    """A simple-API index on 127.0.0.1 with uv's page (JSON or HTML) and its wheels."""

    def __init__(self, *, html: bool, published_sha: str | None = None) -> None:
        self.wheel = fake_wheel("fake-uv-from-test-index")
        self.html = html
        self.sha = published_sha or hashlib.sha256(self.wheel).hexdigest()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/simple/uv/":
                    other = f"uv-0.0.1-py3-none-{FAMILY}_2_17_{MACHINES[0]}.whl"
                    if index.html or "json" not in self.headers.get("Accept", ""):
                        links = [f'<a href="../../files/{n}#sha256={s}">{n}</a>'
                                 for n, s in ((WHEEL, index.sha), (other, "0" * 64))]  # fmt: skip
                        body = f"<html><body>{''.join(links)}</body></html>".encode()
                        kind = "text/html"
                    else:
                        files = [{"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": s}}
                                 for n, s in ((WHEEL, index.sha), (other, "0" * 64))]  # fmt: skip
                        body, kind = json.dumps({"files": files}).encode(), "application/vnd.pypi.simple.v1+json"
                elif self.path == f"/files/{WHEEL}":
                    body, kind = index.wheel, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served() -> Iterator[list[Index]]:
    started: list[Index] = []
    yield started
    for index in started:
        index.close()


def run_bootstrap(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def base_env(tmp_path: Path) -> dict[str, str]:
    import os

    keep = ("PATH", "HOME", "LANG", "SSL_CERT_FILE")
    return {k: os.environ[k] for k in keep if k in os.environ} | {"HOME": str(tmp_path)}


@pytest.mark.parametrize("html", [False, True], ids=["json-api", "html-api"])
def test_uv_comes_from_the_index_checked_and_linked_into_the_project_tools_folder(tmp_path, served, html):
    index = Index(html=html)
    served.append(index)
    done = run_bootstrap("--tools", "tools", env=base_env(tmp_path) | {"PIP_INDEX_URL": index.url}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    uv = tmp_path / "tools" / "bin" / "uv"
    assert uv.is_symlink()
    assert subprocess.run([str(uv)], capture_output=True, text=True, check=True).stdout.strip() == (
        "fake-uv-from-test-index"
    )
    assert (tmp_path / "tools" / f"uv-{VERSION}" / "uvx").is_file()
    # A second call finds it and downloads nothing (the index is gone).
    index.close()
    served.clear()
    again = run_bootstrap("--tools", "tools", env=base_env(tmp_path) | {"PIP_INDEX_URL": index.url}, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stdout


def test_a_wheel_whose_checksum_differs_is_refused_and_nothing_is_installed(tmp_path, served):
    index = Index(html=False, published_sha="1" * 64)
    served.append(index)
    done = run_bootstrap("--tools", "tools", env=base_env(tmp_path) | {"UV_DEFAULT_INDEX": index.url}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "sha256 differs" in done.stderr and WHEEL in done.stderr
    assert not (tmp_path / "tools" / "bin" / "uv").exists()
    assert not any((tmp_path / "tools").glob("uv-*/uv"))


def test_an_unreachable_index_is_one_line_naming_the_url_and_what_to_do(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/simple/"
    done = run_bootstrap("--tools", "tools", env=base_env(tmp_path) | {"PIP_INDEX_URL": url}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: cannot download {url}uv/")
    assert "PIP_INDEX_URL" in done.stderr and "install uv yourself" in done.stderr


def real_uv() -> str:
    """The uv `make setup` used: on PATH, or the project-local one the bootstrap fetched."""
    for candidate in (shutil.which("uv"), str(REPO_ROOT / ".tools" / "bin" / "uv")):
        if candidate and Path(candidate).is_file():
            return candidate
    skip_unless_required("no uv here: run `make setup` (it fetches one into .tools/)")
    raise AssertionError("unreachable")


def test_a_machine_without_the_python_the_project_needs_gets_one_line_saying_what_to_install(tmp_path):
    """uv looks only among its own (empty) managed Pythons and cannot download one: the bootstrap
    says which Python the project needs and how to get it, instead of uv's multi-line trace."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = base_env(tmp_path) | {
        "UV_PYTHON_PREFERENCE": "only-managed",
        "UV_PYTHON_INSTALL_DIR": str(tmp_path / "pythons"),
        "UV_PYTHON_INSTALL_MIRROR": f"http://127.0.0.1:{port}",
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
    }
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    done = run_bootstrap("--uv", real_uv(), "--python-of", "pyproject.toml", env=env, cwd=tmp_path)
    required = bootstrap.required_python(REPO_ROOT / "pyproject.toml")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert f"this project needs Python {required}" in done.stderr
    assert "apt install python3.11" in done.stderr
    # With the machine's Pythons allowed again it finds the project's (the one running this test).
    env.pop("UV_PYTHON_PREFERENCE")
    found = run_bootstrap("--uv", real_uv(), "--python-of", "pyproject.toml", env=env, cwd=tmp_path)
    assert found.returncode == 0, found.stderr


def test_the_bootstrap_fetches_the_uv_the_images_are_built_with():
    dockerfile = (REPO_ROOT / "docker" / "airflow.Dockerfile").read_text()
    image = re.search(r"^ARG UV_IMAGE=\S+:(\S+)$", dockerfile, re.MULTILINE)
    assert image, "docker/airflow.Dockerfile names no UV_IMAGE"
    assert image.group(1) == VERSION
