"""The pipeline code stays free of the orchestrator: only ``wbc_airflow`` (and ``dags/``) import Airflow."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_wbc_tasks_never_imports_airflow():
    files = sorted((REPO / "wbc_tasks").rglob("*.py"))
    assert len(files) > 50
    offenders = {
        str(f.relative_to(REPO)): sorted(m for m in _imported_modules(f) if m.split(".")[0] == "airflow") for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of pyproject.toml over the packages under ``root``."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(root)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_the_layering_holds_and_an_upward_import_breaks_the_contract(tmp_path):
    """`lint-imports` (make lint) passes on the tree, and fails naming the import when a lower
    layer imports a higher one."""
    for package in ("wbc_tasks", "wbc_airflow"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout[-3000:]
    errors = tmp_path / "wbc_tasks" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from wbc_tasks.serving import report  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "wbc_tasks.core.errors -> wbc_tasks.serving.report" in broken.stdout
