"""The predictions database: its tables, migrations, idempotent writes and the export users fetch.

Three tables (SQLite by default, PostgreSQL through ``WBC_PREDICTIONS_DB_URL``):

- ``predictions``: one row per image *content* (sha256) and model version, with the predicted
  class, its confidence and every class probability (JSON ``{class: prob}``, so a model with
  another class list needs no schema change). UNIQUE(sha256, model_name, model_version): an
  image is classified at most once per model version, whatever its file name or drop.
- ``files_seen``: every file found in the drop folder (path relative to the classify folder,
  drop, sha256, size, mtime, when and by which run). UNIQUE(path, sha256). A file reaches its
  prediction through its hash, so a byte-identical copy in a later drop is traceable to the
  prediction made the first time.
- ``rejections``: files that could not be classified, with the reason. UNIQUE(path, sha256);
  an unreadable file has sha256 ``''`` (not NULL: NULLs never collide in a UNIQUE constraint,
  so retries would duplicate them).

Writes use INSERT ... ON CONFLICT DO NOTHING, so a retried task never duplicates a row. A
transaction that fails because the connection was lost or refused (a database restarting) is
retried whole (:func:`transaction`, :func:`with_db_retries`): the database rolled it back, so
the retry neither loses nor duplicates a row. The schema is created and migrated by Alembic
(``wbc_tasks/serving/migrations``) through :func:`upgrade_database`; the version table is
``wbc_predictions_alembic_version`` so the database may be shared with MLflow or Airflow, which
use Alembic's default table name.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    or_,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url

from wbc_tasks.core.settings import CLASS_NAMES, Settings
from wbc_tasks.core.retry import call_with_backoff

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: Alembic's version table for this database (not the default: MLflow and Airflow use that).
VERSION_TABLE = "wbc_predictions_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The ``drop`` of a file lying directly in the classify folder (not in a dated sub-folder).
LOOSE_DROP = ""
#: sha256 recorded for a file that could not be read at all.
UNREADABLE_SHA = ""
EXPORT_FORMATS = ("csv", "parquet", "json")
#: Columns of an export, in order (csv/parquet add one ``prob_<class>`` column per class).
EXPORT_COLUMNS = (
    "path", "drop", "status", "predicted_class", "confidence", "needs_review", "model_name",
    "model_version", "model_run_id", "predicted_at", "prediction_dag_run_id", "rejection_reason",
    "rejected_at", "sha256", "size", "seen_at", "probabilities",
)
#: SQLite allows a limited number of bound parameters per statement; IN lists are split.
_IN_BATCH = 500
#: Connection failures that retrying cannot fix (checked before retrying one).
_PERMANENT_CONNECT_ERRORS = ("authentication failed", "does not exist", "pg_hba.conf", "no password",
                             "permission denied")

T = TypeVar("T")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
_Id = BigInteger().with_variant(Integer(), "sqlite")

predictions = Table(
    "predictions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("sha256", String(64), nullable=False),
    Column("predicted_class", String(100), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("probabilities", JSON, nullable=False),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(50), nullable=False),
    Column("model_run_id", String(64), nullable=False, default=""),
    Column("dag_run_id", String(250), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("needs_review", Boolean, nullable=False),
    UniqueConstraint("sha256", "model_name", "model_version"),
    Index(None, "created_at"),
)

files_seen = Table(
    "files_seen",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("path", String(1024), nullable=False),
    Column("drop", String(255), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=True),
    Column("mtime", Float, nullable=True),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Column("dag_run_id", String(250), nullable=False),
    UniqueConstraint("path", "sha256"),
    Index(None, "sha256"),
    Index(None, "drop"),
)

rejections = Table(
    "rejections",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("path", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False, default=UNREADABLE_SHA),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("dag_run_id", String(250), nullable=False),
    UniqueConstraint("path", "sha256"),
)

_CONFLICT_KEYS = {
    "predictions": ("sha256", "model_name", "model_version"),
    "files_seen": ("path", "sha256"),
    "rejections": ("path", "sha256"),
}


def utcnow() -> datetime:
    """Timestamps are stored in UTC (SQLite keeps no offset, so everything must agree)."""
    return datetime.now(timezone.utc)


def make_engine(url: str) -> Engine:
    """An engine for the predictions database (SQLite: folder created, waits for writers)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Mapped chunk tasks commit concurrently; SQLite serialises writers, so wait, not fail.
        engine = create_engine(url, connect_args={"timeout": 120})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class DatabaseUnavailableError(ConnectionError):
    """The predictions database stayed unreachable through every retry."""


def is_transient_db_error(exc: BaseException) -> bool:
    """Whether a database call failed for a reason that may pass: the connection was lost,
    refused or reset (a restarting server), a deadlock or serialisation failure, SQLite busy."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):  # pool: reconnect / wait
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    text = str(orig).lower()
    if type(orig).__module__.startswith("sqlite3"):
        return "locked" in text or "busy" in text
    if not isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return False
    return not any(fragment in text for fragment in _PERMANENT_CONNECT_ERRORS)


def with_db_retries(settings: Settings, fn: Callable[[], T], *, what: str) -> T:
    """``fn()``, retried while it fails transiently (:func:`is_transient_db_error`).

    ``fn`` must be safe to repeat: a read, or one whole transaction (:func:`transaction`), which
    the database rolled back when the connection went. ``settings.predictions_db_retries``
    retries, the first after ``settings.predictions_db_retry_wait`` seconds, each wait doubled.
    When every try failed transiently, raises :class:`DatabaseUnavailableError`.
    """
    url = make_url(settings.predictions_db_url).render_as_string(hide_password=True)

    def give_up(exc: BaseException, seconds: float) -> Exception:
        cause = str(getattr(exc, "orig", None) or exc).strip()
        return DatabaseUnavailableError(
            f"the predictions database {url} is unreachable: {what} failed "
            f"{settings.predictions_db_retries + 1} times over {seconds:.0f} s "
            f"(WBC_PREDICTIONS_DB_RETRIES={settings.predictions_db_retries}). Nothing of it was "
            f"committed; the task can be retried safely. Last error: {cause}"
        )

    return call_with_backoff(
        fn, retries=settings.predictions_db_retries, first_wait=settings.predictions_db_retry_wait,
        is_transient=is_transient_db_error, what=f"predictions database {url}: {what}", give_up=give_up, log=log,
    )


def transaction(settings: Settings, engine: Engine, work: Callable[[Connection], T], *, what: str) -> T:
    """``work(connection)`` in one transaction, committed whole or not at all, and retried whole
    when the connection fails (:func:`with_db_retries`)."""

    def attempt() -> T:
        with engine.begin() as connection:
            return work(connection)

    return with_db_retries(settings, attempt, what=what)


def read_with_retries(
    settings: Settings, engine: Engine, work: Callable[[Connection], T], *, what: str
) -> T:
    """``work(connection)`` on a fresh connection, retried when the connection fails."""

    def attempt() -> T:
        with engine.connect() as connection:
            return work(connection)

    return with_db_retries(settings, attempt, what=what)


@contextmanager
def open_engine(url: str) -> Iterator[Engine]:
    """An engine that is disposed afterwards (tasks are short; pooled connections would linger)."""
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _alembic_config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade_database(url: str, revision: str = "head") -> str | None:
    """Create or migrate the predictions schema to ``revision``; return the revision reached."""
    from alembic import command

    with open_engine(url) as engine:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), revision)
        return current_revision(engine)


def downgrade_database(url: str, revision: str) -> str | None:
    """Migrate the schema down to ``revision`` (``"base"`` removes every table)."""
    from alembic import command

    with open_engine(url) as engine:
        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), revision)
        return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def insert_ignore(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows``, silently keeping rows that already exist (by the table's unique key)."""
    if not rows:
        return
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(
            f"the predictions database supports SQLite and PostgreSQL, not {dialect}"
        )
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(_CONFLICT_KEYS[table.name]))
    connection.execute(stmt, list(rows))


def _batches(items: Sequence[Any], size: int = _IN_BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predicted_hashes(
    connection: Connection,
    hashes: Iterable[str],
    *,
    model_name: str,
    model_version: str | None = None,
) -> set[str]:
    """Which of ``hashes`` have a prediction by ``model_name`` (any version when None)."""
    hashes = sorted(set(hashes))
    found: set[str] = set()
    for part in _batches(hashes):
        query = select(predictions.c.sha256).where(
            predictions.c.sha256.in_(part), predictions.c.model_name == model_name
        )
        if model_version is not None:
            query = query.where(predictions.c.model_version == str(model_version))
        found.update(connection.execute(query).scalars())
    return found


def seen_files(connection: Connection, paths: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """``files_seen`` rows of ``paths``: path -> [{sha256, size, mtime}, ...]."""
    paths = sorted(set(paths))
    rows: dict[str, list[dict[str, Any]]] = {}
    for part in _batches(paths):
        query = select(
            files_seen.c.path, files_seen.c.sha256, files_seen.c.size, files_seen.c.mtime
        ).where(files_seen.c.path.in_(part))
        for row in connection.execute(query).mappings():
            rows.setdefault(row["path"], []).append(dict(row))
    return rows


def rejected_files(connection: Connection, paths: Iterable[str]) -> set[tuple[str, str]]:
    """(path, sha256) pairs of ``paths`` that already have a rejection."""
    paths = sorted(set(paths))
    found: set[tuple[str, str]] = set()
    for part in _batches(paths):
        query = select(rejections.c.path, rejections.c.sha256).where(rejections.c.path.in_(part))
        found.update((p, s) for p, s in connection.execute(query))
    return found


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

def _as_utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _for_db(value: datetime, connection: Connection) -> datetime:
    # SQLite stores naive UTC text; compare like with like.
    return value.replace(tzinfo=None) if connection.dialect.name == "sqlite" else value


def query_predictions(
    settings: Settings,
    *,
    drop: str | None = None,
    since: datetime | str | None = None,
    predicted_class: str | None = None,
    needs_review: bool | None = None,
    model_version: str | int | None = None,
    latest: bool = False,
) -> "pd.DataFrame":
    """One row per file seen and prediction of its content (long form: ``probabilities`` dict).

    A file whose content was classified by two model versions has two rows (``latest=True``
    keeps only the newest prediction per file). Rejected files appear with ``status``
    ``rejected`` and their ``reason`` unless a prediction filter (class, review, version) is
    given. ``since`` keeps rows whose file was first seen, or whose prediction or rejection was
    made, at or after that time (naive times are UTC).
    """
    import pandas as pd

    fs, p, r = files_seen, predictions, rejections
    query = (
        select(
            fs.c.path,
            fs.c.drop,
            fs.c.sha256,
            fs.c.size,
            fs.c.seen_at,
            p.c.predicted_class,
            p.c.confidence,
            p.c.needs_review,
            p.c.probabilities,
            p.c.model_name,
            p.c.model_version,
            p.c.model_run_id,
            p.c.created_at.label("predicted_at"),
            p.c.dag_run_id.label("prediction_dag_run_id"),
            r.c.reason.label("rejection_reason"),
            r.c.created_at.label("rejected_at"),
        )
        .select_from(fs)
        .outerjoin(p, and_(p.c.sha256 == fs.c.sha256, fs.c.sha256 != UNREADABLE_SHA))
        .outerjoin(r, and_(r.c.path == fs.c.path, r.c.sha256 == fs.c.sha256))
        .order_by(fs.c.path, fs.c.sha256, p.c.created_at, p.c.model_version)
    )
    if drop is not None:
        query = query.where(fs.c.drop == drop)
    if predicted_class is not None:
        query = query.where(p.c.predicted_class == predicted_class)
    if needs_review is not None:
        query = query.where(p.c.needs_review == bool(needs_review))
    if model_version is not None:
        query = query.where(p.c.model_version == str(model_version))
    since_utc = _as_utc(since)

    def fetch(connection: Connection) -> list[dict[str, Any]]:
        selected = query
        if since_utc is not None:
            bound = _for_db(since_utc, connection)
            selected = selected.where(
                or_(fs.c.seen_at >= bound, p.c.created_at >= bound, r.c.created_at >= bound)
            )
        return [dict(row) for row in connection.execute(selected).mappings()]

    with open_engine(settings.predictions_db_url) as engine:
        rows = read_with_retries(settings, engine, fetch, what="reading predictions")
    table = pd.DataFrame(rows, columns=list(query.selected_columns.keys()))
    for column in ("seen_at", "predicted_at", "rejected_at"):
        table[column] = pd.to_datetime(table[column], utc=True)
    table["status"] = "pending"
    table.loc[table["rejection_reason"].notna(), "status"] = "rejected"
    table.loc[table["predicted_class"].notna(), "status"] = "classified"
    table = table[[c for c in EXPORT_COLUMNS if c in table.columns]]
    if latest and len(table):
        table = (
            table.sort_values(["path", "sha256", "predicted_at"], na_position="first")
            .groupby(["path", "sha256"], sort=False)
            .tail(1)
            .sort_values(["path", "sha256"])
        )
    return table.reset_index(drop=True)


def probability_columns(table: "pd.DataFrame") -> list[str]:
    """Class names across every prediction in ``table``: the project's order first, then others."""
    seen: set[str] = set()
    for probs in table["probabilities"].dropna():
        seen.update(probs)
    known = [c for c in CLASS_NAMES if c in seen]
    return known + sorted(seen - set(known))


def wide_table(table: "pd.DataFrame") -> "pd.DataFrame":
    """``probabilities`` spread into one column per class, ``prob_<class>`` (NaN where absent)."""
    classes = probability_columns(table)
    wide = table.drop(columns=["probabilities"]).copy()
    for name in classes:
        wide[f"prob_{name}"] = [
            probs.get(name) if isinstance(probs, dict) else None for probs in table["probabilities"]
        ]
    return wide


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") and not _is_null(value) else None


def _is_null(value: Any) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, dict) and bool(pd.isna(value)))


def _json_records(table: "pd.DataFrame") -> list[dict[str, Any]]:
    records = []
    for row in table.to_dict("records"):
        record = {}
        for key, value in row.items():
            if key in ("seen_at", "predicted_at", "rejected_at"):
                record[key] = _iso(value)
            elif isinstance(value, dict):
                record[key] = value
            elif _is_null(value):
                record[key] = None
            elif hasattr(value, "item"):
                record[key] = value.item()  # numpy scalar
            else:
                record[key] = value
        records.append(record)
    return records


def export_predictions(
    settings: Settings,
    *,
    drop: str | None = None,
    since: datetime | str | None = None,
    predicted_class: str | None = None,
    needs_review: bool | None = None,
    model_version: str | int | None = None,
    latest: bool = False,
    fmt: str = "csv",
    out: Path | str | IO | None = None,
) -> int:
    """Write the predictions of the files seen (filters as :func:`query_predictions`).

    ``fmt``: ``csv`` and ``parquet`` are wide (one ``prob_<class>`` column per class); ``json``
    is a list of records with ``probabilities`` as an object. ``out``: a file path, an open
    file, or None for stdout. Returns the number of rows written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    table = query_predictions(
        settings,
        drop=drop,
        since=since,
        predicted_class=predicted_class,
        needs_review=needs_review,
        model_version=model_version,
        latest=latest,
    )
    if fmt == "json":
        payload: bytes | str = json.dumps(_json_records(table), indent=1, ensure_ascii=False) + "\n"
    elif fmt == "csv":
        wide = wide_table(table)
        payload = wide.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z")
    else:
        buffer = io.BytesIO()
        wide_table(table).to_parquet(buffer, index=False)
        payload = buffer.getvalue()
    _write(payload, out)
    log.info("exported %d rows as %s to %s", len(table), fmt, out or "stdout")
    return len(table)


def _write(payload: bytes | str, out: Path | str | IO | None) -> None:
    data = payload.encode() if isinstance(payload, str) else payload
    if out is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif isinstance(out, (str, Path)):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    elif isinstance(out, io.TextIOBase):
        out.write(data.decode())
    else:
        out.write(data)
