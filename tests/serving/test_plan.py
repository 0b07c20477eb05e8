"""Planning a night: chunks cover every new image once, and their number is capped by growing
their size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serving.conftest import copy_drop, sha
from wbc_tasks.serving.model import resolve_run_model
from wbc_tasks.serving.plan import find_new_images, plan_chunks


def test_chunks_are_capped_by_growing_their_size(night_sqlite):
    settings = night_sqlite.with_overrides(max_chunks=3)
    folder = copy_drop("2026-11-24", settings)
    model = resolve_run_model(settings)
    found = find_new_images(settings, run_id="n", model=model, chunk_size=10)
    items = [json.loads(Path(c).read_text())["items"] for c in found["chunks"]]
    assert [len(i) for i in items] == [34, 34, 32]
    hashes = [item["sha256"] for chunk in items for item in chunk]
    assert sorted(hashes) == sorted(sha(p) for p in folder.glob("*.jpg"))


@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 50_000])
def test_plan_chunks_covers_every_item_once_within_the_cap(n):
    bounds = plan_chunks(n, 100, 32)
    assert len(bounds) <= 32
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(n))
    assert all(stop - start >= 100 for start, stop in bounds[:-1])
