"""A model with a fitted trust policy, shared by the trust tests of this package."""

from __future__ import annotations

import pytest

from tests.demo_stores import train_and_calibrate


@pytest.fixture(scope="package")
def fitted_trust(tmp_path_factory):
    """A tiny model trained on demo images, then calibrated with its trust policy fitted."""
    root = tmp_path_factory.mktemp("trust")
    _, trained, summary = train_and_calibrate(root, splits={"train": 6, "val": 6})
    return root, trained, summary
