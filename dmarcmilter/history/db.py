"""Opening, migrating, checking and pruning the history database.

The Alembic configuration is built here in code, pointing at the migration
scripts shipped inside the package, so no alembic.ini is needed at runtime.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Select, create_engine, delete, event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ..config import parse_database_url
from ..errors import DatabaseError, MissingDependencyError, SchemaError
from .models import (
    DKIMResultRow,
    FailureIncidentRow,
    LateMessageRow,
    MessageRow,
    OverrideReasonRow,
    ReportAttemptRow,
    ReportBounceRow,
    ReportDeliveryRow,
    ReportRow,
)

MIGRATIONS = Path(__file__).with_name("migrations")
# Rows deleted per transaction when pruning: small enough that the milter's
# writer never waits long for the SQLite write lock.
PRUNE_BATCH = 1000
BUSY_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 10  # seconds
DEFAULT_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
# MySQL and MariaDB: strict mode for every session, whatever the server's
# default, so that an overlong value is refused (and the row set aside) as
# on PostgreSQL, not stored cut short.
MYSQL_INIT_COMMAND = (
    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_TRANS_TABLES')"
)


# The extra that installs the driver of each DBAPI module dmarcmilter uses.
DRIVER_EXTRAS = {"psycopg": "postgresql", "pymysql": "mysql"}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite, the file's directory is created and
    every connection is set up for one writer and many readers."""
    try:
        return _make_engine(url)
    except ModuleNotFoundError as exc:
        # The drivers are optional extras: a missing one is an installation
        # problem to name, not a traceback.
        module = (exc.name or "").split(".")[0]
        extra = DRIVER_EXTRAS.get(module)
        hint = (
            f"pip install 'dmarcmilter[{extra}]'"
            if extra
            else f"install the Python module {module!r}"
        )
        raise MissingDependencyError(
            f"database.url needs the database driver {module!r}, which is not installed: {hint}"
        ) from None


def _make_engine(url: str) -> Engine:
    parsed = parse_database_url(url)
    backend = parsed.get_backend_name()
    if parsed.drivername in DEFAULT_DRIVERS:
        # A bare scheme means psycopg2 or mysqlclient to SQLAlchemy; the
        # drivers dmarcmilter installs are psycopg 3 and PyMySQL.
        parsed = parsed.set(drivername=DEFAULT_DRIVERS[parsed.drivername])
    if backend != "sqlite":
        # A database host that drops packets must not hang the writer (or
        # a report run) for the kernel's minutes-long TCP connect timeout.
        connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
        if backend in ("mysql", "mariadb"):
            connect_args["init_command"] = MYSQL_INIT_COMMAND
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        directory = Path(database).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the database directory {directory}: {exc.strerror or exc}"
            ) from None
    engine = create_engine(parsed)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets report queries read while the milter writes; NORMAL is
        # durable across application crashes, which is what WAL needs.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # SQLite ignores ON DELETE CASCADE unless asked to enforce keys.
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would mangle a %-escaped password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "the package ships at least one migration"
    return head


def upgrade(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except CommandError:
        # Alembic cannot place the stored revision: a newer dmarcmilter, or
        # another application's alembic_version table in the same database.
        current, head = schema_status(url)
        raise SchemaError(
            f"database schema is at {current}, which this dmarcmilter (newest "
            f"revision {head}) does not know: is a newer version using this database?"
        ) from None
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot upgrade the database {shown(url)}: {short_error(exc)}"
        ) from None
    finally:
        engine.dispose()


def schema_status(url: str) -> tuple[str | None, str]:
    """(the database's revision, None when unmigrated; the newest revision)."""
    if _missing_sqlite_file(url):
        # Asking must not create an empty database file as a side effect.
        return None, head_revision()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the database {shown(url)}: {short_error(exc)}") from None
    finally:
        engine.dispose()
    return current, head_revision()


def check_schema(url: str) -> None:
    """Raise SchemaError unless the database is at the newest revision."""
    current, head = schema_status(url)
    if current != head:
        raise SchemaError(
            f"database schema is at {current or 'nothing (empty database)'}, "
            f"this dmarcmilter needs {head}: run `dmarcmilter db upgrade`"
        )


def prune(url: str, older_than: dt.timedelta, *, now: dt.datetime | None = None) -> int:
    """Delete messages that arrived more than ``older_than`` ago, with their
    DKIM results, override reasons, late marks and failure incidents, and
    the recorded bounces of report mail received before then; return the
    number of messages."""
    # UTC, like the stored values: SQLite compares the text, offset dropped.
    cutoff = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC) - older_than

    def delete_messages(conn: Connection, ids: list[int]) -> None:
        # Children first and explicitly: correct even where foreign keys
        # are not enforced (an SQLite connection opened elsewhere).
        for child in (DKIMResultRow, OverrideReasonRow):
            conn.execute(delete(child).where(child.message_id.in_(ids)))
        for owned in (LateMessageRow, FailureIncidentRow):
            conn.execute(delete(owned).where(owned.message_pk.in_(ids)))
        conn.execute(delete(MessageRow).where(MessageRow.id.in_(ids)))

    def delete_bounces(conn: Connection, ids: list[int]) -> None:
        conn.execute(delete(ReportBounceRow).where(ReportBounceRow.id.in_(ids)))

    oldest = (
        select(MessageRow.id).where(MessageRow.arrived_at < cutoff).order_by(MessageRow.arrived_at)
    )
    deleted = _delete_in_batches(url, oldest, delete_messages)
    # Anyone can send mail to the report address, so these rows would
    # otherwise only grow; an unprocessed one that old counts for nothing.
    bounces = select(ReportBounceRow.id).where(ReportBounceRow.received_at < cutoff)
    _delete_in_batches(url, bounces.order_by(ReportBounceRow.id), delete_bounces)
    return deleted


def prune_reports(url: str, older_than: dt.timedelta, *, now: dt.datetime | None = None) -> int:
    """Delete the stored reports (aggregate and failure) whose period ended more than
    ``older_than`` ago, with their deliveries and attempts; return how many."""
    cutoff = int(((now or dt.datetime.now(dt.UTC)) - older_than).timestamp())

    def delete_reports(conn: Connection, ids: list[int]) -> None:
        deliveries = select(ReportDeliveryRow.id).where(ReportDeliveryRow.report_pk.in_(ids))
        conn.execute(delete(ReportAttemptRow).where(ReportAttemptRow.delivery_id.in_(deliveries)))
        conn.execute(delete(ReportDeliveryRow).where(ReportDeliveryRow.report_pk.in_(ids)))
        conn.execute(delete(ReportRow).where(ReportRow.id.in_(ids)))

    oldest = select(ReportRow.id).where(ReportRow.period_end < cutoff).order_by(ReportRow.id)
    return _delete_in_batches(url, oldest, delete_reports)


def _delete_in_batches(
    url: str, oldest: Select[int], delete_rows: Callable[[Connection, list[int]], None]
) -> int:
    """Delete what ``oldest`` selects, PRUNE_BATCH ids per transaction, so
    the write lock is held briefly and a huge backlog never builds a huge
    transaction; return how many."""
    check_schema(url)
    engine = make_engine(url)
    total = 0
    try:
        while True:
            with engine.begin() as conn:
                ids = list(conn.scalars(oldest.limit(PRUNE_BATCH)))
                if not ids:
                    break
                delete_rows(conn, ids)
                total += len(ids)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot prune the database {shown(url)}: {short_error(exc)}") from None
    finally:
        engine.dispose()
    return total


def _missing_sqlite_file(url: str) -> bool:
    parsed = parse_database_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return False
    return not database.startswith("file:") and not Path(database).exists()


def shown(url: str) -> str:
    """A database URL as logs and errors show it: without the password."""
    return parse_database_url(url).render_as_string(hide_password=True)


def short_error(exc: SQLAlchemyError) -> str:
    # The driver's own message, without SQLAlchemy's SQL echo and links.
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]
