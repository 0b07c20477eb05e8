"""A training task's worker killed mid-run: the train step started in a second process and
SIGKILLed as soon as an epoch is checkpointed, as a lost Celery worker would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEP_SCRIPT = (
    "import json, sys; from wbc_tasks.pipelines.training import train_step; "
    "train_step(sys.argv[1], json.loads(sys.argv[2]))"
)


def kill_train_step_after_an_epoch(run_id: str, params: dict[str, Any], state_file: Path, log_file: Path) -> int:
    """Run the train step of ``run_id`` in a new process, SIGKILL it once ``state_file`` records
    a finished epoch; return the epochs it recorded. Fails if it ends first or takes over 10
    minutes (its output is in ``log_file``)."""
    log = open(log_file, "wb")  # noqa: SIM115 - the worker writes to it until killed
    worker = subprocess.Popen(
        [sys.executable, "-c", TRAIN_STEP_SCRIPT, run_id, json.dumps(params)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        deadline = time.monotonic() + 600
        while not (state_file.is_file() and json.loads(state_file.read_text())["epochs_done"] >= 1):
            assert worker.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch checkpoint within 10 minutes"
            time.sleep(0.05)
        assert worker.poll() is None, "the task finished before it could be killed"
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    return int(json.loads(state_file.read_text())["epochs_done"])
