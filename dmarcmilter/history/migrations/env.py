"""Alembic environment for the history store.

Run by :mod:`dmarcmilter.history.db`, which builds the Alembic configuration
in code and hands over either an open connection (``connection`` attribute)
or the database URL (``sqlalchemy.url``).  There is no alembic.ini.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dmarcmilter.history.db import make_engine
from dmarcmilter.history.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():  # pragma: no cover - offline SQL is not offered
    raise SystemExit("dmarcmilter migrations run online only")
run_migrations_online()
