"""Bulk insertion of history rows: the writer's one round of SQL per batch.

A batch of rows becomes a few multi-row ``INSERT ... VALUES (...), (...)``
statements, built once per table, dialect and row count, executed with the
driver's own parameter binding.  Going through SQLAlchemy's per-row
parameter processing, or the driver's ``executemany``, costs several times
more than the database's own work (measured: psycopg's executemany ran at
about 4,000 rows a second, one statement per chunk at several times that).
Only the type conversions the dialect really needs are applied (SQLite's
datetime text, for instance).

Where the database supports ``INSERT ... RETURNING`` (PostgreSQL, SQLite
3.35+, MariaDB 10.5+) the new ids come back with their idempotency keys;
elsewhere (MySQL) they are read back by key, which is indexed.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection, Dialect

from .models import (
    DKIMResultRow,
    FailureIncidentRow,
    LateMessageRow,
    MessageRow,
    OverrideReasonRow,
    ReportBounceRow,
)
from .rows import (
    BOUNCES,
    FAILURE_OF,
    LATER_COLUMNS,
    bounce_values,
    failure_incident_values,
    is_late,
    utc_timestamp,
)

MESSAGES: Table = MessageRow.__table__  # type: ignore[assignment]
DKIM_RESULTS: Table = DKIMResultRow.__table__  # type: ignore[assignment]
OVERRIDE_REASONS: Table = OverrideReasonRow.__table__  # type: ignore[assignment]
FAILURE_INCIDENTS: Table = FailureIncidentRow.__table__  # type: ignore[assignment]
LATE_MESSAGES: Table = LateMessageRow.__table__  # type: ignore[assignment]
REPORT_BOUNCES: Table = ReportBounceRow.__table__  # type: ignore[assignment]
# Bound parameters per statement: under SQLite's 32,766 and PostgreSQL's
# 65,535 limits, and small enough that a statement stays a few hundred KB.
MAX_PARAMETERS = 30_000
# MySQL and MariaDB: PyMySQL sends a statement, its values inlined, as one
# packet, and the server drops the connection when that is larger than
# max_allowed_packet (16 MB by default on MariaDB, 64 MB on MySQL 8).  A
# batch of rows with long client-supplied values would exceed it, and the
# writer, taking that for an outage, would retry the same batch forever; so
# a statement also ends after this many characters of text: a full batch
# of ordinary rows still fits in one, and UTF-8 and escaping make at most
# four bytes of each character, 8 MB, half MariaDB's default.
MYSQL_MAX_STATEMENT_CHARS = 2_000_000
# Keys per "which of these are stored" query.
KEY_CHUNK = 500

Rejected = list[tuple[dict[str, Any], str]]


def insert_rows(
    conn: Connection,
    rows: list[dict[str, Any]],
    *,
    skip_existing: bool,
    now: dt.datetime | None = None,
) -> tuple[int, Rejected]:
    """Insert history rows and their children in the caller's transaction;
    (rows inserted, rows refused with the reason).

    ``skip_existing`` first asks which idempotency keys are stored already,
    as a replay must; fresh rows have fresh random keys and skip that query.
    A row that cannot even be converted is refused here, not sent.

    With its message, in the same transaction, goes its late mark
    (:func:`rows.is_late` against ``now``, the writer's clock).  A failure
    line (:func:`rows.failure_line`) inserts the incident of a message in
    this batch or stored before, once per message; one whose message is not
    stored is refused.  A bounce-only line (no message, see
    :func:`rows.bounces_line`) inserts its ``report_bounces`` rows.
    """
    written_at = now or dt.datetime.now(dt.UTC)
    rejected: Rejected = []
    seen: set[str] = set()
    fresh: list[dict[str, Any]] = []
    bounce_lines: list[dict[str, Any]] = []
    failure_lines: list[dict[str, Any]] = []
    for row in rows:
        key = row.get("idempotency_key")
        if not isinstance(key, str):
            rejected.append((row, "row without an idempotency key"))
        elif key in seen:
            continue
        elif BOUNCES in row:
            seen.add(key)
            bounce_lines.append(row)
        elif FAILURE_OF in row:
            seen.add(key)
            failure_lines.append(row)
        else:
            seen.add(key)
            fresh.append(row)
    bounces = _insert_bounces(conn, bounce_lines, skip_existing) if bounce_lines else 0
    if skip_existing and fresh:
        stored = _stored_keys(conn, [r["idempotency_key"] for r in fresh])
        fresh = [r for r in fresh if r["idempotency_key"] not in stored]
    messages = _statement(conn.dialect, MESSAGES)
    values: list[tuple[Any, ...]] = []
    kept: list[dict[str, Any]] = []
    for row in fresh:
        try:
            values.append(messages.values(row))
        except (KeyError, TypeError, ValueError) as exc:
            rejected.append((row, f"malformed row: {exc!r}"))
            continue
        kept.append(row)
    ids: dict[str, int] = {}
    if kept:
        inserted = messages.insert(conn, values, returning=True)
        ids = (
            inserted
            if inserted is not None
            else _message_ids(conn, [row["idempotency_key"] for row in kept])
        )
    incidents = (
        _failure_incidents(conn, failure_lines, ids, skip_existing, rejected)
        if failure_lines
        else 0
    )
    if not kept:
        return bounces + incidents, rejected
    dkim: list[tuple[Any, ...]] = []
    reasons: list[tuple[Any, ...]] = []
    late: list[dict[str, Any]] = []
    dkim_statement = _statement(conn.dialect, DKIM_RESULTS)
    reasons_statement = _statement(conn.dialect, OVERRIDE_REASONS)
    try:
        for row in kept:
            message_id = ids[row["idempotency_key"]]
            for i, d in enumerate(row.get("dkim_results") or ()):
                dkim.append(dkim_statement.values({**d, "message_id": message_id, "position": i}))
            for i, r in enumerate(row.get("override_reasons") or ()):
                reasons.append(
                    reasons_statement.values({**r, "message_id": message_id, "position": i})
                )
            if is_late(utc_timestamp(row["arrived_at"]), written_at):
                late.append({"message_pk": message_id, "claim": None})
    except (KeyError, TypeError, ValueError) as exc:
        # A damaged child in a journaled row: the whole batch must not commit
        # half a message, so let the writer retry row by row.
        raise MalformedRow(f"malformed child row: {exc!r}") from None
    if dkim:
        dkim_statement.insert(conn, dkim)
    if reasons:
        reasons_statement.insert(conn, reasons)
    # Few rows (rows replayed after the end of their day): SQLAlchemy's own
    # executemany is enough.
    if late:
        conn.execute(LATE_MESSAGES.insert(), late)
    return len(kept) + bounces + incidents, rejected


def _failure_incidents(
    conn: Connection,
    lines: list[dict[str, Any]],
    ids: dict[str, int],
    skip_existing: bool,
    rejected: Rejected,
) -> int:
    """Insert the incidents of failure lines; the number of lines taken.

    The message is in ``ids`` (this batch) or stored before (its line comes
    first in the journal).  A replay skips a message that has its incident
    already: one incident per message."""
    wanted = [str(line[FAILURE_OF]) for line in lines if str(line[FAILURE_OF]) not in ids]
    if wanted:
        ids = {**ids, **_message_ids(conn, wanted)}
    values: list[dict[str, Any]] = []
    taken = 0
    for line in lines:
        message_id = ids.get(str(line[FAILURE_OF]))
        if message_id is None:
            rejected.append((line, "the message of this failure incident is not stored"))
            continue
        try:
            incident = failure_incident_values(line, message_id)
        except (KeyError, TypeError, ValueError) as exc:
            rejected.append((line, f"malformed failure incident: {exc!r}"))
            continue
        taken += 1
        if incident is not None:
            values.append(incident)
    if skip_existing and values:
        have = _incident_messages(conn, [v["message_pk"] for v in values])
        values = [v for v in values if v["message_pk"] not in have]
    # One per message, also within a batch.
    unique = {v["message_pk"]: v for v in values}
    if unique:
        conn.execute(FAILURE_INCIDENTS.insert(), list(unique.values()))
    return taken


def _incident_messages(conn: Connection, message_ids: list[int]) -> set[int]:
    table = FAILURE_INCIDENTS
    have: set[int] = set()
    for i in range(0, len(message_ids), KEY_CHUNK):
        chunk = message_ids[i : i + KEY_CHUNK]
        have.update(conn.scalars(select(table.c.message_pk).where(table.c.message_pk.in_(chunk))))
    return have


def _insert_bounces(conn: Connection, lines: list[dict[str, Any]], skip_existing: bool) -> int:
    """Insert the bounces of bounce-only lines; the number of lines.

    ``report_bounces`` has no idempotency key of its own, so a replay skips
    a bounce already stored by what makes it unique: its received_at (to
    the microsecond, taken by the milter) with the Message-ID and address.
    """
    values: list[dict[str, Any]] = []
    try:
        for line in lines:
            values.extend(bounce_values(b) for b in line[BOUNCES])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedRow(f"malformed bounce: {exc!r}") from None
    if skip_existing and values:
        stored = _stored_bounces(conn, values)
        values = [v for v in values if _bounce_key(v) not in stored]
    if values:
        conn.execute(REPORT_BOUNCES.insert(), values)
    return len(lines)


def _bounce_key(values: dict[str, Any]) -> tuple[dt.datetime, str, str]:
    received = values["received_at"]
    # SQLite and MySQL give back naive UTC; compare in that form.
    if received.tzinfo is not None:
        received = received.astimezone(dt.UTC).replace(tzinfo=None)
    return received, values["original_message_id"], values["address"]


def _stored_bounces(
    conn: Connection, values: list[dict[str, Any]]
) -> set[tuple[dt.datetime, str, str]]:
    table = REPORT_BOUNCES
    times = sorted({v["received_at"] for v in values})
    stored: set[tuple[dt.datetime, str, str]] = set()
    for i in range(0, len(times), KEY_CHUNK):
        chunk = times[i : i + KEY_CHUNK]
        query = select(table.c.received_at, table.c.original_message_id, table.c.address).where(
            table.c.received_at.in_(chunk)
        )
        for received_at, message_id, address in conn.execute(query):
            stored.add(
                _bounce_key(
                    {
                        "received_at": received_at,
                        "original_message_id": message_id,
                        "address": address,
                    }
                )
            )
    return stored


class MalformedRow(ValueError):
    """A row's child values are unusable; raised so the transaction rolls back."""


class _Statement:
    """The multi-row INSERT for one table on one dialect."""

    def __init__(self, table: Table, dialect: Dialect) -> None:
        self.table = table
        self.names = tuple(c.name for c in table.columns if c.name != "id")
        # Defaults for columns that older journal lines lack.
        self.later = LATER_COLUMNS if table is MESSAGES else {}
        prep = dialect.identifier_preparer
        self.head = (
            f"INSERT INTO {prep.format_table(table)} "
            f"({', '.join(prep.quote(n) for n in self.names)}) VALUES "
        )
        if dialect.paramstyle == "qmark":
            mark = "?"
        elif dialect.paramstyle in ("format", "pyformat"):
            mark = "%s"
        else:  # pragma: no cover - no such driver is supported
            raise ValueError(f"unsupported DB-API paramstyle {dialect.paramstyle!r}")
        self.group = "(" + ", ".join([mark] * len(self.names)) + ")"
        self.rows_per_statement = max(1, MAX_PARAMETERS // len(self.names))
        self.max_chars = MYSQL_MAX_STATEMENT_CHARS if dialect.name in ("mysql", "mariadb") else 0
        self.returning = bool(dialect.insert_returning) and table is MESSAGES
        self.tail = (
            f" RETURNING {prep.quote('id')}, {prep.quote('idempotency_key')}"
            if self.returning
            else ""
        )
        self.processors: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(self.names):
            proc: Callable[[Any], Any] | None = table.c[name].type.bind_processor(dialect)
            if name == "arrived_at":
                # Journaled rows carry ISO text; the column wants UTC.
                proc = _then(utc_timestamp, proc)
            if proc is not None:
                self.processors.append((i, proc))
        self._sql: dict[int, str] = {}

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """One row's parameters; KeyError, TypeError or ValueError when the
        row lacks a column or holds an unusable value."""
        try:
            values = [row[n] for n in self.names]
        except KeyError:
            later = self.later
            if not later:
                raise
            # A line journaled before a column existed (rare: only after an
            # upgrade), so the fast path above is tried first.
            values = [row[n] if n in row or n not in later else later[n] for n in self.names]
        for i, proc in self.processors:
            values[i] = proc(values[i])
        return tuple(values)

    def sql(self, rows: int) -> str:
        sql = self._sql.get(rows)
        if sql is None:
            sql = self.head + ", ".join([self.group] * rows) + self.tail
            if len(self._sql) < 64:  # the full size, plus a few tails
                self._sql[rows] = sql
        return sql

    def insert(
        self, conn: Connection, values: list[tuple[Any, ...]], *, returning: bool = False
    ) -> dict[str, int] | None:
        """Insert; with ``returning`` and RETURNING support, the new ids by key."""
        ids: dict[str, int] | None = {} if returning and self.returning else None
        for chunk in self._chunks(values):
            params = tuple(v for row in chunk for v in row)
            result = conn.exec_driver_sql(self.sql(len(chunk)), params)
            if ids is not None:
                ids.update((key, id_) for id_, key in result)
        return ids

    def _chunks(self, values: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
        step = self.rows_per_statement
        if not self.max_chars:
            for start in range(0, len(values), step):
                yield values[start : start + step]
            return
        chunk: list[tuple[Any, ...]] = []
        chars = 0
        for row in values:
            size = sum(len(v) for v in row if isinstance(v, str))
            if chunk and (len(chunk) >= step or chars + size > self.max_chars):
                yield chunk
                chunk, chars = [], 0
            chunk.append(row)
            chars += size
        if chunk:
            yield chunk


def _then(first: Callable[[Any], Any], second: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    if second is None:
        return first
    return lambda value: second(first(value))


class _UnnestStatement(_Statement):
    """PostgreSQL: ``INSERT ... SELECT * FROM unnest(%s::type[], ...)``, one
    array parameter per column.  psycopg rewrites the placeholders of every
    query it is given in Python, which for a thousand-row VALUES list costs
    more than the insert; this query is short and the same for any number
    of rows, and psycopg sends the arrays in C."""

    def __init__(self, table: Table, dialect: Dialect) -> None:
        super().__init__(table, dialect)
        prep = dialect.identifier_preparer
        # Binary parameters (%b): psycopg dumps lists of them in C.  The casts
        # drop any length, because an explicit cast to VARCHAR(n) truncates
        # silently, while the INSERT's own assignment refuses an overlong
        # value, which is what should happen to a damaged row.
        casts = ", ".join(
            "%b::" + re.sub(r"\(\d+\)", "", table.c[name].type.compile(dialect=dialect)) + "[]"
            for name in self.names
        )
        self.query = (
            f"INSERT INTO {prep.format_table(table)} "
            f"({', '.join(prep.quote(n) for n in self.names)}) "
            f"SELECT * FROM unnest({casts}){self.tail}"
        )

    def insert(
        self, conn: Connection, values: list[tuple[Any, ...]], *, returning: bool = False
    ) -> dict[str, int] | None:
        columns = tuple(list(column) for column in zip(*values, strict=True))
        result = conn.exec_driver_sql(self.query, columns)
        if returning and self.returning:
            return {key: id_ for id_, key in result}
        return None


# Statements per dialect object, then per table.  Keyed by the object
# itself, weakly: an ``id()`` key outlives its dialect, and CPython hands
# the same id to the next object allocated there, so a dialect of another
# database (another paramstyle, quoting or RETURNING support) would be
# served the freed one's SQL.  An engine's dialect lives as long as the
# engine; a statement holds no reference back to it.
_statements: weakref.WeakKeyDictionary[Dialect, dict[str, _Statement]] = weakref.WeakKeyDictionary()
_statements_lock = threading.Lock()


def _statement(dialect: Dialect, table: Table) -> _Statement:
    with _statements_lock:
        tables = _statements.get(dialect)
        if tables is None:
            tables = _statements[dialect] = {}
        statement = tables.get(table.name)
        if statement is None:
            kind = _UnnestStatement if dialect.name == "postgresql" else _Statement
            statement = tables[table.name] = kind(table, dialect)
        return statement


def _stored_keys(conn: Connection, keys: list[str]) -> set[str]:
    stored: set[str] = set()
    for i in range(0, len(keys), KEY_CHUNK):
        chunk = keys[i : i + KEY_CHUNK]
        stored.update(
            conn.scalars(
                select(MESSAGES.c.idempotency_key).where(MESSAGES.c.idempotency_key.in_(chunk))
            )
        )
    return stored


def _message_ids(conn: Connection, keys: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for i in range(0, len(keys), KEY_CHUNK):
        chunk = keys[i : i + KEY_CHUNK]
        for id_, key in conn.execute(
            select(MESSAGES.c.id, MESSAGES.c.idempotency_key).where(
                MESSAGES.c.idempotency_key.in_(chunk)
            )
        ):
            ids[key] = id_
    return ids
