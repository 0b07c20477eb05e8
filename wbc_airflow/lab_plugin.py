"""The ``wbc-lab`` Airflow plugin (entry point ``airflow.plugins``): mounts the lab's app
(:mod:`wbc_tasks.lab`) in the API server at ``/lab``, with Airflow's auth manager deciding who the
caller is and what they may do, and adds its pages to the Airflow UI: "WBC lab" in the navigation
(the drops, opened inside Airflow) and, on each run of the nightly DAG, the drops that run
classified with their review queue and differential report.

Who is calling: the same login cookie as the Airflow UI and the same bearer tokens as its REST
API, no second user list. Reading needs read access to the nightly DAG's runs; recording a review
needs edit access to them (``is_authorized_dag(method="PUT", access_entity=RUN)``): with Airflow's
Simple auth manager the USER, OP and ADMIN roles may review, VIEWER may only read; with another
auth manager (FAB, Keycloak) its own per-DAG permissions decide.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials

from wbc_tasks.core.vocabulary import DagId
from wbc_tasks.lab.auth import LabUser, Method

#: Where the app is mounted in the API server (not one of Airflow's reserved prefixes).
URL_PREFIX = "/lab"


class AirflowAccess:
    """:class:`wbc_tasks.lab.auth.LabAccess` through Airflow's API server and auth manager."""

    async def identify(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> LabUser:
        """The logged-in Airflow user, by Airflow's own ``get_user`` (bearer token first, else the
        UI's ``_token`` cookie); 401 when there is none, 403 for an invalid token."""
        from airflow.api_fastapi.core_api.security import get_user

        user = await get_user(request, None, credentials)
        return LabUser(name=str(user.get_name()), user=user)

    def is_allowed(self, who: LabUser, method: Method) -> bool:
        """Whether ``who`` may read (GET) or edit (PUT) the nightly DAG's runs, per the auth manager."""
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

        return bool(
            get_auth_manager().is_authorized_dag(
                method=method,
                access_entity=DagAccessEntity.RUN,
                details=DagDetails(id=DagId.NIGHTLY),
                user=who.user,
            )
        )

    def login_url(self, request: Request) -> str:
        """Airflow's login page, coming back to this page afterwards."""
        from airflow.api_fastapi.app import get_auth_manager

        return str(get_auth_manager().get_url_login(next_url=str(request.url)))


def _fastapi_apps() -> list[dict[str, Any]]:
    from wbc_tasks.lab.app import create_app

    return [{"app": create_app(AirflowAccess()), "url_prefix": URL_PREFIX, "name": "WBC lab"}]


class LabPlugin(AirflowPlugin):
    """The lab's view inside Airflow."""

    name = "wbc_lab"
    fastapi_apps = _fastapi_apps()
    # hrefs are relative to the UI's base URL (no leading slash: works behind a proxy prefix).
    external_views = [
        {
            "name": "WBC lab: drops and review",
            "href": "lab/drops",
            "url_route": "wbc-lab",
            "destination": "nav",
            "category": "browse",
        },
        {
            "name": "WBC predictions API (OpenAPI)",
            "href": "lab/openapi.json",
            "destination": "nav",
            "category": "docs",
        },
        {
            "name": "Review and differential of this run's drops",
            "href": "lab/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "wbc-lab-run",
        },
    ]
