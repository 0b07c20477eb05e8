"""The host name a Celery worker reports for the task instances it runs.

Airflow records ``socket.getfqdn()`` by default, which is the same for every worker on one machine
(the native stack runs its CPU and GPU workers side by side) and a bare container id under
docker-compose. Workers set ``WBC_WORKER_ROLE`` (``cpu``/``gpu``) and
``[core] hostname_callable = wbc_worker_hostname.worker_hostname``, so a task instance's
``hostname`` reads ``gpu@<host>`` — the same name as the Celery node (``--celery-hostname gpu@%h``,
where Celery's ``%h`` is ``socket.gethostname()``).
This file lives in Airflow's plugins folder, which Airflow puts on ``sys.path``.
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    """``<role>@<host name>`` when ``WBC_WORKER_ROLE`` is set, else the FQDN (Airflow's default)."""
    role = os.environ.get("WBC_WORKER_ROLE", "").strip()
    return f"{role}@{socket.gethostname()}" if role else socket.getfqdn()
