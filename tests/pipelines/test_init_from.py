"""Fine-tuning from a registered version (issue 30, the ``init_from`` param): ``champion`` is
resolved once, in the split step, to one version number that the run records and its checkpoints
are keyed by; a version whose image size, class names or layers differ is refused saying what
differs; and a tiny adaptation on generated images starts from exactly the registered weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.serving.conftest import V2_CLASSES, register_tiny_model
from tests.training_steps import TINY_PARAMS, run_training_steps
from wbc_tasks.pipelines.init_from import resolve_init_from
from wbc_tasks.training.params import ParamError, training_params


@pytest.fixture
def registry(settings):
    """Version 1 (the nine classes, 32 px) as champion; version 2 with a tenth class."""
    register_tiny_model(settings, seed=1, alias="champion")
    register_tiny_model(settings, class_names=V2_CLASSES, seed=2)
    return settings


def test_init_from_names_none_the_champion_or_a_version_and_nothing_else():
    assert training_params({}).init_from == "none"
    for value in ("none", "champion", "1", "12"):
        assert training_params({"init_from": value}).init_from == value
    for bad in ("latest", "0", "-1", "v2", "champion2", ""):
        with pytest.raises(ParamError, match="init_from"):
            training_params({"init_from": bad})


def test_champion_resolves_to_its_version_and_mismatches_say_what_differs(registry):
    settings = registry
    assert resolve_init_from(settings, training_params({"image_size": 32})) is None
    assert resolve_init_from(settings, training_params({"image_size": 32, "init_from": "champion"})) == 1
    assert resolve_init_from(settings, training_params({"image_size": 32, "init_from": "1"})) == 1
    with pytest.raises(ParamError, match="image size 32 px where this run's is 48 px"):
        resolve_init_from(settings, training_params({"image_size": 48, "init_from": "champion"}))
    with pytest.raises(ParamError, match="class names .*smudge.* where this run's are"):
        resolve_init_from(settings, training_params({"image_size": 32, "init_from": "2"}))
    with pytest.raises(ParamError, match="init_from=7: no model"):
        resolve_init_from(settings, training_params({"image_size": 32, "init_from": "7"}))


def test_a_version_with_other_layers_is_refused_before_training(registry):
    """The tiny registered model has the right size and classes but not VGG16's layers."""
    from wbc_tasks.core.vocabulary import CLASS_NAMES
    from wbc_tasks.pipelines.init_from import initial_weights
    from wbc_tasks.training.model import build_model, start_from_weights

    model = build_model(32, len(CLASS_NAMES), weights="none", settings=registry)
    with pytest.raises(ParamError, match="layers differ from this run's model"):
        start_from_weights(model, initial_weights(registry, 1))


TINY = TINY_PARAMS


@pytest.mark.slow
def test_an_adaptation_run_starts_from_the_champions_registered_weights(tmp_path, monkeypatch):
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.data.demo import generate_demo_dataset
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.versions import load_keras_model, resolve_model

    for name in [n for n in os.environ if n.startswith("WBC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORKERS", "1")
    data = tmp_path / "home" / "WBC"
    generate_demo_dataset(data, per_class=8, size=40, seed=2)
    first = run_training_steps("manual__first", {**TINY, "data_dir": str(data)})
    assert first["promote_step"]["promote"], first["promote_step"]

    # The champion's weights, the adaptation run's starting point; a learning rate too small to
    # move them, so what the train step saved shows what it started from.
    settings = get_settings()
    champion = load_keras_model(settings, resolve_model(settings, "champion"))
    params = {**TINY, "data_dir": str(data), "init_from": "champion", "learning_rate_finetune": 1e-12}
    steps = run_training_steps("manual__adapt", params, last="train_step")
    run = settings.run_dir("manual__adapt")
    split = json.loads((run / "split" / "_COMPLETE.json").read_text())
    assert split["init_from_version"] == 1
    state = json.loads((run / "train_checkpoints" / "state.json").read_text())
    assert state["fingerprint"]["init_from_version"] == 1
    trained = keras.models.load_model(steps["train_step"]["model_path"])
    for started, registered in zip(trained.get_weights(), champion.get_weights(), strict=True):
        np.testing.assert_allclose(started, registered, atol=1e-5)
    tracked = configure_mlflow(settings).search_runs(
        [configure_mlflow(settings).get_experiment_by_name(settings.mlflow_experiment).experiment_id],
        filter_string="tags.airflow_run_id = 'manual__adapt'",
    )
    assert tracked and tracked[0].data.params["init_from_version"] == "1"
