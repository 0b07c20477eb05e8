"""Alembic environment of the predictions database.

Run through :func:`wbc_tasks.serving.predictions.upgrade_database`, which passes an open connection in
``config.attributes["connection"]``. The version table is not Alembic's default, so the
predictions may share a PostgreSQL database with MLflow or Airflow.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from wbc_tasks.serving.predictions import VERSION_TABLE, make_engine, metadata

#: Any fixed number: PostgreSQL advisory lock held while migrating, so two processes starting
#: at once (a CLI run beside the DAG) do not both create the tables.
_MIGRATION_LOCK = 0x5B_C0_DB


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        elif connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:
            # pysqlite opens its transaction lazily (at the first write), so two migrators could
            # both read "no version" and both create tables: take the write lock before Alembic
            # reads the version, so the second waits and then finds the tables made.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection or sqlalchemy.url given to the predictions migrations")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; pass a connection")
run_migrations_online()
