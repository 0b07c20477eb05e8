"""Retention of training work folders (and of unregistered runs' MLflow artifacts), against a
real MLflow registry (SQLite store in the module's tmp folder). Registered versions point at an
empty folder, as in test_promotion: nothing is trained."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from wbc_tasks.core.settings import COMPLETE_MARKER, get_settings

DAY = 86_400.0


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    """One SQLite MLflow per module (creating its tables takes seconds); each test has its own
    experiment and registered model name."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def retention_settings(settings, mlflow_dir, tmp_path, monkeypatch, request):
    import mlflow

    name = request.node.name[:50]
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    monkeypatch.setenv("WBC_MLFLOW_ARTIFACT_ROOT", str(mlflow_dir / "artifacts"))
    monkeypatch.setenv("WBC_MLFLOW_EXPERIMENT", f"exp-{name}")
    monkeypatch.setenv("WBC_MODEL_NAME", f"wbc-{name}")
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_MLFLOW_RETRY_WAIT", "0")
    monkeypatch.setenv("WBC_RETENTION_DAYS", "30")
    monkeypatch.setenv("WBC_RETENTION_KEEP_RUNS", "0")
    yield get_settings()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def set_age(path: Path, days: float) -> None:
    """Make ``path`` and everything in it look last modified ``days`` ago."""
    stamp = time.time() - days * DAY
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def make_run_folder(settings, dag_run_id: str, *, age_days: float, size: int = 1000) -> Path:
    """A run work folder like a training run leaves (a finished step and a checkpoint)."""
    folder = settings.run_dir(dag_run_id)
    (folder / "split").mkdir(parents=True)
    (folder / "split" / "manifest.csv").write_bytes(b"x" * size)
    (folder / "split" / COMPLETE_MARKER).write_text("{}")
    (folder / "train_checkpoints").mkdir()
    (folder / "train_checkpoints" / "epoch-001.weights.h5").write_bytes(b"w" * size)
    set_age(folder, age_days)
    return folder


def register_version(settings, dag_run_id: str, *, alias: str | None = None, tag_version: bool = True) -> str:
    """A registered version made by ``dag_run_id``'s MLflow run (tagged like register_model
    does); the version points at an empty folder (retention never loads the model)."""
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import finish_tracking_run, open_tracking_run
    from wbc_tasks.registry.tags import TAG_AIRFLOW_RUN_ID

    run_id = open_tracking_run(settings, dag_run_id)
    finish_tracking_run(settings, dag_run_id, "FINISHED")
    client = configure_mlflow(settings)
    try:
        client.create_registered_model(settings.model_name)
    except MlflowException:
        pass
    source = settings.home / "fake-model"
    source.mkdir(parents=True, exist_ok=True)
    tags = {TAG_AIRFLOW_RUN_ID: dag_run_id} if tag_version else {}
    version = client.create_model_version(settings.model_name, source.as_uri(), run_id=run_id, tags=tags).version
    if alias:
        client.set_registered_model_alias(settings.model_name, alias, version)
    return str(version)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_champion_and_previous_champion_survive_old_unaliased_runs_go(retention_settings):
    from wbc_tasks.ops.retention import apply_retention

    s = retention_settings
    champion = make_run_folder(s, "manual__2026-01-02T00:00:00+00:00", age_days=300)
    previous = make_run_folder(s, "manual__2026-01-01T00:00:00+00:00", age_days=310)
    registered = make_run_folder(s, "manual__2026-01-03T00:00:00+00:00", age_days=200)  # no alias
    failed = make_run_folder(s, "manual__2026-01-04T00:00:00+00:00", age_days=100)  # never registered
    recent = make_run_folder(s, "manual__2026-11-20T00:00:00+00:00", age_days=3)
    register_version(s, "manual__2026-01-01T00:00:00+00:00", alias=s.rollback_alias)
    # The champion's version lacks the airflow_run_id tag: found through its MLflow run's tag.
    register_version(s, "manual__2026-01-02T00:00:00+00:00", alias=s.champion_alias, tag_version=False)
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
    from wbc_tasks.ops.retention import apply_retention

    monkeypatch.setenv("WBC_RETENTION_KEEP_RUNS", "2")
    folders = [make_run_folder(get_settings(), f"manual__run{i}", age_days=100 + i) for i in range(5)]

    summary = apply_retention(get_settings())

    assert [f.is_dir() for f in folders] == [True, True, False, False, False]
    assert all("WBC_RETENTION_KEEP_RUNS" in summary["kept"][f.name] for f in folders[:2])
    assert summary["folders_scanned"] == 5 and len(summary["deleted"]) == 3


def test_dry_run_deletes_nothing_and_reports_what_would_go(retention_settings):
    from wbc_tasks.ops.retention import apply_retention

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
    from wbc_tasks.ops.retention import apply_retention, runs_root

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
    from wbc_tasks.registry.runs import finish_tracking_run, open_tracking_run
    from wbc_tasks.ops.retention import apply_retention

    s = retention_settings
    folder = make_run_folder(s, "manual__waiting-for-gpu", age_days=60)
    open_tracking_run(s, "manual__waiting-for-gpu")  # RUNNING

    summary = apply_retention(s)
    assert folder.is_dir() and "still RUNNING" in summary["kept"][folder.name]
    assert "mark that MLflow run FAILED" in caplog.text

    finish_tracking_run(s, "manual__waiting-for-gpu", "FAILED")
    assert apply_retention(s)["deleted"] == [folder.name] and not folder.exists()


def test_recent_activity_anywhere_in_the_folder_keeps_it(retention_settings):
    from wbc_tasks.ops.retention import apply_retention

    s = retention_settings
    folder = make_run_folder(s, "manual__resumed", age_days=90)
    checkpoint = folder / "train_checkpoints" / "epoch-002.weights.h5"
    checkpoint.write_bytes(b"new")  # a retried training task wrote a checkpoint just now
    os.utime(folder / "train_checkpoints", (time.time() - 90 * DAY,) * 2)
    os.utime(folder, (time.time() - 90 * DAY,) * 2)

    summary = apply_retention(s)
    assert folder.is_dir() and "WBC_RETENTION_DAYS" in summary["kept"][folder.name]


def test_unreachable_registry_deletes_nothing(retention_settings, monkeypatch):
    from wbc_tasks.ops.retention import apply_retention

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WBC_MLFLOW_RETRIES", "0")
    monkeypatch.setenv("WBC_MLFLOW_HTTP_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    folder = make_run_folder(get_settings(), "manual__maybe-champion", age_days=90)

    with pytest.raises(Exception) as failure:
        apply_retention(get_settings())
    assert f"127.0.0.1:{port}" in str(failure.value)  # it failed asking MLflow, not elsewhere
    assert folder.is_dir() and (folder / "split" / COMPLETE_MARKER).is_file()


def test_nothing_to_delete_needs_no_registry(retention_settings, monkeypatch):
    from wbc_tasks.ops.retention import apply_retention

    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked
    make_run_folder(get_settings(), "manual__fresh", age_days=1)
    summary = apply_retention(get_settings())
    assert summary["deleted"] == [] and summary["folders_scanned"] == 1


def test_retention_below_one_day_is_refused(retention_settings, monkeypatch):
    from wbc_tasks.ops.retention import apply_retention

    monkeypatch.setenv("WBC_RETENTION_DAYS", "0")
    folder = make_run_folder(get_settings(), "manual__running-now", age_days=0)
    with pytest.raises(ValueError, match="WBC_RETENTION_DAYS"):
        apply_retention(get_settings())
    assert folder.is_dir()


def test_mlflow_artifacts_of_unregistered_runs_only_when_asked(retention_settings):
    from wbc_tasks.registry.client import configure_mlflow, ensure_experiment
    from wbc_tasks.registry.runs import open_tracking_run
    from wbc_tasks.ops.retention import ARTIFACTS_DELETED_TAG, apply_retention

    s = retention_settings
    client = configure_mlflow(s)
    ensure_experiment(s)

    def run_with_artifact(dag_run_id: str, status: str | None) -> str:
        run_id = open_tracking_run(s, dag_run_id)
        client.log_text(run_id, "confusion matrix " * 100, "evaluation/report.txt")
        if status:
            client.set_terminated(run_id, status)
        return run_id

    champion = run_with_artifact("manual__champion", None)
    register_version(s, "manual__champion", alias=s.champion_alias)  # finishes it
    unregistered = run_with_artifact("manual__failed", "FAILED")
    running = run_with_artifact("manual__running", None)
    later = time.time() + 60 * DAY  # 60 days from now, every run above is old

    def has_artifacts(run_id: str) -> bool:
        return bool(client.list_artifacts(run_id, "evaluation"))

    # Off by default: folders only.
    assert "mlflow" not in apply_retention(s, now=later)
    assert has_artifacts(unregistered)

    dry = apply_retention(s, now=later, mlflow_artifacts=True, dry_run=True)["mlflow"]
    assert dry["purged"] == [unregistered] and dry["bytes_freed"] > 0 and has_artifacts(unregistered)

    result = apply_retention(s, now=later, mlflow_artifacts=True)["mlflow"]
    assert result["purged"] == [unregistered] and result["bytes_freed"] == dry["bytes_freed"]
    assert not has_artifacts(unregistered)
    assert ARTIFACTS_DELETED_TAG in client.get_run(unregistered).data.tags
    assert client.get_run(unregistered).info.lifecycle_stage == "active"  # the run record stays
    assert has_artifacts(champion) and "registered model version" in result["kept"][champion]
    assert has_artifacts(running) and "RUNNING" in result["kept"][running]
    # The newest N runs keep their artifacts too.
    again = apply_retention(s.with_overrides(retention_keep_runs=10), now=later, mlflow_artifacts=True)
    assert again["mlflow"]["purged"] == []


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
