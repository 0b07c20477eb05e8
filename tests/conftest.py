"""Shared fixtures: the real image sets, isolated settings, small generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_set(name: str) -> Path:
    """A set under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real images absent: {path} not found (../shared/data is not checked out here)")
    return path


@pytest.fixture
def seed_shaped() -> Path:
    """The 528-image labelled set with the original notebook's imbalance."""
    return shared_set("wbc-seed-shaped") / "WBC"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose every state folder lives in this test's tmp folder."""
    from wbc_tasks.config import get_settings

    home = tmp_path / "wbc-home"
    for name in list(__import__("os").environ):
        if name.startswith("WBC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WBC_HOME", str(home))
    monkeypatch.setenv("WBC_WORKERS", "1")
    return get_settings()


def write_image(path: Path, *, size=(48, 40), mode="RGB", seed=0, fmt=None) -> Path:
    """A small random image file (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze() if channels == 1 else array)
    image.save(path, format=fmt)
    return path
