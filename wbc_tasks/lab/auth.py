"""Who is calling and what they may do, as the app sees it: a :class:`LabAccess` given to
:func:`wbc_tasks.lab.app.create_app` answers (inside Airflow, ``wbc_airflow.lab_plugin``'s, through
Airflow's auth manager). Reading (pages, thumbnails, predictions) needs read access to the nightly
DAG's runs; recording a review needs edit access to them. Also the dependencies the routes
declare: an API reader (401/403), a page reader (anonymous ones go to the login page) and the
cross-site request forgery guard of requests that change state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from wbc_tasks.core.vocabulary import DagId

#: Reads the ``Authorization: Bearer`` header without failing (the cookie may be used instead);
#: also puts the bearer scheme into the OpenAPI schema.
bearer_scheme = HTTPBearer(auto_error=False, description="An Airflow JWT from POST /auth/token")

Method = Literal["GET", "PUT"]


@dataclass(frozen=True)
class LabUser:
    """The caller: the access provider's user object and its name."""

    name: str
    user: Any


class LabAccess(Protocol):
    """Identity and permissions for the lab's app."""

    async def identify(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> LabUser:
        """The caller; ``HTTPException`` 401 when anonymous, 403 for an invalid token."""
        ...

    def is_allowed(self, who: LabUser, method: Method) -> bool:
        """Whether ``who`` may read (GET) or edit (PUT) the nightly DAG's runs."""
        ...

    def login_url(self, request: Request) -> str:
        """The login page, coming back to ``request``'s page afterwards."""
        ...


def access_of(request: Request) -> LabAccess:
    """The :class:`LabAccess` the app was created with."""
    access: LabAccess = request.app.state.lab_access
    return access


async def authenticated(request: Request, credentials: HTTPAuthorizationCredentials | None) -> LabUser:
    """The caller of ``request``; 401 when there is none, 403 for an invalid token."""
    return await access_of(request).identify(request, credentials)


def is_allowed(request: Request, who: LabUser, method: Method) -> bool:
    """Whether ``who`` may ``method`` the nightly DAG's runs."""
    return access_of(request).is_allowed(who, method)


def require(request: Request, who: LabUser, method: Method) -> None:
    """403 unless ``who`` may ``method`` the nightly DAG's runs."""
    if not is_allowed(request, who, method):
        action = "record reviews" if method == "PUT" else "see the lab's pages"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"user {who.name!r} may not {action}: it needs {'edit' if method == 'PUT' else 'read'} access "
            f"to the runs of the DAG {DagId.NIGHTLY.value}",
        )


def login_url(request: Request) -> str:
    """The login page, coming back to this page afterwards."""
    return access_of(request).login_url(request)


# --------------------------------------------------------------------------------------------
# What the routes depend on
# --------------------------------------------------------------------------------------------

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


class LoginNeeded(Exception):
    """An anonymous request for a page: answered with a redirect to the login page
    (:func:`to_login`, the app's handler of this exception)."""


async def to_login(request: Request, exc: Exception) -> RedirectResponse:
    """The answer to :class:`LoginNeeded`: the login page, coming back here afterwards."""
    return RedirectResponse(login_url(request), status_code=status.HTTP_303_SEE_OTHER)


async def api_reader(request: Request, credentials: Credentials) -> LabUser:
    """An API caller who may read: 401 anonymous, 403 without read access."""
    who = await authenticated(request, credentials)
    require(request, who, "GET")
    return who


async def page_reader(request: Request, credentials: Credentials) -> LabUser:
    """A page's reader: anonymous ones go to the login page and come back."""
    try:
        who = await authenticated(request, credentials)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            raise LoginNeeded from exc
        raise
    require(request, who, "GET")
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
