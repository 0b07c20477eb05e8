"""A busy lab's history (issue 31): how the drops page, a review queue and a no-op night cost as
the predictions database and the classify folder grow, before and after paging and the drop skip,
side by side in one process on the same data.

    .venv/bin/python bench/bench_scale.py --rows 10000 100000 [--postgresql] --files 20000 --out bench-scale.json
        [--baseline-tree /path/to/an/earlier/checkout] [--export-only]

Per size N (SQLite, and the local PostgreSQL with ``--postgresql``): N ``files_seen`` and prediction
rows bulk-inserted across about N / 4,700 drops (7 million rows is 1,500 drops), the first drop
holding 5,000 cells (a 5,000-cell review queue), one review per 350 cells. Timed, the median of
five after one warm-up:

- filling the drop summaries from the rows (``recount_all``: what migration 0006 does once);
- the drops page: a page of 50 drops counted from their rows (as before the summaries), and read
  from the summaries (``count_drops`` and ``list_drops(limit=50)``), and every drop's summary;
- the 5,000-cell drop's review queue (``review_queue``, which the page then slices), its report,
  and recording a review there (which recounts that drop in its transaction); with
  ``--baseline-tree``, the queue and report of that earlier code too, in turns with this code's.

Then ``--files`` real images hard-linked into a classify folder of drops (100 files each), their
``files_seen`` rows and predictions recorded as a finished night would: the planning of a no-op
night (``find_new_images``) with every drop read (the first night after this change, or
``full_scan``) and then with the finished, unchanged drops skipped; then 20,000 new files (half in
100 new drops, half added to 100 old ones) and the planning of that night. Peak RSS is the
process's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sqlalchemy import text  # noqa: E402

from tests.serving.conftest import base_settings, make_prediction, throwaway_database  # noqa: E402
from wbc_tasks.serving import predictions as db  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "wbc-bench" / "WBC"
ROWS_PER_DROP = 4_700
BIG_DROP = 5_000
CELLS_PER_REVIEW = 350
FILES_PER_DROP = 100
NEW_FILES = 20_000
MODEL = {
    "name": "wbc-classifier",
    "version": "1",
    "run_id": "run1",
    "uri": "models:/wbc-classifier/1",
    "image_size": 64,
    "class_names": [],
}


def timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _copy(connection: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Bulk-load ``rows`` into ``table`` past SQLAlchemy's per-row work: values converted by the
    columns' own SQLAlchemy types, then PostgreSQL's ``COPY`` or SQLite's ``executemany`` (the
    product's insert took about 80 minutes for 7 M rows on PostgreSQL and 35 on SQLite, loaded)."""
    columns = list(rows[0])
    dialect = connection.dialect
    # dialect_impl: a generic type (DateTime) converts nothing itself; its dialect's type does.
    convert = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) or (lambda v: v) for c in columns]
    values = [tuple(f(row[c]) for f, c in zip(convert, columns, strict=True)) for row in rows]
    quoted = ", ".join(f'"{c}"' for c in columns)
    cursor = connection.connection.driver_connection.cursor()
    if dialect.name == "postgresql":
        buffer = io.StringIO()
        csv.writer(buffer).writerows(values)  # None is written empty: NULL in COPY's csv format
        buffer.seek(0)
        cursor.copy_expert(f'COPY "{table.name}" ({quoted}) FROM STDIN WITH (FORMAT csv)', buffer)
    else:
        cursor.executemany(f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join("?" * len(columns))})', values)


def fill(url: str, n: int) -> dict[str, Any]:
    """``n`` files seen with their predictions in ``1 + (n - BIG_DROP) / ROWS_PER_DROP`` drops."""
    db.upgrade_database(url)
    now = db.utcnow()
    drops = []
    with db.open_engine(url) as engine:
        batch_seen, batch_pred, batch_reviews = [], [], []
        for i in range(n):
            drop_index = 0 if i < min(BIG_DROP, n) else 1 + (i - BIG_DROP) // ROWS_PER_DROP
            drop = f"2025-{drop_index:05d}"
            if not drops or drops[-1] != drop:
                drops.append(drop)
            sha = hashlib.sha256(f"cell-{i}".encode()).hexdigest()
            path = f"{drop}/cell-{i:08d}.jpg"
            batch_seen.append(
                {
                    "path": path,
                    "drop": drop,
                    "sha256": sha,
                    "size": 1000,
                    "mtime": 1.0,
                    "seen_at": now,
                    "dag_run_id": "n",
                }
            )
            batch_pred.append(make_prediction(sha, best=i % 9, confidence=0.5 + (i % 50) / 100, review=i % 5 == 0))
            if i % CELLS_PER_REVIEW == 0:
                batch_reviews.append(
                    {
                        "sha256": sha,
                        "drop": drop,
                        "path": path,
                        "reviewer": "tech",
                        "reviewed_at": now,
                        "model_name": "wbc-classifier",
                        "model_version": "1",
                        "predicted_class": "neutrophils",
                        "label": "neutrophils",
                        "note": None,
                    }
                )
            if len(batch_seen) == 20_000 or i == n - 1:
                with engine.begin() as connection:
                    _copy(connection, db.files_seen, batch_seen)
                    _copy(connection, db.predictions, batch_pred)
                    if batch_reviews:
                        connection.execute(db.reviews.insert(), batch_reviews)
                batch_seen, batch_pred, batch_reviews = [], [], []
        if engine.dialect.name == "postgresql":
            # Fresh statistics, as autovacuum gives a table that grew over a year (a bulk load
            # leaves the planner guessing, and it scans whole tables).
            with engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return {"drops": len(drops), "big_drop": drops[0]}


def pages(url: str, n: int, folder: Path, baseline_tree: Path | None = None) -> dict[str, Any]:
    from wbc_tasks.serving.drop_summaries import count_drop, count_drops, drop_names, list_drops, recount_all
    from wbc_tasks.serving.report import differential_report
    from wbc_tasks.serving.review_decisions import record_review
    from wbc_tasks.serving.review_queue import review_queue

    settings = base_settings(folder).with_overrides(predictions_db_url=url)
    started = time.perf_counter()
    filled = fill(url, n)
    result: dict[str, Any] = {"rows": n, **filled, "fill_seconds": round(time.perf_counter() - started, 1)}
    with db.open_engine(url) as engine:
        started = time.perf_counter()
        with engine.begin() as connection:  # what migration 0006 does to a database this size
            recount_all(connection)
        result["recount_all_s"] = round(time.perf_counter() - started, 2)
        page = drop_names(settings, limit=50)

        def counted_from_rows() -> None:  # a page of 50 drops counted from their rows (before 0006)
            with engine.connect() as connection:
                [count_drop(connection, d) for d in page]

        result["drops_page_from_rows_s"] = timed(counted_from_rows, repeat=3)
    result["drops_page_s"] = timed(lambda: (count_drops(settings), list_drops(settings, limit=50)))
    result["every_drop_s"] = timed(lambda: list_drops(settings))
    big = filled["big_drop"]
    for round_ in (1, 2):  # the earlier code and this one in turns, on the same database
        if baseline_tree is not None:
            for key, seconds in queue_and_report_by(baseline_tree, url, big, folder).items():
                result[f"{key}_baseline_round{round_}"] = seconds
        result[f"queue_5000_cells_s_round{round_}"] = timed(lambda: review_queue(settings, big))
        result[f"report_5000_cells_s_round{round_}"] = timed(lambda: differential_report(settings, big))
    result["queue_5000_cells_s"] = result.pop("queue_5000_cells_s_round2")
    result["report_5000_cells_s"] = result.pop("report_5000_cells_s_round2")
    # A review recounts its drop (5,000 cells here) in its own transaction.
    result["review_in_5000_cell_drop_s"] = timed(
        lambda: record_review(settings, f"{big}/cell-{1:08d}.jpg", "neutrophils", reviewer="tech")
    )
    result.update(pages_while_a_night_commits(settings))
    result.update(export_through_the_cli(url, folder, baseline_tree))
    return result


_TIMED_BY_ANOTHER_TREE = """
import json, statistics, sys, time
from pathlib import Path
from tests.serving.conftest import base_settings
from wbc_tasks.serving.report import differential_report
from wbc_tasks.serving.review_queue import review_queue
url, drop, folder = sys.argv[1:4]
settings = base_settings(Path(folder)).with_overrides(predictions_db_url=url)
def timed(fn):
    fn()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
print(json.dumps({"queue_5000_cells_s": timed(lambda: review_queue(settings, drop)),
                  "report_5000_cells_s": timed(lambda: differential_report(settings, drop))}))
"""


def queue_and_report_by(tree: Path, url: str, drop: str, folder: Path) -> dict[str, float]:
    """The queue and report of ``drop`` timed as :func:`timed` does by the code in ``tree`` (an
    earlier checkout), in a child process importing from it, on the same database."""
    python = str(REPO / ".venv" / "bin" / "python")
    argv = [python, "-c", _TIMED_BY_ANOTHER_TREE, url, drop, str(folder / "baseline-home")]
    out = subprocess.run(argv, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pages_while_a_night_commits(settings: Any, seconds: float = 15.0) -> dict[str, Any]:
    """The drops page (count and first 50) read again and again, quiet and then while another
    thread commits chunks of 500 new cells into one drop as a night does: median and p95 ms."""
    import threading

    from wbc_tasks.serving.commit import write_rows
    from wbc_tasks.serving.drop_summaries import count_drops, list_drops

    def page_times(until: float) -> list[float]:
        times = []
        while time.perf_counter() < until:
            started = time.perf_counter()
            count_drops(settings)
            list_drops(settings, limit=50)
            times.append(time.perf_counter() - started)
        return times

    quiet = page_times(time.perf_counter() + seconds / 3)
    stop, commits = threading.Event(), []

    def night() -> None:
        now, n = db.utcnow(), 0
        with db.open_engine(settings.predictions_db_url) as engine:
            while not stop.is_set():
                shas = [hashlib.sha256(f"night-{n + i}".encode()).hexdigest() for i in range(500)]
                seen = [
                    {"path": f"2099-night/c-{n + i:08d}.jpg", "drop": "2099-night", "sha256": sha, "size": 1,
                     "mtime": 1.0, "seen_at": now, "dag_run_id": "night"}
                    for i, sha in enumerate(shas)
                ]  # fmt: skip
                started = time.perf_counter()
                with engine.begin() as connection:
                    write_rows(connection, predictions=[make_prediction(sha) for sha in shas], seen=seen)
                commits.append(time.perf_counter() - started)
                n += 500

    writer = threading.Thread(target=night)
    writer.start()
    try:
        busy = page_times(time.perf_counter() + seconds)
    finally:
        stop.set()
        writer.join()

    def ms(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))] * 1e3, 1)

    return {
        "drops_page_quiet_ms": {"median": ms(quiet, 0.5), "p95": ms(quiet, 0.95)},
        "drops_page_while_committing_ms": {"median": ms(busy, 0.5), "p95": ms(busy, 0.95), "max": ms(busy, 1.0)},
        "night_commits_of_500": {"count": len(commits), "median_ms": ms(commits, 0.5)},
    }


def export_through_the_cli(url: str, folder: Path, baseline_tree: Path | None = None) -> dict[str, Any]:
    """``wbc predictions`` (every row, CSV) as a user runs it: rows/s and its peak RSS; with
    ``baseline_tree`` (a checkout of earlier code) the same command from that code first, on the
    same database, so the two are timed side by side."""
    from bench_lab_api import PeakRss

    def run(prefix: str, argv: list[str], cwd: Path) -> dict[str, Any]:
        out = folder / "export.csv"
        env = {**os.environ, "WBC_HOME": str(folder / "cli-home"), "WBC_PREDICTIONS_DB_URL": url}
        # As `make` runs it (Makefile): without cached bytecode every start compiles ~600 modules (2.4 s).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        started = time.perf_counter()
        child = subprocess.Popen([*argv, "predictions", "--format", "csv", "--out", str(out)], env=env, cwd=cwd)
        with PeakRss(child.pid) as memory:
            child.wait()
        seconds = time.perf_counter() - started
        with open(out, "rb") as handle:
            rows = sum(1 for _ in handle) - 1
        out.unlink()
        return {
            f"{prefix}_rows": rows,
            f"{prefix}_rows_per_s": round(rows / seconds),
            f"{prefix}_peak_rss_mb": round(memory.peak / 2**20),
        }

    result: dict[str, Any] = {}
    if baseline_tree is not None:  # `python -m` imports from its working folder first
        python = [str(REPO / ".venv" / "bin" / "python"), "-m", "wbc_tasks.cli"]
        result.update(run("export_cli_baseline", python, baseline_tree))
    result.update(run("export_cli", [str(REPO / ".venv" / "bin" / "python"), "-m", "wbc_tasks.cli"], REPO))
    return result


def no_op_night(folder: Path, n_files: int) -> dict[str, Any]:
    """A classify folder of ``n_files`` hard links, recorded as done; the planning step timed
    with every drop read and with the finished drops skipped."""
    from wbc_tasks.serving.drop_scans import record_finished
    from wbc_tasks.serving.plan import find_new_images

    settings = base_settings(folder).with_overrides(settle_minutes=0.0)
    sources = sorted(p for c in sorted(SOURCE.iterdir()) for p in sorted(c.iterdir()))[:300]
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}
    seen, predicted = [], {}
    now = db.utcnow()
    for i in range(n_files):
        source = sources[i % len(sources)]
        drop = f"2025-{i // FILES_PER_DROP:05d}"
        target = settings.classify_dir / drop / f"cell-{i:08d}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
        stat = target.stat()
        rel = target.relative_to(settings.classify_dir).as_posix()
        seen.append({"path": rel, "drop": drop, "sha256": digests[source], "size": stat.st_size,
                     "mtime": stat.st_mtime, "seen_at": now, "dag_run_id": "n"})  # fmt: skip
        predicted[digests[source]] = make_prediction(digests[source])
    db.upgrade_database(settings.predictions_db_url)
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        _copy(connection, db.files_seen, seen)
        _copy(connection, db.predictions, list(predicted.values()))

    def plan(full_scan: bool) -> dict[str, Any]:
        return find_new_images(settings, run_id=f"night-{time.time_ns()}", model=MODEL, full_scan=full_scan)

    started = time.perf_counter()
    first = plan(True)
    first_s = time.perf_counter() - started
    assert first["files_new"] == 0 and first["files_already_done"] == n_files, first
    record_finished(settings, "night", first)
    skipped = plan(False)
    assert skipped["drops_skipped_unchanged"] == first["drops_scanned"], skipped
    result = {
        "files": n_files,
        "drops": first["drops_scanned"],
        # Over 200,000 files a full read takes minutes: the first one (the first night after the
        # upgrade) is the figure.
        "every_drop_read_s": round(first_s, 2) if n_files > 200_000 else timed(lambda: plan(True), repeat=3),
        "finished_drops_skipped_s": timed(lambda: plan(False), repeat=3),
    }
    # A busy night: 20,000 new files, half in 100 new drops, half added to 100 old drops.
    old_drops = sorted({row["drop"] for row in seen})[:: max(1, len({row["drop"] for row in seen}) // 100)][:100]
    touched = set()
    for i in range(NEW_FILES):
        source = sources[i % len(sources)]
        drop = f"2026-{i // FILES_PER_DROP:05d}" if i < NEW_FILES // 2 else old_drops[i % len(old_drops)]
        touched.add(drop)
        target = settings.classify_dir / drop / f"new-{i:08d}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copies, not links: a new link changes the change time of the inode that every earlier
        # link of that image shares, so every drop's fingerprint would change (all re-read).
        shutil.copyfile(source, target)
    started = time.perf_counter()
    busy = plan(False)
    result["plan_20000_new_files_s"] = round(time.perf_counter() - started, 2)
    # Copies of a few hundred images: their content is known, so they are linked to the existing
    # predictions rather than classified; they are listed, hashed and looked up all the same.
    assert busy["files_found"] - busy["files_already_done"] == NEW_FILES, busy
    assert busy["drops_scanned"] == len(touched), (busy, len(touched))  # the rest skipped
    result["plan_20000_new_files_drops_read"] = busy["drops_scanned"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000], help="none: the files alone")
    parser.add_argument("--postgresql", action="store_true", help="also the local PostgreSQL")
    parser.add_argument("--only-postgresql", action="store_true", help="the local PostgreSQL alone")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--export-only", action="store_true", help="fill, then time the CLI export alone")
    parser.add_argument(
        "--baseline-tree", type=Path, help="a checkout of earlier code: its export, queue and report timed beside"
    )
    args = parser.parse_args(argv)
    import resource

    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    kinds = ["postgresql"] if args.only_postgresql else ["sqlite"] + (["postgresql"] if args.postgresql else [])
    for kind in kinds:
        for n in args.rows:
            with tempfile.TemporaryDirectory() as tmp, throwaway_database(kind, Path(tmp)) as url:
                if args.export_only:
                    measured = {"rows": n, **fill(url, n), **export_through_the_cli(url, Path(tmp), args.baseline_tree)}
                else:
                    measured = pages(url, n, Path(tmp), args.baseline_tree)
                results.setdefault(kind, []).append(measured)
                print(json.dumps({kind: results[kind][-1]}), flush=True)
    if args.files:
        with tempfile.TemporaryDirectory() as tmp:
            results["no_op_night"] = no_op_night(Path(tmp), args.files)
            shutil.rmtree(Path(tmp) / "classify", ignore_errors=True)
        print(json.dumps({"no_op_night": results["no_op_night"]}), flush=True)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
