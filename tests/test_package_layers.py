"""The pipeline code stays free of the orchestrator: only ``wbc_airflow`` (and ``dags/``) import Airflow."""

from __future__ import annotations

import ast
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
