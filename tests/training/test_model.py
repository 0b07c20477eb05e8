"""The VGG16 model: pixels in, probabilities out, preprocessing inside, weights from local files."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest

from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.training.model import (
    BASE_LAYER,
    PREPROCESS_LAYER,
    VGG16_WEIGHTS_FILE,
    VGG16_WEIGHTS_URL,
    MissingWeightsError,
    build_model,
    conv_layers,
    float32_copy,
    set_trainable,
)

SIZE = 32


@pytest.fixture
def no_cache_settings(settings, tmp_path):
    """Settings whose Keras cache is an empty tmp folder (the real ~/.keras is never consulted)."""
    return settings.with_overrides(keras_home=tmp_path / "keras-home", vgg16_weights_path=None)


@pytest.fixture(scope="module")
def model():
    from wbc_tasks.core.settings import get_settings

    keras.utils.set_random_seed(0)
    return build_model(SIZE, len(CLASS_NAMES), weights="none", settings=get_settings())


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def test_takes_raw_pixels_and_returns_probabilities(model):
    images = _pixels(3)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, len(CLASS_NAMES))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities >= 0).all()
    # uint8 and the same values as float give the same answer: the model casts, nothing else
    np.testing.assert_allclose(model.predict(images.astype(np.float32), verbose=0), probabilities, rtol=1e-5)


def test_vgg16_preprocess_input_is_inside_the_model(model):
    from keras.applications.vgg16 import preprocess_input

    images = _pixels(2, seed=1)
    preprocess = keras.Model(model.input, model.get_layer(PREPROCESS_LAYER).output)
    np.testing.assert_allclose(
        preprocess.predict(images, verbose=0), preprocess_input(images.astype(np.float32)), atol=1e-4
    )
    # and the rest of the network sees exactly that: base+head on preprocess_input(x) == model(x)
    rest = keras.Sequential(
        [model.get_layer(BASE_LAYER)]
        + [model.get_layer(n) for n in ("head_pool", "head_dense", "head_dropout", "head_logits", "probabilities")]
    )
    np.testing.assert_allclose(
        rest.predict(preprocess_input(images.astype(np.float32)), verbose=0),
        model.predict(images, verbose=0),
        rtol=1e-4,
        atol=1e-6,
    )


def test_saved_model_loads_without_this_package(model, tmp_path):
    """Stock layers only: a plain keras.models.load_model (safe mode) restores the same model."""
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    images = _pixels(2, seed=2)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5)
    assert not loaded.get_layer(PREPROCESS_LAYER).trainable


def _trainable_layer_names(m) -> set[str]:
    names = set()
    for layer in m.get_layer(BASE_LAYER).layers + m.layers:
        if layer.trainable_weights and layer.name != BASE_LAYER:
            names.add(layer.name)
    return names


def test_set_trainable_phases(model):
    convs = [layer.name for layer in conv_layers(model)]
    assert len(convs) == 13
    head = {"head_dense", "head_logits"}

    set_trainable(model, "head", 4)
    assert _trainable_layer_names(model) == head

    set_trainable(model, "finetune", 4)
    assert _trainable_layer_names(model) == head | set(convs[-4:])
    assert convs[-4:] == ["block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"]

    count = set_trainable(model, "scratch", 0)
    assert _trainable_layer_names(model) == head | set(convs)
    assert PREPROCESS_LAYER not in _trainable_layer_names(model)
    assert count == sum(int(np.prod(w.shape)) for w in model.trainable_weights)

    with pytest.raises(ValueError, match="unfreeze_layers"):
        set_trainable(model, "finetune", 14)
    with pytest.raises(ValueError, match="phase"):
        set_trainable(model, "everything", 0)


def test_imagenet_weights_come_from_the_configured_file(no_cache_settings, tmp_path):
    keras.utils.set_random_seed(3)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights_file = tmp_path / "vgg16-notop.weights.h5"
    source.save_weights(weights_file)
    settings = no_cache_settings.with_overrides(vgg16_weights_path=weights_file)

    model = build_model(SIZE, len(CLASS_NAMES), weights="imagenet", settings=settings)

    loaded = model.get_layer(BASE_LAYER).get_weights()
    expected = source.get_weights()
    assert len(loaded) == len(expected) == 26
    for got, want in zip(loaded, expected):
        np.testing.assert_array_equal(got, want)


def test_imagenet_weights_come_from_the_keras_cache(no_cache_settings):
    """The real file is a legacy-format .h5 under <KERAS_HOME>/models/: write one like it."""
    from keras.src.legacy.saving import legacy_h5_format  # the format Keras published it in

    keras.utils.set_random_seed(4)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    cache_file = no_cache_settings.keras_home / "models" / VGG16_WEIGHTS_FILE
    cache_file.parent.mkdir(parents=True)
    with h5py.File(cache_file, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)

    model = build_model(48, 3, weights="imagenet", settings=no_cache_settings)

    for got, want in zip(model.get_layer(BASE_LAYER).get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_missing_weights_fail_with_directions(no_cache_settings):
    with pytest.raises(MissingWeightsError) as caught:
        build_model(SIZE, len(CLASS_NAMES), weights="imagenet", settings=no_cache_settings)
    message = str(caught.value)
    assert VGG16_WEIGHTS_FILE in message
    assert str(no_cache_settings.keras_home / "models" / VGG16_WEIGHTS_FILE) in message
    assert "WBC_VGG16_WEIGHTS" in message
    assert VGG16_WEIGHTS_URL in message
    assert "weights=none" in message


def test_configured_weights_path_that_does_not_exist_is_named(no_cache_settings, tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.h5"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        build_model(SIZE, 9, weights="imagenet", settings=no_cache_settings.with_overrides(vgg16_weights_path=missing))


def test_corrupt_weights_file_is_named(no_cache_settings, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="broken.h5"):
        build_model(SIZE, 9, weights="imagenet", settings=no_cache_settings.with_overrides(vgg16_weights_path=broken))


def test_mixed_precision_model_copies_to_float32(settings):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(5)
        mixed = build_model(SIZE, 4, weights="none", settings=settings, dense_units=16)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert mixed.get_layer("head_dense").compute_dtype == "float16"
    assert mixed.get_layer("probabilities").compute_dtype == "float32"

    copy = float32_copy(mixed, settings=settings)

    assert {layer.compute_dtype for layer in copy.get_layer(BASE_LAYER).layers} == {"float32"}
    assert copy.get_layer("head_dense").units == 16
    images = _pixels(2, seed=6)
    np.testing.assert_allclose(copy.predict(images, verbose=0), mixed.predict(images, verbose=0), atol=2e-2)


def test_keras_home_environment_variable_moves_the_cache(settings, tmp_path, monkeypatch):
    from wbc_tasks.core.settings import get_settings

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "elsewhere" / "models" / VGG16_WEIGHTS_FILE)):
        build_model(SIZE, 9, weights="imagenet", settings=get_settings())
