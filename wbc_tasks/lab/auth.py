"""Who is calling and what they may do, as the app sees it: a :class:`LabAccess` given to
:func:`wbc_tasks.lab.app.create_app` answers (inside Airflow, ``wbc_airflow.lab_plugin``'s, through
Airflow's auth manager). Reading (pages, thumbnails, predictions) needs read access to the nightly
DAG's runs; recording a review needs edit access to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

#: The DAG whose runs write the predictions people review: its permissions are the lab's.
NIGHTLY_DAG_ID = "wbc_batch_classification"

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
            f"to the runs of the DAG {NIGHTLY_DAG_ID}",
        )


def login_url(request: Request) -> str:
    """The login page, coming back to this page afterwards."""
    return access_of(request).login_url(request)
