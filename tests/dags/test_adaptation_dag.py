"""The adaptation DAG (issue 30): the training tasks, started by the ``wbc_reviews_to_learn`` asset,
one run at a time, its form's defaults the ``adapt`` profile; and a tiny adaptation end to end
under ``dag.test()``: a champion trained on generated cells, a new lab's drop of other generated
cells classified and reviewed through the product's review function, then the adaptation run from
the champion, decided on the lab's reviewed test images and the labelled ones."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import parse_dag
from tests.dags.test_training_dag import ORDER
from tests.training_steps import TINY_PARAMS, run_training_steps
from wbc_tasks.core.vocabulary import CLASS_NAMES, DagId
from wbc_tasks.registry.decision import TWO_GROUP_RULE
from wbc_tasks.training.params import TRAINING_PARAM_SPECS
from wbc_tasks.training.profiles import PROFILES

TINY = TINY_PARAMS


def test_the_asset_starts_it_one_run_at_a_time_with_the_training_tasks_and_the_adapt_profile():
    from wbc_airflow.dag_helpers import REVIEWS_TO_LEARN

    dag = parse_dag(DagId.ADAPTATION)
    training = parse_dag(DagId.TRAINING)
    assert dag.schedule == [REVIEWS_TO_LEARN]  # the asset alone starts it (or a person, by hand)
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert [t.task_id for t in dag.topological_sort()] == ORDER == [t.task_id for t in training.topological_sort()]
    assert {t.task_id: t.queue for t in dag.tasks} == {t.task_id: t.queue for t in training.tasks}
    defaults = dag.params.dump()
    assert set(defaults) == set(TRAINING_PARAM_SPECS)
    adapt = PROFILES["adapt"]
    assert defaults == {name: adapt.get(name, spec["default"]) for name, spec in TRAINING_PARAM_SPECS.items()}
    assert defaults["init_from"] == "champion" and defaults["include_reviewed"] is True
    assert defaults["epochs_finetune"] < PROFILES["cpu"]["epochs_finetune"]


@pytest.mark.slow
def test_a_tiny_adaptation_learns_a_new_labs_reviews_and_records_why_it_was_decided(airflow_db, tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState, TaskInstanceState

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.data.demo import generate_demo_dataset
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.serving.adaptation_requests import review_backlog
    from wbc_tasks.serving.lab_learning import learning_status
    from wbc_tasks.serving.nightly import classify_new_images
    from wbc_tasks.serving.review_decisions import record_review

    for name in [n for n in os.environ if n.startswith("WBC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORKERS", "1")
    monkeypatch.setenv("WBC_SETTLE_MINUTES", "0")
    monkeypatch.setenv("WBC_PROMOTION_MIN_REVIEWED_TEST", "2")
    settings = get_settings()
    labelled = tmp_path / "home" / "WBC"
    generate_demo_dataset(labelled, per_class=8, size=40, seed=2)
    champion = run_training_steps("manual__champion", {**TINY, "data_dir": str(labelled)})
    assert champion["promote_step"]["promote"], champion["promote_step"]

    # The new lab: other generated cells (another seed), dropped without their class in the name.
    other = tmp_path / "other-lab"
    generate_demo_dataset(other, per_class=3, size=40, seed=9)
    drop = settings.classify_dir / "lab-1"
    drop.mkdir(parents=True)
    truth = {}
    for i, image in enumerate(sorted(other.rglob("*.png"))):
        shutil.copy(image, drop / f"cell-{i:02d}.png")
        truth[f"lab-1/cell-{i:02d}.png"] = image.parent.name
    assert classify_new_images(settings)["images_classified"] == len(CLASS_NAMES) * 3
    for path, label in truth.items():
        record_review(settings, path, label, reviewer="tech")
    assert review_backlog(settings).reviews == len(truth)

    run = parse_dag(DagId.ADAPTATION).test(run_conf={**TINY, "data_dir": str(labelled)})

    assert run.state == DagRunState.SUCCESS
    assert {ti.task_id: ti.state for ti in run.get_task_instances()} == dict.fromkeys(ORDER, TaskInstanceState.SUCCESS)
    client = configure_mlflow(settings)
    version = client.get_model_version(settings.model_name, "2")
    params = client.get_run(version.run_id).data.params
    assert params["init_from_version"] == "1" and params["include_reviewed"] == "True"
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["reviewed_images_added"] == len(truth)
    # Decided on both groups, candidate and champion on the same images, promoted or not, and why.
    decision = {k.removeprefix("promotion."): v for k, v in version.tags.items() if k.startswith("promotion.")}
    groups = json.loads(decision["groups"])
    reviewed = groups["reviewed_test"]
    assert reviewed["images"] >= 2 and groups["labelled_test"]["images"] > 0
    assert decision["rule"] == TWO_GROUP_RULE
    assert ("better on the lab's reviewed images" in decision["reason"]) or ("not better" in decision["reason"])
    # Every review so far is learned: the night does not ask for these again.
    assert review_backlog(settings).reviews == 0
    # The lab's learning page: the version, what it learned and from which version, its decision.
    status = learning_status(settings)
    newest = status.versions[0]
    assert (newest["version"], newest["init_from_version"]) == ("2", "1")
    assert sum(newest["reviewed_images"].values()) == len(truth)
    assert newest["decision"]["outcome"] == decision["decision"] and newest["decision"]["groups"] == groups
    assert status.since_last_adaptation == 0
    assert [(r["kind"], r["reviews"]) for r in status.requests] == [("training", len(truth))]
