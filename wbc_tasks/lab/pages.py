"""The lab's HTML pages: the drops (all, or those of one nightly run), a drop's review queue, its
differential report and how the model learns the lab's reviews, rendered from the Jinja2 templates
in ``templates/`` beside this module (autoescaped: every value from the database or a URL is
escaped, none is marked safe). Anonymous readers are sent to the login page. Handlers that touch
the database are plain ``def``: FastAPI runs them in its thread pool, so a slow query never blocks
the API server's event loop."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from wbc_tasks.core.html import render_template
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.lab import auth
from wbc_tasks.lab.auth import LabUser, PageReader
from wbc_tasks.lab.security import csp_nonce
from wbc_tasks.serving.review_decisions import UNUSABLE

#: Keyboard shortcuts: 1-9 the nine classes in the project's order, 0 or u unusable.
SHORTCUTS: dict[str, str] = {str(i + 1): name for i, name in enumerate(CLASS_NAMES)}
SHORTCUTS |= {"0": UNUSABLE, "u": UNUSABLE}
#: The longest side of a thumbnail in the review queue.
QUEUE_THUMBNAIL_SIDE = 256
#: Drops per page of the drops page, cells per page of a review queue: what a browser renders at
#: once, whatever a year of drops or a 50,000-file drop holds.
DROPS_PER_PAGE = 50
QUEUE_PER_PAGE = 100
#: A promotion outcome in the lab's words.
OUTCOME_WORDS = {
    "promoted": "promoted",
    "kept_champion": "refused: the version in use stayed",
    "rejected": "refused: below a quality floor",
    "already_champion": "already in use",
    "error": "not applied (the registry failed; nothing changed)",
}

router = APIRouter()


def render(name: str, **context: Any) -> str:
    """The template ``name`` (``drops`` or ``review``) with ``context``."""
    return render_template("wbc_tasks.lab", f"{name}.html", **context)


def drop_url(request: Request, route: str, drop: str) -> str:
    """The URL of ``route`` for ``drop``, its name percent-encoded: Starlette's ``url_for`` puts a
    path parameter in as it is, so a drop named ``a#b`` or ``50%`` would lead elsewhere."""
    return str(request.url_for(route, drop=quote(drop, safe="")))


def _links(request: Request, drop: str | None = None) -> dict[str, str]:
    base = str(request.url_for("predictions"))
    links = {
        "drops": str(request.url_for("drops_page")),
        "learning": str(request.url_for("learning_page")),
        "learning_json": str(request.url_for("learning_api")),
        "api_docs": str(request.url_for("api_schema")),
        "csv": f"{base}?format=csv",
        "json": f"{base}?format=json",
        "parquet": f"{base}?format=parquet",
    }
    if drop:
        links["review"] = drop_url(request, "review_page", drop)
        links["report"] = drop_url(request, "report_page", drop)
    return links


def _page(
    request: Request, who: LabUser, name: str, title: str, drop: str | None = None, **context: Any
) -> HTMLResponse:
    html = render(
        name,
        title=title,
        links=_links(request, drop),
        user=who.name,
        can_review=auth.is_allowed(request, who, "PUT"),
        drop=drop,
        csp_nonce=csp_nonce(request),
        **context,
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def _pager(url: str, page: int, total: int, per_page: int) -> dict[str, Any]:
    """Where page ``page`` of ``total`` items lies, and the links to its neighbours."""
    pages = max(1, -(-total // per_page))
    first = (page - 1) * per_page
    return {
        "page": page,
        "pages": pages,
        "first": first,
        "last": min(first + per_page, total),
        "total": total,
        "previous_url": f"{url}?{urlencode({'page': page - 1})}" if page > 1 else None,
        "next_url": f"{url}?{urlencode({'page': page + 1})}" if page < pages else None,
    }


def _with_links(request: Request, drops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``drops`` with the links to each one's review queue and report."""
    for d in drops:
        if d["drop"]:
            d["review_url"] = drop_url(request, "review_page", d["drop"])
            d["report_url"] = drop_url(request, "report_page", d["drop"])
    return drops


def _drops_of_run(run_id: str) -> set[str]:
    from wbc_tasks.serving.predictions import files_seen, open_engine

    with open_engine(get_settings().predictions_db_url) as engine, engine.connect() as connection:
        query = select(files_seen.c.drop).where(files_seen.c.dag_run_id == run_id).distinct()
        return set(connection.execute(query).scalars())


def _review_labels() -> list[dict[str, str]]:
    """The queue's buttons in shortcut order: the nine classes, then unusable (keys 0 and u)."""
    unusable = "not a white cell / unusable"
    labels = [
        {"key": key, "name": name, "title": unusable if name == UNUSABLE else name}
        for key, name in SHORTCUTS.items()
        if key != "u"
    ]
    return labels[:9] + [{"key": "0 / u", "name": UNUSABLE, "title": unusable}]


@router.get("/", include_in_schema=False)
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(str(request.url_for("drops_page")), status_code=status.HTTP_303_SEE_OTHER)


@router.get("/schema", include_in_schema=False, name="api_schema")
def api_schema() -> RedirectResponse:
    return RedirectResponse("openapi.json")


@router.get("/drops", response_class=HTMLResponse, name="drops_page", summary="Drops (HTML)")
def drops_page(request: Request, who: PageReader, page: Annotated[int, Query(ge=1)] = 1) -> HTMLResponse:
    from wbc_tasks.serving.drop_summaries import count_drops, list_drops

    settings = get_settings()
    pager = _pager(str(request.url_for("drops_page")), page, count_drops(settings), DROPS_PER_PAGE)
    drops = list_drops(settings, limit=DROPS_PER_PAGE, offset=pager["first"])
    return _page(request, who, "drops", "Drops", heading="Drops", drops=_with_links(request, drops), pager=pager)


@router.get("/runs/{run_id}", response_class=HTMLResponse, summary="The drops a nightly run classified (HTML)")
def run_page(request: Request, run_id: str, who: PageReader) -> HTMLResponse:
    from wbc_tasks.serving.drop_summaries import drop_counts

    drops = drop_counts(get_settings(), sorted(_drops_of_run(run_id), reverse=True))
    heading = f"Drops of run {run_id}"
    return _page(request, who, "drops", f"Run {run_id}", heading=heading, drops=_with_links(request, drops), pager=None)


@router.get("/drops/{drop}/review", response_class=HTMLResponse, name="review_page", summary="Review queue (HTML)")
def review_page(request: Request, drop: str, who: PageReader, page: Annotated[int, Query(ge=1)] = 1) -> HTMLResponse:
    from wbc_tasks.serving.review_queue import review_queue

    whole = review_queue(get_settings(), drop)
    pager = _pager(drop_url(request, "review_page", drop), page, len(whole), QUEUE_PER_PAGE)
    queue = whole[pager["first"] : pager["last"]]
    image = str(request.url_for("thumbnail"))
    for cell in queue:
        cell["name"] = cell["path"].rsplit("/", 1)[-1]
        cell["image_url"] = f"{image}?{urlencode({'path': cell['path'], 'side': QUEUE_THUMBNAIL_SIDE})}"
    return _page(
        request,
        who,
        "review",
        f"Review {drop}",
        drop,
        queue=queue,
        queued=len(whole),
        pager=pager,
        reviewed=sum(1 for c in whole if c["latest_review"]),
        labels=_review_labels(),
        keymap=SHORTCUTS,
        review_endpoint=str(request.url_for("record_decision")),
    )


@router.get("/learning", response_class=HTMLResponse, name="learning_page", summary="Learning the lab's cells (HTML)")
def learning_page(request: Request, who: PageReader) -> HTMLResponse:
    from wbc_tasks.serving.lab_learning import learning_status

    settings = get_settings()
    return _page(
        request,
        who,
        "learning",
        "Learning",
        status=learning_status(settings),
        outcomes=OUTCOME_WORDS,
        champion_alias=settings.champion_alias,
    )


@router.get("/drops/{drop}/report", response_class=HTMLResponse, name="report_page", summary="Differential (HTML)")
def report_page(request: Request, drop: str, who: PageReader) -> HTMLResponse:
    # (No docstring: it would become the route's description in the OpenAPI schema.)
    from wbc_tasks.serving.report import ReportError, differential_report
    from wbc_tasks.serving.report_rendering import render_report

    try:
        # The lab's navigation bar is part of the report's template: its links and the user name
        # are escaped like every value of every page (a drop's name is anyone's folder name).
        links = _links(request, drop)
        nav = {"drops": links["drops"], "review": links["review"], "user": who.name}
        html = render_report(differential_report(get_settings(), drop), "html", nav=nav)
    except ReportError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
