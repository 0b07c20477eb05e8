"""TensorFlow's oneDNN CPU kernels are on wherever the package is imported first (TensorFlow alone
turns them on only on CPUs with AVX512 VNNI/BF16 or AMX), and a value the user set wins. Checked
in fresh processes: TensorFlow reads the variable once, when it loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ONEDNN_STATE = (
    "import os, wbc_tasks, tensorflow; from tensorflow.python.util import _pywrap_util_port as p; "
    "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], p.IsMklEnabled())"
)


@pytest.mark.parametrize(("preset", "expected"), [(None, "1 True"), ("0", "0 False"), ("1", "1 True")])
def test_importing_the_package_turns_onednn_on_unless_the_user_said_otherwise(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    found = subprocess.run(
        [sys.executable, "-c", ONEDNN_STATE], env=env, cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    assert found.strip().splitlines()[-1] == expected
