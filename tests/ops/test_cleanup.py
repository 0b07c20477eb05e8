"""One cleanup from the shell (wbc_tasks.ops.cleanup through ``wbc cleanup``)."""

from __future__ import annotations

import json

from tests.ops.conftest import make_run_folder


def test_wbc_cleanup_command(retention_settings, capsys):
    from wbc_tasks.cli import main

    s = retention_settings
    old = make_run_folder(s, "manual__old", age_days=45)

    assert main(["cleanup", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["deleted"] == [old.name] and old.is_dir()

    assert main(["cleanup"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"] == [old.name] and not old.exists()
