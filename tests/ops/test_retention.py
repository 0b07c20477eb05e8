"""Retention of training work folders (wbc_tasks.ops.retention), run through the cleanup entry
point against a real MLflow registry (SQLite store in the module's tmp folder)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.ops.conftest import DAY, make_run_folder, register_version, set_age
from wbc_tasks.core.settings import COMPLETE_MARKER, get_settings


def test_champion_and_previous_champion_survive_old_unaliased_runs_go(
    retention_settings,
):
    from wbc_tasks.ops.cleanup import apply_retention

    s = retention_settings
    champion = make_run_folder(s, "manual__2026-01-02T00:00:00+00:00", age_days=300)
    previous = make_run_folder(s, "manual__2026-01-01T00:00:00+00:00", age_days=310)
    registered = make_run_folder(s, "manual__2026-01-03T00:00:00+00:00", age_days=200)  # no alias
    failed = make_run_folder(s, "manual__2026-01-04T00:00:00+00:00", age_days=100)  # never registered
    recent = make_run_folder(s, "manual__2026-11-20T00:00:00+00:00", age_days=3)
    register_version(s, "manual__2026-01-01T00:00:00+00:00", alias=s.rollback_alias)
    # The champion's version lacks the airflow_run_id tag: found through its MLflow run's tag.
    register_version(
        s,
        "manual__2026-01-02T00:00:00+00:00",
        alias=s.champion_alias,
        tag_version=False,
    )
    register_version(s, "manual__2026-01-03T00:00:00+00:00")

    summary = apply_retention(s)

    assert champion.is_dir() and previous.is_dir() and recent.is_dir()
    assert not registered.exists() and not failed.exists()
    assert sorted(summary["deleted"]) == sorted([registered.name, failed.name])
    assert summary["bytes_freed"] == 4 * 1000 + 2 * len("{}")
    assert "@champion" in summary["kept"][champion.name]
    assert "@previous-champion" in summary["kept"][previous.name]
    assert "WBC_RETENTION_DAYS" in summary["kept"][recent.name]
    assert summary["errors"] == {} and summary["dry_run"] is False


def test_newest_n_stay_even_when_old(retention_settings, monkeypatch):
    from wbc_tasks.ops.cleanup import apply_retention

    monkeypatch.setenv("WBC_RETENTION_KEEP_RUNS", "2")
    folders = [make_run_folder(get_settings(), f"manual__run{i}", age_days=100 + i) for i in range(5)]

    summary = apply_retention(get_settings())

    assert [f.is_dir() for f in folders] == [True, True, False, False, False]
    assert all("WBC_RETENTION_KEEP_RUNS" in summary["kept"][f.name] for f in folders[:2])
    assert summary["folders_scanned"] == 5 and len(summary["deleted"]) == 3


def test_dry_run_deletes_nothing_and_reports_what_would_go(retention_settings):
    from wbc_tasks.ops.cleanup import apply_retention

    s = retention_settings
    old = make_run_folder(s, "manual__old", age_days=90, size=5000)
    champion = make_run_folder(s, "manual__champion", age_days=90)
    register_version(s, "manual__champion", alias=s.champion_alias)
    before = sorted(p for p in old.rglob("*"))

    summary = apply_retention(s, dry_run=True)

    assert summary["dry_run"] is True and summary["deleted"] == [old.name]
    assert summary["bytes_freed"] == 2 * 5000 + len("{}")
    assert sorted(p for p in old.rglob("*")) == before and champion.is_dir()
    assert (old / "split" / COMPLETE_MARKER).is_file()  # not even the markers


def test_symlinks_pointing_outside_are_never_followed(retention_settings, tmp_path):
    from wbc_tasks.ops.cleanup import apply_retention
    from wbc_tasks.ops.retention import runs_root

    s = retention_settings
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "slides.txt").write_text("keep me")
    old = make_run_folder(s, "manual__old", age_days=90)
    (old / "data-link").symlink_to(outside, target_is_directory=True)  # inside a run folder
    escape = runs_root(s) / "manual__escape"
    escape.symlink_to(outside, target_is_directory=True)  # a "run folder" that leads outside
    set_age(old, 90)
    set_age(outside, 90)

    summary = apply_retention(s)

    assert not old.exists()  # the folder went, its link with it...
    assert (outside / "slides.txt").read_text() == "keep me"  # ...but not the link's target
    assert escape.is_symlink() and "not followed" in summary["skipped"]["manual__escape"]
    assert summary["deleted"] == [old.name]


def test_a_run_still_running_in_mlflow_keeps_its_old_folder(retention_settings, caplog):
    from wbc_tasks.ops.cleanup import apply_retention
    from wbc_tasks.registry.runs import finish_tracking_run, open_tracking_run

    s = retention_settings
    folder = make_run_folder(s, "manual__waiting-for-gpu", age_days=60)
    open_tracking_run(s, "manual__waiting-for-gpu")  # RUNNING

    summary = apply_retention(s)
    assert folder.is_dir() and "still RUNNING" in summary["kept"][folder.name]
    assert "mark that MLflow run FAILED" in caplog.text

    finish_tracking_run(s, "manual__waiting-for-gpu", "FAILED")
    assert apply_retention(s)["deleted"] == [folder.name] and not folder.exists()


def test_recent_activity_anywhere_in_the_folder_keeps_it(retention_settings):
    from wbc_tasks.ops.cleanup import apply_retention

    s = retention_settings
    folder = make_run_folder(s, "manual__resumed", age_days=90)
    checkpoint = folder / "train_checkpoints" / "epoch-002.weights.h5"
    checkpoint.write_bytes(b"new")  # a retried training task wrote a checkpoint just now
    os.utime(folder / "train_checkpoints", (time.time() - 90 * DAY,) * 2)
    os.utime(folder, (time.time() - 90 * DAY,) * 2)

    summary = apply_retention(s)
    assert folder.is_dir() and "WBC_RETENTION_DAYS" in summary["kept"][folder.name]


def test_unreachable_registry_deletes_nothing(retention_settings, monkeypatch):
    from wbc_tasks.ops.cleanup import apply_retention

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WBC_MLFLOW_RETRIES", "0")
    monkeypatch.setenv("WBC_MLFLOW_HTTP_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    folder = make_run_folder(get_settings(), "manual__maybe-champion", age_days=90)

    with pytest.raises(ConnectionError) as failure:  # MlflowUnavailableError is one
        apply_retention(get_settings())
    assert f"127.0.0.1:{port}" in str(failure.value)  # it failed asking MLflow, not elsewhere
    assert folder.is_dir() and (folder / "split" / COMPLETE_MARKER).is_file()


def test_nothing_to_delete_needs_no_registry(retention_settings, monkeypatch):
    from wbc_tasks.ops.cleanup import apply_retention

    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked
    make_run_folder(get_settings(), "manual__fresh", age_days=1)
    summary = apply_retention(get_settings())
    assert summary["deleted"] == [] and summary["folders_scanned"] == 1


def test_retention_below_one_day_is_refused(retention_settings, monkeypatch):
    from wbc_tasks.ops.cleanup import apply_retention

    monkeypatch.setenv("WBC_RETENTION_DAYS", "0")
    folder = make_run_folder(get_settings(), "manual__running-now", age_days=0)
    with pytest.raises(ValueError, match="WBC_RETENTION_DAYS"):
        apply_retention(get_settings())
    assert folder.is_dir()
