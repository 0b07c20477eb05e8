"""The lab's FastAPI app (mounted by the plugin at ``/lab`` in Airflow's API server): the pages,
the thumbnails, the review endpoint and the predictions table, every one behind Airflow's auth
(:mod:`.auth`). Handlers that touch the database are plain ``def``: FastAPI runs them in its
thread pool, so a slow query never blocks the API server's event loop."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from sqlalchemy import select

from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import CLASS_NAMES, REVIEW_REASONS
from wbc_tasks.lab import auth
from wbc_tasks.lab.auth import LabUser, bearer_scheme
from wbc_tasks.lab.templates import render

#: Keyboard shortcuts: 1-9 the nine classes in the project's order, 0 or u unusable.
SHORTCUTS: dict[str, str] = {str(i + 1): name for i, name in enumerate(CLASS_NAMES)}
SHORTCUTS |= {"0": "unusable", "u": "unusable"}
THUMBNAIL_SIDES = (128, 256, 512)
_FORMATS: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
}
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


class _LoginNeeded(Exception):
    """An anonymous request for a page: answered with a redirect to Airflow's login page."""


async def api_reader(request: Request, credentials: Credentials) -> LabUser:
    """An API caller who may read: 401 anonymous, 403 without read access."""
    who = await auth.authenticated(request, credentials)
    auth.require(request, who, "GET")
    return who


async def page_reader(request: Request, credentials: Credentials) -> LabUser:
    """A page's reader: anonymous ones go to Airflow's login page and come back."""
    try:
        who = await auth.authenticated(request, credentials)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            raise _LoginNeeded from exc
        raise
    auth.require(request, who, "GET")
    return who


Reader = Annotated[LabUser, Depends(api_reader)]
PageReader = Annotated[LabUser, Depends(page_reader)]


def same_origin_json(request: Request) -> None:
    """Cross-site request forgery guard of state-changing requests: the body must be JSON (an
    HTML form cannot send that content type, and a cross-site script cannot without a CORS
    preflight this app never grants) and a browser's Origin, when sent, must be this server."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the decision as application/json")
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site requests may not record reviews")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"origin {origin} is not this server")


class Decision(BaseModel):
    """A reviewer's decision on one cell."""

    path: str = Field(description="The file, relative to the classify folder, as in the predictions table")
    label: str = Field(description=f"One of {', '.join((*CLASS_NAMES, 'unusable'))}")
    sha256: str | None = Field(None, description="The content reviewed (default: the file's newest)")
    model_version: str | None = Field(None, description="The version whose prediction was shown")
    note: str | None = Field(None, max_length=2000)


def _links(request: Request, drop: str | None = None) -> dict[str, str]:
    base = str(request.url_for("predictions"))
    links = {
        "drops": str(request.url_for("drops_page")),
        "api_docs": str(request.url_for("api_schema")),
        "csv": f"{base}?format=csv",
        "json": f"{base}?format=json",
        "parquet": f"{base}?format=parquet",
    }
    if drop:
        links["review"] = str(request.url_for("review_page", drop=drop))
        links["report"] = str(request.url_for("report_page", drop=drop))
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
        **context,
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def create_app(access: auth.LabAccess) -> FastAPI:
    """The app the plugin mounts, ``access`` deciding who calls and what they may do; its OpenAPI
    schema is ``/lab/openapi.json`` (no /docs page: Swagger UI loads its assets from a CDN the API
    server may not reach)."""
    app = FastAPI(
        title="WBC lab",
        description="The lab's view of the WBC classifier: drops, review queue, differential report and the "
        "predictions table. For research use only. Authenticate with an Airflow token "
        "(POST /auth/token) or the Airflow UI's login.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.lab_access = access

    @app.exception_handler(_LoginNeeded)
    async def to_login(request: Request, exc: _LoginNeeded) -> RedirectResponse:
        return RedirectResponse(auth.login_url(request), status_code=status.HTTP_303_SEE_OTHER)

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> RedirectResponse:
        return RedirectResponse(str(request.url_for("drops_page")), status_code=status.HTTP_303_SEE_OTHER)

    @app.get("/schema", include_in_schema=False, name="api_schema")
    def api_schema() -> RedirectResponse:
        return RedirectResponse("openapi.json")

    @app.get("/drops", response_class=HTMLResponse, name="drops_page", summary="Drops (HTML)")
    def drops_page(request: Request, who: PageReader) -> HTMLResponse:
        return _page(request, who, "drops", "Drops", heading="Drops", drops=_drops(request))

    @app.get("/runs/{run_id}", response_class=HTMLResponse, summary="The drops a nightly run classified (HTML)")
    def run_page(request: Request, run_id: str, who: PageReader) -> HTMLResponse:
        chosen = _drops_of_run(run_id)
        drops = [d for d in _drops(request) if d["drop"] in chosen]
        return _page(request, who, "drops", f"Run {run_id}", heading=f"Drops of run {run_id}", drops=drops)

    @app.get("/drops/{drop}/review", response_class=HTMLResponse, name="review_page", summary="Review queue (HTML)")
    def review_page(request: Request, drop: str, who: PageReader) -> HTMLResponse:
        from wbc_tasks.serving.reviews import review_queue

        queue = review_queue(get_settings(), drop)
        image = str(request.url_for("thumbnail"))
        for cell in queue:
            cell["name"] = cell["path"].rsplit("/", 1)[-1]
            cell["image_url"] = f"{image}?{_query(path=cell['path'], side=256)}"
        labels = [
            {"key": key, "name": name, "title": "not a white cell / unusable" if name == "unusable" else name}
            for key, name in SHORTCUTS.items()
            if key != "u"
        ]
        labels = labels[:9] + [{"key": "0 / u", "name": "unusable", "title": "not a white cell / unusable"}]
        return _page(
            request,
            who,
            "review",
            f"Review {drop}",
            drop,
            queue=queue,
            reviewed=sum(1 for c in queue if c["latest_review"]),
            labels=labels,
            keymap=SHORTCUTS,
            review_endpoint=str(request.url_for("record_decision")),
        )

    @app.get("/drops/{drop}/report", response_class=HTMLResponse, name="report_page", summary="Differential (HTML)")
    def report_page(request: Request, drop: str, who: PageReader) -> HTMLResponse:
        from wbc_tasks.serving.report import ReportError, differential_report, render_report

        try:
            html = render_report(differential_report(get_settings(), drop), "html")
        except ReportError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        links = _links(request, drop)
        bar = (
            '<p style="font-family: system-ui, sans-serif; font-size: 18px">'
            f'<a href="{_escape(links["drops"])}">All drops</a> · '
            f'<a href="{_escape(links["review"])}">Review queue of this drop</a>'
            f" · signed in as {_escape(who.name)}</p>"
        )
        return HTMLResponse(re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + bar, html, count=1))

    @app.get("/image", name="thumbnail", summary="A cell's thumbnail (JPEG), read from the original file")
    def thumbnail(
        who: Reader,
        path: Annotated[str, Query(description="The file, relative to the classify folder")],
        side: Annotated[int, Query(description="Longest side in pixels")] = 256,
    ) -> Response:
        from wbc_tasks.data.images import ImageError, thumbnail_jpeg
        from wbc_tasks.serving.reviews import ReviewError, review_image_path

        if side not in THUMBNAIL_SIDES:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"side must be one of {THUMBNAIL_SIDES}")
        settings = get_settings()
        try:
            # The path is checked (relative, no '..', inside the classify/archive/allowed folders,
            # links resolved) before anything is opened; the file is only read.
            file = review_image_path(settings, path)
            data = thumbnail_jpeg(file, side, max_pixels=settings.max_image_pixels)
        except ReviewError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
        except ImageError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image {path!r}: {exc.reason}") from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/drops", summary="Every drop with its counts")
    def drops_api(who: Reader) -> list[dict[str, Any]]:
        from wbc_tasks.serving.reviews import list_drops

        return list_drops(get_settings())

    @app.get("/api/drops/{drop}/queue", summary="A drop's review queue")
    def queue_api(drop: str, who: Reader) -> JSONResponse:
        from fastapi.encoders import jsonable_encoder

        from wbc_tasks.serving.reviews import review_queue

        return JSONResponse(jsonable_encoder(review_queue(get_settings(), drop)))

    @app.post(
        "/api/reviews",
        name="record_decision",
        status_code=status.HTTP_201_CREATED,
        summary="Record a decision on a cell (needs edit access to the nightly DAG's runs)",
        dependencies=[Depends(same_origin_json)],
    )
    def record_decision(request: Request, decision: Decision, who: Reader) -> JSONResponse:
        from fastapi.encoders import jsonable_encoder

        from wbc_tasks.serving.reviews import ReviewError, record_review

        auth.require(request, who, "PUT")
        try:
            row = record_review(
                get_settings(),
                decision.path,
                decision.label,
                reviewer=who.name,
                note=decision.note,
                sha256=decision.sha256,
                model_version=decision.model_version,
            )
        except ReviewError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        return JSONResponse(jsonable_encoder(row), status_code=status.HTTP_201_CREATED)

    @app.get(
        "/api/predictions",
        name="predictions",
        summary="The predictions table (as `wbc predictions`), streamed",
        response_class=StreamingResponse,
        responses={200: {"content": {media: {} for media in _FORMATS.values()}}},
    )
    def predictions(
        who: Reader,
        format: Literal["csv", "json", "parquet"] = "csv",
        drop: str | None = None,
        since: Annotated[datetime | None, Query(description="Files seen / predictions made at or after (UTC)")] = None,
        predicted_class: Annotated[str | None, Query(alias="class", description="Predicted class")] = None,
        needs_review: bool | None = None,
        review_reason: Annotated[Literal[REVIEW_REASONS] | None, Query()] = None,  # type: ignore[valid-type]
        model_version: str | None = None,
        latest: Annotated[bool, Query(description="Only each file's newest prediction")] = False,
    ) -> StreamingResponse:
        from wbc_tasks.serving.queries import (
            PredictionFilter,
            stream_csv,
            stream_json,
            stream_parquet,
            stream_predictions,
            stream_probability_columns,
        )

        settings = get_settings()
        where = PredictionFilter(
            drop=drop,
            since=since,
            predicted_class=predicted_class,
            needs_review=needs_review,
            review_reason=review_reason,
            model_version=model_version,
            latest=latest,
        )
        rows = stream_predictions(settings, where)
        if format == "json":
            body = stream_json(rows)
        else:
            classes = stream_probability_columns(settings, model_version=model_version)
            body = stream_csv(rows, classes) if format == "csv" else stream_parquet(rows, classes)
        return StreamingResponse(
            body,
            media_type=_FORMATS[format],
            headers={"Content-Disposition": f'attachment; filename="predictions.{format}"'},
        )

    return app


def _query(**params: Any) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


def _drops(request: Request) -> list[dict[str, Any]]:
    from wbc_tasks.serving.reviews import list_drops

    drops = list_drops(get_settings())
    for d in drops:
        if d["drop"]:
            d["review_url"] = str(request.url_for("review_page", drop=d["drop"]))
            d["report_url"] = str(request.url_for("report_page", drop=d["drop"]))
    return drops


def _drops_of_run(run_id: str) -> set[str]:
    from wbc_tasks.serving.predictions import files_seen, open_engine

    with open_engine(get_settings().predictions_db_url) as engine, engine.connect() as connection:
        query = select(files_seen.c.drop).where(files_seen.c.dag_run_id == run_id).distinct()
        return set(connection.execute(query).scalars())
