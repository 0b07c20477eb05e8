"""The embedded backup and restore drill (issue 28): a real embedded state (two registered model
versions with the champion alias, a night of real images classified, reviews, the pseudonym key,
Airflow's folder with its secrets), backed up while a writer keeps committing, removed, restored;
then the restored state equals the backup's point and the next night classifies exactly the files
the restored state has not seen. A corrupted, truncated or partial backup fails naming the file,
before anything is written."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.serving.conftest import base_settings, copy_drop, register_tiny_model
from wbc_tasks.ops.backup import BackupError, backup_embedded, restore_embedded, table_checksums, verify_backup

DROP = "2026-11-24"
DATABASES = ("predictions.db", "mlflow/mlflow.db", "airflow/airflow.db")
SECRETS = ("airflow/airflow.cfg", "airflow/simple_auth_manager_passwords.json.generated", "work/.pseudonym_key")


def _record_review(settings, path: str, label: str) -> None:
    from wbc_tasks.serving.review_decisions import record_review

    record_review(settings, path, label, reviewer="drill", note="backup drill")


def _seen_paths(settings) -> list[str]:
    database = Path(settings.predictions_db_url.removeprefix("sqlite:///"))
    with sqlite3.connect(database) as connection:
        return sorted(row[0] for row in connection.execute("SELECT path FROM files_seen"))


@pytest.fixture
def embedded(tmp_path):
    """An embedded WBC_HOME with every kind of state a lab has after a few nights."""
    from wbc_tasks.core.privacy import pseudonym_key
    from wbc_tasks.serving.nightly import classify_new_images

    home = tmp_path / "wbc-home"
    settings = base_settings(home)
    settings.classify_dir.mkdir(parents=True)
    register_tiny_model(settings, seed=1)
    register_tiny_model(settings, seed=2, alias="champion")
    drop = copy_drop(DROP, settings)
    later = tmp_path / "later"
    later.mkdir()
    for extra in sorted(drop.iterdir())[40:]:  # kept back for the night after the restore
        extra.rename(later / extra.name)
    classify_new_images(settings)
    seen = _seen_paths(settings)
    for path in seen[:5]:
        _record_review(settings, path, "neutrophils")
    pseudonym_key(settings)  # generated once into the work folder
    airflow = home / "airflow"
    airflow.mkdir()
    (airflow / "airflow.cfg").write_text("[core]\nfernet_key = drill-key\n[api_auth]\njwt_secret = drill-secret\n")
    (airflow / "simple_auth_manager_passwords.json.generated").write_text('{"admin": "drill-password"}')
    with sqlite3.connect(airflow / "airflow.db") as connection:
        connection.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, run_id TEXT)")
        connection.execute("INSERT INTO dag_run (run_id) VALUES ('scheduled__night-1')")
    return settings, tmp_path


def _state(settings) -> dict:
    """What must equal after a restore: tables (counts and checksums), the champion and versions
    with loadable artifacts, the secrets."""
    from wbc_tasks.registry.client import configure_mlflow

    home = settings.home.resolve()
    client = configure_mlflow(settings)
    versions = sorted(client.search_model_versions(f"name = '{settings.model_name}'"), key=lambda v: int(v.version))
    import mlflow

    for version in versions:  # the artifacts load
        assert mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{version.version}/MLmodel")
    return {
        "tables": {
            db: table_checksums(home / db) for db in ("predictions.db", "mlflow/mlflow.db", "airflow/airflow.db")
        },
        "champion": client.get_model_version_by_alias(settings.model_name, "champion").version,
        "versions": [(v.version, v.source) for v in versions],
        "secrets": {
            name: (home / name).read_bytes()
            for name in (
                "airflow/airflow.cfg",
                "airflow/simple_auth_manager_passwords.json.generated",
                "work/.pseudonym_key",
            )
        },
    }


def test_a_restored_home_equals_the_backup_point_and_the_next_night_classifies_only_new_files(embedded):
    from wbc_tasks.serving.nightly import classify_new_images

    settings, folder = embedded
    before = _state(settings)
    out = folder / "backup"
    manifest = backup_embedded(settings, out)
    assert {"predictions.db", "mlflow/mlflow.db", "airflow/airflow.db"} <= {f["path"] for f in manifest["files"]}
    assert manifest["tables"]["predictions.db"]["reviews"]["rows"] == 5
    assert not any(f["path"].startswith("work/runs/") for f in manifest["files"])
    # The classify folder lies inside WBC_HOME here (the embedded default): the lab's images come along.
    assert sum(f["path"].startswith(f"classify/{DROP}/") for f in manifest["files"]) == 40

    shutil.rmtree(settings.home)
    restored = restore_embedded(out, settings)
    assert restored["files"] == len(manifest["files"])
    assert _state(settings) == before

    # The next night: the files kept back arrive; exactly they are classified, nothing twice.
    seen_before = _seen_paths(settings)
    drop = settings.classify_dir / DROP
    drop.mkdir(parents=True, exist_ok=True)
    arriving = sorted((folder / "later").iterdir())
    assert arriving
    for image in arriving:
        shutil.copy(image, drop / image.name)
    classify_new_images(settings)
    seen_after = _seen_paths(settings)
    new = sorted(set(seen_after) - set(seen_before))
    assert len(seen_after) == len(set(seen_after))  # nothing recorded twice
    assert sorted(Path(p).name for p in new) == [p.name for p in arriving]


def test_a_backup_taken_while_a_writer_commits_is_consistent(embedded):
    """Rows committed during the backup are either in its snapshot or not, never half."""
    settings, folder = embedded
    database = Path(settings.predictions_db_url.removeprefix("sqlite:///"))
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE drill_pairs (id INTEGER PRIMARY KEY, part INTEGER, pair INTEGER)")
    stop = threading.Event()
    written = []

    def writer() -> None:
        with sqlite3.connect(database, timeout=30) as connection:
            pair = 0
            while not stop.is_set():
                with connection:  # one transaction: both halves of a pair or neither
                    connection.execute("INSERT INTO drill_pairs (part, pair) VALUES (1, ?)", (pair,))
                    connection.execute("INSERT INTO drill_pairs (part, pair) VALUES (2, ?)", (pair,))
                written.append(pair)
                pair += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        manifest = backup_embedded(settings, folder / "backup")
    finally:
        stop.set()
        thread.join()
    rows = manifest["tables"]["predictions.db"]["drill_pairs"]["rows"]
    assert rows % 2 == 0 and 0 < rows // 2 <= len(written)
    with sqlite3.connect(folder / "backup" / "predictions.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no-manifest"])
def test_a_damaged_backup_fails_naming_the_file_and_restores_nothing(embedded, damage):
    settings, folder = embedded
    out = folder / "backup"
    manifest = backup_embedded(settings, out)
    victim = out / next(f["path"] for f in manifest["files"] if f["path"].startswith("mlflow/artifacts/"))
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif damage == "delete":
        victim.unlink()
    else:
        victim = out / "manifest.json"
        victim.unlink()
    shutil.rmtree(settings.home)
    with pytest.raises(BackupError) as failure:
        restore_embedded(out, settings)
    assert str(victim) in str(failure.value)
    assert not settings.home.exists()
    assert not list(settings.home.parent.glob(f".{settings.home.name}.restoring-*"))


def test_restore_refuses_a_non_empty_home_unless_told_and_then_keeps_the_old_one(embedded):
    settings, folder = embedded
    out = folder / "backup"
    backup_embedded(settings, out)
    marker = settings.home / "note-from-today.txt"
    marker.write_text("work done after the backup")
    with pytest.raises(BackupError, match="not empty"):
        restore_embedded(out, settings)
    result = restore_embedded(out, settings, replace=True)
    aside = Path(result["moved_aside"])
    assert (aside / "note-from-today.txt").read_text() == "work done after the backup"
    assert not (settings.home / "note-from-today.txt").exists()
    verify_backup(out)  # the backup itself is untouched


def test_a_backup_refuses_a_non_empty_folder_and_one_inside_home(embedded):
    settings, folder = embedded
    (folder / "busy").mkdir()
    (folder / "busy" / "x").write_text("x")
    with pytest.raises(BackupError, match="not empty"):
        backup_embedded(settings, folder / "busy")
    with pytest.raises(BackupError, match="inside WBC_HOME"):
        backup_embedded(settings, settings.home / "backup")
    assert json.loads(json.dumps(backup_embedded(settings, folder / "ok")))["kind"] == "embedded"
