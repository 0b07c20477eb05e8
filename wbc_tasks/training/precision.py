"""Numeric precision and compilation: which dtype policy and whether XLA, chosen from the
``precision`` and ``xla`` params and the hardware found, with the reason logged; and the
optimizer that goes with the choice (loss scaling only for float16).

``auto`` keeps what has been measured: mixed float16 + XLA on a CUDA GPU; mixed bfloat16 on a
CPU with AVX512_BF16 or AMX (the ``cpu`` profile trains in 15 instead of 25 minutes there, test
balanced accuracy 0.804 against float32's 0.808 over three seeds, within seed noise:
docs/benchmarks.md); float32 on other CPUs, where bfloat16 is emulated and slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wbc_tasks.training.params import Precision, Xla, choices

PRECISIONS = choices(Precision)
XLA_CHOICES = choices(Xla)


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype policy and XLA setting one training uses, and why."""

    policy: str
    xla: bool
    reason: str
    #: Why this choice will be slow on this machine ("" when it will not).
    warning: str = ""

    @property
    def mixed(self) -> bool:
        return self.policy != Precision.FLOAT32


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_precision(
    precision: str = Precision.AUTO, xla: str = Xla.AUTO, *, gpu: bool | None = None
) -> PrecisionChoice:
    """The policy and XLA setting for ``precision`` / ``xla`` on this machine (``gpu``: whether a
    CUDA GPU is visible; looked up when None)."""
    if precision not in PRECISIONS or xla not in XLA_CHOICES:
        raise ValueError(f"precision must be one of {PRECISIONS} and xla one of {XLA_CHOICES}")
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    warning = ""
    if precision != Precision.AUTO:
        policy, why = precision, f"precision={precision} asked for"
        if not gpu and policy == Precision.MIXED_FLOAT16:
            warning = "float16 on a CPU is emulated: several times slower than float32 (use float32 or auto)"
        elif not gpu and policy == Precision.MIXED_BFLOAT16 and not cpu_has_bfloat16():
            warning = (
                "this CPU has no AVX512_BF16 or AMX: bfloat16 is emulated, several times slower than float32 "
                "(docs/benchmarks.md; use float32 or auto)"
            )
    elif gpu:
        policy, why = Precision.MIXED_FLOAT16.value, "auto: a CUDA GPU (float16 tensor cores)"
    elif cpu_has_bfloat16():
        policy, why = (
            Precision.MIXED_BFLOAT16.value,
            "auto: a CPU with native bfloat16 (AVX512_BF16/AMX), 1.7-2x float32",
        )
    else:
        policy, why = Precision.FLOAT32.value, "auto: no GPU, and this CPU has no native bfloat16"
    use_xla = gpu if xla == Xla.AUTO else xla == Xla.ON
    xla_why = (
        f"XLA {'on' if use_xla else 'off'} ({'auto: ' + ('GPU' if gpu else 'CPU') if xla == Xla.AUTO else 'asked for'})"
    )
    return PrecisionChoice(policy, use_xla, f"{why}; {xla_why}", warning)


#: Momentum of the weights' moving average (``weight_averaging=ema``): Keras' default, which
#: averages over about the last 100 steps (an epoch at the cpu profile, 116 steps).
EMA_MOMENTUM = 0.99


def compile_model(
    model: Any,
    learning_rate: float,
    *,
    policy: str,
    xla: bool,
    cosine_decay_steps: int | None = None,
    average_weights: bool = False,
) -> None:
    """Adam at ``learning_rate`` (loss-scaled under float16, whose gradients underflow; bfloat16
    has float32's range and needs none), cross-entropy, accuracy. ``cosine_decay_steps``: the
    rate falls from ``learning_rate`` to 0 along a half cosine over that many steps (Keras'
    ``CosineDecay``, counted by the optimizer's own step, which a checkpoint keeps: a resumed
    phase continues on the curve). ``average_weights``: the optimizer keeps an exponential moving
    average of the trainable weights (``EMA_MOMENTUM``; saved with its other state, so a resumed
    phase keeps it too)."""
    import keras

    rate: Any = learning_rate
    if cosine_decay_steps:
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=cosine_decay_steps)
    optimizer = keras.optimizers.Adam(rate, use_ema=average_weights, ema_momentum=EMA_MOMENTUM)
    if policy == Precision.MIXED_FLOAT16:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=xla)
