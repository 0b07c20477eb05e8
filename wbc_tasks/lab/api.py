"""The lab's endpoints for programs and the pages' scripts: a cell's thumbnail (read from the
original file through the allowed-folder checks), the drops, a drop's review queue and the lab's
learning status as JSON,
recording a decision (edit access, JSON from this origin only) and the predictions table
streamed as CSV, JSON or Parquet. Every one answers 401/403 rather than redirecting. Handlers
that touch the database are plain ``def``: FastAPI runs them in its thread pool."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import REVIEW_REASONS
from wbc_tasks.lab import auth
from wbc_tasks.lab.auth import Reader, same_origin_json
from wbc_tasks.serving.review_decisions import REVIEW_LABELS

THUMBNAIL_SIDES = (128, 256, 512)
_FORMATS: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
}

router = APIRouter()


class Decision(BaseModel):
    """A reviewer's decision on one cell."""

    path: str = Field(description="The file, relative to the classify folder, as in the predictions table")
    label: str = Field(description=f"One of {', '.join(REVIEW_LABELS)}")
    sha256: str | None = Field(None, description="The content reviewed (default: the file's newest)")
    model_version: str | None = Field(None, description="The version whose prediction was shown")
    note: str | None = Field(None, max_length=2000)


@router.get("/image", name="thumbnail", summary="A cell's thumbnail (JPEG), read from the original file")
def thumbnail(
    who: Reader,
    path: Annotated[str, Query(description="The file, relative to the classify folder")],
    side: Annotated[int, Query(description="Longest side in pixels")] = 256,
) -> Response:
    from wbc_tasks.data.images import ImageError, thumbnail_jpeg
    from wbc_tasks.serving.review_decisions import ReviewError
    from wbc_tasks.serving.review_export import review_image_path

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


Limit = Annotated[
    int | None, Query(ge=1, le=10_000, description="At most this many (default: all; the total is in X-Total-Count)")
]
Offset = Annotated[int, Query(ge=0, description="Skip this many first")]


@router.get("/api/drops", summary="The drops with their counts, newest first (paged with limit and offset)")
def drops_api(response: Response, who: Reader, limit: Limit = None, offset: Offset = 0) -> list[dict[str, Any]]:
    from wbc_tasks.serving.drop_summaries import count_drops, list_drops

    settings = get_settings()
    if limit is None:  # every drop, as before paging existed
        every = list_drops(settings)
        response.headers["X-Total-Count"] = str(len(every))
        return every[offset:]
    response.headers["X-Total-Count"] = str(count_drops(settings))
    return list_drops(settings, limit=limit, offset=offset)


@router.get("/api/drops/{drop}/queue", summary="A drop's review queue (paged with limit and offset)")
def queue_api(drop: str, who: Reader, limit: Limit = None, offset: Offset = 0) -> JSONResponse:
    from wbc_tasks.serving.review_queue import review_queue

    queue = review_queue(get_settings(), drop)
    page = queue[offset : None if limit is None else offset + limit]
    return JSONResponse(jsonable_encoder(page), headers={"X-Total-Count": str(len(queue))})


@router.get("/api/learning", name="learning_api", summary="The lab's reviews and the versions that learned them")
def learning_api(who: Reader) -> JSONResponse:
    from wbc_tasks.serving.lab_learning import learning_status

    found = learning_status(get_settings()).as_dict()
    return JSONResponse(jsonable_encoder(found), headers={"Cache-Control": "no-store"})


@router.post(
    "/api/reviews",
    name="record_decision",
    status_code=status.HTTP_201_CREATED,
    summary="Record a decision on a cell (needs edit access to the nightly DAG's runs)",
    dependencies=[Depends(same_origin_json)],
)
def record_decision(request: Request, decision: Decision, who: Reader) -> JSONResponse:
    from wbc_tasks.serving.review_decisions import ReviewError, record_review

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


@router.get(
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
    from wbc_tasks.serving.export import PredictionFilter
    from wbc_tasks.serving.export_formats import stream_csv, stream_json, stream_parquet
    from wbc_tasks.serving.export_stream import stream_columns, stream_predictions, stream_probability_columns

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
    if format == "json":
        body = stream_json(stream_predictions(settings, where))
    else:
        classes = stream_probability_columns(settings, model_version=model_version)
        batches = stream_columns(settings, where)
        body = stream_csv(batches, classes) if format == "csv" else stream_parquet(batches, classes)
    return StreamingResponse(
        body,
        media_type=_FORMATS[format],
        headers={"Content-Disposition": f'attachment; filename="predictions.{format}"'},
    )
