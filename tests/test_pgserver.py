"""The throwaway PostgreSQL cluster: reachable, and it survives a stop and start."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from tests.pgserver import PostgresServer


def test_url_exported(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://")
    assert pg_url.endswith("/dmarcmilter_test")
    assert os.environ["DMARCMILTER_TEST_PG_URL"] == pg_url


def test_stop_and_start_keeps_data(pg_server: PostgresServer, pg_url: str) -> None:
    engine = sa.create_engine(pg_url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("select version()")).scalar_one()
            assert version.startswith("PostgreSQL ")
            assert conn.execute(sa.text("show fsync")).scalar_one() == "off"
        with engine.begin() as conn:
            conn.execute(sa.text("drop table if exists pg_restart_probe"))
            conn.execute(sa.text("create table pg_restart_probe (id int primary key, v text)"))
            conn.execute(sa.text("insert into pg_restart_probe values (1, 'kept')"))

        pg_server.stop()
        assert not pg_server.running
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.execute(sa.text("select 1"))

        pg_server.start()
        assert pg_server.running
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select id, v from pg_restart_probe")).all()
            assert [tuple(row) for row in rows] == [(1, "kept")]
        with engine.begin() as conn:
            conn.execute(sa.text("drop table pg_restart_probe"))
    finally:
        engine.dispose()
