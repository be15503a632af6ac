"""The history store's foundation: migrations, schema checks, row conversion,
pruning and the ``dmarcmilter db`` commands.

The migrations are run from an empty database and compared with the models
by Alembic's own autogenerate comparison, on SQLite always and on PostgreSQL
and MariaDB when they are available: the databases ``DMARCMILTER_TEST_PG_URL``
and ``DMARCMILTER_TEST_MYSQL_URL`` name, else the throwaway servers of
``tests/pgserver.py`` and ``tests/mysqlserver.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, String, Table, Text, create_engine, func, inspect, select
from sqlalchemy import insert as insert_into
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from dmarcmilter.config import Config, DNSConfig, config_from_mapping
from dmarcmilter.errors import ConfigError, SchemaError
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.history import db
from dmarcmilter.history.bulk import insert_rows
from dmarcmilter.history.models import (
    Base,
    DKIMResultRow,
    FailureIncidentRow,
    LateMessageRow,
    MessageRow,
    OverrideReasonRow,
    ReportBounceRow,
)
from dmarcmilter.history.rows import (
    LATER_COLUMNS,
    message_columns,
    message_from_row,
    message_row,
    new_idempotency_key,
)
from dmarcmilter.message import Message
from dmarcmilter.policy import Decision, decide
from dmarcmilter.resolver import Resolver
from tests.conftest import drop_all
from tests.dnsserver import TestDNSServer
from tests.history_worker import make_row
from tests.mysqlserver import MySQLServer
from tests.signing import dkim_sign, dkim_zone, make_message

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80"), ("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.example.com": [("A", "192.0.2.1")],
    "_dmarc.example.com": [
        ("TXT", "v=DMARC1; p=reject; sp=quarantine; rua=mailto:a@example.com,mailto:b@x.example")
    ],
    "thirdparty.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    **dkim_zone("example.com", "s1"),
    **dkim_zone("thirdparty.example", "esp", "ed25519"),
}


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def url(tmp_path: Path) -> str:
    # A subdirectory that does not exist yet: make_engine must create it.
    return sqlite_url(tmp_path / "state" / "history.sqlite3")


def schema_diffs(url: str) -> list[Any]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


# -- migrations ---------------------------------------------------------------


def test_migrations_from_empty_sqlite_match_models(url: str) -> None:
    db.upgrade(url)
    assert schema_diffs(url) == []
    assert db.schema_status(url) == ("0005", "0005")
    db.check_schema(url)


def test_sqlite_connections_are_set_up(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
            }
    finally:
        engine.dispose()
    # synchronous: 1 is NORMAL.
    assert pragmas == {
        "journal_mode": "wal",
        "busy_timeout": 5000,
        "synchronous": 1,
        "foreign_keys": 1,
    }


def test_upgrade_is_idempotent(migrated: str) -> None:
    db.upgrade(migrated)
    assert db.schema_status(migrated) == ("0005", "0005")


def test_indexes_and_cascades(migrated: str) -> None:
    engine = db.make_engine(migrated)
    try:
        insp = inspect(engine)
        indexes = {ix["name"]: ix["column_names"] for ix in insp.get_indexes("messages")}
        assert indexes["ix_messages_policy_domain_arrived_at_record_key"] == [
            "policy_domain",
            "arrived_at",
            "record_key",
        ]
        assert indexes["ix_messages_arrived_at"] == ["arrived_at"]
        uniques = insp.get_unique_constraints("messages")
        assert [u["column_names"] for u in uniques] == [["idempotency_key"]]
        for table in ("dkim_results", "override_reasons"):
            (fk,) = insp.get_foreign_keys(table)
            assert fk["referred_table"] == "messages"
            assert fk["options"].get("ondelete") == "CASCADE"
    finally:
        engine.dispose()


def test_downgrade_to_empty_and_back(migrated: str) -> None:
    command.downgrade(db.alembic_config(migrated), "base")
    assert db.schema_status(migrated) == (None, "0005")
    db.upgrade(migrated)
    assert schema_diffs(migrated) == []


def test_suppressions_table(migrated: str) -> None:
    engine = db.make_engine(migrated)
    try:
        insp = inspect(engine)
        uniques = insp.get_unique_constraints("suppressions")
        assert [u["column_names"] for u in uniques] == [["target"]]
        nullable = {c["name"]: c["nullable"] for c in insp.get_columns("suppressions")}
        assert [name for name, null in nullable.items() if null] == [
            "suppressed_at",
            "expires_at",
            "last_bounce_at",
        ]
    finally:
        engine.dispose()


def test_upgrade_from_0002_adds_suppressions_and_keeps_rows(migrated: str) -> None:
    command.downgrade(db.alembic_config(migrated), "0002")
    assert db.schema_status(migrated) == ("0002", "0005")
    engine = db.make_engine(migrated)
    try:
        assert "suppressions" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    # A row as a 0002 database holds it: without the columns added since.
    columns = message_columns(make_row("Q2"))
    for later in LATER_COLUMNS:
        del columns[later]
    engine = db.make_engine(migrated)
    try:
        with engine.begin() as conn:
            old = Table("messages", MetaData(), autoload_with=conn)
            message_id = conn.execute(old.insert().values(columns)).inserted_primary_key[0]
    finally:
        engine.dispose()
    db.upgrade(migrated)
    assert schema_diffs(migrated) == []
    row = stored(migrated, message_id)
    assert (row["queue_id"], row["mailing_list"]) == ("Q2", False)


@pytest.mark.parametrize("database", ["pg_db", "mysql_db"], ids=["postgresql", "mysql"])
def test_migrations_from_empty_server_match_models(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue(database))
    with pytest.raises(SchemaError):
        db.check_schema(url)
    db.upgrade(url)
    assert schema_diffs(url) == []
    db.check_schema(url)


@pytest.mark.parametrize("scheme", ["mysql+pymysql", "mysql", "mariadb"])
def test_mysql_schema_details(mysql_db: str, scheme: str) -> None:
    """What Alembic's comparison does not see: the fractional seconds, the
    text types, the character set, the collation and the storage engine.
    The bare schemes use the default driver, and "mariadb" the dialect that
    reads only mariadb_ options."""
    url = scheme + mysql_db[mysql_db.index(":") :]
    db.upgrade(url)
    assert schema_diffs(url) == []
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.dialect.name == scheme.partition("+")[0]
            tables = conn.exec_driver_sql(
                "SELECT table_name, engine, table_collation FROM information_schema.tables"
                " WHERE table_schema = DATABASE() AND table_name <> 'alembic_version'"
            ).all()
            columns = conn.exec_driver_sql(
                "SELECT table_name, column_name, column_type, character_set_name,"
                " collation_name FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND table_name <> 'alembic_version'"
            ).all()
    finally:
        engine.dispose()
    assert sorted(tuple(t) for t in tables) == [
        (name, "InnoDB", "utf8mb4_bin") for name in sorted(Base.metadata.tables)
    ]
    types = {(t, c): ctype for t, c, ctype, _, _ in columns}
    assert types[("messages", "arrived_at")] == "datetime(6)"
    # A compressed report can be larger than BLOB's 64 KB.
    assert types[("reports", "content")] == "longblob"
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, Text):
                assert types[(table.name, column.name)] == "mediumtext", column
    # Every text column, VARCHAR and MEDIUMTEXT alike.
    texts = {(t, c): (cs, coll) for t, c, _, cs, coll in columns if cs is not None}
    assert len(texts) == sum(
        isinstance(c.type, String) for t in Base.metadata.sorted_tables for c in t.columns
    )
    assert set(texts.values()) == {("utf8mb4", "utf8mb4_bin")}


def test_mysql_sessions_are_strict_whatever_the_server_default(
    mysql_cluster: MySQLServer,
) -> None:
    """An overlong value is refused, not cut short, even where the server's
    SQL mode is not strict: make_engine asks for strict mode per session.
    On the suite's own server, whose global settings the test may change."""
    url = mysql_cluster.url
    drop_all(url)
    db.upgrade(url)
    admin = db.make_engine(mysql_cluster.admin_url)
    with admin.connect() as conn:
        mode = conn.exec_driver_sql("SELECT @@GLOBAL.sql_mode").scalar()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SET GLOBAL sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        # A plain engine gets the server's new default...
        assert session_sql_mode(create_engine(url)) == {"NO_ENGINE_SUBSTITUTION"}
        # ...and dmarcmilter's adds strict mode to it.
        assert session_sql_mode(db.make_engine(url)) == {
            "NO_ENGINE_SUBSTITUTION",
            "STRICT_TRANS_TABLES",
        }
        row = make_row("Q1")
        row["dmarc_result"] = "x" * 40  # VARCHAR(32)
        with pytest.raises(DataError, match="Data too long for column 'dmarc_result'"):
            insert(url, row)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("SET GLOBAL sql_mode = %s", (mode,))
        admin.dispose()
        drop_all(url)


def session_sql_mode(engine: Engine) -> set[str]:
    try:
        with engine.connect() as conn:
            return set(str(conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()).split(","))
    finally:
        engine.dispose()


# -- schema checks ------------------------------------------------------------


def test_check_schema_on_empty_database(url: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaError) as info:
        db.check_schema(url)
    assert str(info.value) == (
        "database schema is at nothing (empty database), this dmarcmilter needs 0005: "
        "run `dmarcmilter db upgrade`"
    )
    # Asking did not create the file.
    assert not (tmp_path / "state" / "history.sqlite3").exists()


def test_check_schema_on_unknown_revision(migrated: str) -> None:
    # A database stamped with a revision this version does not have, as a
    # newer dmarcmilter would leave it.
    engine = db.make_engine(migrated)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    finally:
        engine.dispose()
    with pytest.raises(
        SchemaError,
        match=r"^database schema is at 0000, this dmarcmilter needs 0005: "
        r"run `dmarcmilter db upgrade`$",
    ):
        db.check_schema(migrated)
    with pytest.raises(SchemaError, match=r"^database schema is at 0000, which this dmarcmilter"):
        db.upgrade(migrated)
    proc = cli("upgrade", "--url", migrated)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dmarcmilter db upgrade: error: database schema is at 0000")
    assert len(proc.stderr.splitlines()) == 1


# -- rows ---------------------------------------------------------------------


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.set_zone(ZONE)
    return dns_server


def run(
    resolver: Resolver,
    server: TestDNSServer,
    message: bytes,
    *,
    mail_from: str = "bounce@bounce.example.com",
    rcpt: tuple[str, ...] = ("user@Receiver.Example", "other@elsewhere.example"),
) -> tuple[Evaluation, Decision]:
    config = Config(dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=0.5))
    envelope = Envelope.create("192.0.2.1", "mx.example.com", mail_from, rcpt, "4XyZ1")
    ev = evaluate(envelope, Message.from_bytes(message), resolver.session(), config, now=NOW)
    return ev, decide(ev, config.policy)


def insert(url: str, row: dict[str, Any]) -> int:
    engine = db.make_engine(url)
    try:
        with Session(engine) as session, session.begin():
            message = message_from_row(row)
            session.add(message)
            session.flush()
            return message.id
    finally:
        engine.dispose()


def stored(url: str, message_id: int) -> dict[str, Any]:
    """The stored message and children, in message_row's shape."""
    engine = db.make_engine(url)
    try:
        with Session(engine) as session:
            m = session.get_one(MessageRow, message_id)
            data = {c.key: getattr(m, c.key) for c in MessageRow.__table__.columns}
            del data["id"]
            # SQLite returns naive datetimes (the column stores UTC);
            # PostgreSQL returns them in the session's time zone.
            arrived = data["arrived_at"]
            if arrived.tzinfo is None:
                arrived = arrived.replace(tzinfo=dt.UTC)
            data["arrived_at"] = arrived.astimezone(dt.UTC).isoformat()
            data["dkim_results"] = [
                {
                    "domain": d.domain,
                    "selector": d.selector,
                    "result": d.result,
                    "human_result": d.human_result,
                }
                for d in m.dkim_results
            ]
            data["override_reasons"] = [
                {"type": r.type, "comment": r.comment} for r in m.override_reasons
            ]
            return data
    finally:
        engine.dispose()


def test_message_row_aligned_pass_round_trips(
    zone: TestDNSServer, resolver: Resolver, migrated: str
) -> None:
    msg = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    msg = dkim_sign(msg, "thirdparty.example", "esp", "ed25519")
    ev, decision = run(resolver, zone, msg)
    row = message_row(ev, decision, key="0" * 32)
    # The row is plain data: what the writer journals is what it inserts.
    assert json.loads(json.dumps(row)) == row
    assert row["idempotency_key"] == "0" * 32
    assert row["arrived_at"] == "2026-05-01T12:00:00+00:00"
    assert row["queue_id"] == "4XyZ1"
    assert row["envelope_from_domain"] == "bounce.example.com"
    assert row["envelope_to_domain"] == "receiver.example"
    assert row["header_from_domain"] == "example.com"
    assert row["policy_domain"] == "example.com"
    assert row["org_domain"] == "example.com"
    assert (row["p"], row["sp"], row["np"]) == ("reject", "quarantine", None)
    assert (row["adkim"], row["aspf"], row["testing"], row["psd"]) == ("r", "r", "n", "u")
    assert row["rua"] == "mailto:a@example.com,mailto:b@x.example"
    assert row["ruf"] == ""
    assert row["discovery_method"] == "treewalk"
    assert (row["dmarc_result"], row["policy_evaluated"], row["disposition"]) == (
        "pass",
        "reject",
        "pass",
    )
    assert row["dkim_aligned"] is True
    assert row["spf_aligned"] is True
    assert (row["spf_domain"], row["spf_scope"], row["spf_result"]) == (
        "bounce.example.com",
        "mfrom",
        "pass",
    )
    assert row["arc_result"] == "none"
    # The aligned signature first, whatever the message's order.
    assert [d["domain"] for d in row["dkim_results"]] == ["example.com", "thirdparty.example"]
    assert row["dkim_summary"] == (
        '[["example.com","s1","pass"],["thirdparty.example","esp","pass"]]'
    )
    assert row["reasons_summary"] == "[]"
    message_id = insert(migrated, row)
    assert stored(migrated, message_id) == row


def test_message_row_failure_with_override_round_trips(
    zone: TestDNSServer, resolver: Resolver, migrated: str
) -> None:
    # Unsigned, and the MAIL FROM is the null path: SPF checks the HELO.
    ev, decision = run(resolver, zone, make_message(from_="alice@example.com"), mail_from="")
    row = message_row(ev, decision)
    assert len(row["idempotency_key"]) == 32
    assert row["envelope_from_domain"] == ""
    assert row["dmarc_result"] == "fail"
    assert row["disposition"] == "quarantine"
    assert row["dkim_results"] == []
    assert row["dkim_summary"] == "[]"
    assert [r["type"] for r in row["override_reasons"]] == ["local_policy"]
    assert json.loads(row["reasons_summary"]) == [
        [r["type"], r["comment"]] for r in row["override_reasons"]
    ]
    message_id = insert(migrated, row)
    assert stored(migrated, message_id) == row


def test_message_row_without_policy(zone: TestDNSServer, resolver: Resolver, migrated: str) -> None:
    ev, decision = run(resolver, zone, make_message(from_="bob@nowhere.example"), rcpt=())
    row = message_row(ev, decision)
    assert row["policy_domain"] is None
    assert row["p"] is None and row["rua"] is None and row["testing"] is None
    assert row["envelope_to_domain"] is None
    assert row["dmarc_result"] == "none"
    assert stored(migrated, insert(migrated, row)) == row


def test_idempotency_key_is_unique(migrated: str, zone: TestDNSServer, resolver: Resolver) -> None:
    ev, decision = run(resolver, zone, make_message(from_="alice@example.com"))
    key = new_idempotency_key()
    assert len(key) == 32 and int(key, 16) >= 0
    insert(migrated, message_row(ev, decision, key=key))
    with pytest.raises(IntegrityError):
        insert(migrated, message_row(ev, decision, key=key))


# -- pruning ------------------------------------------------------------------


def test_prune_deletes_old_messages_and_children(
    zone: TestDNSServer, resolver: Resolver, migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PRUNE_BATCH", 2)  # several batches
    msg = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    ev, decision = run(resolver, zone, msg)
    fail_ev, fail_decision = run(
        resolver, zone, make_message(from_="alice@example.com"), mail_from="b@thirdparty.example"
    )
    base = message_row(ev, decision)
    fail = message_row(fail_ev, fail_decision)
    ids = {}
    for days in (0, 1, 29, 31, 40, 45, 90):
        for name, template in (("pass", base), ("fail", fail)):
            row = dict(template, idempotency_key=new_idempotency_key())
            row["arrived_at"] = (NOW - dt.timedelta(days=days)).isoformat()
            ids[(days, name)] = insert(migrated, row)
    engine = db.make_engine(migrated)
    try:
        # What else a message owns, and the bounces of report mail.
        with engine.begin() as conn:
            for (days, name), pk in ids.items():
                at = NOW - dt.timedelta(days=days)
                conn.execute(insert_into(LateMessageRow).values(message_pk=pk, claim=None))
                if name == "fail":
                    conn.execute(
                        insert_into(FailureIncidentRow).values(
                            message_pk=pk,
                            arrived_at=at,
                            policy_domain="example.com",
                            reported_domain="example.com",
                            source_ip="192.0.2.1",
                            kinds="dmarc",
                            ruf="mailto:ruf@example.com",
                            sample="{}",
                            status="pending",
                        )
                    )
                    conn.execute(
                        insert_into(ReportBounceRow).values(
                            received_at=at,
                            original_message_id=f"<r{days}.t@mx.example>",
                            address="ruf@example.com",
                            status="5.1.1",
                            diagnostic="",
                            reporting_mta="",
                        )
                    )
        deleted = db.prune(migrated, dt.timedelta(days=30), now=NOW)
        assert deleted == 8
        kept = {ids[(d, n)] for d in (0, 1, 29) for n in ("pass", "fail")}
        with Session(engine) as session:
            left = set(session.scalars(select(MessageRow.id)))
            assert left == kept
            dkim_owners = set(session.scalars(select(DKIMResultRow.message_id)))
            reason_owners = set(session.scalars(select(OverrideReasonRow.message_id)))
            assert dkim_owners == {ids[(d, "pass")] for d in (0, 1, 29)}
            assert reason_owners == {ids[(d, "fail")] for d in (0, 1, 29)}
            assert set(session.scalars(select(LateMessageRow.message_pk))) == kept
            assert set(session.scalars(select(FailureIncidentRow.message_pk))) == {
                ids[(d, "fail")] for d in (0, 1, 29)
            }
            assert sorted(session.scalars(select(ReportBounceRow.original_message_id))) == [
                "<r0.t@mx.example>",
                "<r1.t@mx.example>",
                "<r29.t@mx.example>",
            ]
    finally:
        engine.dispose()
    assert db.prune(migrated, dt.timedelta(days=30), now=NOW) == 0


def test_cascade_deletes_children(zone: TestDNSServer, resolver: Resolver, migrated: str) -> None:
    ev, decision = run(
        resolver, zone, dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    )
    message_id = insert(migrated, message_row(ev, decision))
    engine = db.make_engine(migrated)
    try:
        with engine.begin() as conn:
            conn.execute(MessageRow.__table__.delete().where(MessageRow.id == message_id))
            count = conn.scalar(select(func.count()).select_from(DKIMResultRow))
        assert count == 0
    finally:
        engine.dispose()


def test_prune_needs_current_schema(url: str) -> None:
    with pytest.raises(SchemaError):
        db.prune(url, dt.timedelta(days=1))


# -- configuration ------------------------------------------------------------


def test_database_url_defaults_to_state_dir(tmp_path: Path) -> None:
    config = config_from_mapping({"paths": {"state_dir": str(tmp_path)}})
    assert config.database_url() == f"sqlite:///{tmp_path}/history.sqlite3"
    config = config_from_mapping({"database": {"url": "postgresql://u@db/dmarc"}})
    assert config.database_url() == "postgresql://u@db/dmarc"


def test_default_state_dir_is_usable() -> None:
    state = Config().effective_state_dir()
    assert state in (Path("/var/lib/dmarcmilter"), Path.cwd() / "state")


@pytest.mark.parametrize("bad", ["not a url", "oracle://u@h/db", "://"])
def test_invalid_database_url_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: database\.url: "):
        config_from_mapping({"database": {"url": bad}}, "x.toml")


# -- command line -------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", "db", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def test_cli_upgrade_status_prune(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "db" / "h.sqlite3")
    proc = cli("status", "--url", url)
    assert proc.returncode == 1, proc.stderr
    assert "Schema revision: - (empty database)" in proc.stdout
    proc = cli("upgrade", "--url", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{url}: schema upgraded from empty to 0005\n"
    proc = cli("upgrade", "--url", url)
    assert proc.stdout == f"{url}: schema already at 0005\n"
    proc = cli("status", "--url", url)
    assert proc.returncode == 0, proc.stderr
    assert "Schema revision: 0005" in proc.stdout
    for age in ("30d", "12h", "8w"):
        proc = cli("prune", "--older-than", age, "--url", url)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"{url}: deleted 0 message(s) older than {age}\n"


def test_cli_uses_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "d.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path / "st"}"\n')
    proc = cli("upgrade", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "st" / "history.sqlite3").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("prune", "--older-than", "30"), "--older-than: expected a positive number"),
        (("prune", "--older-than", "3x"), "--older-than: expected a positive number"),
        (("prune", "--older-than", "0d"), "--older-than: expected a positive number"),
        (("prune", "--older-than=-1d"), "--older-than: expected a positive number"),
        (("status", "--url", "oracle://h/db"), "--url: unsupported database 'oracle'"),
        (("status", "--url", "nonsense"), "--url: not a database URL"),
        (("upgrade", "--config", "/nonexistent.toml"), "/nonexistent.toml: file not found"),
        (
            ("prune", "--older-than", "30d", "--url", "sqlite:///{tmp}/x.db"),
            "database schema is at nothing",
        ),
        (("frobnicate",), "invalid choice"),
        (("prune",), "required: --older-than"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert lines[0].startswith("dmarcmilter")


def test_client_supplied_values_of_any_length_insert(
    zone: TestDNSServer, resolver: Resolver, migrated: str
) -> None:
    # HELO, envelope domains, queue ids and DKIM d=/s= come from the client
    # or the message unvalidated; PostgreSQL would refuse an over-long
    # VARCHAR, and MySQL more than 64 KB in a TEXT.
    msg = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    ev, decision = run(resolver, zone, msg)
    row = message_row(ev, decision)
    long = "x" * 70_000
    row.update(
        helo=long,
        queue_id=long,
        envelope_from_domain=long,
        envelope_to_domain=long,
        spf_domain=long,
    )
    row["dkim_results"][0].update(domain=long, selector=long)
    assert stored(migrated, insert(migrated, row)) == row


def test_arrival_time_is_stored_in_utc(
    zone: TestDNSServer, resolver: Resolver, migrated: str
) -> None:
    ev, decision = run(resolver, zone, make_message(from_="alice@example.com"))
    row = message_row(ev, decision)
    # With microseconds, which MySQL's DATETIME would drop (or round away).
    row["arrived_at"] = "2026-05-01T14:00:00.999999+02:00"
    assert stored(migrated, insert(migrated, row))["arrived_at"] == (
        "2026-05-01T12:00:00.999999+00:00"
    )


def test_list_mail_is_recorded_and_older_lines_read_as_not_list_mail(
    zone: TestDNSServer, resolver: Resolver, migrated: str
) -> None:
    listed = make_message(from_="alice@example.com", extra_headers=[("List-Id", "<l.example>")])
    plain = make_message(from_="alice@example.com")
    list_row = message_row(*run(resolver, zone, listed))
    plain_row = message_row(*run(resolver, zone, plain))
    assert (list_row["mailing_list"], plain_row["mailing_list"]) == (True, False)
    # A line journaled before the column existed.
    older = dict(plain_row, idempotency_key=new_idempotency_key())
    del older["mailing_list"]
    ids = [insert(migrated, row) for row in (list_row, plain_row, older)]
    assert [stored(migrated, i)["mailing_list"] for i in ids] == [True, False, False]
    # The writer's multi-row INSERT path too.
    engine = db.make_engine(migrated)
    try:
        with engine.begin() as conn:
            again = [dict(r, idempotency_key=new_idempotency_key()) for r in (list_row, older)]
            count, refused = insert_rows(conn, again, skip_existing=True)
        assert (count, refused) == (2, [])
        with engine.connect() as conn:
            keys = [r["idempotency_key"] for r in again]
            flags = dict(
                conn.execute(
                    select(MessageRow.idempotency_key, MessageRow.mailing_list).where(
                        MessageRow.idempotency_key.in_(keys)
                    )
                ).all()
            )
        assert [flags[k] for k in keys] == [True, False]
    finally:
        engine.dispose()
