"""Faults of the MLflow tracking server, against a real ``mlflow server`` (SQLite backend, proxied
artifacts, in a tmp folder), started once for the module.

The client reaches the server through a small TCP gate (:class:`Gate`). Closing the gate makes
the server unreachable exactly as a restart or a network cut does (connections refused, open
ones reset), in milliseconds, where restarting the server costs half a minute of CPU; a "trip"
closes it on a chosen request, dropping that request before the server sees it. The last test
kills the server itself for good.

Retries are shortened: MLflow's own HTTP retries are off (``WBC_MLFLOW_HTTP_RETRIES=0``) so
each failed request surfaces at once, and ours wait 0.25 s, doubling (a 16 s window).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES

pytestmark = pytest.mark.slow  # starts an MLflow server (~30 s on two cores)

FLOORS = {
    "metric": "balanced_accuracy",
    "margin": 0.0,
    "min_metric": 0.5,
    "min_class_recall": 0.3,
    "min_blast_recall": 0.8,
}


class MlflowServer:
    """``mlflow server`` in its own process group, SQLite backend and artifacts in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.backend_uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        import requests

        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the server writes to it until stopped
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.backend_uri,
                "--artifacts-destination",
                str(self.folder / "artifacts"),
            ],
            # The job runner (and its consumers) would double the start-up cost; nothing here uses it.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "server.log").read_text(errors="replace")[-3000:]
                self.kill()
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.25)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and its workers (its whole process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


class Gate:
    """A TCP forwarder in front of the server, which the test can close and open again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._trips: list[dict] = []
        self._lose_reply: set[socket.socket] = set()
        self.tripped: list[bytes] = []
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = list(self._sockets), set()
        for sock in ([listener] if listener else []) + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            sock.close()

    def trip(self, needle: bytes, *, down_for: float, nth: int = 1, lose_reply: bool = False) -> None:
        """On the ``nth`` request containing ``needle``: drop it unsent (or, ``lose_reply``, let the
        server handle it and drop its reply), then stay closed for ``down_for`` seconds."""
        with self._lock:
            self._trips.append({"needle": needle, "left": nth, "down_for": down_for, "lose_reply": lose_reply})

    def reset(self) -> None:
        with self._lock:
            self._trips.clear()
            self.tripped.clear()

    def _check_trips(self, data: bytes) -> dict | None:
        with self._lock:
            for trip in self._trips:
                if trip["needle"] in data:
                    trip["left"] -= 1
                    if trip["left"] == 0:
                        self._trips.remove(trip)
                        self.tripped.append(trip["needle"])
                        return trip
        return None

    def _go_down(self, seconds: float) -> None:
        self.close()
        threading.Timer(seconds, self.open).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # the server itself is down
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # closed meanwhile
                    client.close(), upstream.close()
                    return
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                trip = self._check_trips(data) if requests else None
                if trip is not None and not trip["lose_reply"]:
                    self._go_down(trip["down_for"])
                    return
                if trip is not None:
                    with self._lock:
                        self._lose_reply.add(target)
                    self._down_for_after_reply = trip["down_for"]
                if not requests and source in self._lose_reply:  # the server answered: lose it
                    self._go_down(self._down_for_after_reply)
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    gate = Gate(server.port)
    try:
        yield server, gate
    finally:
        gate.close()
        server.kill()


@pytest.fixture
def mlflow_settings(server, settings, tmp_path, monkeypatch, request):
    """Settings pointing at the server through the gate (open), this test's model name and work
    folder, short retries. MLflow's HTTP variables are restored afterwards."""
    import mlflow

    mlflow_server, gate = server
    if not mlflow_server.running():  # killed by a test that ran out of order
        mlflow_server.start()
    gate.open()
    gate.reset()
    for variable in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.setenv(variable, os.environ.get(variable, ""))  # restored after the test
    for name, value in {
        "WBC_MLFLOW_TRACKING_URI": gate.url,
        "WBC_MODEL_NAME": f"wbc-{request.node.name}"[:60],
        "WBC_WORK_DIR": str(tmp_path / "work"),
        "WBC_MLFLOW_RETRIES": "6",
        "WBC_MLFLOW_RETRY_WAIT": "0.25",
        "WBC_MLFLOW_HTTP_RETRIES": "0",
        "WBC_MLFLOW_HTTP_BACKOFF": "0",
        "WBC_MLFLOW_HTTP_TIMEOUT": "20",
    }.items():
        monkeypatch.setenv(name, value)
    yield get_settings()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _client(settings):
    from wbc_tasks.registry.client import configure_mlflow

    return configure_mlflow(settings)


def _metrics(balanced: float) -> dict:
    recall = {"blasts": 0.9, "neutrophils": 0.8}
    return {"balanced_accuracy": balanced, "accuracy": balanced, "recall": recall, "support": {c: 5 for c in recall}}


def _add_version(settings, balanced: float):
    """A version with this project's tags and test metrics (promotion never loads the model, so
    its source is a placeholder)."""
    from mlflow.exceptions import MlflowException

    from wbc_tasks.registry.tags import metric_tags
    from wbc_tasks.registry.versions import model_ref_from_version

    client = _client(settings)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(settings.model_name)
    tags = {"image_size": "32", "class_names": json.dumps(list(CLASS_NAMES)), **metric_tags(_metrics(balanced))}
    version = client.create_model_version(settings.model_name, "s3://wbc-test/placeholder", tags=tags)
    return model_ref_from_version(settings, client.get_model_version(settings.model_name, version.version))


def _versions(settings) -> list:
    return _client(settings).search_model_versions(f"name='{settings.model_name}'")


# ------------------------------------------------------------------ unreachable, then back


def test_metrics_logged_while_the_server_is_unreachable_arrive_once(mlflow_settings, server):
    from wbc_tasks.registry.artifacts import log_metrics
    from wbc_tasks.registry.runs import open_tracking_run

    _, gate = server
    run_id = open_tracking_run(mlflow_settings, "manual__outage-log", {"image_size": 32})
    gate.close()
    reopened = threading.Event()

    def reopen() -> None:
        reopened.set()  # before opening: a call that got through necessarily sees it set
        gate.open()

    threading.Timer(1.5, reopen).start()
    log_metrics(mlflow_settings, "manual__outage-log", {"loss": 0.5, "per_class": {"blasts": 0.9}}, step=1)
    assert reopened.is_set(), "the call returned before the server was reachable again"
    client = _client(mlflow_settings)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5)]
    assert len(client.get_metric_history(run_id, "per_class_blasts")) == 1


def test_registration_whose_version_creation_reply_is_lost_ends_with_one_version(mlflow_settings, server):
    """The server creates the model version but its reply is lost, and it is unreachable for
    1.5 s: registration retries, finds the version it created and ends with exactly one version,
    fully tagged (retrying the create blindly would register the model twice)."""
    import keras

    from wbc_tasks.registry.registration import register_model
    from wbc_tasks.registry.runs import open_tracking_run

    _, gate = server
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
        ]
    )
    run_id = open_tracking_run(mlflow_settings, "manual__outage-reg", {"image_size": 32})
    gate.trip(b"POST /api/2.0/mlflow/model-versions/create", down_for=1.5, lose_reply=True)
    ref = register_model(
        mlflow_settings,
        "manual__outage-reg",
        model,
        image_size=32,
        class_names=CLASS_NAMES,
        metrics=_metrics(0.9),
        data_summary={"counts": {}},
        params={"image_size": 32},
    )
    assert gate.tripped == [b"POST /api/2.0/mlflow/model-versions/create"]
    versions = _versions(mlflow_settings)
    assert [v.version for v in versions] == [ref.version] == ["1"]
    assert versions[0].run_id == run_id and versions[0].status == "READY"
    tags = versions[0].tags
    assert tags["airflow_run_id"] == "manual__outage-reg" and float(tags["metric.balanced_accuracy"]) == 0.9
    assert "Research use only" in _client(mlflow_settings).get_model_version(ref.name, ref.version).description


def test_promotion_cut_off_at_the_champion_move_completes_once(mlflow_settings, server):
    """The champion alias move (after the rollback alias moved) is lost and the server is away
    for 1.5 s: the promotion retries and completes, aliases and decision tags consistent."""
    from wbc_tasks.registry.decision import PROMOTED
    from wbc_tasks.registry.promotion import promote_if_better, promote_version
    from wbc_tasks.registry.versions import current_aliases

    _, gate = server
    s = mlflow_settings
    v1, v2 = _add_version(s, 0.7), _add_version(s, 0.9)
    promote_version(s, v1.version, who="ana", why="baseline")
    # Promotion moves @previous-champion, then @champion: lose the second request.
    gate.trip(b"POST /api/2.0/mlflow/registered-models/alias", down_for=1.5, nth=2)
    result = promote_if_better(s, v2, _metrics(0.9), lambda ref: _metrics(0.7), **FLOORS)
    assert gate.tripped == [b"POST /api/2.0/mlflow/registered-models/alias"]
    assert result["outcome"] == PROMOTED and result["champion"] == v2.version
    assert current_aliases(s) == {s.champion_alias: v2.version, s.rollback_alias: v1.version}
    tags = _client(s).get_model_version(s.model_name, v2.version).tags
    assert tags["promotion.decision"] == PROMOTED and tags["promotion.compared_with_version"] == v1.version
    demoted = _client(s).get_model_version(s.model_name, v1.version).tags
    assert demoted["demotion.replaced_by"] == v2.version
    assert len(_versions(s)) == 2


# ------------------------------------------------------------------ two runs finishing together

PROMOTE_SCRIPT = r"""
import json, sys, time
from pathlib import Path

from wbc_tasks.core.settings import get_settings
from wbc_tasks.registry.promotion import promote_if_better
from wbc_tasks.registry.versions import resolve_model, version_metrics

version, delay, folder = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
settings = get_settings()
candidate = resolve_model(settings, version)
metrics = version_metrics(settings, version)
windows = []

def champion_metrics(ref):  # the champion's evaluation, inside the promotion lock
    started = time.time()
    time.sleep(delay)
    windows.append((started, time.time()))
    return version_metrics(settings, ref.version)

(folder / f"ready-{version}").touch()
while not (folder / f"go-{version}").exists():
    time.sleep(0.01)
floors = json.loads(sys.argv[4])
result = promote_if_better(settings, candidate, metrics, champion_metrics, **floors)
(folder / f"result-{version}.json").write_text(json.dumps({"result": result, "windows": windows}))
"""


def test_two_processes_promoting_together_end_with_the_better_champion(mlflow_settings, tmp_path):
    """Two training runs finish together, in two processes. The worse one starts its (slow)
    champion evaluation first, the better one 0.3 s later and finishes its (fast) one first:
    without the lock the worse would move the champion last and win. With it, the evaluations
    never overlap, the better one is compared with the worse one and ends as champion."""
    from wbc_tasks.registry.decision import PROMOTED
    from wbc_tasks.registry.promotion import promote_version
    from wbc_tasks.registry.versions import current_aliases

    s = mlflow_settings
    v0, worse, better = (_add_version(s, b) for b in (0.6, 0.7, 0.8))
    promote_version(s, v0.version, who="ana", why="baseline")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = {
        v.version: subprocess.Popen(
            [sys.executable, "-c", PROMOTE_SCRIPT, v.version, delay, str(tmp_path), json.dumps(FLOORS)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v, delay in ((worse, "1.5"), (better, "0.2"))
    }
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready-{v}").exists() for v in processes):
            assert all(p.poll() is None for p in processes.values()), [p.communicate()[0] for p in processes.values()]
            assert time.monotonic() < deadline, "the promoting processes did not start"
            time.sleep(0.05)
        (tmp_path / f"go-{worse.version}").touch()
        time.sleep(0.3)
        (tmp_path / f"go-{better.version}").touch()
        outputs = {v: p.communicate(timeout=180)[0] for v, p in processes.items()}
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in processes.values()), outputs
    done = {v: json.loads((tmp_path / f"result-{v}.json").read_text()) for v in processes}

    ((_w_start, w_end),) = done[worse.version]["windows"]
    ((b_start, _b_end),) = done[better.version]["windows"]
    assert w_end <= b_start, "the two champion evaluations overlapped: promotion was not serialised"
    assert done[worse.version]["result"]["outcome"] == PROMOTED
    assert done[worse.version]["result"]["compared_with_version"] == v0.version
    assert done[better.version]["result"]["outcome"] == PROMOTED
    assert done[better.version]["result"]["compared_with_version"] == worse.version
    assert current_aliases(s) == {s.champion_alias: better.version, s.rollback_alias: worse.version}
    client = _client(s)
    for version, compared in ((worse.version, v0.version), (better.version, worse.version)):
        tags = client.get_model_version(s.model_name, version).tags
        assert tags["promotion.decision"] == PROMOTED and tags["promotion.compared_with_version"] == compared
    assert client.get_model_version(s.model_name, worse.version).tags["demotion.replaced_by"] == better.version


# ------------------------------------------------------------------ down for good (kills the server: last)


def test_server_dead_past_the_retries_fails_clearly_and_leaves_the_champion(mlflow_settings, server, monkeypatch):
    """The server dies while the champion is being evaluated and stays down: the promotion fails
    with a clear error naming the server, and the registry (read from its database) still has the
    old champion, no rollback alias and no decision on the candidate."""
    from mlflow import MlflowClient

    from wbc_tasks.registry.client import MlflowUnavailableError
    from wbc_tasks.registry.promotion import promote_if_better, promote_version

    mlflow_server, gate = server
    s = mlflow_settings.with_overrides(mlflow_retries=2, mlflow_retry_wait=0.1)
    v1, v2 = _add_version(s, 0.7), _add_version(s, 0.9)
    promote_version(s, v1.version, who="ana", why="baseline")

    def champion_metrics(ref):
        mlflow_server.kill()
        return _metrics(0.7)

    with pytest.raises(MlflowUnavailableError) as failed:
        promote_if_better(s, v2, _metrics(0.9), champion_metrics, **FLOORS)
    message = str(failed.value)
    assert f"MLflow at {gate.url} is unreachable" in message and "3 times" in message
    assert "WBC_MLFLOW_RETRIES" in message and "retried safely" in message

    registry = MlflowClient(tracking_uri=mlflow_server.backend_uri, registry_uri=mlflow_server.backend_uri)
    aliases = registry.get_registered_model(s.model_name).aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {s.champion_alias: v1.version}
    assert not any(k.startswith("promotion.") for k in registry.get_model_version(s.model_name, v2.version).tags)
