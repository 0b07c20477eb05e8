"""The CPU inference engine of a model version: its outputs model (probabilities, logits and the
features the unfamiliar score needs) converted to OpenVINO at registration, accepted only when
it predicts like Keras.

OpenVINO was chosen over ONNX Runtime by measurement on a 2-core AVX512_BF16 CPU at 256 px
(``bench/bench_inference.py``, docs/benchmarks.md): in float32 both run at about Keras' speed;
only OpenVINO computes in bfloat16 on such CPUs, and that is where the speed is. OpenVINO picks
bfloat16 on its own on these CPUs (its default ``INFERENCE_PRECISION_HINT``); here the precision
is always asked for explicitly and recorded.

:func:`export_engine` converts the model once (weights kept in float32), then tries each
precision this CPU offers, fastest first, on a sample of the run's test images: a precision is
accepted when the top class and the review reasons agree with Keras on at least
``engine_min_agreement`` of the images and no calibrated probability differs by more than
``engine_max_probability_difference``. None accepted: the engine files are removed, the reason is
written to ``engine.json`` and serving uses Keras.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.data.image_checks import check_image
from wbc_tasks.data.store import open_store
from wbc_tasks.training.precision import cpu_has_bfloat16

log = logging.getLogger(__name__)

#: The MLflow artifact folder of a version's run holding the engine (like ``trust/``).
ENGINE_ARTIFACT_PATH = "engine"
ENGINE_INFO_FILE = "engine.json"
ENGINE_MODEL_FILE = "model.xml"  # OpenVINO IR; its weights are in model.bin beside it
ENGINE_NAME = "openvino"
#: The engine's outputs, in the order of :func:`~wbc_tasks.training.outputs.outputs_model`.
OUTPUT_NAMES = ("probabilities", "logits", "top", "low")


@dataclass(frozen=True)
class AgreementCheck:
    """How an engine at one precision compared with Keras on the check images."""

    precision: str
    images: int
    argmax_agreement: float
    review_agreement: float
    max_probability_difference: float
    keras_images_per_second: float
    engine_images_per_second: float
    accepted: bool
    reason: str


def engine_precisions() -> tuple[str, ...]:
    """Precisions to try, fastest first: bfloat16 only on CPUs that compute it natively."""
    return ("bf16", "f32") if cpu_has_bfloat16() else ("f32",)


class OpenVinoEngine:
    """An exported engine compiled for this CPU at one precision. Quacks like the Keras outputs
    model where prediction needs it (``predict_on_batch``, ``outputs``), so
    :func:`~wbc_tasks.training.predict.predict_outputs` runs either."""

    def __init__(self, model_file: Path, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(model_file))
        # Asked for explicitly: left to itself OpenVINO runs bfloat16 on CPUs that have it.
        self._compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        self._request = self._compiled.create_infer_request()
        by_name = {name: port for port in self._compiled.outputs for name in port.get_names()}
        missing = [name for name in OUTPUT_NAMES if name not in by_name]
        if missing:
            raise ValueError(f"{model_file}: engine outputs {missing} missing (has {sorted(by_name)})")
        self._ports = [by_name[name] for name in OUTPUT_NAMES]
        self.outputs = [SimpleNamespace(shape=tuple(p.get_partial_shape().get_min_shape())) for p in self._ports]
        self.precision = precision
        self.path = Path(model_file)

    def predict_on_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return [np.array(result[port], dtype=np.float32) for port in self._ports]


def convert_to_openvino(outputs: Any, image_size: int, out: Path) -> Path:
    """Convert a Keras outputs model to OpenVINO IR in ``out`` (float32 weights), its outputs
    named :data:`OUTPUT_NAMES`; return the ``.xml`` file."""
    import openvino as ov

    converted = ov.convert_model(outputs, input=[("pixels", [-1, image_size, image_size, 3], ov.Type.f32)])
    # Converted outputs carry Keras' tensor names and their order is not kept: name them by tensor.
    wanted = {tensor.name: name for tensor, name in zip(outputs.outputs, OUTPUT_NAMES, strict=True)}
    for port in converted.outputs:
        names = [wanted[n] for n in port.get_names() if n in wanted]
        if len(names) != 1:
            raise ValueError(f"cannot tell which output {sorted(port.get_names())} is (expected one of {wanted})")
        port.get_tensor().set_names({names[0]})
    out.mkdir(parents=True, exist_ok=True)
    path = out / ENGINE_MODEL_FILE
    ov.save_model(converted, str(path), compress_to_fp16=False)  # the default halves weights to float16
    return path


def sample_for_check(store_path: Path, max_images: int) -> np.ndarray:
    """Up to ``max_images`` images of a store, spread evenly over it (stores are in class order,
    so every class is represented)."""
    store = open_store(store_path)
    n = len(store)
    index = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(int)) if n else np.zeros(0, int)
    return np.asarray(store.images[index])


def compare_outputs(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    image_checks: list[str | None],
    policy: Any,
    stats: Any,
    settings: Settings,
) -> dict[str, float]:
    """Top-class and review-reason agreement (share of images) and the largest calibrated
    probability difference between two sets of model outputs for the same images."""
    from wbc_tasks.training.trust_policy import assess

    n = len(reference["probabilities"])
    if n == 0:
        return {"argmax_agreement": 1.0, "review_agreement": 1.0, "max_probability_difference": 0.0}
    ours = assess(reference, image_checks, policy, stats, settings)
    theirs = assess(candidate, image_checks, policy, stats, settings)
    same_reasons = [set(a) == set(b) for a, b in zip(ours.reasons, theirs.reasons, strict=True)]
    return {
        "argmax_agreement": float((ours.probabilities.argmax(1) == theirs.probabilities.argmax(1)).mean()),
        "review_agreement": float(np.mean(same_reasons)),
        "max_probability_difference": float(np.abs(ours.probabilities - theirs.probabilities).max()),
    }


def _timed_outputs(model: Any, images: np.ndarray, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    from wbc_tasks.training.outputs import predict_all

    predict_all(model, images[:batch_size], batch_size)  # warm-up: graph tracing, kernel choice
    started = time.perf_counter()
    outputs = predict_all(model, images, batch_size)
    return outputs, len(images) / max(time.perf_counter() - started, 1e-9)


def export_engine(
    model_path: Path,
    check_store: Path,
    out: Path,
    *,
    trust_dir: Path | None,
    settings: Settings,
    batch_size: int,
    precisions: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Export the model at ``model_path`` to an OpenVINO engine in ``out`` and check it against
    Keras on images of ``check_store`` (the run's test split), with the trust policy in
    ``trust_dir`` deciding review reasons. Returns (and writes to ``engine.json``) what was
    checked and whether the engine was accepted; a refused engine leaves no model files."""
    import keras

    from wbc_tasks.training.outputs import outputs_model
    from wbc_tasks.training.trust_policy import load_trust

    precisions = precisions or engine_precisions()
    model = keras.models.load_model(model_path)
    outputs = outputs_model(model)
    image_size = int(model.input_shape[1])
    policy, stats = load_trust(trust_dir)
    images = sample_for_check(check_store, settings.engine_check_images)
    checks = [check_image(image, settings) for image in images]
    info: dict[str, Any] = {
        "engine": ENGINE_NAME,
        "accepted": False,
        "precision": None,
        "image_size": image_size,
        "check_images": len(images),
        "min_agreement": settings.engine_min_agreement,
        "max_probability_difference": settings.engine_max_probability_difference,
        "checks": [],
    }
    if len(images) == 0:
        info["reason"] = f"no test images in {check_store} to check the engine on"
        return _finish(out, info)
    started = time.perf_counter()
    reference, keras_speed = _timed_outputs(outputs, images, batch_size)
    model_file = convert_to_openvino(outputs, image_size, out)
    for precision in precisions:
        engine = OpenVinoEngine(model_file, precision)
        candidate, engine_speed = _timed_outputs(engine, images, batch_size)
        agreement = compare_outputs(reference, candidate, checks, policy, stats, settings)
        failures = [
            f"{what} {agreement[what]:.4f} < {settings.engine_min_agreement}"
            for what in ("argmax_agreement", "review_agreement")
            if agreement[what] < settings.engine_min_agreement
        ]
        if agreement["max_probability_difference"] > settings.engine_max_probability_difference:
            failures.append(
                f"a probability differs by {agreement['max_probability_difference']:.4f} "
                f"> {settings.engine_max_probability_difference}"
            )
        check = AgreementCheck(
            precision=precision,
            images=len(images),
            keras_images_per_second=round(keras_speed, 2),
            engine_images_per_second=round(engine_speed, 2),
            accepted=not failures,
            reason="; ".join(failures) or "agrees with Keras",
            **{k: round(v, 6) for k, v in agreement.items()},
        )
        info["checks"].append(check.__dict__)
        log.info(
            "engine %s %s on %d test images: top class agrees %.4f, review reasons %.4f, max probability "
            "difference %.4f; %.1f images/s (Keras float32 %.1f): %s",
            ENGINE_NAME,
            precision,
            len(images),
            check.argmax_agreement,
            check.review_agreement,
            check.max_probability_difference,
            engine_speed,
            keras_speed,
            "accepted" if check.accepted else f"refused ({check.reason})",
        )
        if check.accepted:
            info.update(accepted=True, precision=precision, reason=f"{precision} agrees with Keras")
            break
    else:
        info["reason"] = "; ".join(f"{c['precision']}: {c['reason']}" for c in info["checks"])
    info["seconds"] = round(time.perf_counter() - started, 1)
    return _finish(out, info)


def _finish(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if not info["accepted"]:
        for leftover in (out / ENGINE_MODEL_FILE, (out / ENGINE_MODEL_FILE).with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
        log.warning("engine refused, classification will use Keras: %s", info.get("reason"))
    write_json_atomic(out / ENGINE_INFO_FILE, info)
    return info


def load_engine(folder: Path | None) -> OpenVinoEngine | None:
    """The accepted engine in ``folder`` (an ``engine/`` artifact folder) compiled at its checked
    precision, or None (no folder, refused, OpenVINO missing or failing: Keras is used)."""
    import json

    if folder is None or not (Path(folder) / ENGINE_INFO_FILE).is_file():
        return None
    info = json.loads((Path(folder) / ENGINE_INFO_FILE).read_text())
    if not info.get("accepted"):
        log.info("engine in %s was refused at registration (%s): using Keras", folder, info.get("reason"))
        return None
    try:
        return OpenVinoEngine(Path(folder) / ENGINE_MODEL_FILE, info["precision"])
    except Exception as exc:  # noqa: BLE001 - any engine failure falls back to Keras, loudly
        log.warning("engine in %s cannot be loaded (%s: %s): using Keras", folder, type(exc).__name__, exc)
        return None
