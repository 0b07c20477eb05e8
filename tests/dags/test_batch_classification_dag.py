"""The nightly classification DAG: it parses cleanly with the documented configuration, keeps
heavy imports out of parsing, and a whole ``dag.test()`` run classifies a real drop."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import (
    REPO_ROOT,
    parse_dag,
    skip_unless_required,
)

DAG_ID = "wbc_batch_classification"
DROP = REPO_ROOT.parent / "shared" / "data" / "wbc-bench" / "classify-images" / "2026-11-24"


def test_dag_parses_with_schedule_limits_and_params(settings):
    dag = parse_dag(DAG_ID)
    assert dag.schedule == "0 2 * * *" and dag.timezone.name == "UTC"
    assert dag.catchup is False and dag.max_active_runs == 1
    params = dag.params.dump()
    assert params == {
        "drop": "",
        "model": settings.champion_alias,
        "threshold": settings.review_threshold,
        "chunk_size": settings.classify_chunk_size,
        "reclassify": False,
        "full_scan": False,
    }
    order = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert order == {
        "resolve_model": ["classify_chunk", "find_new_images", "summarise"],
        "find_new_images": ["chunk_files", "summarise"],
        "chunk_files": ["classify_chunk"],
        "classify_chunk": ["summarise"],
        "summarise": ["request_adaptation"],
        "request_adaptation": [],
    }
    from wbc_airflow.dag_helpers import REVIEWS_TO_LEARN

    request = dag.get_task("request_adaptation")
    assert request.outlets == [REVIEWS_TO_LEARN] and request.trigger_rule == "none_failed"
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(dag.get_task("classify_chunk"), MappedOperator)


def test_schedule_and_timezone_come_from_settings(settings, monkeypatch):
    monkeypatch.setenv("WBC_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("WBC_CLASSIFY_SCHEDULE", "30 3 * * 1-5")
    dag = parse_dag(DAG_ID)
    assert dag.timezone.name == "Europe/Berlin"
    assert dag.schedule == "30 3 * * 1-5"


def _night_settings(monkeypatch, tmp_path, classify_dir, **extra):
    """The settings of a night in ``tmp_path`` (set in the environment, as the DAG's tasks read them)."""
    from wbc_tasks.core.settings import get_settings

    for name, value in {
        "WBC_CLASSIFY_DIR": classify_dir,
        "WBC_SETTLE_MINUTES": 0,
        "WBC_WORK_DIR": tmp_path / "work",
        "WBC_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "WBC_MLFLOW_ARTIFACT_ROOT": tmp_path / "artifacts",
        "WBC_PREDICTIONS_DB_URL": f"sqlite:///{tmp_path / 'predictions.db'}",
        **extra,
    }.items():
        monkeypatch.setenv(name, str(value))
    return get_settings()


@pytest.mark.slow
def test_dag_test_classifies_a_real_drop_in_mapped_chunks(airflow_db, settings, monkeypatch, tmp_path):
    if not DROP.is_dir():
        skip_unless_required(f"real images absent: {DROP} not found (../shared/data is not checked out here)")
    from airflow.utils.state import DagRunState, TaskInstanceState

    from tests.serving.conftest import register_tiny_model
    from wbc_tasks.serving import predictions as db
    from wbc_tasks.serving.plan import run_work_dir

    classify_dir = tmp_path / "classify"
    shutil.copytree(DROP, classify_dir / DROP.name)
    settings = _night_settings(monkeypatch, tmp_path, classify_dir)
    ref = register_tiny_model(settings, seed=1, alias="champion")
    dag = parse_dag(DAG_ID)

    run = dag.test(run_conf={"chunk_size": 30, "threshold": 0.5})

    assert run.state == DagRunState.SUCCESS
    chunks = [ti for ti in run.get_task_instances() if ti.task_id == "classify_chunk"]
    assert sorted(ti.map_index for ti in chunks) == [0, 1, 2, 3]  # 100 images / 30 per chunk
    assert {ti.state for ti in chunks} == {TaskInstanceState.SUCCESS}
    with db.open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        rows = connection.execute(db.predictions.select()).mappings().all()
        seen = connection.execute(db.files_seen.select()).mappings().all()
    assert len(rows) == 100 and len(seen) == 100
    assert {r["model_version"] for r in rows} == {ref.version} and {r["dag_run_id"] for r in rows} == {run.run_id}
    assert all(r["needs_review"] == (r["confidence"] < 0.5) for r in rows)
    summary = json.loads((run_work_dir(settings, run.run_id) / "summary.json").read_text())
    assert summary["images_classified"] == 100 and summary["chunks"] == 4
    assert sum(summary["per_class"].values()) == 100

    # The next night finds nothing new: no chunk runs, the summary still does.
    second = dag.test()
    assert second.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert states["classify_chunk"] == TaskInstanceState.SKIPPED
    assert states["summarise"] == TaskInstanceState.SUCCESS
    assert states["request_adaptation"] == TaskInstanceState.SKIPPED  # the trigger is off by default
    with db.open_engine(settings.predictions_db_url) as engine, engine.connect() as connection:
        assert len(connection.execute(db.predictions.select()).all()) == 100


def test_nightly_runs_the_dags_task_functions_in_the_dags_order(settings, monkeypatch):
    """``wbc_tasks.serving.nightly.classify_new_images`` (what the tests and benches run) and the
    DAG call the same functions, in the same order, with the same arguments: the two cannot drift."""
    from wbc_airflow import dag_helpers
    from wbc_tasks.serving import nightly

    dag = parse_dag(DAG_ID)
    assert [t.task_id for t in dag.topological_sort()] == list(nightly.TASKS)

    calls: list[tuple[str, tuple]] = []
    returns = {
        "resolve_model": {"name": "m", "version": "3"},
        "find_new_images": {"chunks": ["chunk-0", "chunk-1"]},
        "chunk_files": ["chunk-0", "chunk-1"],
        "summarise": {"images_classified": 2},
        "request_adaptation": {"requested": False, "reason": "2 reviews since the last adaptation, 50 needed"},
    }
    for name in nightly.TASKS:

        def record(*args, name=name):
            calls.append((name, args))
            return returns[name] if name in returns else {"chunk": args[3]}

        monkeypatch.setattr(nightly, name, record)
    asked = {
        "model": "3",
        "drop": "2026-11-24",
        "threshold": 0.4,
        "chunk_size": 10,
        "reclassify": True,
        "full_scan": True,
    }
    params = nightly.night_params(settings, **asked)
    assert params == {**dag.params.dump(), **asked}, "the form's params, as a triggered run has them"

    nightly.classify_new_images(settings, run_id="manual__night", **asked)
    composed = list(calls)
    calls.clear()

    # The DAG's tasks, each called as Airflow calls it (upstream results passed in), in its order.
    monkeypatch.setattr(dag_helpers, "get_current_context", lambda: {"run_id": "manual__night", "params": params})
    task = {t.task_id: t.python_callable for t in dag.tasks}
    model = task["resolve_model"]()
    found = task["find_new_images"](model)
    chunks = [task["classify_chunk"](chunk, model) for chunk in task["chunk_files"](found)]
    task["summarise"](model, found, chunks)
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="50 needed"):  # no request: skipped, no asset event
        task["request_adaptation"]()

    assert [name for name, _ in calls] == [
        "resolve_model",
        "find_new_images",
        "chunk_files",
        "classify_chunk",
        "classify_chunk",
        "summarise",
        "request_adaptation",
    ]
    # Without Airflow nothing would start the adaptation run: the composed night does not ask.
    assert calls[:-1] == composed and calls[-1] == ("request_adaptation", (settings, "manual__night", params))


@pytest.mark.slow
def test_enough_reviews_update_the_asset_once_and_queue_one_adaptation_run(airflow_db, monkeypatch, tmp_path):
    """The night after ``WBC_ADAPT_AFTER_REVIEWS`` reviews, ``request_adaptation`` succeeds and Airflow
    records one event of ``wbc_reviews_to_learn`` (with the count) and queues ``wbc_adaptation``;
    the next night, with no new review, it is skipped and records none."""
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select, update

    from tests.serving.conftest import register_tiny_model
    from wbc_tasks.serving.review_decisions import record_review

    classify_dir = tmp_path / "classify"
    shutil.copytree(DROP, classify_dir / DROP.name, ignore=lambda _d, names: sorted(names)[6:])
    settings = _night_settings(monkeypatch, tmp_path, classify_dir, WBC_ADAPT_AFTER_REVIEWS=2)
    register_tiny_model(settings, seed=1, alias="champion")
    nightly = parse_dag(DAG_ID)  # dag.test() registers the dags folder's DAGs, wbc_adaptation with them

    def events() -> list[dict]:
        with create_session() as session:
            asset = session.scalar(select(AssetModel).where(AssetModel.name == "wbc_reviews_to_learn"))
            return [e.extra for e in session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id))]

    def queued() -> int:
        with create_session() as session:
            rows = session.scalars(select(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == "wbc_adaptation"))
            return len(list(rows))

    first = nightly.test()
    states = {ti.task_id: ti.state for ti in first.get_task_instances()}
    assert states["request_adaptation"] == TaskInstanceState.SKIPPED
    before = len(events())
    with create_session() as session:  # as an operator turns it on (DAGs are created paused)
        session.execute(update(DagModel).where(DagModel.dag_id == "wbc_adaptation").values(is_paused=False))
    cells = sorted(p.relative_to(classify_dir).as_posix() for p in classify_dir.rglob("*") if p.is_file())
    for path in cells[:2]:
        record_review(settings, path, "neutrophils", reviewer="tech")

    second = nightly.test()
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert states["request_adaptation"] == TaskInstanceState.SUCCESS
    assert len(events()) == before + 1 and events()[-1]["reviews"] == 2
    assert queued() == 1

    third = nightly.test()
    states = {ti.task_id: ti.state for ti in third.get_task_instances()}
    assert states["request_adaptation"] == TaskInstanceState.SKIPPED
    assert len(events()) == before + 1 and queued() == 1
