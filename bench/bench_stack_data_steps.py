"""The split checks, preprocess and augment tasks on the stack's Celery worker against the
embedded default (issue 31), on the same machine and data, as a lab runs them: one
``wbc_training`` run through each Airflow's REST API, and each task's duration as Airflow
recorded it (task start-up included, the same for both).

- ``embedded``: ``wbc airflow-ui`` on a fresh ``WBC_HOME`` (LocalExecutor, SQLite): a task runs
  in an ordinary process, so ``parallel_map`` uses worker processes;
- ``stack``: ``stack/start`` (CeleryExecutor, Redis, PostgreSQL, MLflow server, a ``cpu`` and a
  ``gpu`` worker), the processes the compose stack runs in its containers: a task runs under a
  Celery prefork worker, a daemonic process, where ``parallel_map`` uses worker processes too
  (threads before 7ea082e, billiard's pool until e4a3e0f).

The rest of the run is kept small (one epoch, no ImageNet weights): only the data steps are timed.
Rounds alternate between the two. Needs PostgreSQL and Redis on localhost, as the system tests do.

    .venv/bin/python bench/bench_stack_data_steps.py [--data ../shared/data/wbc-bench/WBC]
        [--size 64] [--augment 400] [--rounds 1] [--out bench-stack-data-steps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"
STEPS = ("split", "preprocess", "augment")
SETUPS = ("embedded", "stack")
START_TIMEOUT_S = 600
RUN_TIMEOUT_S = 3600


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without Airflow/WBC/MLflow settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "WBC_", "MLFLOW_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's shell: bytecode is written once
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf(data: Path, size: int, augment: int) -> dict[str, Any]:
    return {
        "data_dir": str(data),
        "image_size": size,
        "weights": "none",
        "epochs_head": 0,
        "epochs_finetune": 1,
        "batch_size": 32,
        "augment_per_class": augment,
        # A one-epoch model: crowned or not, the run must end in success.
        "min_metric": 0.0,
        "min_class_recall": 0.0,
        "min_blast_recall": 0.0,
    }


def _durations(client: Any, run_id: str) -> dict[str, float]:
    """Seconds of each data step, as Airflow recorded its task instance."""
    tis = {ti["task_id"]: ti for ti in client.task_instances("wbc_training", run_id)}
    seconds = {}
    for step in STEPS:
        ti = tis[step]
        start = datetime.fromisoformat(ti["start_date"])
        end = datetime.fromisoformat(ti["end_date"])
        seconds[step] = (end - start).total_seconds()
    return seconds


def _train_once(client: Any, conf: dict[str, Any]) -> dict[str, Any]:
    client.wait_for_dag("wbc_training", timeout=300)
    run_id = client.trigger("wbc_training", conf)
    client.wait_for_run("wbc_training", run_id, timeout=RUN_TIMEOUT_S)
    tis = [ti for ti in client.task_instances("wbc_training", run_id) if ti["task_id"] in STEPS]
    return {
        "seconds": _durations(client, run_id),
        "hosts": {ti["task_id"]: ti.get("hostname") for ti in tis},
        # Where a task's time went: its log lines carry their times.
        "logs": {ti["task_id"]: client.task_log("wbc_training", run_id, ti) for ti in tis},
    }


def run_embedded(conf: dict[str, Any], root: Path) -> dict[str, Any]:
    """``wbc airflow-ui`` on a fresh state folder; one training run; stopped."""
    from tests.system.conftest import AirflowClient

    port = _free_port()
    home = root / "wbc-home"
    env = _clean_env({"WBC_HOME": str(home), "WBC_ALLOWED_ROOTS": conf["data_dir"], "PYTHONUNBUFFERED": "1"})
    log = (root / "airflow-ui.log").open("w")
    ui = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "wbc"), "airflow-ui", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        passwords = home / "airflow" / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Airflow is ready" not in (root / "airflow-ui.log").read_text(errors="replace"):
            if ui.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wbc airflow-ui did not start:\n{(root / 'airflow-ui.log').read_text()[-3000:]}")
            time.sleep(2)
        client = AirflowClient(f"http://localhost:{port}", "admin", json.loads(passwords.read_text())["admin"])
        return _train_once(client, conf)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
        log.close()


def run_stack(conf: dict[str, Any], root: Path) -> dict[str, Any]:
    """``stack/start`` with a throwaway prefix; one training run; stopped, databases dropped."""
    from tests.system.conftest import AirflowClient, _kill_leftover_groups, _run_stack, read_env_file

    prefix = f"wbcb_{secrets.token_hex(4)}"
    state = root / "stack-state"
    classify = root / "classify-images"
    classify.mkdir()
    env = _clean_env({"WBC_ALLOWED_ROOTS": conf["data_dir"]})
    common = ["--prefix", prefix, "--state-dir", str(state)]
    try:
        started = _run_stack(
            "start", *common, "--classify-dir", str(classify), "--timeout", str(START_TIMEOUT_S),
            timeout=START_TIMEOUT_S + 60, env=env,
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"stack/start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        stack_env = read_env_file(state / "stack.env")
        client = AirflowClient(
            stack_env["WBC_STACK_API_URL"], stack_env["AIRFLOW_ADMIN_USERNAME"], stack_env["AIRFLOW_ADMIN_PASSWORD"]
        )
        return _train_once(client, conf)
    finally:
        try:  # as the system tests stop their stack: the script, then its process groups if need be
            _run_stack("stop", *common, "--drop-databases", timeout=300, env=env)
        finally:
            _kill_leftover_groups(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--augment", type=int, default=400, help="augment_per_class")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"no labelled images at {args.data}: see ../shared/data/README")
    conf = _conf(args.data.resolve(), args.size, args.augment)
    times: dict[str, dict[str, list[float]]] = {s: {step: [] for step in STEPS} for s in SETUPS}
    hosts: dict[str, Any] = {}
    logs: dict[str, list[Any]] = {s: [] for s in SETUPS}
    runs = {"embedded": run_embedded, "stack": run_stack}
    for round_ in range(args.rounds):
        for setup in SETUPS:
            with tempfile.TemporaryDirectory(prefix=f"bench-{setup}-") as tmp:
                result = runs[setup](conf, Path(tmp))
            for step, seconds in result["seconds"].items():
                times[setup][step].append(seconds)
            hosts[setup] = result["hosts"]
            logs[setup].append(result.pop("logs"))
            print(json.dumps({"round": round_ + 1, setup: result}), flush=True)
    median = {s: {step: statistics.median(v) for step, v in steps.items()} for s, steps in times.items()}
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data": str(args.data),
        "conf": conf,
        "rounds": args.rounds,
        "seconds": times,
        "hosts": hosts,
        "median_s": {s: {step: round(v, 2) for step, v in steps.items()} for s, steps in median.items()},
        "stack_to_embedded": {step: round(median["stack"][step] / median["embedded"][step], 2) for step in STEPS},
    }
    print(json.dumps(results, indent=1))
    if args.out:  # the logs beside: the tasks' timed lines say where each one's time went
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".logs.json").write_text(json.dumps(logs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
