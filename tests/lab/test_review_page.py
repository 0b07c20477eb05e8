"""The review page's order (issue 30, item 5) as rendered: which order it is in, the link to the
other, and the advice to review in onboarding order only where most of the drop is unfamiliar."""

from __future__ import annotations

import pytest

from tests.lab.conftest import PAGE_LINKS
from wbc_tasks.lab.pages import render

URLS = {"urgent": "/lab/drops/d/review", "onboarding": "/lab/drops/d/review?order=onboarding"}


def _page(order: str, unfamiliar: int, cells: int = 10) -> str:
    return render(
        "review",
        title="Review d",
        links={**PAGE_LINKS, "review": "/lab/drops/d/review", "report": "/lab/drops/d/report"},
        user="tech",
        can_review=True,
        drop="d",
        csp_nonce="n",
        queue=[],
        queued=unfamiliar,
        pager=None,
        reviewed=0,
        labels=[],
        keymap={},
        review_endpoint="/lab/api/reviews",
        order=order,
        order_urls=URLS,
        unfamiliar=unfamiliar,
        cells=cells,
        mostly_unfamiliar=unfamiliar * 2 > cells,
    )


@pytest.mark.parametrize("order", ["urgent", "onboarding"])
def test_the_page_says_its_order_and_links_to_the_other(order):
    page = _page(order, unfamiliar=1)
    other = "onboarding" if order == "urgent" else "urgent"
    assert f'id="order-switch" href="{URLS[other]}"'.replace("&", "&amp;") in page
    assert ("(onboarding order)" in page) == (order == "onboarding")
    assert 'id="onboarding-advice"' not in page  # 1 of 10 unfamiliar: the model knows this lab


def test_a_mostly_unfamiliar_drop_is_advised_the_onboarding_order_with_what_was_measured():
    urgent = _page("urgent", unfamiliar=9)
    assert 'id="onboarding-advice"' in urgent and "9 of 10 cells" in urgent
    assert f'<a href="{URLS["onboarding"]}">onboarding order</a>' in urgent and "0.82 against 0.76" in urgent
    onboarding = _page("onboarding", unfamiliar=9)
    assert 'id="onboarding-advice"' in onboarding and "0.82" not in onboarding
