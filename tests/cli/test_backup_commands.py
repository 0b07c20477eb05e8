"""`wbc backup` and `wbc restore` as a person runs them (real processes, a new user's shell): a
JSON summary on success, one line naming the problem and exit 1 on a refused or damaged backup."""

from __future__ import annotations

import json
import shutil
import subprocess

from tests.cli.test_embedded_commands import WBC, plain_shell_env
from tests.ops.test_backup import embedded  # noqa: F401 - the fixture


def wbc(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(WBC), *args], env=env, capture_output=True, text=True, timeout=600, check=False)


def test_backup_then_restore_from_the_command_line(embedded):  # noqa: F811
    settings, folder = embedded
    env = plain_shell_env(settings.home) | {"WBC_CLASSIFY_DIR": str(settings.classify_dir)}
    out = folder / "nightly-backup"
    made = wbc(env, "backup", "--out", str(out))
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["rows"]["predictions.db"]["reviews"] == 5
    assert summary["rows"]["predictions.db"]["files_seen"] == 40

    refused = wbc(env, "restore", str(out))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "not empty" in refused.stderr and "--replace" in refused.stderr

    shutil.rmtree(settings.home)
    restored = wbc(env, "restore", str(out))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["files"] == summary["files"]
    listed = wbc(env, "predictions", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 40

    (out / "predictions.db").write_bytes(b"not a database any more")
    shutil.rmtree(settings.home)
    damaged = wbc(env, "restore", str(out))
    assert damaged.returncode == 1
    assert damaged.stderr.count("\n") == 1 and str(out / "predictions.db") in damaged.stderr
    assert not settings.home.exists()
