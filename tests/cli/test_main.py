"""The ``wbc`` command's own logic (commands that start Airflow are in test_embedded_commands)."""

from __future__ import annotations

import json

import pytest

from wbc_tasks.cli.main import main
from wbc_tasks.data.images import load_image


def test_demo_data_drop_writes_unlabelled_images_for_the_nightly_run(settings, capsys):
    assert main(["demo-data", "--drop", "2026-12-02", "--count", "4", "--seed", "1"]) == 0
    reply = json.loads(capsys.readouterr().out)
    drop = settings.classify_dir / "2026-12-02"
    assert reply == {"drop": str(drop), "images": 4}
    files = sorted(drop.iterdir())
    assert len(files) == 4
    assert all(load_image(f, 32, max_pixels=10**6, min_side=8).shape == (32, 32, 3) for f in files)


@pytest.mark.parametrize("name", ["../outside", "a/b", ".."])
def test_demo_data_drop_must_be_a_folder_name(settings, name):
    with pytest.raises(SystemExit, match="give a folder name"):
        main(["demo-data", "--drop", name])
    assert not settings.classify_dir.exists()
