"""docker/stack_backup.py without containers (the whole drill runs in the container suite): the
table checksums it compares come from a real PostgreSQL dump and see a lost, a duplicated or a
changed row, whatever the row order; a corrupted or partial backup is refused naming the file
before the restore runs any command."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.serving.conftest import throwaway_database
from wbc_tasks.serving import predictions as db

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "stack_backup.py"


def _script():
    spec = importlib.util.spec_from_file_location("stack_backup", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_dump(url: str) -> bytes:
    parsed = make_url(url)
    argv = ["pg_dump", "--data-only", "-h", parsed.host or "localhost", "-U", parsed.username or "postgres"]
    return subprocess.run([*argv, parsed.database or ""], capture_output=True, check=True, timeout=120).stdout


def test_table_checksums_from_a_real_dump_see_every_changed_row_but_not_the_order(tmp_path):
    stack_backup = _script()
    with throwaway_database("postgresql", tmp_path) as url:
        db.upgrade_database(url)
        with db.open_engine(url) as engine, engine.begin() as connection:
            for name in ("a", "b", "c"):
                connection.execute(
                    text("INSERT INTO reviews (sha256, drop, path, reviewer, reviewed_at, model_name, model_version,"
                         " predicted_class, label) VALUES (:s, 'd', :p, 'alice', now(), 'm', '1', 'blasts', 'blasts')"),
                    {"s": name * 64, "p": f"d/{name}.jpg"},
                )  # fmt: skip
        first = stack_backup.checksums_of_sql(_data_dump(url))
        assert first["public.reviews"]["rows"] == 3
        assert first["public.files_seen"]["rows"] == 0 and "public.drop_summaries" in first  # every table
        with db.open_engine(url) as engine, engine.begin() as connection:
            # The same rows stored in another physical order: the checksum does not change.
            connection.execute(text("CREATE TABLE reviews_copy AS SELECT * FROM reviews ORDER BY id DESC"))
            connection.execute(text("DELETE FROM reviews"))
            connection.execute(text("INSERT INTO reviews SELECT * FROM reviews_copy"))
            connection.execute(text("DROP TABLE reviews_copy"))
        assert stack_backup.checksums_of_sql(_data_dump(url)) == first
        for change in (
            "DELETE FROM reviews WHERE path = 'd/b.jpg'",
            "INSERT INTO reviews SELECT id + 100, sha256, drop, path, reviewer, reviewed_at, model_name,"
            " model_version, predicted_class, label, note FROM reviews WHERE path = 'd/a.jpg'",
            "UPDATE reviews SET label = 'monocytes' WHERE path = 'd/c.jpg'",
        ):
            with db.open_engine(url) as engine, engine.begin() as connection:
                connection.execute(text(change))
            assert stack_backup.checksums_of_sql(_data_dump(url))["public.reviews"] != first["public.reviews"], change


@pytest.mark.parametrize("damage", ["corrupted", "missing", "no manifest"])
def test_a_damaged_backup_is_refused_naming_the_file_before_anything_runs(tmp_path, damage, capsys):
    stack_backup = _script()
    backup = tmp_path / "backup"
    backup.mkdir()
    for name, data in (("predictions.dump", b"dump bytes"), ("mlflow-artifacts.tgz", b"archive bytes")):
        (backup / name).write_bytes(data)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": stack_backup.sha256_of(p)} for p in backup.iterdir()}
    (backup / "manifest.json").write_text(json.dumps({"files": files, "databases": {}}))
    named = {"corrupted": "predictions.dump", "missing": "mlflow-artifacts.tgz", "no manifest": "manifest.json"}[damage]
    if damage == "corrupted":
        (backup / named).write_bytes(b"dump bytez")  # same size, other bytes
    else:
        (backup / named).unlink()
    ran = tmp_path / "compose-ran"
    env_file = tmp_path / "stack.env"
    env_file.write_text("POSTGRES_USER=wbc\n")
    # A compose command that leaves a mark if it is ever run: a refused backup runs nothing.
    code = stack_backup.main(["restore", str(backup), "--compose", f"touch {ran}", "--env-file", str(env_file)])
    assert code == 1
    assert named in capsys.readouterr().err
    assert not ran.exists()
