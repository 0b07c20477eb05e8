import os
from pathlib import Path

import pytest

from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.settings import SettingsError, get_settings


def test_embedded_defaults_live_under_one_home(settings):
    home = settings.home
    assert settings.work_dir == home / "work"
    assert settings.mlflow_tracking_uri == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert settings.predictions_db_url.startswith("sqlite:///") and str(home) in settings.predictions_db_url
    assert settings.data_dir is None


def test_env_overrides_and_bad_numbers(monkeypatch, tmp_path):
    monkeypatch.setenv("WBC_IMAGE_SIZE", "64")
    monkeypatch.setenv("WBC_DATA_DIR", str(tmp_path))
    settings = get_settings()
    assert settings.image_size == 64 and settings.data_dir == tmp_path.resolve()
    monkeypatch.setenv("WBC_IMAGE_SIZE", "big")
    with pytest.raises(SettingsError, match="WBC_IMAGE_SIZE='big'"):
        get_settings()


def test_lists_and_switches_read_from_one_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("WBC_ALLOWED_ROOTS", f"{tmp_path}{os.pathsep}~")
    monkeypatch.setenv("WBC_ALERT_EMAIL", "lab@example.org, it@example.org,")
    monkeypatch.setenv("WBC_SMTP_STARTTLS", "off")
    monkeypatch.setenv("WBC_SMTP_PASSWORD", "hunter2")
    monkeypatch.setenv("WBC_ARCHIVE_DIR", "")  # empty counts as unset
    settings = get_settings()
    assert settings.allowed_roots == (tmp_path.resolve(), Path("~").expanduser().resolve())
    assert settings.alert_email == ("lab@example.org", "it@example.org")
    assert settings.smtp_starttls is False and settings.archive_dir is None
    assert "hunter2" not in repr(settings)


def test_explicit_folders_win_over_those_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "scratch"))
    settings = get_settings()
    assert settings.work_dir == (tmp_path / "scratch").resolve()
    assert settings.classify_dir == (tmp_path / "home" / "classify-images").resolve()


def test_run_ids_become_safe_folder_names(settings):
    folder = settings.run_dir("manual__2026-11-25T02:00:00+00:00")
    assert folder.parent == settings.work_dir / "runs"
    assert "/" not in folder.name and ":" not in folder.name and "+" not in folder.name
    assert safe_name("../../etc") == "etc"  # no way out of the runs folder


def test_every_setting_is_documented_in_the_readme():
    from tests.conftest import REPO_ROOT
    from wbc_tasks.core.settings import Settings, env_variable

    readme = (REPO_ROOT / "README.md").read_text()
    names = {env_variable(name) for name in Settings.model_fields}
    assert "WBC_IMAGE_SIZE" in names and "WBC_VGG16_WEIGHTS" in names and "KERAS_HOME" in names
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"settings not documented in README.md: {missing}"
