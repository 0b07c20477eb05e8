"""Cheap checks of a decoded image before the model sees it, and the synthetic "not a familiar
white cell" images the unfamiliar score is fitted and measured on.

A blank, uniform, badly exposed or noise-like frame is not a cell image, whatever the model
says about it (an untrained eye sees it at once; a classifier happily calls a black frame
"blasts"). The checks look only at pixels (never at the file name, format or original size).

The negatives are made from familiar images: crops that leave the centred white cell out (two
recipes, one to fit with and another to measure with, so the measure is not of the recipe) and
strong colour shifts (a stain or scanner unlike the training labs').
"""

from __future__ import annotations

import numpy as np

from wbc_tasks.core.settings import Settings

#: Image-check results (the ``image_check`` column; the review reason is ``image_check``).
UNIFORM = "uniform frame"
UNDEREXPOSED = "too dark"
OVEREXPOSED = "too bright"
NOISE = "noise-like texture"


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """Grey-level mean and standard deviation, and roughness: the mean absolute difference of
    neighbouring pixels over the standard deviation (~1.1 for pixel noise, < 0.3 for smears)."""
    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    std = float(grey.std())
    step = (np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2
    return {"mean": float(grey.mean()), "std": std, "roughness": float(step / std) if std > 0 else 0.0}


def check_image(image: np.ndarray, settings: Settings) -> str | None:
    """What is wrong with a decoded image (one of the constants above), or None when it passes."""
    stats = image_statistics(image)
    if stats["std"] < settings.image_check_min_std:
        return UNIFORM
    if stats["mean"] < settings.image_check_min_mean:
        return UNDEREXPOSED
    if stats["mean"] > settings.image_check_max_mean:
        return OVEREXPOSED
    if stats["roughness"] > settings.image_check_max_roughness:
        return NOISE
    return None


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR))


def corner_crops(images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Recipe A (fitting): one random corner per image, a third of the side, enlarged back to
    full size. The cell sits in the middle of these crops; a corner third holds red cells and
    background only."""
    rng = np.random.default_rng(seed)
    out = []
    for image in np.asarray(images):
        size = image.shape[0]
        side = max(4, size // 3)
        top = 0 if rng.random() < 0.5 else size - side
        left = 0 if rng.random() < 0.5 else size - side
        out.append(_resize(image[top : top + side, left : left + side], size))
    return np.stack(out).astype(np.uint8)


def corner_mosaics(images: np.ndarray) -> np.ndarray:
    """Recipe B (measuring only): the four corner quarters-of-the-side of each image put together
    as a 2×2 mosaic and enlarged to full size: no white cell, a texture unlike recipe A."""
    out = []
    for image in np.asarray(images):
        size = image.shape[0]
        q = max(2, size // 4)
        top = np.concatenate([image[:q, :q], image[:q, -q:]], axis=1)
        bottom = np.concatenate([image[-q:, :q], image[-q:, -q:]], axis=1)
        out.append(_resize(np.concatenate([top, bottom], axis=0), size))
    return np.stack(out).astype(np.uint8)


def colour_shifts(images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """A strong random stain/scanner shift per image: hue turned, saturation and gamma changed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for image in np.asarray(images):
        hsv = np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.float32)
        hue_turn = rng.uniform(0.08, 0.2) * rng.choice([-1, 1]) * 255
        hsv[..., 0] = np.mod(hsv[..., 0] + hue_turn, 256)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.4, 2.0), 0, 255)
        shifted = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
        gamma = rng.choice([rng.uniform(0.5, 0.7), rng.uniform(1.4, 1.8)])
        out.append((255 * (shifted / 255) ** gamma).astype(np.uint8))
    return np.stack(out)


def generated_non_cells(size: int, count: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Frames that are no cell at all: black, white, uniform grey-ish, pixel noise, smooth blobs."""
    rng = np.random.default_rng(seed)
    n = max(1, count)
    uniform = np.stack([np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(n)])
    noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    # Large smooth colour blobs: low-frequency noise, not a cell.
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    blobs = np.stack([_resize(c, size) for c in coarse])
    return {
        "black": np.zeros((n, size, size, 3), np.uint8),
        "white": np.full((n, size, size, 3), 255, np.uint8),
        "uniform": uniform,
        "noise": noise,
        "blobs": blobs,
    }
