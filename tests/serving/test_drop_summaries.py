"""Each drop's counts are kept by the writers (issue 31): after any mix of nights and reviews the
``drop_summaries`` rows equal a full recount from the cells, and a night that fails halfway leaves
no half-written counts. Real images, a real tiny model, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.serving.conftest import counts_from_cells, drop_source, table_rows
from wbc_tasks.serving import drop_summaries
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.commit import classify_chunk
from wbc_tasks.serving.drop_summaries import count_drops, drop_counts, list_drops, recount_all
from wbc_tasks.serving.model import resolve_run_model
from wbc_tasks.serving.nightly import classify_new_images
from wbc_tasks.serving.plan import find_new_images
from wbc_tasks.serving.review_decisions import record_review

SOURCE = "2026-11-24"


def _images(n: int, start: int = 0) -> list[Path]:
    return sorted(drop_source(SOURCE).iterdir())[start : start + n]


def _fill(settings, drop: str, images: list[Path]) -> list[str]:
    folder = settings.classify_dir / drop
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    return [f"{drop}/{image.name}" for image in images]


def _stored(settings) -> list[dict]:
    return [{k: r[k] for k in ("drop", *drop_summaries.COUNTS)} for r in table_rows(settings, db.drop_summaries)]


def _assert_summaries_equal_a_recount(settings) -> list[dict]:
    expected = counts_from_cells(settings)
    assert list_drops(settings) == expected
    assert sorted(_stored(settings), key=lambda r: r["drop"], reverse=True) == expected
    return expected


def test_counts_equal_a_full_recount_after_a_mixed_sequence_of_nights_and_reviews(night):
    settings = night
    first = _fill(settings, "2026-01-01", _images(6))
    (settings.classify_dir / "2026-01-01" / "notes.txt").write_text("not an image")
    assert classify_new_images(settings)["images_classified"] == 6
    _assert_summaries_equal_a_recount(settings)

    record_review(settings, first[0], "neutrophils", reviewer="alice")
    record_review(settings, first[0], "bands", reviewer="bob")  # a second opinion: still one reviewed cell
    record_review(settings, first[1], "unusable", reviewer="alice")
    counts = _assert_summaries_equal_a_recount(settings)
    assert counts[0]["reviewed"] == 2 and counts[0]["rejected"] == 1

    # The next night: a new drop holding a copy of a reviewed image, a file added to the old drop
    # and one of its files rewritten in place; a review then changes both drops holding that image.
    _fill(settings, "2026-01-02", [*_images(2), *_images(2, start=8)])
    _fill(settings, "2026-01-01", _images(1, start=6))
    rewritten = settings.classify_dir / first[2]
    shutil.copy(_images(1, start=7)[0], rewritten)
    assert classify_new_images(settings)["images_classified"] == 4
    record_review(settings, "2026-01-02/" + _images(1, start=1)[0].name, "monocytes", reviewer="carol")
    counts = _assert_summaries_equal_a_recount(settings)
    assert [c["drop"] for c in counts] == ["2026-01-02", "2026-01-01"]
    assert counts[0]["files"] == 4 and counts[0]["reviewed"] == 2  # both copies of reviewed content

    # Another model version classifies the old drop again: its newest predictions count there and
    # in the new drop that holds copies of the same images.
    assert classify_new_images(settings, model="2", reclassify=True)["images_classified"] > 0
    counts = _assert_summaries_equal_a_recount(settings)
    assert count_drops(settings) == 2
    assert drop_counts(settings, ["2026-01-01", "no-such-drop", "2026-01-02"]) == [counts[1], counts[0]]
    assert list_drops(settings, limit=1, offset=1) == [counts[1]]


def test_a_night_failing_halfway_leaves_the_counts_of_what_was_committed(night_sqlite, monkeypatch):
    settings = night_sqlite
    _fill(settings, "2026-01-01", _images(4))
    classify_new_images(settings)
    before = _stored(settings)
    _fill(settings, "2026-01-01", _images(4, start=4))
    model = resolve_run_model(settings)
    found = find_new_images(settings, run_id="night-2", model=model, chunk_size=2)
    assert len(found["chunks"]) == 2

    real_refresh = drop_summaries.refresh

    def refresh_then_fail(connection, drops):
        real_refresh(connection, drops)  # the counts are written, then the commit fails
        raise RuntimeError("database went away")

    monkeypatch.setattr(drop_summaries, "refresh", refresh_then_fail)
    with pytest.raises(RuntimeError, match="went away"):
        classify_chunk(settings, found["chunks"][0], model, run_id="night-2")
    monkeypatch.setattr(drop_summaries, "refresh", real_refresh)
    assert _stored(settings) == before
    _assert_summaries_equal_a_recount(settings)

    # The first chunk commits; the second never runs (the night stopped): the counts say
    # exactly what is in the rows, two new files more, none pending.
    classify_chunk(settings, found["chunks"][0], model, run_id="night-2")
    counts = _assert_summaries_equal_a_recount(settings)
    assert counts[0]["files"] == before[0]["files"] + 2 and counts[0]["pending"] == 0


def test_recount_all_repairs_missing_or_wrong_rows(night_sqlite):
    settings = night_sqlite
    _fill(settings, "2026-01-01", _images(3))
    _fill(settings, "2026-01-02", _images(2, start=3))
    classify_new_images(settings)
    expected = _assert_summaries_equal_a_recount(settings)
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        connection.execute(db.drop_summaries.delete().where(db.drop_summaries.c.drop == "2026-01-02"))
        connection.execute(db.drop_summaries.update().values(cells=99))
    assert list_drops(settings) != expected
    with db.open_engine(settings.predictions_db_url) as engine, engine.begin() as connection:
        assert recount_all(connection) == 2
    assert list_drops(settings) == expected


def test_a_database_not_migrated_yet_is_counted_from_its_rows(night_sqlite):
    """The lab's pages may read a database an older night wrote, before the next night migrates it."""
    settings = night_sqlite
    _fill(settings, "2026-01-01", _images(3))
    classify_new_images(settings)
    expected = _assert_summaries_equal_a_recount(settings)
    assert db.downgrade_database(settings.predictions_db_url, "0005") == "0005"
    assert list_drops(settings) == expected and count_drops(settings) == 1
    assert drop_counts(settings, ["2026-01-01"]) == expected
    assert db.upgrade_database(settings.predictions_db_url) == db.head_revision()
    assert _stored(settings) == expected


def test_two_writers_at_once_on_postgresql_each_count_the_others_rows(settings, tmp_path):
    """A review recorded while a night's chunk is committing the same drop waits for the chunk's
    recount (one advisory lock), then counts the chunk's files too: no lost update."""
    from tests.serving.conftest import KNOWN_DROP, add_known_drop, make_prediction, make_seen, throwaway_database
    from wbc_tasks.serving.commit import write_rows

    with throwaway_database("postgresql", tmp_path) as url:
        lab = settings.with_overrides(predictions_db_url=url)
        db.upgrade_database(url)
        add_known_drop(lab)
        late = hashlib.sha256(b"late cell").hexdigest()
        reviewed = threading.Event()
        with db.open_engine(url) as engine:
            with engine.begin() as night_chunk:
                write_rows(
                    night_chunk,
                    predictions=[make_prediction(late, "1", best=2)],
                    seen=[make_seen(f"{KNOWN_DROP}/late-cell.jpg", late, KNOWN_DROP)],
                )
                review = threading.Thread(
                    target=lambda: (
                        record_review(lab, f"{KNOWN_DROP}/n1.jpg", "neutrophils", reviewer="alice"),
                        reviewed.set(),
                    )
                )
                review.start()
                time.sleep(1.0)
                assert not reviewed.is_set()  # waiting for the chunk's recount to commit
            review.join(timeout=30)
        assert reviewed.is_set()
        [counts] = [c for c in list_drops(lab) if c["drop"] == KNOWN_DROP]
        assert counts == next(c for c in counts_from_cells(lab) if c["drop"] == KNOWN_DROP)
        assert counts["reviewed"] == 1 and counts["files"] == 15
