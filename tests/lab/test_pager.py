"""The pages' pager (issue 31): where a page lies, its neighbours' links, and the text the drops
page shows (a year of drops or a 50,000-cell queue is never one page)."""

from __future__ import annotations

from wbc_tasks.lab.pages import DROPS_PER_PAGE, _pager, render


def test_the_pager_knows_its_neighbours_and_the_last_page_is_short():
    middle = _pager("/lab/drops", 2, 120, 50)
    assert (middle["first"], middle["last"], middle["pages"]) == (50, 100, 3)
    assert middle["previous_url"] == "/lab/drops?page=1" and middle["next_url"] == "/lab/drops?page=3"
    last = _pager("/lab/drops", 3, 120, 50)
    assert (last["first"], last["last"], last["next_url"]) == (100, 120, None)
    alone = _pager("/lab/drops", 1, 0, 50)
    assert (alone["pages"], alone["previous_url"], alone["next_url"]) == (1, None, None)


def test_the_drops_page_says_which_drops_it_shows_and_links_both_ways():
    pager = _pager("/lab/drops", 2, 2 * DROPS_PER_PAGE + 7, DROPS_PER_PAGE)
    drop = {"drop": "2026-11-24", "cells": 1, "needs_review": 0, "reviewed": 0, "blast_suspected": 0}
    page = render(
        "drops",
        title="Drops",
        heading="Drops",
        links={
            "drops": "/lab/drops",
            "learning": "/lab/learning",
            "csv": "c",
            "json": "j",
            "parquet": "p",
            "api_docs": "a",
        },
        user="tech",
        can_review=False,
        drop=None,
        csp_nonce="n",
        drops=[{**drop, "rejected": 0, "pending": 0, "review_url": "r", "report_url": "d"}],
        pager=pager,
    )
    assert f"Drops {DROPS_PER_PAGE + 1}–{2 * DROPS_PER_PAGE} of {2 * DROPS_PER_PAGE + 7} (page 2 of 3)" in page
    assert 'href="/lab/drops?page=1" rel="prev">newer' in page and 'href="/lab/drops?page=3" rel="next">older' in page
