"""VGG16 + a small classification head, with VGG16's input normalisation inside the model.

The model takes plain RGB pixels (uint8 or float, 0..255): the registered model and the image
loader agree on "pixels in, probabilities out", so training and serving cannot disagree about
normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.settings import Settings
from wbc_tasks.training.params import ParamError, Weights, choices

log = logging.getLogger(__name__)

#: Name Keras gives the no-top ImageNet weights of VGG16 in its cache (``<keras home>/models/``).
VGG16_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
#: Where Keras publishes that file (fetch it on a machine with internet access).
VGG16_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + VGG16_WEIGHTS_FILE
#: Layer names the training schedule relies on.
BASE_LAYER = "vgg16"
PREPROCESS_LAYER = "vgg16_preprocess_input"
HEAD_LAYERS = ("head_pool", "head_dense", "head_dropout", "head_logits", "probabilities")

WEIGHT_CHOICES = choices(Weights)
PHASES = ("head", "finetune", "scratch")


class MissingWeightsError(PermanentError, FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine (nothing is downloaded)."""


def vgg16_weights_file(settings: Settings) -> Path:
    """The local VGG16 no-top ImageNet weights file, or :class:`MissingWeightsError`.

    ``settings.vgg16_weights_path`` (``WBC_VGG16_WEIGHTS``) wins when set; otherwise the Keras
    cache ``<KERAS_HOME>/models/`` is searched. Never downloads: training machines may have no
    internet, and a silent 58 MB download inside a task is no way to learn that.
    """
    cache_file = settings.keras_home / "models" / VGG16_WEIGHTS_FILE
    configured = settings.vgg16_weights_path
    if configured is not None:
        if configured.is_file():
            return configured
        problem = f"WBC_VGG16_WEIGHTS points to {configured}, which does not exist."
    elif cache_file.is_file():
        return cache_file
    else:
        problem = f"{VGG16_WEIGHTS_FILE} is not in the Keras cache and WBC_VGG16_WEIGHTS is not set."
    raise MissingWeightsError(
        f"VGG16 ImageNet weights not found: {problem} "
        f"Put the file {VGG16_WEIGHTS_FILE} either in the Keras cache at {cache_file} "
        f"(the cache folder follows KERAS_HOME) or anywhere and set WBC_VGG16_WEIGHTS to its path. "
        f"This machine does not download it: fetch {VGG16_WEIGHTS_URL} on a machine with internet "
        f"access and copy it over. Alternatively train from scratch with the param weights=none."
    )


def _preprocess_layer(image_size: int):
    """A frozen 1x1 convolution computing ``keras.applications.vgg16.preprocess_input`` exactly.

    VGG16's ``preprocess_input`` ("caffe" mode) is a fixed per-pixel affine map: RGB -> BGR, then
    minus the ImageNet channel means. Its kernel and bias are read off the function itself (its
    output for a black pixel and for the three unit colours), so no constant is copied here. A
    ``Lambda`` layer wrapping the function cannot be loaded back from a ``.keras`` file (Keras'
    safe mode refuses it), and a custom layer class would force every loader of the registered
    model (MLflow, the nightly job, other tools) to import this package first; stock layers
    load anywhere.
    """
    import keras
    from keras.applications.vgg16 import preprocess_input

    bias = np.asarray(preprocess_input(np.zeros((1, 1, 1, 3), dtype=np.float32)))[0, 0, 0]
    unit = np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3)
    kernel = np.asarray(preprocess_input(unit)).reshape(3, 3) - bias  # row: input channel
    layer = keras.layers.Conv2D(3, 1, name=PREPROCESS_LAYER, trainable=False, dtype="float32")
    layer.build((None, image_size, image_size, 3))
    layer.set_weights([kernel.reshape(1, 1, 3, 3), bias.astype(np.float32)])
    return layer


def _he_initialise(base) -> None:
    """Re-draw the conv kernels of a randomly initialised VGG16 from He-normal.

    Keras draws them from Glorot-uniform, under which a stack of 13 ReLU convolutions without
    BatchNorm shrinks its signal layer by layer and barely starts learning from scratch (He et
    al. 2015 show this for VGG-style nets). Measured on the demo data (32 px, 30 images per
    class, Adam 1e-4, batch 16), test balanced accuracy after 3 / 5 epochs: He-normal 0.78 /
    0.94, Glorot-uniform 0.43 / 0.67. (Also dividing the first kernel by the pixel spread, so
    the first logits are not in the tens, learned slower: 0.51 / 0.82; at Adam 3e-4 it stalled.)
    """
    import keras

    initializer = keras.initializers.HeNormal()
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(initializer(layer.kernel.shape, dtype=layer.kernel.dtype))


def build_model(
    image_size: int,
    n_classes: int,
    *,
    weights: str,
    settings: Settings,
    dropout: float = 0.5,
    dense_units: int = 256,
):
    """VGG16 without its top, VGG16's preprocessing in front and a softmax head on top.

    Input: ``(image_size, image_size, 3)`` RGB pixels 0..255 (uint8 input is cast). Output:
    ``n_classes`` probabilities, computed in float32 even under mixed precision. ``weights`` is
    ``"imagenet"`` (from a local file, see :func:`vgg16_weights_file`) or ``"none"`` (random
    initialisation, He-normal for the conv kernels). The returned model is not compiled; all of
    it is trainable except the preprocessing (use :func:`set_trainable`).
    """
    import keras

    weights = Weights.NONE.value if weights is None else str(weights).lower()
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    source = vgg16_weights_file(settings) if weights == Weights.IMAGENET else None
    try:
        base = keras.applications.VGG16(
            include_top=False,
            weights=str(source) if source else None,
            input_shape=(image_size, image_size, 3),
        )
    except (OSError, ValueError, KeyError) as exc:
        if source is None:
            raise
        raise ValueError(
            f"cannot load VGG16 weights from {source}: {exc}. Expected the no-top ImageNet "
            f"weights file {VGG16_WEIGHTS_FILE} (from {VGG16_WEIGHTS_URL})."
        ) from exc
    if source is not None:
        log.info("VGG16 base initialised from %s", source)
    else:
        _he_initialise(base)

    pixels = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    x = _preprocess_layer(image_size)(pixels)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    x = keras.layers.Dense(n_classes, name="head_logits")(x)
    # Softmax in float32: under mixed_float16 a float16 softmax loses small probabilities.
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name="wbc_vgg16")


def conv_layers(model) -> list:
    """VGG16's 13 convolution layers, bottom to top."""
    import keras

    base = model.get_layer(BASE_LAYER)
    return [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]


def set_trainable(model, phase: str, unfreeze_layers: int = 0) -> int:
    """Freeze/unfreeze for a training phase; return the number of trainable weights (scalars).

    ``head``: VGG16 frozen, head trainable. ``finetune``: the top ``unfreeze_layers`` conv layers
    and the head trainable. ``scratch``: everything. The preprocessing layer is always frozen.
    The model must be (re)compiled afterwards for the change to take effect in training.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    convs = conv_layers(model)
    if not 0 <= unfreeze_layers <= len(convs):
        raise ValueError(f"unfreeze_layers must be 0..{len(convs)}, got {unfreeze_layers}")
    base = model.get_layer(BASE_LAYER)
    # Every flag is set explicitly: setting a nested model's flag does not reliably reach its
    # layers in Keras 3 (a layer left frozen by an earlier phase stayed frozen).
    base.trainable = phase != "head"
    unfrozen = {
        "head": set(),
        "finetune": set(convs[len(convs) - unfreeze_layers :]),
        "scratch": set(convs),
    }[phase]
    for layer in base.layers:
        layer.trainable = layer in unfrozen
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True
    model.get_layer(PREPROCESS_LAYER).trainable = False
    return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))


def float32_copy(model, *, settings: Settings):
    """The same network and weights with a float32 policy (for serving on CPUs).

    A model trained under ``mixed_float16`` keeps that policy when saved; CPU inference in
    float16 is slow, so the saved model is rebuilt in float32 (its variables were float32
    already, so nothing is lost).
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        image_size = int(model.input_shape[1])
        head = model.get_layer("head_dense")
        copy = build_model(
            image_size,
            int(model.output_shape[-1]),
            weights=Weights.NONE,
            settings=settings,
            dropout=float(model.get_layer("head_dropout").rate),
            dense_units=int(head.units),
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def start_from_weights(model: Any, weights: list[Any]) -> None:
    """Give the new ``model`` a registered version's weights (ParamError when its layers differ)."""
    expected = [tuple(w.shape) for w in model.get_weights()]
    given = [tuple(w.shape) for w in weights]
    if given != expected:
        raise ParamError(
            f"init_from: the registered version's layers differ from this run's model ({len(given)} weight "
            f"arrays, shapes {given[:3]}... where this run builds {len(expected)}, {expected[:3]}...)"
        )
    model.set_weights(weights)
    log.info("starting from the registered version's weights (%d arrays)", len(weights))
