"""Generated demo data: synthetic single-cell images for all nine classes.

Used where no labelled data is configured (``make demo``, tests, first runs) so the whole
pipeline can run on a fresh checkout. The images are cartoons, not cells: each class has its own
nucleus shape, nucleus/cytoplasm colour and granules, drawn with random position, rotation, size,
colour jitter, red-cell distractors and noise, so a small VGG16 learns them in minutes but not
from a single pixel. Each image is a function of (seed, class, index) only: the same call always
writes the same files, and growing ``per_class`` adds images without changing earlier ones.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from wbc_tasks.core.vocabulary import CLASS_NAMES

log = logging.getLogger(__name__)

#: Rendering is done at this multiple of the output size, then downsampled (anti-aliasing).
_SUPERSAMPLE = 2
#: Stream tags keep the labelled set and unlabelled drops from ever drawing the same image.
_LABELLED_STREAM = 1
_DROP_STREAM = 2

Colour = tuple[int, int, int]


def _jitter(rng: np.random.Generator, colour: Colour, amount: float) -> Colour:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)  # type: ignore[return-value]


def _polygon(cx: float, cy: float, radius: Callable[[np.ndarray], np.ndarray], angle: float, n: int = 72):
    """Points of a closed outline given its radius as a function of the polar angle."""
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = radius(theta)
    return list(zip(cx + r * np.cos(theta + angle), cy + r * np.sin(theta + angle)))


def _ellipse(cx, cy, rx, ry, angle):
    def radius(t):
        return rx * ry / np.sqrt((ry * np.cos(t)) ** 2 + (rx * np.sin(t)) ** 2)

    return _polygon(cx, cy, radius, angle)


def _arc(cx, cy, r, thickness, span, angle, n=48):
    """A thick circular arc (a band nucleus) centred on ``angle``."""
    theta = np.linspace(-span / 2, span / 2, n) + angle
    outer = list(zip(cx + (r + thickness / 2) * np.cos(theta), cy + (r + thickness / 2) * np.sin(theta)))
    inner = list(zip(cx + (r - thickness / 2) * np.cos(theta), cy + (r - thickness / 2) * np.sin(theta)))
    return outer + inner[::-1]


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: Colour) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _granules(draw, rng, cx, cy, radius, count, size, colour, spread=8.0):
    for _ in range(count):
        a = rng.uniform(0, 2 * math.pi)
        d = radius * math.sqrt(rng.uniform(0, 1))
        _dot(
            draw, cx + d * math.cos(a), cy + d * math.sin(a), size * rng.uniform(0.7, 1.3), _jitter(rng, colour, spread)
        )


# Each class: relative cell radius, cytoplasm colour, and a function drawing nucleus and granules.
# Inspired (loosely) by the real morphology so the demo reads sensibly to a haematologist's eye.


def _bands(draw, rng, cx, cy, r, angle, nuc):
    _granules(draw, rng, cx, cy, r * 0.9, 40, r * 0.03, (200, 150, 180))
    draw.polygon(_arc(cx, cy, r * 0.5, r * 0.28, rng.uniform(3.4, 4.2), angle), fill=nuc)


def _basophils(draw, rng, cx, cy, r, angle, nuc):
    draw.polygon(_polygon(cx, cy, lambda t: r * (0.55 + 0.08 * np.sin(3 * t)), angle), fill=nuc)
    _granules(draw, rng, cx, cy, r * 0.95, 70, r * 0.08, (45, 15, 70), spread=10)


def _blasts(draw, rng, cx, cy, r, angle, nuc):
    draw.polygon(_ellipse(cx, cy, r * 0.8, r * 0.74, angle), fill=nuc)
    for _ in range(int(rng.integers(1, 4))):
        a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.1, 0.4)
        _dot(draw, cx + d * math.cos(a), cy + d * math.sin(a), r * 0.1, (195, 175, 225))


def _eosinophils(draw, rng, cx, cy, r, angle, nuc):
    _granules(draw, rng, cx, cy, r * 0.95, 120, r * 0.06, (235, 120, 70), spread=12)
    for side in (-1, 1):
        ox, oy = side * r * 0.38 * math.cos(angle), side * r * 0.38 * math.sin(angle)
        draw.polygon(_ellipse(cx + ox, cy + oy, r * 0.3, r * 0.24, angle), fill=nuc)


def _lymphocytes(draw, rng, cx, cy, r, angle, nuc):
    draw.polygon(_ellipse(cx + r * 0.05, cy, r * 0.86, r * 0.82, angle), fill=nuc)


def _metamyelocytes(draw, rng, cx, cy, r, angle, nuc):
    def kidney(t):
        return r * 0.55 * (1 - 0.45 * np.exp(-((np.angle(np.exp(1j * t))) ** 2) / 0.25))

    draw.polygon(_polygon(cx, cy, kidney, angle), fill=nuc)
    _granules(draw, rng, cx, cy, r * 0.9, 25, r * 0.03, (205, 160, 175))


def _monocytes(draw, rng, cx, cy, r, angle, nuc):
    phase = rng.uniform(0, 2 * math.pi)
    draw.polygon(
        _polygon(cx, cy, lambda t: r * (0.5 + 0.12 * np.sin(2 * t + phase) + 0.07 * np.sin(5 * t)), angle), fill=nuc
    )
    for _ in range(int(rng.integers(3, 7))):  # vacuoles
        a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.65, 0.85)
        _dot(draw, cx + d * math.cos(a), cy + d * math.sin(a), r * 0.07, (225, 225, 240))


def _myelocytes(draw, rng, cx, cy, r, angle, nuc):
    _granules(draw, rng, cx, cy, r * 0.9, 60, r * 0.04, (190, 120, 150))
    ox, oy = r * 0.3 * math.cos(angle), r * 0.3 * math.sin(angle)
    draw.polygon(_ellipse(cx + ox, cy + oy, r * 0.5, r * 0.42, angle), fill=nuc)


def _neutrophils(draw, rng, cx, cy, r, angle, nuc):
    _granules(draw, rng, cx, cy, r * 0.9, 30, r * 0.025, (210, 170, 190))
    lobes = int(rng.integers(3, 5))
    points = [
        (cx + r * 0.45 * math.cos(angle + a), cy + r * 0.45 * math.sin(angle + a))
        for a in np.linspace(-1.6, 1.6, lobes)
    ]
    draw.line(points, fill=nuc, width=max(1, int(r * 0.07)))
    for x, y in points:
        _dot(draw, x, y, r * 0.2, nuc)


#: class -> (cell radius as a fraction of the image side, cytoplasm colour, nucleus colour, painter)
_CLASS_LOOKS: dict[str, tuple[float, Colour, Colour, Callable]] = {
    # Colours are exaggerated and spread apart on purpose: a cartoon that a from-scratch VGG16
    # separates within a few CPU minutes, so the demo pipeline ends with a usable model.
    "bands": (0.27, (235, 190, 215), (110, 30, 120), _bands),
    "basophils": (0.25, (200, 175, 225), (60, 35, 95), _basophils),
    "blasts": (0.34, (140, 165, 230), (160, 110, 200), _blasts),
    "eosinophils": (0.28, (245, 205, 180), (95, 45, 120), _eosinophils),
    "lymphocytes": (0.19, (150, 195, 240), (55, 25, 100), _lymphocytes),
    "metamyelocytes": (0.28, (225, 215, 190), (120, 75, 165), _metamyelocytes),
    "monocytes": (0.35, (170, 185, 200), (130, 95, 170), _monocytes),
    "myelocytes": (0.29, (215, 170, 190), (140, 60, 130), _myelocytes),
    "neutrophils": (0.27, (240, 215, 225), (70, 30, 150), _neutrophils),
}


def render_cell(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic ``size`` x ``size`` RGB uint8 image of ``class_name``."""
    radius_fraction, cytoplasm, nucleus, paint = _CLASS_LOOKS[class_name]
    big = size * _SUPERSAMPLE
    background = (245, 238, 246) if class_name == "blasts" else (236, 216, 222)
    image = Image.new("RGB", (big, big), _jitter(rng, background, 6))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):  # red blood cells: pale discs with a paler centre
        x, y, rr = rng.uniform(0, big), rng.uniform(0, big), big * rng.uniform(0.14, 0.2)
        _dot(draw, x, y, rr, _jitter(rng, (225, 160, 168), 8))
        _dot(draw, x, y, rr * 0.45, _jitter(rng, (235, 190, 195), 6))
    r = big * radius_fraction * rng.uniform(0.85, 1.15)
    cx = big / 2 + rng.uniform(-0.08, 0.08) * big
    cy = big / 2 + rng.uniform(-0.08, 0.08) * big
    angle = rng.uniform(0, 2 * math.pi)
    draw.polygon(_ellipse(cx, cy, r, r * rng.uniform(0.88, 1.0), angle), fill=_jitter(rng, cytoplasm, 8))
    paint(draw, rng, cx, cy, r, angle, _jitter(rng, nucleus, 10))
    image = image.filter(ImageFilter.GaussianBlur(radius=big / 160)).resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels * rng.uniform(0.9, 1.08) + rng.normal(0, 5, pixels.shape)  # exposure + noise
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``; an existing identical file is fine, a different one is an error.

    Demo data must never overwrite someone's image that happens to share a name.
    """
    if path.exists():
        if path.is_file() and path.read_bytes() == data:
            return
        raise FileExistsError(f"{path} exists and is not the demo image of that name; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def generate_demo_dataset(out_dir: Path, *, per_class: int = 40, size: int = 96, seed: int = 0) -> dict:
    """Write ``per_class`` images per class as ``out_dir/<class>/<n>.png``; return a summary.

    Deterministic per (seed, class, n). Existing identical files are kept; a different file with a
    demo file's name stops the run (nothing is overwritten).
    """
    if per_class < 0 or size < 8:
        raise ValueError(f"need per_class >= 0 and size >= 8, got {per_class} and {size}")
    out_dir = Path(out_dir)
    for class_index, name in enumerate(CLASS_NAMES):
        for n in range(per_class):
            rng = np.random.default_rng([seed, _LABELLED_STREAM, class_index, n])
            _write_once(out_dir / name / f"{n}.png", _png_bytes(render_cell(name, size, rng)))
    counts = {name: per_class for name in CLASS_NAMES}
    log.info("demo dataset in %s: %d images of %d px %s", out_dir, per_class * len(CLASS_NAMES), size, counts)
    return {"data_dir": str(out_dir), "counts": counts, "size": size, "seed": seed}


def generate_demo_drop(out_dir: Path, n: int, seed: int, *, size: int = 96) -> list[Path]:
    """Write ``n`` unlabelled demo images (random classes) into a drop folder; return their paths.

    ``out_dir`` is the drop itself, e.g. ``<classify dir>/2026-11-24``. File names say nothing
    about the class. The images are never identical to the labelled demo set's.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, _DROP_STREAM])
    classes = rng.integers(0, len(CLASS_NAMES), size=n)
    paths = []
    for i, class_index in enumerate(classes):
        image_rng = np.random.default_rng([seed, _DROP_STREAM, i])
        path = out_dir / f"demo-{i:04d}.png"
        _write_once(path, _png_bytes(render_cell(CLASS_NAMES[int(class_index)], size, image_rng)))
        paths.append(path)
    log.info("demo drop in %s: %d images", out_dir, n)
    return paths
