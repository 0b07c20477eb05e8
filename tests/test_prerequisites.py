"""A missing test prerequisite skips on a developer's machine and fails in CI
(``WBC_TESTS_REQUIRE_ALL=1``, which ``.ci/run`` sets)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
from tests.conftest import shared_set

def test_needs_a_set_that_is_not_there():
    shared_set("no-such-set-anywhere")
"""


def _run_probe(tmp_path, require_all: str) -> subprocess.CompletedProcess:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "WBC_TESTS_REQUIRE_ALL": require_all}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(REPO_ROOT),
            "--confcutdir",
            str(REPO_ROOT),
            str(probe),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_prerequisite_skips_on_a_developer_machine(tmp_path):
    result = _run_probe(tmp_path, "")
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout


def test_a_missing_prerequisite_fails_in_ci(tmp_path):
    result = _run_probe(tmp_path, "1")
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout
    assert "no-such-set-anywhere" in result.stdout and "WBC_TESTS_REQUIRE_ALL=1" in result.stdout
