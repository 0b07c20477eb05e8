"""The model card (wbc_tasks.registry.model_card) from the real sources file of ../shared/data."""

from __future__ import annotations

import pandas as pd

from tests.conftest import SHARED_DATA, skip_unless_required
from wbc_tasks.core.vocabulary import CLASS_NAMES


def test_source_counts_from_real_sources_file():
    from wbc_tasks.registry.model_card import model_card, source_counts

    sources_file = SHARED_DATA / "wbc-seed-shaped" / "SOURCES.csv"
    if not sources_file.is_file():
        skip_unless_required(f"real images absent: {sources_file} not found (../shared/data is not checked out here)")
    table = pd.read_csv(sources_file, dtype=str)
    manifest = table.rename(columns={"file": "path"})[["path", "class", "sha256"]]
    counts = source_counts(manifest, sources_file.parent / "WBC")
    expected = table.groupby(["class", "source"]).size()
    assert {(c, s): n for c, by in counts.items() for s, n in by.items()} == expected.to_dict()
    blast_sources = set(counts["blasts"])
    assert len(blast_sources) == 1, "the README says blasts come from one lab only"

    card = model_card(
        model_name="m",
        version="1",
        dag_run_id="d",
        mlflow_run_id="r",
        image_size=32,
        class_names=CLASS_NAMES,
        metrics={"balanced_accuracy": 0.5, "recall": {"blasts": 0.9}},
        data_summary={"counts": {"test": {"blasts": 1}}, "sources": counts},
        params={},
    )
    assert f"blasts (only {blast_sources.pop()})" in card and "Acevedo" in card
    assert "Few test images (under 30) for blasts" in card
