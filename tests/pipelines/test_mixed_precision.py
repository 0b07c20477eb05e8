"""The mixed-precision path on a CPU, end to end: a training forced into mixed_float16 or
mixed_bfloat16 is killed after a checkpointed epoch, resumes in its retry, and the steps after it
calibrate, evaluate, register (with the engine's check) and classify with a float32 model that
predicts like the model as trained."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.killed_worker import kill_train_step_after_an_epoch
from tests.training_steps import run_training_steps

pytestmark = pytest.mark.slow  # a killed training process and the whole training pipeline at 32 px


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_training_killed_resumes_and_registers_a_float32_model(precision, tmp_path, monkeypatch):
    import keras

    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.data.demo import generate_demo_dataset
    from wbc_tasks.data.store import open_store
    from wbc_tasks.pipelines import training as steps
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.versions import load_keras_model, resolve_model
    from wbc_tasks.serving.infer import predict_images
    from wbc_tasks.serving.model import load_model
    from wbc_tasks.training.checkpoints import CHECKPOINT_STATE_FILE

    for name in [n for n in os.environ if n.startswith("WBC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WBC_WORKERS", "1")
    data = tmp_path / "home" / "WBC"
    generate_demo_dataset(data, per_class=12, size=48, seed=5)
    run_id = f"manual__{precision}"
    params = {
        "data_dir": str(data),
        "image_size": 32,
        "weights": "none",
        "epochs_head": 0,
        "epochs_finetune": 4,
        "batch_size": 8,
        "learning_rate_finetune": 1e-4,
        "augment_per_class": 0,
        "smote": False,
        "early_stopping_patience": 0,
        "min_metric": 0.0,
        "min_class_recall": 0.0,
        "min_blast_recall": 0.0,
        "precision": precision,
        "seed": 3,
    }
    run_training_steps(run_id, params, last="balance_step")
    run = get_settings().run_dir(run_id)
    state_file = run / "train_checkpoints" / CHECKPOINT_STATE_FILE

    done_before = kill_train_step_after_an_epoch(run_id, params, state_file, tmp_path / "worker.log")
    assert 1 <= done_before < 4

    trained = steps.train_step(run_id, params)  # Airflow's retry of the task
    assert trained["resumed_from_epoch"] == done_before and trained["precision"] == precision
    state = json.loads(state_file.read_text())
    as_trained = keras.models.load_model(run / "train_checkpoints" / state["model_file"])
    assert as_trained.get_layer("vgg16").get_layer("block1_conv1").dtype_policy.name == precision

    run_training_steps(run_id, params, first="calibrate_step")
    settings = get_settings()
    ref = resolve_model(settings, settings.champion_alias)
    registered = load_keras_model(settings, ref)
    every_layer = [*registered.layers, *registered.get_layer("vgg16").layers]
    assert {layer.dtype_policy.name for layer in every_layer} == {"float32"}, "the registered model is float32"
    assert configure_mlflow(settings).get_model_version(ref.name, ref.version).tags["engine"]

    # Its predictions are the trained model's, calibrated: the same top class, and probabilities
    # from the mixed-precision model's logits at the version's temperature.
    from wbc_tasks.training.calibration import softmax
    from wbc_tasks.training.outputs import outputs_model, predict_all
    from wbc_tasks.training.trust_policy import load_trust

    images = np.concatenate(
        [np.asarray(open_store(run / "preprocess" / split).images) for split in ("train", "val", "test")]
    )
    policy, _ = load_trust(run / "calibrate" / "trust")
    mixed = predict_all(outputs_model(as_trained), images, 8)
    served = predict_all(outputs_model(registered), images, 8)
    # float16 keeps 11 significant bits, bfloat16 8: through 13 convolutions the logits of this
    # small net differ by up to ~0.1 (bfloat16, measured); calibrated probabilities by less.
    tolerance = 0.05 if "bfloat" in precision else 0.01
    np.testing.assert_allclose(served["probabilities"], softmax(mixed["logits"], policy.temperature), atol=tolerance)
    # The same top class wherever the trained model's top two are further apart than both can move
    # (on a CPU without native float16/bfloat16 an emulated near-tie may flip; the check above bounds it).
    top_two = np.sort(mixed["probabilities"], axis=1)[:, -2:]
    decided = top_two[:, 1] - top_two[:, 0] > 2 * tolerance
    same = mixed["probabilities"].argmax(1) == served["probabilities"].argmax(1)
    # Enough clear predictions that the comparison means something: a count, not a share (this
    # 4-epoch net's confidence depends on the CPU: on an Intel AMX host 46 of 108 images were clear,
    # 43 %, where an AMD host gave over half).
    assert decided.sum() >= 25, f"too few clear predictions to compare: {decided.sum()} of {len(decided)}"
    assert same[decided].mean() >= 0.99

    # Classified by the nightly code path, from the registry.
    model = load_model(settings, ref)
    files = sorted((data / "blasts").glob("*.png"))[:5]
    monkeypatch.setenv("WBC_ALLOWED_ROOTS", str(data))
    outcomes = list(predict_images(get_settings(), model, ref, [(p.name, p, None) for p in files]))
    assert [o.reason for o in outcomes] == [None] * len(files)
    assert all(len(o.probabilities) == 9 and abs(sum(o.probabilities) - 1) < 1e-4 for o in outcomes)
