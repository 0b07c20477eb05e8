"""Failure alerts against real local servers: an HTTP server receiving the webhook and a small
SMTP server receiving the e-mail (both threads in this process), then real ``dag.test()`` runs
of both DAGs whose failing task sends the alert."""

from __future__ import annotations

import base64
import email
import email.policy
import socket
import socketserver
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import parse_dag
from tests.local_servers import TOKEN, Webhook
from wbc_tasks.core.settings import get_settings
from wbc_tasks.core.vocabulary import DagId

SMTP_PASSWORD = "smtp-pa55word-xyz"

# --------------------------------------------------------------------------- local servers


class SmtpSink:
    """A minimal SMTP server (EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT; no STARTTLS) keeping
    every message and login it receives."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.logins: list[tuple[str, str]] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ready")
                sender, recipients = None, []
                while line := self.rfile.readline():
                    command = line.decode().rstrip("\r\n")
                    verb = command.split(" ", 1)[0].upper()
                    if verb == "EHLO":
                        self.reply("250-sink")
                        self.reply("250 AUTH PLAIN")
                    elif verb == "AUTH":
                        _, _, user, password = (b"\0" + base64.b64decode(command.split()[2])).split(b"\0")
                        sink.logins.append((user.decode(), password.decode()))
                        self.reply("235 ok")
                    elif verb == "MAIL":
                        sender = command.split(":", 1)[1].strip(" <>")
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        recipients.append(command.split(":", 1)[1].strip(" <>"))
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go on")
                        data = []
                        while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                            data.append(chunk)
                        sink.messages.append({"from": sender, "to": recipients, "data": b"".join(data).decode()})
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 not implemented")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def smtp():
    sink = SmtpSink()
    yield sink
    sink.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def alert_env(settings, monkeypatch, tmp_path):
    """Isolated settings; channels are switched on by each test."""
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_ALERT_TIMEOUT", "5")
    return monkeypatch


def use_webhook(monkeypatch, url: str) -> None:
    monkeypatch.setenv("WBC_ALERT_WEBHOOK_URL", url)


def use_email(monkeypatch, sink: SmtpSink, *, starttls: bool = False) -> None:
    monkeypatch.setenv("WBC_ALERT_EMAIL", "lab-oncall@example.org, ml-team@example.org")
    monkeypatch.setenv("WBC_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("WBC_SMTP_PORT", str(sink.port))
    monkeypatch.setenv("WBC_SMTP_USER", "wbc-alerts")
    monkeypatch.setenv("WBC_SMTP_PASSWORD", SMTP_PASSWORD)
    monkeypatch.setenv("WBC_SMTP_STARTTLS", "true" if starttls else "false")


def failed_task_context(
    *,
    task_id: str = "train_model",
    try_number: int = 3,
    map_index: int = -1,
    run_id: str = "manual__2026-11-25T10:00:00+00:00",
    error: Exception | None = None,
) -> dict:
    """A context shaped like the one Airflow passes a task's on_failure_callback."""
    ti = SimpleNamespace(
        dag_id="wbc_training",
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        try_number=try_number,
        max_tries=2,
        hostname="gpu-worker-1",
        log_url=f"http://airflow:8080/dags/wbc_training/runs/{run_id}/tasks/{task_id}",
    )
    return {
        "ti": ti,
        "run_id": run_id,
        "dag": SimpleNamespace(dag_id="wbc_training"),
        "exception": error or RuntimeError("CUDA out of memory"),
    }


RECEIVED: list[dict] = []


def record_alert(details: dict) -> None:
    """A custom WBC_ALERT_CALLBACK target."""
    RECEIVED.append(details)


def explode(details: dict) -> None:
    raise RuntimeError("pager service down")


# --------------------------------------------------------------------------- channels


def test_webhook_receives_the_failure_as_json(alert_env, webhook):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_webhook(alert_env, webhook.url)
    outcome = alert_task_failure(failed_task_context())

    assert outcome == {"webhook": "sent"}
    [post] = webhook.posts
    assert post["path"] == f"/hooks/{TOKEN}" and post["content_type"] == "application/json"
    body = post["json"]
    assert body["event"] == "task_failed" and body["dag_id"] == "wbc_training"
    assert body["run_id"] == "manual__2026-11-25T10:00:00+00:00"
    assert body["task_id"] == "train_model" and body["try_number"] == 3 and body["map_index"] is None
    assert body["exception"] == "RuntimeError: CUDA out of memory"
    assert body["log_url"].endswith("/tasks/train_model") and body["hostname"] == "gpu-worker-1"
    assert body["text"].startswith("WBC: wbc_training run manual__2026-11-25T10:00:00+00:00 failed in train_model")


def test_email_through_a_local_smtp_server_with_login(alert_env, smtp, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_email(alert_env, smtp)
    caplog.set_level("DEBUG")
    outcome = alert_task_failure(failed_task_context())

    assert outcome == {"email": "sent"}
    assert smtp.logins == [("wbc-alerts", SMTP_PASSWORD)]
    [mail] = smtp.messages
    assert mail["from"] == "wbc-pipeline@localhost"
    assert mail["to"] == ["lab-oncall@example.org", "ml-team@example.org"]
    message = email.message_from_string(mail["data"], policy=email.policy.default)
    assert message["Subject"].startswith(
        "WBC: wbc_training run manual__2026-11-25T10:00:00+00:00 failed in train_model"
    )
    body = message.get_content()
    assert "RuntimeError: CUDA out of memory" in body and "try_number: 3" in body and "log_url: http://" in body
    assert SMTP_PASSWORD not in caplog.text


def test_starttls_is_required_by_default_so_no_password_goes_in_clear(alert_env, smtp, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_email(alert_env, smtp, starttls=True)  # the sink offers no STARTTLS
    outcome = alert_task_failure(failed_task_context())

    assert outcome["email"].startswith("failed: SMTPNotSupportedError")
    assert smtp.logins == [] and smtp.messages == []
    assert "failure alert for wbc_training/" in caplog.text and SMTP_PASSWORD not in caplog.text


def test_unreachable_webhook_is_logged_and_email_still_goes(alert_env, smtp, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_webhook(alert_env, f"http://127.0.0.1:{closed_port()}/hooks/{TOKEN}")
    use_email(alert_env, smtp)
    outcome = alert_task_failure(failed_task_context())  # no exception

    assert outcome["webhook"].startswith("failed:") and outcome["email"] == "sent"
    assert len(smtp.messages) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "via webhook (http://127.0.0.1:" in errors[0].getMessage()
    assert TOKEN not in caplog.text  # the webhook's secret path never reaches the logs


def test_a_hanging_webhook_times_out(alert_env, webhook):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_webhook(alert_env, webhook.url)
    alert_env.setenv("WBC_ALERT_TIMEOUT", "0.5")
    webhook.delay = 5.0
    outcome = alert_task_failure(failed_task_context())

    assert outcome["webhook"].startswith("failed:") and "timed out" in outcome["webhook"]


def test_webhook_error_status_is_logged_not_raised(alert_env, webhook, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_webhook(alert_env, webhook.url)
    webhook.status = 500
    outcome = alert_task_failure(failed_task_context())

    assert outcome["webhook"].startswith("failed: HTTPError") and len(webhook.posts) == 1
    assert "HTTP Error 500" in caplog.text


def test_custom_callback_is_called_and_broken_ones_are_contained(alert_env, webhook, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    RECEIVED.clear()
    alert_env.setenv("WBC_ALERT_CALLBACK", "tests.ops.test_alerts:record_alert")
    assert alert_task_failure(failed_task_context(try_number=1)) == {"callback": "sent"}
    assert RECEIVED[0]["task_id"] == "train_model" and RECEIVED[0]["exception"].startswith("RuntimeError")

    use_webhook(alert_env, webhook.url)
    alert_env.setenv("WBC_ALERT_CALLBACK", "tests.ops.test_alerts:explode")
    outcome = alert_task_failure(failed_task_context(try_number=2))
    assert outcome == {"webhook": "sent", "callback": "failed: RuntimeError: pager service down"}

    alert_env.setenv("WBC_ALERT_CALLBACK", "no_such_module_here:notify")
    outcome = alert_task_failure(failed_task_context(try_number=3))
    assert outcome["callback"].startswith("failed: ModuleNotFoundError") and len(webhook.posts) == 2


def test_passwords_are_masked_in_what_is_sent(alert_env, webhook, smtp):
    from wbc_tasks.ops.alerts import alert_task_failure

    use_webhook(alert_env, webhook.url)
    use_email(alert_env, smtp)
    error = RuntimeError(
        f"could not connect to postgresql://wbc:db-pa55@postgres/predictions; login {SMTP_PASSWORD} refused"
    )
    alert_task_failure(failed_task_context(error=error))

    sent = webhook.posts[0]["json"]["exception"]
    assert sent == "RuntimeError: could not connect to postgresql://wbc:***@postgres/predictions; login *** refused"
    assert "db-pa55" not in smtp.messages[0]["data"] and SMTP_PASSWORD not in smtp.messages[0]["data"]


def test_no_channel_configured_is_quiet(alert_env, caplog):
    from wbc_tasks.ops.alerts import alert_task_failure

    caplog.set_level("INFO")
    assert alert_task_failure(failed_task_context()) == {}
    assert "no alert channel configured" in caplog.text


def test_an_alert_never_raises_even_with_broken_settings(alert_env, caplog):
    from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure

    alert_env.setenv("WBC_ALERT_TIMEOUT", "soon")  # get_settings() raises
    assert alert_task_failure(failed_task_context()) is None
    assert alert_dag_failure({"run_id": "x"}) is None
    assert "failure alert could not be prepared or sent" in caplog.text


def test_one_alert_per_failing_task_try_and_dag_run(alert_env, webhook):
    from wbc_tasks.ops.alerts import alert_dag_failure, alert_task_failure

    use_webhook(alert_env, webhook.url)
    for chunk in range(4):  # a mapped task whose every chunk fails
        alert_task_failure(failed_task_context(task_id="classify_chunk", map_index=chunk, try_number=3))
    assert len(webhook.posts) == 1 and webhook.posts[0]["json"]["map_index"] == 0

    alert_task_failure(
        failed_task_context(task_id="classify_chunk", map_index=0, try_number=4)
    )  # cleared, failed again
    assert len(webhook.posts) == 2

    run = failed_task_context()["run_id"]
    alert_dag_failure({"run_id": run, "dag": SimpleNamespace(dag_id="wbc_training"), "reason": "task_failure"})
    assert len(webhook.posts) == 2  # the task alert already covered this run

    alert_dag_failure(
        {"run_id": "scheduled__timed-out", "dag": SimpleNamespace(dag_id="wbc_training"), "reason": "timed_out"}
    )
    assert len(webhook.posts) == 3
    assert webhook.posts[2]["json"]["event"] == "dag_run_failed"
    assert webhook.posts[2]["json"]["reason"] == "timed_out" and webhook.posts[2]["json"]["task_id"] is None


# --------------------------------------------------------------------------- the DAGs' wiring


@pytest.mark.parametrize("dag_id", [d.value for d in DagId])
def test_every_task_and_dag_alerts_on_failure(settings, dag_id):
    dag = parse_dag(dag_id)
    trains = dag_id in (DagId.TRAINING, DagId.ADAPTATION)

    def names_of(callbacks) -> list[str]:  # one callable or a list (mapped tasks keep it as given)
        return [cb.__name__ for cb in (callbacks if isinstance(callbacks, list) else [callbacks])]

    for task in dag.tasks:
        expected = ["alert_task_failure"]
        if trains:  # the worker closes the MLflow run (no dag-processor time limit)
            expected.append("close_mlflow_run")
        assert names_of(task.on_failure_callback) == expected, task.task_id
    names = names_of(dag.on_failure_callback)
    assert names[0] == "alert_dag_failure"
    if trains:  # chained with, not instead of, closing the MLflow run
        assert names == ["alert_dag_failure", "close_mlflow_run"]  # the one callback of dag_helpers


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    """One SQLite MLflow for the DAG runs below (creating its tables takes seconds); no model
    is ever registered in it."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def dag_env(airflow_db, alert_env, tmp_path, webhook, mlflow_dir):
    for name, value in {
        "WBC_MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "WBC_MLFLOW_ARTIFACT_ROOT": str(mlflow_dir / "artifacts"),
        "WBC_MLFLOW_RETRY_WAIT": "0",
        "WBC_PREDICTIONS_DB_URL": f"sqlite:///{tmp_path / 'predictions.db'}",
        "WBC_CLASSIFY_DIR": str(tmp_path / "classify"),
        "WBC_ALERT_WEBHOOK_URL": webhook.url,
    }.items():
        alert_env.setenv(name, value)
    return webhook


def test_failed_nightly_classification_sends_one_alert(dag_env):
    """dag.test() of the real DAG with an empty registry: resolve_model fails (no champion)."""
    from airflow.utils.state import DagRunState

    dag = parse_dag("wbc_batch_classification")
    run = dag.test()

    assert run.state == DagRunState.FAILED
    [post] = dag_env.posts  # the task's alert; the DAG-level callback saw it and stayed quiet
    body = post["json"]
    assert body["event"] == "task_failed" and body["dag_id"] == "wbc_batch_classification"
    assert body["run_id"] == run.run_id and body["task_id"] == "resolve_model" and body["try_number"] == 1
    assert body["exception"].startswith("NoModelError: no model 'wbc-classifier@champion'")
    assert "/dags/wbc_batch_classification/runs/" in body["log_url"] and body["log_url"].endswith("try_number=1")


def test_failed_training_alerts_and_still_marks_the_mlflow_run_failed(dag_env):
    """dag.test() of the training DAG's preprocess task alone (no split output: it fails), with
    retries off; the DAG run's MLflow run exists and must end FAILED (the chained callback)."""
    import pendulum
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import find_tracking_run, open_tracking_run

    settings = get_settings()
    dag = parse_dag("wbc_training").partial_subset(
        task_ids=["preprocess"], include_upstream=False, include_downstream=False
    )
    for task in dag.tasks:
        task.retries = 0
    when = pendulum.datetime(2026, 11, 25, 10, tz="UTC")
    run_id = DagRunType.MANUAL.generate_run_id(suffix=when.isoformat())
    open_tracking_run(settings, run_id)  # as the split task would have

    run = dag.test(logical_date=when, run_after=when)

    assert run.state == DagRunState.FAILED and run.run_id == run_id
    [post] = dag_env.posts
    assert post["json"]["task_id"] == "preprocess" and post["json"]["run_id"] == run_id
    assert "did not finish" in post["json"]["exception"]
    mlflow_run = configure_mlflow(settings).get_run(find_tracking_run(settings, run_id))
    assert mlflow_run.info.status == "FAILED"
