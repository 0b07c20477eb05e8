"""The whole training DAG under ``dag.test()``, then the promotion outcomes against a registry.

Each test has its own home (registry, work folders) and builds the history it needs: an untrained
first model becomes the first champion (nothing to beat); a model rejected by a floor; a trained
model that wins (the old champion moves to the rollback alias); an untrained one that loses.
Only the generated images are shared (read-only). The runs after the first call the same step
functions the DAG's tasks call: the DAG adds nothing to promotion's behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os

import mlflow
import pytest

from tests.training_steps import run_training_steps

pytestmark = pytest.mark.slow

BASE = {
    "image_size": 32,
    "weights": "none",
    "epochs_head": 0,
    "epochs_finetune": 0,
    "batch_size": 16,
    "learning_rate_finetune": 1e-4,
    "augment_per_class": 0,
    "smote": False,
    "min_metric": 0.0,
    "min_class_recall": 0.0,
    "min_blast_recall": 0.0,
    "seed": 7,
}


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """Generated demo images (distinct enough to learn fast), shared read-only by the tests."""
    from wbc_tasks.data.demo import generate_demo_dataset

    data = tmp_path_factory.mktemp("e2e-data") / "WBC"
    generate_demo_dataset(data, per_class=40, seed=3)
    # A SOURCES.csv beside the class folders, as ../shared/data has: the model card credits it.
    rows = [
        f"{path.relative_to(data)},{path.parent.name},{hashlib.sha256(path.read_bytes()).hexdigest()},"
        f"{'demo-lab-a' if int(path.stem) % 2 else 'demo-lab-b'}"
        for path in sorted(data.rglob("*.png"))
    ]
    (data.parent / "SOURCES.csv").write_text("file,class,sha256,source\n" + "\n".join(rows) + "\n")
    return data


@pytest.fixture
def env(demo_images, tmp_path, monkeypatch):
    """Settings for this test's own home; runs may read the shared demo images."""
    for name in [n for n in os.environ if n.startswith("WBC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORKERS", "1")
    monkeypatch.setenv("WBC_ALLOWED_ROOTS", f"{demo_images.parent}{os.pathsep}{tmp_path}")
    from wbc_tasks.core.settings import get_settings

    return get_settings()


@pytest.fixture
def base(demo_images):
    """Params of an untrained, fast run on the demo images, every floor off."""
    return {**BASE, "data_dir": str(demo_images)}


@pytest.fixture
def demo_params(demo_images):
    """The profile `make demo` uses, on the demo images, floors off (this is about the comparison:
    63 test images make per-class recall of one run too noisy to gate on)."""
    from wbc_tasks.training.profiles import PROFILES

    floors_off = {"min_metric": 0.0, "min_class_recall": 0.0, "min_blast_recall": 0.0}
    return {**PROFILES["demo"], **floors_off, "data_dir": str(demo_images), "seed": 7}


def run_steps(run_id: str, params: dict) -> dict:
    """The training DAG's step functions in task order, as its tasks call them."""
    return run_training_steps(run_id, params)


def client_for(settings):
    from wbc_tasks.registry.client import configure_mlflow

    return configure_mlflow(settings)


def test_dag_run_registers_and_crowns_the_first_model(env, base, airflow_db):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from tests.conftest import REPO_ROOT

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "wbc_training.py")).dags["wbc_training"]
    run = dag.test(run_conf=base)
    assert run.state == DagRunState.SUCCESS
    tasks = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert tasks["export_engine"] == "success", tasks  # the engine's export is a task of its own

    client = client_for(env)
    champion = client.get_model_version_by_alias(env.model_name, env.champion_alias)
    assert str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "promoted"
    assert json.loads(champion.tags["class_names"])[2] == "blasts" and champion.tags["image_size"] == "32"
    mlflow_run = client.get_run(champion.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["airflow_run_id"] == run.run_id
    assert "test_balanced_accuracy" in mlflow_run.data.metrics
    assert mlflow_run.data.params["image_size"] == "32"
    assert mlflow_run.inputs.dataset_inputs, "the split manifest is the run's input dataset"
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json"} <= artifacts
    description = client.get_registered_model(env.model_name).description
    assert "not a diagnostic device" in description.lower() or "research use" in description.lower()
    card = client.get_model_version(env.model_name, "1").description
    assert "demo-lab-a (180 images)" in card and "demo-lab-b (180 images)" in card


def test_a_model_under_a_floor_is_rejected_and_the_champion_stays(env, base):
    assert run_steps("first-run", base)["promote_step"]["outcome"] == "promoted"
    results = run_steps("floor-run", {**base, "min_metric": 1.0})
    decision = results["promote_step"]
    assert decision["outcome"] == "rejected"
    client = client_for(env)
    assert client.get_model_version_by_alias(env.model_name, env.champion_alias).version == 1
    version = client.get_model_version(env.model_name, results["register_step"]["version"])
    assert version.tags["promotion.decision"] == "rejected" and "min_metric" in version.tags["promotion.reason"]


def test_a_trained_model_wins_and_the_old_champion_moves_to_rollback(env, base, demo_params):
    assert run_steps("first-run", base)["promote_step"]["outcome"] == "promoted"
    results = run_steps("win-run", demo_params)
    # The demo profile on the demo images: well above chance (1/9).
    assert results["evaluate_step"]["balanced_accuracy"] > 0.4, results["evaluate_step"]
    client = client_for(env)
    new = results["register_step"]["version"]
    assert client.get_model_version_by_alias(env.model_name, env.champion_alias).version == int(new)
    assert client.get_model_version_by_alias(env.model_name, env.rollback_alias).version == 1
    assert results["promote_step"]["outcome"] == "promoted"
    # The export step exported the CPU engine, checked it against Keras and logged it with the run;
    # registration tagged the version with it.
    version = client.get_model_version(env.model_name, new)
    engine = json.loads((env.run_dir("win-run") / "export" / "engine.json").read_text())
    assert engine["accepted"] and engine["check_images"] > 0, engine
    assert results["export_step"]["accepted"] and results["export_step"]["precision"] == engine["precision"]
    assert version.tags["engine"] == f"openvino {engine['precision']}" == results["register_step"]["engine"]
    logged = {a.path for a in client.list_artifacts(version.run_id, "engine")}
    assert {"engine/engine.json", "engine/model.xml", "engine/model.bin"} <= logged
    assert "engine_" + engine["precision"] + "_argmax_agreement" in client.get_run(version.run_id).data.metrics


def test_a_worse_model_loses_and_the_aliases_stay(env, base, demo_params):
    assert run_steps("trained-run", demo_params)["promote_step"]["outcome"] == "promoted"
    client = client_for(env)
    results = run_steps("lose-run", base)
    assert results["promote_step"]["outcome"] == "kept_champion"
    assert client.get_model_version_by_alias(env.model_name, env.champion_alias).version == 1
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        client.get_model_version_by_alias(env.model_name, env.rollback_alias)
