"""The ``wbc-lab`` Airflow plugin (entry point ``airflow.plugins``): mounts the lab's app in the API
server at ``/lab`` and adds its pages to the Airflow UI: "WBC lab" in the navigation (the drops,
opened inside Airflow) and, on each run of the nightly DAG, the drops that run classified with
their review queue and differential report. Only this module imports Airflow at import time."""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

#: Where the app is mounted in the API server (not one of Airflow's reserved prefixes).
URL_PREFIX = "/lab"


def _fastapi_apps() -> list[dict[str, Any]]:
    from wbc_tasks.lab.app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "WBC lab"}]


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
