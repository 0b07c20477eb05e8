"""Faults of the predictions database: a PostgreSQL server that crashes and restarts in the middle
of a nightly batch, or stays down longer than the retries.

Against a real, throwaway PostgreSQL cluster (``initdb`` into a temporary folder, its own port,
started and crashed with ``pg_ctl``): never the shared server on localhost:5432. The chunk is
classified for real (a tiny Keras model in a SQLite MLflow registry, generated images); the fault
is injected at a chosen statement by a SQLAlchemy event hook that crashes the server there.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine

from tests.conftest import free_port, skip_unless_required, write_image
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.registry.versions import ModelRef
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import classify_chunk
from wbc_tasks.serving.model import model_ref_to_dict
from wbc_tasks.serving.plan import find_new_images

N_IMAGES = 12
CHUNK = 4


def _pg_bindir() -> Path | None:
    explicit = os.environ.get("WBC_TEST_PG_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next(
        (c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()),
        None,
    )


class PgCluster:
    """A PostgreSQL cluster of our own: its folder, port and log; stopped however the test ends."""

    def __init__(self, bindir: Path, root: Path, as_user: list[str]) -> None:
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data, self.log = root / "data", root / "server.log"
        self.port = free_port()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr}\n{tail}")
        return result

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c full_page_writes=off -c shared_buffers=16MB -c max_connections=20"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def crash(self) -> None:
        """Stop at once, as a crash does: sessions are cut, open transactions are lost."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def pg_cluster():
    """One throwaway cluster per module (initdb takes a few seconds); skips without PostgreSQL."""
    bindir = _pg_bindir()
    if bindir is None:
        skip_unless_required("PostgreSQL server binaries (initdb, pg_ctl) not found; set WBC_TEST_PG_BINDIR")
    # Not under pytest's tmp folder: the server's user must be able to reach its data folder.
    root = Path(tempfile.mkdtemp(prefix="wbc-test-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run its tools as `postgres`
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            skip_unless_required("running as root and there is no `postgres` user to run a PostgreSQL cluster as")
        if shutil.which("runuser") is None:
            shutil.rmtree(root)
            skip_unless_required("running as root without `runuser` to start PostgreSQL as the `postgres` user")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PgCluster(bindir, root, as_user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.data.is_dir():
            cluster._run(
                "pg_ctl",
                "-D",
                str(cluster.data),
                "-m",
                "immediate",
                "-w",
                "stop",
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[ModelRef, str]:
    """A 32 px Rescaling + Flatten + Dense softmax model, version 1 of ``wbc-classifier`` in a
    SQLite registry of the module's own; returns its reference and the registry's URI."""
    import keras
    import mlflow.tensorflow
    from mlflow import MlflowClient

    from wbc_tasks.registry.versions import model_ref_from_version

    folder = tmp_path_factory.mktemp("registry")
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
        ]
    )
    path = folder / "model"
    # Explicit requirements: inferring them loads the model again in a subprocess (~20 s of CPU).
    mlflow.tensorflow.save_model(model, str(path), pip_requirements=["tensorflow"])
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("wbc-classifier")
    tags = {"image_size": "32", "class_names": json.dumps(list(CLASS_NAMES))}
    version = client.create_model_version("wbc-classifier", path.as_uri(), tags=tags)
    return model_ref_from_version(None, client.get_model_version("wbc-classifier", version.version)), uri


@pytest.fixture
def night(pg_cluster, tiny_model, settings, tmp_path):
    """Settings for a nightly run against a fresh database on the throwaway cluster, with
    ``N_IMAGES`` new images (chunks of ``CHUNK``) and short database retries."""
    if not pg_cluster.running():  # a test that failed half-way may have left it down
        pg_cluster.start()
    name = f"wbc_faults_{tmp_path.name[-20:].lower().replace('-', '_')}"
    admin = create_engine(pg_cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    settings = settings.with_overrides(
        mlflow_tracking_uri=tiny_model[1],
        model_name="wbc-classifier",
        predictions_db_url=pg_cluster.url(name),
        classify_dir=tmp_path / "classify",
        work_dir=tmp_path / "work",
        settle_minutes=0.0,
        classify_batch_size=8,
        predictions_db_retries=8,
        predictions_db_retry_wait=0.2,
    )
    for i in range(N_IMAGES):
        write_image(settings.classify_dir / "2026-11-24" / f"cell_{i:02d}.png", seed=100 + i)
    return settings


class CrashAt:
    """A SQLAlchemy hook that crashes the server just before the first statement starting with
    ``prefix`` once armed (the transaction is then open, with earlier statements of it sent);
    with ``restart_after``, a thread starts the server again that many seconds later."""

    def __init__(self, cluster: PgCluster, prefix: str, restart_after: float | None) -> None:
        self.cluster, self.prefix, self.restart_after = cluster, prefix, restart_after
        self.armed = False
        self.fired = 0
        self.restarter: threading.Thread | None = None

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not self.armed or not statement.lstrip().upper().startswith(self.prefix):
            return
        self.armed = False
        self.fired += 1
        self.cluster.crash()
        if self.restart_after is not None:

            def restart() -> None:
                time.sleep(self.restart_after)
                self.cluster.start()

            self.restarter = threading.Thread(target=restart, daemon=True)
            self.restarter.start()

    def __enter__(self) -> Self:
        event.listen(Engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(Engine, "before_cursor_execute", self)
        if self.restarter is not None:
            self.restarter.join(timeout=120)


def _rows(settings, table) -> list[dict]:
    with (
        db.open_engine(settings.predictions_db_url) as engine,
        engine.connect() as connection,
    ):
        return [dict(r) for r in connection.execute(select(table)).mappings()]


def _expected(settings) -> dict[str, str]:
    """relative path -> sha256 of every image dropped."""
    from wbc_tasks.data.images import sha256_of_file

    return {
        str(p.relative_to(settings.classify_dir)): sha256_of_file(p)
        for p in sorted(settings.classify_dir.rglob("*.png"))
    }


def _assert_each_image_exactly_once(settings) -> None:
    expected = _expected(settings)
    predictions = _rows(settings, db.predictions)
    assert sorted(r["sha256"] for r in predictions) == sorted(expected.values()), "a row lost or duplicated"
    seen = _rows(settings, db.files_seen)
    assert sorted((r["path"], r["sha256"]) for r in seen) == sorted(expected.items())
    assert _rows(settings, db.rejections) == []


def test_server_crash_mid_transaction_then_restart_retries_the_chunk_once(night, pg_cluster, tiny_model, caplog):
    """The server crashes inside chunk 2's transaction (its predictions sent, not committed) and
    is back 1.5 s later: the commit is retried whole and the run ends with one row per image."""
    caplog.set_level(logging.WARNING, logger="wbc_tasks.serving.predictions")
    model = model_ref_to_dict(tiny_model[0])
    found = find_new_images(night, run_id="night-1", model=model, chunk_size=CHUNK)
    assert len(found["chunks"]) == N_IMAGES // CHUNK
    first, second, third = found["chunks"]
    classify_chunk(night, first, model, run_id="night-1")

    with CrashAt(pg_cluster, "INSERT INTO FILES_SEEN", restart_after=1.5) as crash:
        crash.armed = True
        summary = classify_chunk(night, second, model, run_id="night-1")
    assert crash.fired == 1 and pg_cluster.running()
    retries = [r.getMessage() for r in caplog.records if "committing chunk" in r.getMessage()]
    assert retries and "retry 1 of 8" in retries[0], "the commit was not retried"
    assert summary["images_classified"] == CHUNK

    classify_chunk(night, third, model, run_id="night-1")
    _assert_each_image_exactly_once(night)


def test_server_down_longer_than_the_retries_commits_nothing_then_the_rerun_commits_once(night, pg_cluster, tiny_model):
    """The server crashes inside chunk 1's transaction and stays down past the retries: a clear
    error, no row of the chunk, no summary file; the retried task commits the chunk exactly once."""
    settings = night.with_overrides(predictions_db_retries=2, predictions_db_retry_wait=0.1)
    model = model_ref_to_dict(tiny_model[0])
    found = find_new_images(settings, run_id="night-2", model=model, chunk_size=CHUNK)
    chunk = found["chunks"][0]

    with CrashAt(pg_cluster, "INSERT INTO FILES_SEEN", restart_after=None) as crash:
        crash.armed = True
        with pytest.raises(db.DatabaseUnavailableError) as failed:
            classify_chunk(settings, chunk, model, run_id="night-2")
    message = str(failed.value)
    assert crash.fired == 1
    assert "is unreachable" in message and "committing chunk chunk-0000.json" in message
    assert f"127.0.0.1:{pg_cluster.port}" in message and "3 times" in message
    assert "WBC_PREDICTIONS_DB_RETRIES" in message and "Nothing of it was committed" in message
    assert not Path(chunk).with_suffix(".done.json").exists()

    pg_cluster.start()
    with (
        db.open_engine(settings.predictions_db_url) as engine,
        engine.connect() as connection,
    ):
        assert connection.execute(select(func.count()).select_from(db.predictions)).scalar_one() == 0
        assert connection.execute(select(func.count()).select_from(db.files_seen)).scalar_one() == 0

    for chunk in found["chunks"]:  # Airflow retries the failed chunk; the others run as usual
        classify_chunk(settings, chunk, model, run_id="night-2")
    _assert_each_image_exactly_once(settings)


def test_only_connection_failures_are_retried():
    """A lost connection is retried; a constraint violation or a wrong password is not."""
    import sqlite3

    import psycopg2
    from sqlalchemy.exc import IntegrityError, OperationalError

    lost = OperationalError(
        "INSERT",
        {},
        psycopg2.OperationalError("server closed the connection unexpectedly"),
        connection_invalidated=True,
    )
    refused = OperationalError("connect", {}, psycopg2.OperationalError("connection refused"))
    password = OperationalError(
        "connect",
        {},
        psycopg2.OperationalError('password authentication failed for user "x"'),
    )
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    no_table = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: predictions"))
    duplicate = IntegrityError("INSERT", {}, psycopg2.IntegrityError("duplicate key"))
    assert [db.is_transient_db_error(e) for e in (lost, refused, password, locked, no_table, duplicate)] == [
        True,
        True,
        False,
        True,
        False,
        False,
    ]
