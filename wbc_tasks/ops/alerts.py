"""Failure alerts: a webhook POST, an e-mail and/or a custom callable when a DAG run fails.

The DAGs wire two Airflow callbacks here (Airflow is never imported; the callbacks pass their
context mapping in):

- :func:`alert_task_failure`, every task's ``on_failure_callback`` (a task failed with no retries
  left): it knows the task, the try number and the exception;
- :func:`alert_dag_failure`, the DAG's ``on_failure_callback``: it alerts only when no task alert
  went out for that DAG run (a run timed out, or a task was killed without its callback), so one
  failure gives one alert.

One alert per failing task and try per DAG run: a mapped task whose 32 chunks fail sends one,
not 32 (a marker file under ``<work dir>/alerts/`` records what was sent; if it cannot be
written, the alert goes out anyway).

Channels (all optional, all independent; settings in :mod:`wbc_tasks.core.settings`):

- ``WBC_ALERT_WEBHOOK_URL``: POST of :func:`failure_details` as JSON (with a ``text`` line, so a
  Slack/Mattermost/Teams incoming webhook shows it as is);
- ``WBC_ALERT_EMAIL``: plain-text e-mail through ``smtplib`` with ``WBC_SMTP_*`` (this package
  never imports Airflow, and core Airflow 3 no longer sends mail itself);
- ``WBC_ALERT_CALLBACK=module:function``: called with the same dict.

An alert never raises: every failure (unreachable webhook, SMTP refusal, a broken callable) is
logged and swallowed, so the task's own failure is what Airflow records. Network calls time out
after ``WBC_ALERT_TIMEOUT`` seconds. Logs name the webhook's host only (webhook URLs often carry
a token) and never the SMTP password; passwords in URLs and known secrets are masked in the
exception text that is sent.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import smtplib
import ssl
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from wbc_tasks.core.paths import safe_name
from wbc_tasks.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Longest exception text sent (the log has the whole traceback).
MAX_EXCEPTION_CHARS = 4000
ALERTS_DIR = "alerts"
#: Environment variables whose values never leave in an alert.
SECRET_ENV_VARS = (
    "WBC_SMTP_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "POSTGRES_PASSWORD",
    "AIRFLOW_ADMIN_PASSWORD",
)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


# --------------------------------------------------------------------------------------------
# What an alert says


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``; None when it is missing or reading it fails."""
    if obj is None:
        return None
    try:
        if isinstance(obj, Mapping):
            return obj.get(name)
        return getattr(obj, name, None)
    except Exception:  # e.g. a log_url property that needs configuration
        return None


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with URL passwords and the given/known secret values replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    values = [*secrets, *(os.environ.get(name, "") for name in SECRET_ENV_VARS)]
    for value in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def safe_url(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what logs may show of a webhook address."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
    except ValueError:
        return "<unparseable URL>"


def failure_details(
    context: Mapping[str, Any], *, kind: str = "task_failed", settings: Settings | None = None
) -> dict[str, Any]:
    """The alert's content from an Airflow callback context (missing parts are None)."""
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    dag_run = context.get("dag_run")
    dag_id = _get(dag, "dag_id") or _get(ti, "dag_id") or _get(dag_run, "dag_id")
    run_id = context.get("run_id") or _get(ti, "run_id") or _get(dag_run, "run_id")
    exception = context.get("exception")
    secrets = tuple(s for s in (settings.smtp_password, settings.alert_webhook_url) if s) if settings else ()
    text = None
    if exception is not None:
        text = exception if isinstance(exception, str) else f"{type(exception).__name__}: {exception}"
        text = redact(text, secrets)[:MAX_EXCEPTION_CHARS]
    map_index = _get(ti, "map_index")
    logical_date = context.get("logical_date") or _get(dag_run, "logical_date")
    details = {
        "event": kind,
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": _get(ti, "task_id"),
        "map_index": map_index if isinstance(map_index, int) and map_index >= 0 else None,
        "try_number": _get(ti, "try_number"),
        "max_tries": _get(ti, "max_tries"),
        "exception": text,
        "reason": context.get("reason"),
        "log_url": _get(ti, "log_url"),
        "hostname": _get(ti, "hostname"),
        "logical_date": str(logical_date) if logical_date is not None else None,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    details["text"] = summary_line(details)
    return details


def summary_line(details: Mapping[str, Any]) -> str:
    """One line for chat webhooks and the e-mail subject."""
    where = details.get("task_id") or "the DAG run"
    if details.get("map_index") is not None:
        where += f"[{details['map_index']}]"
    what = details.get("exception") or details.get("reason") or "failed"
    first = str(what).strip().splitlines()[0] if str(what).strip() else "failed"
    tries = f" (try {details['try_number']})" if details.get("try_number") else ""
    return f"WBC: {details.get('dag_id')} run {details.get('run_id')} failed in {where}{tries}: {first[:300]}"


# --------------------------------------------------------------------------------------------
# Channels (each raises on failure; send_alert contains them)


def post_webhook(url: str, payload: Mapping[str, Any], *, timeout: float) -> int:
    """POST ``payload`` as JSON; the HTTP status (raises on a connection error or >= 400)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"webhook URL scheme must be http or https, not {urlsplit(url).scheme!r}")
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "wbc-pipeline-alerts"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


def email_message(settings: Settings, details: Mapping[str, Any]) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = details["text"][:200]
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(settings.alert_email)
    lines = [details["text"], ""]
    for key in (
        "dag_id",
        "run_id",
        "task_id",
        "map_index",
        "try_number",
        "max_tries",
        "logical_date",
        "hostname",
        "reason",
        "log_url",
        "at",
    ):
        if details.get(key) is not None:
            lines.append(f"{key}: {details[key]}")
    if details.get("exception"):
        lines += ["", "exception:", str(details["exception"])]
    message.set_content("\n".join(lines) + "\n")
    return message


def send_email(settings: Settings, details: Mapping[str, Any]) -> None:
    """Send the alert to ``WBC_ALERT_EMAIL`` through ``WBC_SMTP_HOST`` (raises on failure)."""
    if not settings.smtp_host:
        raise ValueError("WBC_ALERT_EMAIL is set but WBC_SMTP_HOST is not")
    message = email_message(settings, details)
    context = ssl.create_default_context()
    if settings.smtp_port == 465:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            settings.smtp_host, settings.smtp_port, timeout=settings.alert_timeout, context=context
        )
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.alert_timeout)
    with smtp:
        smtp.ehlo()
        if settings.smtp_starttls and settings.smtp_port != 465:
            smtp.starttls(context=context)
            smtp.ehlo()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password or "")
        smtp.send_message(message)


def load_callable(spec: str) -> Any:
    """The function named ``module:function`` (``module.sub:obj.attr`` works too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"WBC_ALERT_CALLBACK={spec!r} is not module:function")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"WBC_ALERT_CALLBACK={spec!r} is not callable")
    return target


def send_alert(settings: Settings, details: Mapping[str, Any]) -> dict[str, str]:
    """Send ``details`` on every configured channel; ``{channel: "sent" | "failed: why"}``.

    Never raises: each channel's failure is logged (without secrets) and the others still go.
    """
    outcome: dict[str, str] = {}
    what = f"{details.get('dag_id')}/{details.get('run_id')}/{details.get('task_id') or '-'}"
    secrets = tuple(s for s in (settings.smtp_password, settings.alert_webhook_url) if s)

    def failed(channel: str, target: str, exc: BaseException) -> None:
        why = redact(f"{type(exc).__name__}: {exc}", secrets)
        outcome[channel] = f"failed: {why}"
        log.error("failure alert for %s via %s (%s) failed: %s", what, channel, target, why)

    if settings.alert_webhook_url:
        target = safe_url(settings.alert_webhook_url)
        try:
            status = post_webhook(settings.alert_webhook_url, details, timeout=settings.alert_timeout)
            outcome["webhook"] = "sent"
            log.info("failure alert for %s posted to webhook %s (HTTP %s)", what, target, status)
        except Exception as exc:
            failed("webhook", target, exc)
    if settings.alert_email:
        target = f"{settings.smtp_host}:{settings.smtp_port}"
        try:
            send_email(settings, details)
            outcome["email"] = "sent"
            log.info("failure alert for %s e-mailed to %s via %s", what, ", ".join(settings.alert_email), target)
        except Exception as exc:
            failed("email", target, exc)
    if settings.alert_callback:
        try:
            load_callable(settings.alert_callback)(dict(details))
            outcome["callback"] = "sent"
            log.info("failure alert for %s passed to %s", what, settings.alert_callback)
        except Exception as exc:
            failed("callback", settings.alert_callback, exc)
    if not outcome:
        log.info(
            "failure of %s: no alert channel configured (WBC_ALERT_WEBHOOK_URL, WBC_ALERT_EMAIL, WBC_ALERT_CALLBACK)",
            what,
        )
    return outcome


# --------------------------------------------------------------------------------------------
# One alert per failure


def _run_marker_dir(settings: Settings, dag_id: Any, run_id: Any) -> Any:
    return settings.work_dir / ALERTS_DIR / safe_name(str(dag_id)) / safe_name(str(run_id))


def claim_task_alert(settings: Settings, details: Mapping[str, Any]) -> bool:
    """True the first time a (DAG run, task, try) asks; False after (another mapped instance
    already alerted). True as well when the marker cannot be written: better twice than never."""
    folder = _run_marker_dir(settings, details.get("dag_id"), details.get("run_id"))
    name = safe_name(f"{details.get('task_id')}.try{details.get('try_number')}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        log.warning("could not record the alert in %s (%s); alerting anyway", folder, exc)
        return True


def task_alert_sent(settings: Settings, dag_id: Any, run_id: Any) -> bool:
    """Whether a task of this DAG run already sent its failure alert."""
    folder = _run_marker_dir(settings, dag_id, run_id)
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def alert_task_failure(context: Mapping[str, Any]) -> dict[str, str] | None:
    """A task's ``on_failure_callback``: alert once per (DAG run, task, try). Never raises."""
    try:
        settings = get_settings()
        details = failure_details(context, kind="task_failed", settings=settings)
        if not claim_task_alert(settings, details):
            log.info(
                "failure of %s/%s/%s already alerted (another mapped instance); not again",
                details["dag_id"],
                details["run_id"],
                details["task_id"],
            )
            return None
        return send_alert(settings, details)
    except Exception:
        log.exception("failure alert could not be prepared or sent (the task's own failure stands)")
        return None


def alert_dag_failure(context: Mapping[str, Any]) -> dict[str, str] | None:
    """A DAG's ``on_failure_callback``: alert unless a task alert already covered this run.
    Never raises."""
    try:
        settings = get_settings()
        details = failure_details(context, kind="dag_run_failed", settings=settings)
        if task_alert_sent(settings, details["dag_id"], details["run_id"]):
            log.info(
                "DAG run %s/%s failed; its failing task already sent the alert", details["dag_id"], details["run_id"]
            )
            return None
        return send_alert(settings, details)
    except Exception:
        log.exception("failure alert could not be prepared or sent (the DAG run's failure stands)")
        return None
