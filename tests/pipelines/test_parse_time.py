"""One setting at a time for DAG parsing (wbc_tasks.pipelines.parse_time): the same value and
the same refusal as the whole settings, and no other variable read."""

from __future__ import annotations

import pytest

from wbc_tasks.core.settings import Settings, SettingsError, get_settings
from wbc_tasks.pipelines.params import classification_param_specs, maintenance_param_specs
from wbc_tasks.pipelines.parse_time import read_setting

#: Fields read alone: every field with a default (the others derive from WBC_HOME).
ALONE = sorted(name for name, field in Settings.model_fields.items() if not field.is_required())


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {
            "WBC_TIMEZONE": "Europe/Berlin",
            "WBC_CLASSIFY_SCHEDULE": "30 3 * * 1-5",
            "WBC_CLASSIFY_CHUNK_SIZE": "40",
            "WBC_REVIEW_THRESHOLD": "0.6",
            "WBC_RETENTION_MLFLOW_ARTIFACTS": "yes",
            "WBC_ENGINE_MIN_AGREEMENT": "0.9",
            "WBC_ALLOWED_ROOTS": "/tmp:/srv",
            "WBC_ALERT_EMAIL": "a@lab, b@lab",
            "wbc_max_chunks": "7",  # any case, as the whole settings read it
            "KERAS_HOME": "/tmp/keras",
            "WBC_SEED": "",  # empty: unset
        },
    ],
    ids=["defaults", "set"],
)
def test_each_setting_alone_equals_the_whole_settings(settings, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    whole = get_settings()
    for name in ALONE:
        assert read_setting(name) == getattr(whole, name), name


def test_a_malformed_variable_is_refused_naming_it_and_the_others_are_not_read(settings, monkeypatch):
    monkeypatch.setenv("WBC_CLASSIFY_CHUNK_SIZE", "many")
    monkeypatch.setenv("WBC_ENGINE_MIN_AGREEMENT", "2")
    with pytest.raises(SettingsError, match="WBC_CLASSIFY_CHUNK_SIZE='many'"):
        read_setting("classify_chunk_size")
    with pytest.raises(SettingsError, match="WBC_ENGINE_MIN_AGREEMENT='2'.*less than or equal to 1"):
        read_setting("engine_min_agreement")  # the field's bounds
    assert read_setting("timezone") == "UTC"  # the malformed ones are not read
    assert maintenance_param_specs()["mlflow_artifacts"]["default"] is False
    with pytest.raises(SettingsError, match="WBC_CLASSIFY_CHUNK_SIZE"):
        classification_param_specs()


def test_only_fields_with_a_default_are_read_alone(settings):
    with pytest.raises(TypeError, match="unknown setting"):
        read_setting("no_such_setting")
    with pytest.raises(TypeError, match="derives from WBC_HOME"):
        read_setting("work_dir")


def test_the_forms_read_alone_what_the_settings_give(settings, monkeypatch):
    monkeypatch.setenv("WBC_CHAMPION_ALIAS", "best")
    monkeypatch.setenv("WBC_REVIEW_THRESHOLD", "0.55")
    monkeypatch.setenv("WBC_RETENTION_MLFLOW_ARTIFACTS", "true")
    whole = get_settings()
    assert classification_param_specs() == classification_param_specs(whole)
    assert maintenance_param_specs() == maintenance_param_specs(whole)
    assert classification_param_specs()["model"]["default"] == "best"
