"""The model a classification run uses: loaded only from the configured registry."""

from __future__ import annotations

import pytest


def test_models_load_only_from_the_configured_registry(registry_settings, tmp_path):
    from dataclasses import replace

    from wbc_tasks.registry.versions import resolve_model
    from wbc_tasks.serving.model import load_model

    ref = resolve_model(registry_settings, "1")
    assert load_model(registry_settings, ref) is not None
    forged = [
        replace(ref, uri=str(tmp_path / "evil.keras")),  # a file anywhere on the worker
        replace(ref, uri=f"runs:/{ref.run_id}/model"),  # an unregistered run's artifact
        replace(
            ref,
            name="someone-elses-model",
            uri=f"models:/someone-elses-model/{ref.version}",
        ),
        replace(ref, version="1/../../2", uri=f"models:/{ref.name}/1/../../2"),
    ]
    for bad in forged:
        with pytest.raises(ValueError, match="only from the configured registry"):
            load_model(registry_settings, bad)
