"""Health checks: whether each service of a running stack answers, and waiting until all do.

MLflow answers ``/health``; the Airflow api-server reports itself (its metadata database), the
scheduler, the dag-processor and the triggerer on its public ``/api/v2/monitor/health``; each
Celery worker must answer a ping through the stack's broker, under the node name its role gives
it. ``wait_healthy`` is the last step of start: it fails naming the services that exited or are
still not healthy, with their log files.

Imports: ``config`` and ``processes`` of this package; celery lazily.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from .config import StackConfig, StackError, load_topology, process_specs
from .processes import running_pid


def _http_status(url: str, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def airflow_health(config: StackConfig) -> dict[str, str]:
    """Component -> status from the api-server's public ``/api/v2/monitor/health``."""
    url = f"{config.api_url}/api/v2/monitor/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return {key: str(value.get("status")) for key, value in body.items() if isinstance(value, dict)}


def worker_nodes(config: StackConfig) -> dict[str, str]:
    """Service name -> Celery node name of each worker."""
    from celery.utils.nodenames import host_format

    return {
        service["name"]: host_format(f"{service['role']}@%h")
        for service in load_topology()["services"]
        if service.get("role")
    }


def ping_workers(config: StackConfig) -> set[str]:
    """Celery node names that answer a ping through the stack's broker."""
    from celery import Celery

    app = Celery(broker=config.redis_url)
    app.conf.broker_transport_options = {"global_keyprefix": f"{config.prefix}:"}
    app.conf.broker_connection_retry_on_startup = False
    try:
        nodes = list(worker_nodes(config).values())
        replies = app.control.ping(destination=nodes, timeout=1.5)
    except Exception:
        return set()
    finally:
        app.close()
    return {node for reply in replies for node in reply}


def health(config: StackConfig) -> dict[str, bool]:
    """Service name -> healthy, for every service the native stack runs."""
    result = {"mlflow": _http_status(f"{config.mlflow_url}/health") == 200}
    components = airflow_health(config)
    result["airflow-apiserver"] = components.get("metadatabase") == "healthy"
    result["airflow-scheduler"] = components.get("scheduler") == "healthy"
    result["airflow-dag-processor"] = components.get("dag_processor") == "healthy"
    result["airflow-triggerer"] = components.get("triggerer") == "healthy"
    nodes = worker_nodes(config)
    # A ping waits its full timeout for absent workers: skip it while none runs.
    any_worker = any(running_pid(config, name) for name in nodes)
    answered = ping_workers(config) if any_worker else set()
    for name, node in nodes.items():
        result[name] = node in answered
    return result


def wait_healthy(config: StackConfig, secret: dict[str, str], timeout: float) -> None:
    """Block until every service reports healthy; raise naming the laggards and their logs."""
    deadline = time.monotonic() + timeout
    state: dict[str, bool] = {}
    while time.monotonic() < deadline:
        dead = [
            name for name in (s.name for s in process_specs(config, secret))
            if running_pid(config, name) is None
        ]  # fmt: skip
        if dead:
            logs = ", ".join(str(config.log_dir / f"{n}.log") for n in dead)
            raise StackError(
                f"{', '.join(dead)} exited during start-up: see {logs} "
                f"(the rest is still running: stack/stop --prefix {config.prefix})"
            )
        state = health(config)
        if all(state.values()):
            return
        time.sleep(2)
    lagging = [name for name, ok in state.items() if not ok]
    logs = ", ".join(str(config.log_dir / f"{n}.log") for n in lagging)
    raise StackError(
        f"not healthy after {timeout:.0f} s: {', '.join(lagging)} (see {logs}; "
        f"stack/stop --prefix {config.prefix} stops what started)"
    )
