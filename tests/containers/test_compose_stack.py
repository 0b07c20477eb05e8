"""The docker-compose stack in containers: built from the Dockerfiles, started with the project's
compose file, both DAGs run over the REST API as a user would.

The stack starts without the ImageNet weights (airflow-init must say so, naming the setting; a
default training run must fail at once), then the weights file is put into the mounted folder
and picked up; a tiny training run (32 px, from scratch) registers a champion on the MLflow
server, and a nightly run classifies a mounted drop, read back with `wbc predictions` inside a
container. Run with ``make test-containers`` (about 20 minutes on 2 cores with empty caches).
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest
import requests

from ..system.conftest import AirflowClient, assert_tasks_ran_on_their_queues
from .conftest import DROP_NAME, DROP_SIZE, PROJECT, STATE_DIR, WEIGHTS_FILE, ContainerStack, generated_weights

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

RUN_TIMEOUT_S = 1500
TINY_TRAINING = {
    "image_size": 32,
    "weights": "none",
    "epochs_head": 0,
    "epochs_finetune": 1,
    "batch_size": 16,
    "augment_per_class": 8,
    "smote": True,
    "min_metric": 0,
    "min_class_recall": 0,
    "min_blast_recall": 0,
    "seed": 7,
}


class PatientSession(requests.Session):
    """Ten containers on two cores: the API server sometimes needs more than the native test's
    30 s to answer. Longer timeouts; reads (GET) are tried again after a time-out."""

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        kwargs["timeout"] = max(kwargs.get("timeout") or 0, 120)
        attempts = 3 if method.upper() == "GET" else 1
        for attempt in range(attempts):
            try:
                return super().request(method, url, *args, **kwargs)
            except (requests.ConnectionError, requests.Timeout):
                if attempt == attempts - 1:
                    raise
                time.sleep(5)
        raise AssertionError("unreachable")


class StackClient(AirflowClient):
    """The native system test's REST client, with a :class:`PatientSession`."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = PatientSession()
        response = self.session.post(f"{self.base_url}/auth/token", json={"username": username, "password": password})
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"


@pytest.fixture(scope="module")
def airflow(container_stack: ContainerStack) -> AirflowClient:
    return StackClient(
        container_stack.api_url,
        container_stack.settings["AIRFLOW_ADMIN_USERNAME"],
        container_stack.settings["AIRFLOW_ADMIN_PASSWORD"],
    )


def timed(stack: ContainerStack, key: str, started: float) -> None:
    stack.times[key] = round(time.monotonic() - started, 1)
    print(f"[containers] {key}: {stack.times[key]:.0f} s", flush=True)


def test_every_service_passes_its_own_health_check(container_stack: ContainerStack) -> None:
    """Each service's compose health check, run now (podman healthcheck run), passes; init exited 0."""
    services = container_stack.config()["services"]
    checked = []
    for name, service in services.items():
        if not service.get("healthcheck"):
            continue
        done = container_stack.engine.podman("healthcheck", "run", container_stack.container(name), check=False)
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        checked.append(name)
    assert set(checked) == set(services) - {"airflow-init"}, checked
    state = container_stack.engine.podman(
        "inspect", container_stack.container("airflow-init"), "--format", "{{.State.Status}} {{.State.ExitCode}}"
    ).stdout.strip()
    assert state == "exited 0"


def test_the_installed_package_is_the_working_trees_code(container_stack: ContainerStack) -> None:
    """What the workers import (the installed wbc_tasks, not a source checkout) is this tree's code:
    a rebuild after a change must not install a cached wheel of the previous code."""
    from .conftest import REPO_ROOT

    script = (
        "import hashlib, pathlib, wbc_tasks\n"
        "root = pathlib.Path(wbc_tasks.__file__).parent\n"
        "assert 'site-packages' in str(root), root\n"
        "for f in sorted(root.rglob('*.py')):\n"
        "    print(f.relative_to(root), hashlib.sha256(f.read_bytes()).hexdigest())\n"
    )
    # From /tmp: in the image's WORKDIR (/opt/wbc) `python -c` would import the source copy.
    done = container_stack.engine.podman(
        "exec", "-w", "/tmp", container_stack.container("airflow-worker"), "python", "-c", script, check=False
    )
    assert done.returncode == 0, done.stderr
    installed = dict(line.split() for line in done.stdout.splitlines())
    import hashlib

    local = {
        str(f.relative_to(REPO_ROOT / "wbc_tasks")): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted((REPO_ROOT / "wbc_tasks").rglob("*.py"))
    }
    stale = sorted(name for name, digest in local.items() if installed.get(name) != digest)
    assert not stale, f"the image's installed wbc_tasks differs from the working tree: {stale[:10]}"


def test_databases_were_created_by_the_projects_init_script(container_stack: ContainerStack) -> None:
    """The postgres stand-in ran docker/postgres/init-databases.sh as the official image would."""
    done = container_stack.exec(
        "postgres", "psql", "-U", container_stack.settings["POSTGRES_USER"], "-d", "airflow", "-At", "-c",
        "SELECT datname FROM pg_database ORDER BY 1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {"airflow", "mlflow", "mlflow_auth", "predictions"} <= set(done.stdout.split())


def test_anonymous_requests_are_refused(container_stack: ContainerStack) -> None:
    """Neither the Airflow API nor the MLflow server answers without credentials."""
    assert requests.get(f"{container_stack.api_url}/api/v2/dags", timeout=30).status_code in (401, 403)
    wrong = requests.post(
        f"{container_stack.api_url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30
    )
    assert wrong.status_code in (401, 403)
    search = f"{container_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code in (401, 403)
    assert requests.get(search, auth=container_stack.mlflow_auth, timeout=30).status_code == 200


def test_airflow_init_warns_loudly_naming_the_setting_when_the_weights_are_missing(
    container_stack: ContainerStack,
) -> None:
    """The stack starts without the weights file; airflow-init says so with WBC_VGG16_WEIGHTS."""
    log = container_stack.logs("airflow-init")
    assert "WARNING: WBC_VGG16_WEIGHTS" in log, log[-3000:]
    assert WEIGHTS_FILE in log
    assert "database migrated" in log


def test_default_training_without_weights_fails_at_once_before_any_data_step(
    container_stack: ContainerStack, airflow: AirflowClient
) -> None:
    """weights=imagenet (the default) with the file missing: split fails in its first try, naming
    the setting, and no later step runs."""
    started = time.monotonic()
    airflow.wait_for_dag("wbc_training")
    run_id = airflow.trigger("wbc_training", {})
    deadline = time.monotonic() + 600
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = airflow.get(f"/dags/wbc_training/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            break
        time.sleep(3)
    assert run.get("state") == "failed", run
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("wbc_training", run_id)}
    assert tis["split"]["state"] == "failed"
    assert tis["split"]["try_number"] == 1, "a missing weights file must not be retried"
    assert {ti["state"] for task, ti in tis.items() if task != "split"} <= {"upstream_failed", None}
    log = airflow.task_log("wbc_training", run_id, tis["split"])
    assert "WBC_VGG16_WEIGHTS" in log and "MissingWeightsError" in log, log
    timed(container_stack, "training run failing on missing weights", started)


def test_weights_put_into_the_mounted_folder_are_found_and_load(container_stack: ContainerStack) -> None:
    """The documented way: the file into WBC_HOST_WEIGHTS_DIR, no restart; the workers load it."""
    check = container_stack.exec("airflow-worker-gpu", "wbc-airflow-entrypoint", "check-weights")
    assert check.returncode == 3 and "WBC_VGG16_WEIGHTS" in check.stderr, check.stdout + check.stderr
    source = generated_weights(STATE_DIR)
    target = container_stack.run_dir / "weights" / WEIGHTS_FILE
    shutil.copy(source, target)
    target.chmod(0o644)
    for service in ("airflow-worker", "airflow-worker-gpu"):
        check = container_stack.exec(service, "wbc-airflow-entrypoint", "check-weights")
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"/data/weights/{WEIGHTS_FILE}" in check.stdout
    # The pipeline's own model builder takes the file as the VGG16 base (same kernels as written).
    script = (
        "import h5py, numpy as np\n"
        "from wbc_tasks.core.settings import get_settings\n"
        "from wbc_tasks.training.model import build_model, vgg16_weights_file\n"
        "s = get_settings(); path = vgg16_weights_file(s)\n"
        "model = build_model(32, 3, weights='imagenet', settings=s)\n"
        "kernel = model.get_layer('vgg16').get_layer('block1_conv1').get_weights()[0]\n"
        "with h5py.File(path, 'r') as f:\n"
        "    group = f['block1_conv1']\n"
        "    name = group.attrs['weight_names'][0]\n"
        "    stored = group[name.decode() if isinstance(name, bytes) else name][()]\n"
        "print(path, bool(np.allclose(kernel, stored)))\n"
    )
    loaded = container_stack.exec("airflow-worker-gpu", "python", "-c", script, timeout=600)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert loaded.stdout.strip().endswith("True"), loaded.stdout + loaded.stderr


@pytest.fixture(scope="module")
def training_run(container_stack: ContainerStack, airflow: AirflowClient) -> dict[str, Any]:
    """One finished tiny ``wbc_training`` run on the mounted labelled folder (WBC_DATA_DIR)."""
    started = time.monotonic()
    airflow.wait_for_dag("wbc_training")
    run_id = airflow.trigger("wbc_training", TINY_TRAINING)
    run = airflow.wait_for_run("wbc_training", run_id, timeout=RUN_TIMEOUT_S)
    timed(container_stack, "tiny training run", started)
    return {"run_id": run_id, "run": run, "task_instances": airflow.task_instances("wbc_training", run_id)}


def test_training_runs_train_model_on_the_gpu_worker(training_run: dict[str, Any]) -> None:
    assert_tasks_ran_on_their_queues(training_run)


def mlflow_get(stack: ContainerStack, path: str, **params: Any) -> dict[str, Any]:
    response = requests.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/{path}", params=params, auth=stack.mlflow_auth, timeout=30
    )
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
    return response.json()


def champion(stack: ContainerStack) -> dict[str, Any]:
    return mlflow_get(stack, "registered-models/alias", name="wbc-classifier", alias="champion")["model_version"]


def test_mlflow_server_holds_the_run_the_version_and_the_champion(
    container_stack: ContainerStack, training_run: dict[str, Any]
) -> None:
    """Inside the stack, with auth: the run (named after the DAG run), its registered version, the alias."""
    version = champion(container_stack)
    assert version["name"] == "wbc-classifier" and "champion" in version.get("aliases", [])
    run = mlflow_get(container_stack, "runs/get", run_id=version["run_id"])["run"]
    assert run["info"]["run_name"] == training_run["run_id"]
    assert run["info"]["status"] == "FINISHED"
    # Artifacts went through the server (proxied) into its volume, not onto the workers.
    listed = container_stack.exec("mlflow", "sh", "-c", "find /mlflow/artifacts -type f | head -5")
    assert listed.stdout.strip(), listed.stderr


def test_batch_classification_rows_read_back_with_wbc_predictions_in_a_container(
    container_stack: ContainerStack, airflow: AirflowClient, training_run: dict[str, Any]
) -> None:
    """The mounted drop is classified by the champion; `wbc predictions` (installed package, inside
    a container, on the stack's PostgreSQL) returns one classified row per file."""
    started = time.monotonic()
    airflow.wait_for_dag("wbc_batch_classification")
    run_id = airflow.trigger("wbc_batch_classification", {"drop": DROP_NAME})
    airflow.wait_for_run("wbc_batch_classification", run_id, timeout=RUN_TIMEOUT_S)
    timed(container_stack, "batch classification run", started)
    done = container_stack.exec("airflow-worker", "wbc", "predictions", "--drop", DROP_NAME, "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout)
    dropped = sorted(p.name for p in (container_stack.run_dir / "classify-images" / DROP_NAME).iterdir())
    assert len(rows) == len(dropped) == DROP_SIZE, rows
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows) == dropped
    assert {row["status"] for row in rows} == {"classified"}
    assert {str(row["model_version"]) for row in rows} == {str(champion(container_stack)["version"])}

    # The same rows over HTTP from the lab plugin in the API server (loaded through the package's
    # airflow.plugins entry point), with the REST API's token; anonymous requests are refused.
    url = f"{container_stack.api_url}/lab/api/predictions"
    query = {"format": "csv", "drop": DROP_NAME}
    assert requests.get(url, params=query, timeout=60).status_code == 401
    response = airflow.session.get(url, params=query, timeout=60)
    assert response.status_code == 200, response.text[:2000]
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in table) == dropped


def mlflow_status_of(stack: ContainerStack, dag_run_id: str) -> str:
    """The status of a DAG run's MLflow run, looked up by the pipeline's own code in a container."""
    script = (
        "import sys\n"
        "from wbc_tasks.core.settings import get_settings\n"
        "from wbc_tasks.registry.client import configure_mlflow\n"
        "from wbc_tasks.registry.runs import find_tracking_run\n"
        "s = get_settings(); run = find_tracking_run(s, sys.argv[1])\n"
        "print('STATUS', configure_mlflow(s).get_run(run).info.status if run else 'NONE')\n"
    )
    done = stack.exec("airflow-worker", "python", "-c", script, dag_run_id, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATUS ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    return lines[-1].split(" ", 1)[1]


def test_a_failed_training_run_closes_its_mlflow_run_as_failed(
    container_stack: ContainerStack, airflow: AirflowClient, training_run: dict[str, Any]
) -> None:
    """A run that fails after its MLflow run was opened: the failure handling marks it FAILED.

    The failure is made over the REST API (a task marked failed, as an operator would), after
    `split` opened the MLflow run; the scheduler then fails the DAG run and the failure
    callbacks run where Airflow runs them on the stack."""
    started = time.monotonic()
    run_id = airflow.trigger("wbc_training", {**TINY_TRAINING, "seed": 11})
    deadline = time.monotonic() + 900
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("wbc_training", run_id)}
        if states.get("split") == "success" or states.get("split") == "failed":
            break
        time.sleep(3)
    assert states.get("split") == "success", states
    response = airflow.session.patch(
        f"{airflow.base_url}/api/v2/dags/wbc_training/dagRuns/{run_id}/taskInstances/preprocess",
        json={"new_state": "failed"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    while time.monotonic() < deadline:
        run = airflow.get(f"/dags/wbc_training/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            break
        time.sleep(3)
    assert run["state"] == "failed", run
    failed_at = time.monotonic()
    status = ""
    while time.monotonic() < failed_at + 300:
        status = mlflow_status_of(container_stack, run_id)
        if status == "FAILED":
            break
        time.sleep(10)
    container_stack.times["failure callback: MLflow run FAILED after the DAG run failed"] = round(
        time.monotonic() - failed_at, 1
    )
    assert status == "FAILED", f"MLflow run of {run_id} is {status} 300 s after the DAG run failed"
    # Where it ran: Airflow 3 runs DAG-level callbacks in the dag-processor (its file processor,
    # within [dag_processor] dag_file_processor_timeout). Reported, for docs/stack.md.
    where = container_stack.exec(
        "airflow-dag-processor", "sh", "-c",
        "grep -rl 'Executing on_failure dag callback' /opt/airflow/logs 2>/dev/null | head -3",
    )  # fmt: skip
    print(f"[containers] on_failure dag callback logged in the dag-processor: {where.stdout.strip() or 'not found'}")
    timed(container_stack, "failed training run and its MLflow run closed", started)


# --------------------------------------------------------------------------------------------
# Backup and restore drill (issue 28): last in this module, it replaces the stack with a restored one
# --------------------------------------------------------------------------------------------

DRILL_DROP = "2026-12-04-drill"
DRILL_FILES = 192
DRILL_CHUNK = 6


def stack_psql(stack: ContainerStack, database: str, sql: str) -> list[str]:
    done = stack.exec("postgres", "psql", "-U", stack.settings["POSTGRES_USER"], "-d", database, "-Atc", sql)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def seen_in_drill_drop(stack: ContainerStack) -> int:
    rows = stack_psql(stack, "predictions", f"SELECT count(*) FROM files_seen WHERE drop = '{DRILL_DROP}'")
    return int(rows[0])


def stack_backup(stack: ContainerStack, *args: str) -> dict[str, Any]:
    """docker/stack_backup.py, as an operator runs it, with this stack's compose command."""
    from .conftest import REPO_ROOT, compose_argv, compose_env

    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "stack_backup.py"), *args,
         "--compose", shlex.join(compose_argv(stack.env_file)), "--env-file", str(stack.env_file)],
        capture_output=True, text=True, env=compose_env(stack.engine), timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, f"stack_backup.py {args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_backup_while_a_night_runs_then_restore_into_a_fresh_stack(
    container_stack: ContainerStack, airflow: AirflowClient, training_run: dict[str, Any]
) -> None:
    """The documented backup of a running stack, taken while a nightly run is committing chunks,
    restored after everything (volumes too) was removed: every table equal to the backup's,
    the same champion and versions with loadable artifacts, the in-flight run marked failed, the
    next night classifies exactly the files the backup had not seen, logins work with the
    restored secrets, and the lab's pages answer."""
    from .conftest import SHARED_DATA, wait_healthy

    stack = container_stack
    drop = stack.run_dir / "classify-images" / DRILL_DROP
    drop.mkdir()
    sources = sorted(p for c in sorted((SHARED_DATA / "wbc-bench" / "WBC").iterdir()) for p in sorted(c.iterdir()))
    for i, source in enumerate(sources[:: len(sources) // DRILL_FILES][:DRILL_FILES]):
        shutil.copy(source, drop / f"cell-{i:04d}{source.suffix}")
        (drop / f"cell-{i:04d}{source.suffix}").chmod(0o644)
    drop.chmod(0o755)
    versions_before = mlflow_get(stack, "registered-models/get", name="wbc-classifier")["registered_model"]
    champion_before = champion(stack)
    seen_elsewhere = int(stack_psql(stack, "predictions", "SELECT count(*) FROM files_seen")[0])

    in_flight = airflow.trigger("wbc_batch_classification", {"drop": DRILL_DROP, "chunk_size": DRILL_CHUNK})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and seen_in_drill_drop(stack) == 0:
        time.sleep(2)
    assert 0 < seen_in_drill_drop(stack) < DRILL_FILES, "the backup must start while the night is committing"

    started = time.monotonic()
    backup_dir = STATE_DIR / "stack-backup"
    shutil.rmtree(backup_dir, ignore_errors=True)
    made = stack_backup(stack, "backup", str(backup_dir))
    stack.times["stack backup (while a night ran)"] = round(time.monotonic() - started, 1)
    state = airflow.get(f"/dags/wbc_batch_classification/dagRuns/{in_flight}")["state"]
    assert state == "running", f"the night ended ({state}) before the backup finished: the drill proves nothing"
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    seen_at_backup = manifest["databases"]["predictions"]["public.files_seen"]["rows"]
    assert made["tables"] >= 4 and set(manifest["databases"]) >= {"airflow", "mlflow", "mlflow_auth", "predictions"}
    drill_at_backup = seen_at_backup - seen_elsewhere  # only the night in flight wrote meanwhile
    assert 0 < drill_at_backup < DRILL_FILES

    # Everything goes: containers, networks and volumes.
    stack.compose("down", "--volumes", "--timeout", "20", timeout=600)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert not stack.engine.podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()

    started = time.monotonic()
    restored = stack_backup(stack, "restore", str(backup_dir))
    wait_healthy(stack, stack.config()["services"], timeout=900)
    stack.times["stack restore until every service is healthy"] = round(time.monotonic() - started, 1)
    assert restored["tables_checked"] == made["tables"]
    assert f"wbc_batch_classification/{in_flight}" in restored["runs_marked_failed"]

    # Logins with the restored secrets; the same registry.
    client = StackClient(
        stack.api_url, stack.settings["AIRFLOW_ADMIN_USERNAME"], stack.settings["AIRFLOW_ADMIN_PASSWORD"]
    )
    assert client.get(f"/dags/wbc_batch_classification/dagRuns/{in_flight}")["state"] == "failed"
    assert champion(stack) == champion_before
    after = mlflow_get(stack, "registered-models/get", name="wbc-classifier")["registered_model"]
    assert after["latest_versions"] == versions_before["latest_versions"]
    assert seen_in_drill_drop(stack) == drill_at_backup

    # The next night (loading the champion's restored artifacts) classifies exactly what the
    # backup had not seen: every file once, nothing twice.
    seen_before = int(stack_psql(stack, "predictions", "SELECT count(*) FROM files_seen")[0])
    assert seen_before == seen_at_backup
    next_night = client.trigger("wbc_batch_classification", {"drop": DRILL_DROP, "chunk_size": 30})
    client.wait_for_run("wbc_batch_classification", next_night, timeout=RUN_TIMEOUT_S)
    assert seen_in_drill_drop(stack) == DRILL_FILES
    paths = stack_psql(stack, "predictions", f"SELECT path FROM files_seen WHERE drop = '{DRILL_DROP}'")
    assert len(paths) == len(set(paths)) == DRILL_FILES
    new_rows = int(stack_psql(stack, "predictions", "SELECT count(*) FROM files_seen")[0]) - seen_before
    assert new_rows == DRILL_FILES - drill_at_backup
    # The lab's pages answer from the restored database.
    drops = client.session.get(f"{stack.api_url}/lab/api/drops", timeout=120)
    assert drops.status_code == 200, drops.text[:500]
    [counts] = [d for d in drops.json() if d["drop"] == DRILL_DROP]
    assert counts["files"] == DRILL_FILES and counts["cells"] + counts["rejected"] == DRILL_FILES
    print(f"[containers] drill: backup {made}, restore {restored}", flush=True)
