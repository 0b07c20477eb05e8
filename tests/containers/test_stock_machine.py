"""README's two commands on a stock Debian 12 machine (issue 32), as a new user runs them.

The machine is a container from the suite's debootstrap'ed bookworm with only Debian's python3
(3.11, PEP 668's externally-managed marker, no pip, no venv), make, git and ca-certificates, no
uv, as a non-root user (standins/stock-debian.Containerfile). It clones the project (a git
repository made from the working tree as a fresh clone has it, so uncommitted work is what is
tested), runs ``make setup`` then ``make demo`` exactly as README writes them, and the demo must
end with its run summary. Everything is downloaded as a new user would: uv through the project's
bootstrap, then every dependency from the lock file; nothing from the host's caches.

Host networking: the container reaches the package index the way this machine does, and podman
adds no firewall rules that could outlive the test.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from .conftest import STATE_DIR
from .engine import Engine, missing_tools, run
from .images import build_stock_debian, project_context

pytestmark = [pytest.mark.containers, pytest.mark.slow]

USER_UID = 1000
README = Path(__file__).resolve().parents[2] / "README.md"
SCRIPT = """set -eu
exec 2>&1  # one transcript in the order a user sees it
git clone -q /srv/wbc wbc
cd wbc
{commands}
"""
TIMEOUT_S = 2400


def readme_commands() -> list[str]:
    """``make setup``, then the demo command of README's first code block, as written there."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "README has no bash block"
    written = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert "make demo" in written, f"README's first commands no longer include make demo: {written}"
    return ["make setup", "make demo"]


def project_repository(work: Path) -> Path:
    """A git repository of the working tree, owned by the container's user (git refuses a
    repository owned by someone else)."""
    source = project_context(work)
    run(["git", "init", "-q", "-b", "main"], cwd=source)
    run(["git", "add", "-A"], cwd=source)
    who = ["-c", "user.name=stock-test", "-c", "user.email=stock-test@localhost"]
    run(["git", *who, "commit", "-q", "-m", "snapshot"], cwd=source)
    for path in [source, *source.rglob("*")]:
        os.lchown(path, USER_UID, USER_UID)
    return source


def test_readme_commands_work_on_a_stock_debian_12_as_a_new_user() -> None:
    missing = missing_tools()
    if missing:
        pytest.fail(f"the container test needs {', '.join(missing)}: run tests/containers/install-podman.sh")
    if os.geteuid() != 0:
        pytest.fail("the container test runs podman as root")
    times: dict[str, float] = {}
    engine = Engine(STATE_DIR / "engine")
    work = STATE_DIR / "stock"
    work.mkdir(parents=True, exist_ok=True)
    image = build_stock_debian(engine, work, times)
    repository = project_repository(work)
    commands = readme_commands()
    script = SCRIPT.format(commands="\n".join(f"echo '+ {c}'; {c}" for c in commands))
    started = time.monotonic()
    done = engine.podman(
        "run", "--rm", "--network", "host",
        "--volume", f"{repository}:/srv/wbc:ro",
        # This machine's TLS-intercepting proxy: uv trusts the system store only when told.
        "--env", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        image, "bash", "-c", script,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    transcript = done.stdout + done.stderr
    (STATE_DIR / "stock-machine.log").write_text(transcript)
    shutil.rmtree(work / "context", ignore_errors=True)
    print(f"\n[stock machine] {' && '.join(commands)}: exit {done.returncode} in {elapsed:.0f} s; "
          f"image builds {times}; transcript {STATE_DIR / 'stock-machine.log'}; last lines:\n"
          + "\n".join(transcript.rstrip().splitlines()[-14:]), flush=True)  # fmt: skip
    assert done.returncode == 0, transcript[-6000:]
    assert "bootstrap: downloading uv-" in transcript, "uv did not come through the project's bootstrap"
    assert "externally-managed-environment" not in transcript
    summary = transcript[transcript.rindex("wbc_training run ") :]
    assert re.match(r"wbc_training run \S+: succeeded", summary), summary[:2000]
    assert "model: wbc-classifier version 1" in summary
    assert "test metrics (" in summary and "champion" in summary
