import pytest

from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.paths import safe_name


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
    with pytest.raises(ValueError, match="WBC_IMAGE_SIZE"):
        get_settings()


def test_run_ids_become_safe_folder_names(settings):
    folder = settings.run_dir("manual__2026-11-25T02:00:00+00:00")
    assert folder.parent == settings.work_dir / "runs"
    assert "/" not in folder.name and ":" not in folder.name and "+" not in folder.name
    assert safe_name("../../etc") == "etc"  # no way out of the runs folder


def test_every_setting_is_documented_in_the_readme():
    import re

    from tests.conftest import REPO_ROOT

    source = (REPO_ROOT / "wbc_tasks" / "core" / "settings.py").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    names = set(re.findall(r'"(WBC_[A-Z0-9_]+)"', source))
    assert names, "no settings found"
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"settings not documented in README.md: {missing}"
