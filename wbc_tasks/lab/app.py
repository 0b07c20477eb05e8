"""The lab's FastAPI app (mounted by the plugin at ``/lab`` in Airflow's API server): the pages
of :mod:`.pages` and the endpoints of :mod:`.api`, every one behind the :class:`~.auth.LabAccess`
the app is created with."""

from __future__ import annotations

from fastapi import FastAPI

from wbc_tasks.lab import api, auth, pages
from wbc_tasks.lab.security import SecurityHeaders


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
    app.add_exception_handler(auth.LoginNeeded, auth.to_login)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.add_middleware(SecurityHeaders)
    return app
