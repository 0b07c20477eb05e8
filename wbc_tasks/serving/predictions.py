"""The predictions database: its tables, migrations, connections that retry, and idempotent
writes. Reading it: the nightly look-ups are :mod:`wbc_tasks.serving.queries`, the export
:mod:`wbc_tasks.serving.export`, the reviews :mod:`wbc_tasks.serving.review_queue`.

Seven tables (SQLite by default, PostgreSQL through ``WBC_PREDICTIONS_DB_URL``):

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
- ``reviews``: a person's decision on one image (migration 0003): who, when, the model version
  and its prediction at that time, the label (a class or ``unusable``) and a note. Never updated:
  a second review is a new row and the latest one counts (:mod:`wbc_tasks.serving.review_decisions`).
- ``drop_scans`` (migration 0005): per drop, the fingerprint of what it held when a night
  finished it (every file classified or rejected, none settling); the next night skips a drop
  whose fingerprint is unchanged (:mod:`wbc_tasks.serving.scan`, :mod:`wbc_tasks.serving.plan`).
- ``adaptation_requests`` (migration 0004): the watermark of reviews already learned or asked to
  be learned: each row is a night's request for an adaptation run (``asset``) or a training run
  that trained on the reviews (``training``), with the highest review id it accounts for
  (:mod:`wbc_tasks.serving.adaptation_requests`).
- ``drop_summaries`` (migration 0006): each drop's counts for the drops page, recounted by every
  writer in its own transaction (:mod:`wbc_tasks.serving.drop_summaries`).

Writes use INSERT ... ON CONFLICT DO NOTHING, so a retried task never duplicates a row. A
transaction that fails because the connection was lost or refused (a database restarting) is
retried whole (:func:`transaction`, :func:`with_db_retries`): the database rolled it back, so
the retry neither loses nor duplicates a row. The schema is created and migrated by Alembic
(``wbc_tasks/serving/migrations``) through :func:`upgrade_database`; the version table is
``wbc_predictions_alembic_version`` so the database may be shared with MLflow or Airflow, which
use Alembic's default table name.

Over 400 lines on purpose: the tables are the schema's one definition beside the engine and
retries every access goes through (``db.open_engine``, ``db.upgrade_database`` and the inserts are
called, and patched by tests, as names of this module from about 30 places); a split would move
names, not separate jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine, make_url

from wbc_tasks.core.retry import call_with_backoff
from wbc_tasks.core.settings import Settings

log = logging.getLogger(__name__)

#: Alembic's version table for this database (not the default: MLflow and Airflow use that).
VERSION_TABLE = "wbc_predictions_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The ``drop`` of a file lying directly in the classify folder (not in a dated sub-folder).
LOOSE_DROP = ""
#: sha256 recorded for a file that could not be read at all.
UNREADABLE_SHA = ""
#: Connection failures that retrying cannot fix (checked before retrying one).
_PERMANENT_CONNECT_ERRORS = (
    "authentication failed",
    "does not exist",
    "pg_hba.conf",
    "no password",
    "permission denied",
)

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
    # Migration 0002: why it needs review (a JSON list, empty when nothing applies), the image's
    # unfamiliar score (NULL before scores existed) and what the pre-model image check found.
    Column("review_reasons", JSON, nullable=False, default=list, server_default="[]"),
    Column("unfamiliar_score", Float, nullable=True),
    Column("image_check", Text, nullable=True),
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

reviews = Table(
    "reviews",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("sha256", String(64), nullable=False),
    Column("drop", String(255), nullable=False),
    Column("path", String(1024), nullable=False),
    Column("reviewer", String(255), nullable=False),
    Column("reviewed_at", DateTime(timezone=True), nullable=False),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(50), nullable=False),
    Column("predicted_class", String(100), nullable=False),
    Column("label", String(100), nullable=False),
    Column("note", Text, nullable=True),
    # No unique key: a second opinion is a new row, never an overwrite (the latest one counts).
    Index(None, "sha256"),
    Index(None, "drop"),
)

adaptation_requests = Table(
    "adaptation_requests",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    # Reviews up to this id are accounted for: the next request counts only later ones.
    Column("through_review_id", BigInteger, nullable=False),
    Column("reviews", Integer, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    # The nightly DAG run that asked, or the training run that trained on the reviews; unique, so
    # a retried task finds its own request instead of making a second one.
    Column("run_id", String(250), nullable=False),
    UniqueConstraint("run_id"),
)

drop_scans = Table(
    "drop_scans",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("drop", String(255), nullable=False),
    # What the drop held when a night finished it (scan.drop_fingerprint); an equal one later
    # means nothing under it changed, and the night skips it.
    Column("fingerprint", String(64), nullable=False),
    Column("files", Integer, nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("dag_run_id", String(250), nullable=False),
    UniqueConstraint("drop"),
)

drop_summaries = Table(
    "drop_summaries",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("drop", String(255), nullable=False),
    # What the drops page shows, recounted from the rows by every writer in its own transaction
    # (wbc_tasks.serving.drop_summaries), so a page reads a row per drop, not the drop's cells.
    Column("files", Integer, nullable=False),
    Column("cells", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
    Column("pending", Integer, nullable=False),
    Column("needs_review", Integer, nullable=False),
    Column("reviewed", Integer, nullable=False),
    Column("blast_suspected", Integer, nullable=False),
    Column("counted_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("drop"),
)

_CONFLICT_KEYS = {
    "predictions": ("sha256", "model_name", "model_version"),
    "files_seen": ("path", "sha256"),
    "rejections": ("path", "sha256"),
    "adaptation_requests": ("run_id",),
}


def utcnow() -> datetime:
    """Timestamps are stored in UTC (SQLite keeps no offset, so everything must agree)."""
    return datetime.now(UTC)


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
            # Write-ahead log: the lab's pages read while a night commits, never waiting for it
            # (with the default rollback journal a page waited out each commit: p95 1.4 s,
            # bench/bench_scale.py). Kept by the file; every process here is on one machine.
            if parsed.database and parsed.database != ":memory:":
                cursor.execute("PRAGMA journal_mode=WAL")
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
        fn,
        retries=settings.predictions_db_retries,
        first_wait=settings.predictions_db_retry_wait,
        is_transient=is_transient_db_error,
        what=f"predictions database {url}: {what}",
        give_up=give_up,
        log=log,
    )


def transaction(settings: Settings, engine: Engine, work: Callable[[Connection], T], *, what: str) -> T:
    """``work(connection)`` in one transaction, committed whole or not at all, and retried whole
    when the connection fails (:func:`with_db_retries`)."""

    def attempt() -> T:
        with engine.begin() as connection:
            return work(connection)

    return with_db_retries(settings, attempt, what=what)


def read_with_retries(settings: Settings, engine: Engine, work: Callable[[Connection], T], *, what: str) -> T:
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


def head_revision() -> str:
    """The newest migration in ``MIGRATIONS_DIR`` (what :func:`upgrade_database` reaches)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


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


def upsert(connection: Connection, table: Table, rows: Sequence[dict[str, Any]], key: Sequence[str]) -> None:
    """Insert ``rows``, replacing the other columns of rows that exist by ``key`` (unique)."""
    if not rows:
        return
    insert = _dialect_insert(connection)
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in (*key, "id")},
    )
    connection.execute(stmt, list(rows))


def _dialect_insert(connection: Connection) -> Any:
    """The dialect's ``insert`` (with ON CONFLICT): PostgreSQL's or SQLite's."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"the predictions database supports SQLite and PostgreSQL, not {dialect}")


def insert_ignore(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows``, silently keeping rows that already exist (by the table's unique key)."""
    if not rows:
        return
    insert = _dialect_insert(connection)
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(_CONFLICT_KEYS[table.name]))
    connection.execute(stmt, list(rows))
