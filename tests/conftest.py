"""Shared fixtures: the real image sets, isolated settings, small generated images."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Airflow reads its configuration when first imported: point it at a throwaway home before any
# test imports it, so tests never touch a user's Airflow and always parse this repo's dags/.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="wbc-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite Airflow metadata database for ``dag.test()`` runs (once per session)."""
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return _AIRFLOW_HOME


#: CI sets this: a missing prerequisite (real images, PostgreSQL, root) then fails the test
#: instead of skipping it, so a green CI cannot hide a silently skipped half of the suite.
REQUIRE_ALL = os.environ.get("WBC_TESTS_REQUIRE_ALL", "") == "1"


def put_back_fault_handlers(before: Mapping[int, Any]) -> None:
    """Each signal's handler as ``signal.getsignal`` gave it before (the default where it gave
    None), then pytest's traceback dump (faulthandler) installed over them again where it is on."""
    for fault, handler in before.items():
        signal.signal(fault, signal.SIG_DFL if handler is None else handler)
    if faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.disable()
        faulthandler.enable(file=sys.__stderr__)


@pytest.fixture(autouse=True)
def faults_stay_fatal():
    """Airflow's DAG-file import sets a Python SIGSEGV handler and leaves it. A Python handler
    returns to the faulting instruction, so a crash later in this process (or a worker forked
    from it) would spin at full CPU instead of failing; the handler is put back after each test."""
    before = signal.getsignal(signal.SIGSEGV)
    yield
    if signal.getsignal(signal.SIGSEGV) is not before:
        put_back_fault_handlers({signal.SIGSEGV: before})


def skip_unless_required(reason: str) -> NoReturn:
    """Skip the test for a missing prerequisite, or fail it where every one is required (CI)."""
    if REQUIRE_ALL:
        pytest.fail(f"prerequisite missing (WBC_TESTS_REQUIRE_ALL=1): {reason}", pytrace=False)
    pytest.skip(reason)


def shared_set(name: str) -> Path:
    """A set under ../shared/data, or skip (fail in CI) saying what is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        skip_unless_required(f"real images absent: {path} not found (../shared/data is not checked out here)")
    return path


@pytest.fixture
def seed_shaped() -> Path:
    """The 528-image labelled set with the original notebook's imbalance."""
    return shared_set("wbc-seed-shaped") / "WBC"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose every state folder lives in this test's tmp folder."""
    from wbc_tasks.core.settings import get_settings

    home = tmp_path / "wbc-home"
    for name in list(__import__("os").environ):
        if name.startswith("WBC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(home))
    monkeypatch.setenv("WBC_WORKERS", "1")
    return get_settings()


def write_image(path: Path, *, size=(48, 40), mode="RGB", seed=0, fmt=None) -> Path:
    """A small random image file (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze() if channels == 1 else array)
    image.save(path, format=fmt)
    return path


def parse_dag(dag_id: str):
    """``dags/<dag_id>.py`` as the scheduler's DAG processor loads it (settings read from the
    environment now), with no import errors."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=REPO_ROOT / "dags" / f"{dag_id}.py")
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
