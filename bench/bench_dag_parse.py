"""Scheduler load: seconds to parse each DAG file in a DagBag, Airflow already imported.

    .venv/bin/python bench/bench_dag_parse.py [--repeat 5]

Baseline in the same run: an empty DAG file (the cost Airflow adds to any file).
Target (issue 6): under 0.5 s per file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMPTY_DAG = """
import pendulum
from airflow.sdk import dag, task

@dag(dag_id="empty", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def empty():
    @task
    def nothing():
        pass
    nothing()

empty()
"""


def parse_seconds(path: Path, repeat: int) -> list[float]:
    from airflow.dag_processing.dagbag import DagBag

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        bag = DagBag(dag_folder=str(path))
        times.append(time.perf_counter() - start)
        if bag.import_errors:
            raise SystemExit(f"{path}: {bag.import_errors}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp())
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    import airflow.sdk  # noqa: F401  (import cost is paid once by a real scheduler)
    from airflow.dag_processing.dagbag import DagBag  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        rows = [("empty DAG (baseline)", parse_seconds(empty, args.repeat))]
        for dag_file in sorted((REPO / "dags").glob("*.py")):
            rows.append((dag_file.name, parse_seconds(dag_file, args.repeat)))
    base = statistics.median(rows[0][1])
    print("| DAG file | median parse (s) | max (s) | vs empty DAG |")
    print("|---|---|---|---|")
    for name, times in rows:
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {max(times):.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
