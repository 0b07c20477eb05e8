"""Who is calling, through Airflow's auth manager: the same login cookie as the Airflow UI and the
same bearer tokens as its REST API, no second user list.

Reading (pages, thumbnails, predictions) needs read access to the nightly DAG's runs; recording a
review needs edit access to them (``is_authorized_dag(method="PUT", access_entity=RUN)``): with
Airflow's Simple auth manager the USER, OP and ADMIN roles may review, VIEWER may only read; with
another auth manager (FAB, Keycloak) its own per-DAG permissions decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

#: The DAG whose runs write the predictions people review: its permissions are the lab's.
NIGHTLY_DAG_ID = "wbc_batch_classification"

#: Reads the ``Authorization: Bearer`` header without failing (the cookie may be used instead);
#: also puts the bearer scheme into the OpenAPI schema.
bearer_scheme = HTTPBearer(auto_error=False, description="An Airflow JWT from POST /auth/token")


@dataclass(frozen=True)
class LabUser:
    """The caller: Airflow's user object and its name."""

    name: str
    user: Any


async def authenticated(request: Request, credentials: HTTPAuthorizationCredentials | None) -> LabUser:
    """The logged-in Airflow user, by Airflow's own ``get_user`` (bearer token first, else the
    UI's ``_token`` cookie); 401 when there is none, 403 for an invalid token."""
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request, None, credentials)
    return LabUser(name=str(user.get_name()), user=user)


def is_allowed(who: LabUser, method: Literal["GET", "PUT"]) -> bool:
    """Whether ``who`` may read (GET) or edit (PUT) the nightly DAG's runs, per the auth manager."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return bool(
        get_auth_manager().is_authorized_dag(
            method=method,
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=NIGHTLY_DAG_ID),
            user=who.user,
        )
    )


def require(who: LabUser, method: Literal["GET", "PUT"]) -> None:
    """403 unless ``who`` may ``method`` the nightly DAG's runs."""
    if not is_allowed(who, method):
        action = "record reviews" if method == "PUT" else "see the lab's pages"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"user {who.name!r} may not {action}: it needs {'edit' if method == 'PUT' else 'read'} access "
            f"to the runs of the DAG {NIGHTLY_DAG_ID}",
        )


def login_url(request: Request) -> str:
    """Airflow's login page, coming back to this page afterwards."""
    from airflow.api_fastapi.app import get_auth_manager

    return str(get_auth_manager().get_url_login(next_url=str(request.url)))
