"""Waiting for a registered version to be READY (wbc_tasks.registry.versions.wait_until_ready),
against a stand-in client whose version goes through the statuses given."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest


@pytest.fixture
def registering(monkeypatch):
    """``registering(*statuses)``: the version's status at each look (the last one repeats),
    with the waits between looks recorded instead of slept."""
    from wbc_tasks.registry import versions

    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)

    def statuses(*seen: str) -> list[float]:
        looks = list(seen)

        def get_model_version(name: str, version: str) -> SimpleNamespace:
            status = looks.pop(0) if len(looks) > 1 else looks[0]
            return SimpleNamespace(name=name, version=version, status=status, status_message="disk full")

        client = SimpleNamespace(get_model_version=get_model_version)
        monkeypatch.setattr(versions, "configure_mlflow", lambda settings: client)
        return waits

    return statuses


def test_waits_with_doubling_pauses_until_ready(settings, registering):
    from wbc_tasks.registry.versions import wait_until_ready

    waits = registering(*["PENDING_REGISTRATION"] * 6, "READY")
    assert wait_until_ready(settings, "3").status == "READY"
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_failed_registration_raises_at_once(settings, registering):
    from wbc_tasks.registry.versions import wait_until_ready

    waits = registering("PENDING_REGISTRATION", "FAILED_REGISTRATION")
    with pytest.raises(RuntimeError, match="version 3 failed to register: disk full"):
        wait_until_ready(settings, "3")
    assert waits == [0.5]


def test_still_pending_after_the_timeout_raises_timeout_error(settings, registering):
    from wbc_tasks.registry.versions import wait_until_ready

    registering("PENDING_REGISTRATION")
    with pytest.raises(
        TimeoutError,
        match=r"still PENDING_REGISTRATION after 0 s \(WBC_MODEL_READY_TIMEOUT\)",
    ):
        wait_until_ready(settings.with_overrides(model_ready_timeout=0.0), "3")
