"""Shared fixtures: the loopback DNS server and resolvers pointed at it,
history databases (SQLite, and throwaway PostgreSQL and MariaDB servers), and
throwaway Postfix instances."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy.engine import Engine

from dmarcmilter.history import db
from dmarcmilter.history.models import Base
from dmarcmilter.resolver import Resolver, ResolverSettings
from tests.dnsserver import TestDNSServer
from tests.mysqlserver import MySQLServer, MySQLUnavailable
from tests.mysqlserver import start_server as start_mysql_server
from tests.pgserver import PostgresServer, PostgresUnavailable, start_server
from tests.postfixserver import (
    PostfixInstances,
    PostfixServer,
    PostfixUnavailable,
    ReportSink,
    check_available,
    reap_stale,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ENV = "DMARCMILTER_TEST_PG_URL"
MYSQL_ENV = "DMARCMILTER_TEST_MYSQL_URL"


def shared_path(*parts: str) -> Path:
    """A file under ../shared; skip outside CI when it is absent, fail in CI."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing; CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not found: the conformance data in ../shared is absent")
    return path


@pytest.fixture(scope="session")
def dns_server_session() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    yield server
    server.stop()


@pytest.fixture
def dns_server(dns_server_session: TestDNSServer) -> Iterator[TestDNSServer]:
    """The shared test DNS server, emptied for each test."""
    dns_server_session.set_zone({})
    dns_server_session.clear_log()
    yield dns_server_session
    dns_server_session.set_zone({})


@pytest.fixture
def resolver(dns_server: TestDNSServer) -> Resolver:
    """A fresh resolver (empty cache) pointed at the test DNS server."""
    return Resolver(
        ResolverSettings(
            nameservers=(dns_server.host,),
            port=dns_server.port,
            query_timeout=0.5,
            message_budget=5.0,
        )
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the session (skipped outside CI if unavailable)."""
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL unavailable, skipping: {exc}")
    env = pytest.MonkeyPatch()
    env.setenv(PG_ENV, server.url)
    try:
        yield server
    finally:
        env.undo()
        server.cleanup()


@pytest.fixture(scope="session")
def pg_url(pg_cluster: PostgresServer) -> str:
    """SQLAlchemy URL of the test database; also exported as $DMARCMILTER_TEST_PG_URL."""
    return pg_cluster.url


@pytest.fixture
def pg_server(pg_cluster: PostgresServer) -> Iterator[PostgresServer]:
    """The session's cluster, for tests that stop() and start() it; running again afterwards."""
    pg_cluster.start()
    yield pg_cluster
    pg_cluster.start()


@pytest.fixture
def pg_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """A PostgreSQL database, empty at the start and at the end of each test:
    the one $DMARCMILTER_TEST_PG_URL names, else the suite's throwaway
    cluster (``pg_url``, which skips with the reason when PostgreSQL is
    unavailable outside CI)."""
    url = os.environ.get(PG_ENV) or str(request.getfixturevalue("pg_url"))
    # Start and end with an empty schema, whatever an earlier run left
    # (even a revision Alembic does not know, so not via a downgrade).
    drop_all(url)
    yield url
    drop_all(url)


def drop_all(url: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def mysql_cluster() -> Iterator[MySQLServer]:
    """A throwaway MariaDB server for the session (skipped outside CI if unavailable)."""
    try:
        server = start_mysql_server()
    except MySQLUnavailable as exc:
        if IN_CI:
            pytest.fail(f"MariaDB is required in CI: {exc}")
        pytest.skip(f"MariaDB unavailable, skipping: {exc}")
    env = pytest.MonkeyPatch()
    env.setenv(MYSQL_ENV, server.url)
    try:
        yield server
    finally:
        env.undo()
        server.cleanup()


@pytest.fixture(scope="session")
def mysql_url(mysql_cluster: MySQLServer) -> str:
    """SQLAlchemy URL of the test database; also exported as $DMARCMILTER_TEST_MYSQL_URL."""
    return mysql_cluster.url


@pytest.fixture
def mysql_server(mysql_cluster: MySQLServer) -> Iterator[MySQLServer]:
    """The session's server, for tests that stop() and start() it; running again afterwards."""
    mysql_cluster.start()
    yield mysql_cluster
    mysql_cluster.start()


@pytest.fixture
def mysql_db(request: pytest.FixtureRequest) -> Iterator[str]:
    """A MySQL or MariaDB database, empty at the start and at the end of each
    test: the one $DMARCMILTER_TEST_MYSQL_URL names, else the suite's
    throwaway server (``mysql_url``, which skips with the reason when MariaDB
    is unavailable outside CI)."""
    url = os.environ.get(MYSQL_ENV) or str(request.getfixturevalue("mysql_url"))
    drop_all(url)
    yield url
    drop_all(url)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated history database: SQLite, and PostgreSQL and MariaDB when
    they are available."""
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_db"))
    elif request.param == "mysql":
        url = str(request.getfixturevalue("mysql_db"))
    else:
        url = f"sqlite:///{tmp_path / 'state' / 'history.sqlite3'}"
    db.upgrade(url)
    return url


@pytest.fixture
def sink() -> Iterator[ReportSink]:
    """The report smarthost: an SMTP server on loopback keeping what it gets."""
    server = ReportSink().start()
    yield server
    server.stop()


@pytest.fixture
def engine(migrated: str) -> Iterator[Engine]:
    """An engine on the ``migrated`` database, disposed of afterwards."""
    engine = db.make_engine(migrated)
    yield engine
    engine.dispose()


def _postfix_unavailable(exc: PostfixUnavailable) -> NoReturn:
    if IN_CI:
        pytest.fail(f"Postfix is required in CI: {exc}")
    pytest.skip(f"Postfix unavailable, skipping: {exc}")


class _PostfixInstances(PostfixInstances):
    def start(self, **options: Any) -> PostfixServer:
        try:
            return super().start(**options)
        except PostfixUnavailable as exc:
            _postfix_unavailable(exc)


@pytest.fixture(scope="session")
def postfix_instances() -> Iterator[PostfixInstances]:
    """Throwaway Postfix instances (tests/postfixserver.py):
    ``postfix_instances.start(**options)`` returns a running one (``options`` as
    for ``PostfixServer``: ``milter``, ``milter_default_action``,
    ``milter_protocol``, ``settings``, ``sink``) and ``remove(server)`` removes
    it; whatever is left is removed at the end of the session.  When Postfix
    cannot run here (not installed, not root) or an instance does not start, the
    test is skipped outside CI and failed in CI.  Instances left behind by a
    killed earlier run are removed first."""
    try:
        check_available()
    except PostfixUnavailable as exc:
        _postfix_unavailable(exc)
    reap_stale()
    instances = _PostfixInstances()
    try:
        yield instances
    finally:
        instances.cleanup()


@pytest.fixture
def postfix_server(postfix_instances: PostfixInstances) -> Iterator[PostfixServer]:
    """A fresh instance for one test: no milter, mail delivered to its sink."""
    server = postfix_instances.start()
    try:
        yield server
    finally:
        postfix_instances.remove(server)
