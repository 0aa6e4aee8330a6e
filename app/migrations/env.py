"""Alembic environment for the VALD-MD schema.

Run programmatically: ``app.audit.upgrade_database(url)`` / ``init_db(url)`` hand a connection in through
``config.attributes["connection"]`` (already inside a write-locked transaction). ``alembic_config(url)`` gives a
configuration for the Alembic commands (``command.revision(cfg, autogenerate=True, message=...)``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection
from sqlmodel import SQLModel

import app.audit.models  # noqa: F401 - registers the tables on SQLModel.metadata for autogenerate

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER TABLE needs copy-and-move
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Writes the SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Runs the migrations on the handed-in connection, or on a new engine for ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from app.audit.db import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: use app.audit.upgrade_database(url) or alembic_config(url)")
    engine = make_engine(url)
    try:
        with engine.begin() as new_connection:
            _run(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
