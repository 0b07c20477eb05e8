"""Which labelled folder a training run uses (wbc_tasks.pipelines.data_folder, shared with
``wbc train``): a data_dir param must lie inside the configured folders; else WBC_DATA_DIR; else
generated demo data."""

from __future__ import annotations

import os

import pytest

from wbc_tasks.core.paths import OutsideAllowedFoldersError
from wbc_tasks.pipelines.data_folder import configured_data_dir, resolve_data_dir
from wbc_tasks.training.params import training_params


def test_data_dir_param_outside_the_configured_folders_is_refused(settings, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "WBC"
    elsewhere.mkdir(parents=True)
    with pytest.raises(OutsideAllowedFoldersError, match="WBC_ALLOWED_ROOTS") as raised:
        resolve_data_dir(settings, training_params({"data_dir": str(elsewhere)}))
    assert str(elsewhere) in str(raised.value)
    for sneaky in ("/etc", str(settings.home / ".." / "elsewhere" / "WBC")):
        with pytest.raises(OutsideAllowedFoldersError):
            resolve_data_dir(settings, training_params({"data_dir": sneaky}))


def test_data_dir_param_inside_home_or_an_allowed_root_is_used(settings, tmp_path):
    inside = settings.home / "lab" / "WBC"
    inside.mkdir(parents=True)
    assert resolve_data_dir(settings, training_params({"data_dir": str(inside)})) == inside.resolve()
    share = tmp_path / "share" / "WBC"
    share.mkdir(parents=True)
    allowed = settings.with_overrides(allowed_roots=(share.parent.resolve(),))
    assert resolve_data_dir(allowed, training_params({"data_dir": str(share)})) == share.resolve()


def test_a_link_inside_home_leading_out_is_refused(settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    settings.home.mkdir(parents=True, exist_ok=True)
    link = settings.home / "link"
    os.symlink(outside, link)
    with pytest.raises(OutsideAllowedFoldersError, match="resolves to"):
        resolve_data_dir(settings, training_params({"data_dir": str(link)}))


def test_without_a_param_the_configured_folder_is_used_else_demo_data(settings, tmp_path):
    data = tmp_path / "lab" / "WBC"
    data.mkdir(parents=True)
    configured = settings.with_overrides(data_dir=data)
    assert configured_data_dir(configured, training_params({})) == data.resolve()
    assert resolve_data_dir(configured, training_params({})) == data.resolve()
    assert configured_data_dir(settings, training_params({})) is None  # no folder: the run makes demo data
    inside = settings.home / "other" / "WBC"
    inside.mkdir(parents=True)
    assert configured_data_dir(configured, training_params({"data_dir": str(inside)})) == inside.resolve()
