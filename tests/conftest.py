"""Shared fixtures: the loopback DNS server and resolvers pointed at it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmarcmilter.resolver import Resolver, ResolverSettings
from tests.dnsserver import TestDNSServer
from tests.pgserver import PostgresServer, PostgresUnavailable, start_server

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
    env.setenv("DMARCMILTER_TEST_PG_URL", server.url)
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
