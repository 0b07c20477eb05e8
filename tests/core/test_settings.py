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


def test_an_override_through_a_symlinked_folder_is_resolved_like_the_environment(settings, tmp_path):
    real = tmp_path / "real" / "data"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real.parent, target_is_directory=True)
    overridden = settings.with_overrides(data_dir=link / "data", allowed_roots=(link,), archive_dir="~/archive")
    assert overridden.data_dir == real
    assert overridden.allowed_roots == (real.parent,)
    assert overridden.archive_dir == Path("~/archive").expanduser().resolve()
    assert real in overridden.input_roots() and link not in overridden.input_roots()


def test_a_bad_override_is_refused_naming_the_setting(settings):
    from wbc_tasks.core.settings import SettingsError

    with pytest.raises(SettingsError, match="WBC_IMAGE_SIZE='big'"):
        settings.with_overrides(image_size="big")
    with pytest.raises(SettingsError, match="WBC_INFERENCE_ENGINE='fast'"):
        settings.with_overrides(inference_engine="fast")
    with pytest.raises(SettingsError, match="WBC_ENGINE_MIN_AGREEMENT=2"):
        settings.with_overrides(engine_min_agreement=2)
    with pytest.raises(TypeError, match="unknown settings"):
        settings.with_overrides(image_sise=64)


def test_overrides_win_and_the_environment_is_not_read_again(monkeypatch, settings):
    monkeypatch.setenv("WBC_IMAGE_SIZE", "128")
    monkeypatch.setenv("WBC_SEED", "7")
    overridden = settings.with_overrides(image_size=64)
    assert overridden.image_size == 64  # the override, not the variable set since
    assert overridden.seed == 42 and overridden.workers == settings.workers == 1  # as read before
    assert overridden.with_overrides() == overridden


def test_an_override_set_to_none_takes_the_default(settings, tmp_path):
    moved = settings.with_overrides(home=tmp_path / "other", work_dir=None, review_threshold=None)
    assert moved.work_dir == (tmp_path / "other" / "work").resolve()
    assert moved.classify_dir == settings.classify_dir  # not overridden: kept
    assert moved.review_threshold is None


def test_the_user_is_a_setting(monkeypatch, settings):
    assert settings.user is None
    monkeypatch.setenv("WBC_USER", "dr.lee")
    assert get_settings().user == "dr.lee"
