"""The bulk insert's statement cache: one database's SQL is never served to another."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect

from dmarcmilter.history import bulk
from dmarcmilter.history.bulk import MESSAGES, _statement, _UnnestStatement

DIALECTS: tuple[Callable[[], Dialect], ...] = (
    sqlite.pysqlite.dialect,
    postgresql.psycopg.dialect,
    mysql.pymysql.dialect,
)


def _fits(statement: bulk._Statement, dialect: Dialect) -> bool:
    if dialect.name == "postgresql":
        return isinstance(statement, _UnnestStatement)
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    return not isinstance(statement, _UnnestStatement) and statement.group.startswith("(" + mark)


def test_a_freed_dialects_statements_are_not_served_to_the_next() -> None:
    # Dialects of different databases, each freed before the next is made:
    # CPython reuses the freed object's address, so a cache keyed by id()
    # hands SQLite's "?" statement to PostgreSQL or MySQL (and did, most
    # rounds, before the cache was keyed by the object).
    wrong = []
    for _ in range(100):
        for make in DIALECTS:
            dialect = make()
            statement = _statement(dialect, MESSAGES)
            if not _fits(statement, dialect):
                wrong.append((dialect.name, type(statement).__name__, statement.group))
            del dialect, statement
    assert wrong == []


def test_statements_go_with_their_dialect() -> None:
    gc.collect()
    dialect = sqlite.pysqlite.dialect()
    first = _statement(dialect, MESSAGES)
    assert _statement(dialect, MESSAGES) is first  # built once per dialect and table
    gone = weakref.ref(dialect)
    before = len(bulk._statements)
    del dialect, first
    gc.collect()
    assert gone() is None  # the cache keeps no dialect alive
    assert len(bulk._statements) == before - 1
