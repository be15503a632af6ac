"""The history writer and its journal, against real databases.

The outage tests stop the suite's real PostgreSQL and MariaDB servers in the
middle of a stream of rows, kill a writer process in the middle of a replay,
and run several writer processes against one database, as a fleet of MX
hosts would.  Each asserts that every row is stored exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.errors import SchemaError
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.history import db
from dmarcmilter.history.bulk import insert_rows
from dmarcmilter.history.journal import REJECTED_FILE, Journal, JournalError, encode
from dmarcmilter.history.models import DKIMResultRow, MessageRow, OverrideReasonRow
from dmarcmilter.history.rows import message_row
from dmarcmilter.history.writer import HistoryWriter
from dmarcmilter.message import Message
from dmarcmilter.policy import Decision, decide
from dmarcmilter.resolver import Resolver
from tests.conftest import ROOT
from tests.dnsserver import TestDNSServer
from tests.history_worker import make_row
from tests.mysqlserver import MySQLServer
from tests.pgserver import PostgresServer
from tests.signing import dkim_sign, dkim_zone, make_message

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com")],
    **dkim_zone("example.com", "s1"),
}

# The tests that need a database server run on PostgreSQL and on MariaDB.
SERVERS = pytest.mark.parametrize("database", ["pg_db", "mysql_db"], ids=["postgresql", "mysql"])

# A closed port on loopback: connecting is refused at once.
DEAD_PG = "postgresql+psycopg://postgres@127.0.0.1:9/none"


def count(url: str) -> tuple[int, int, int]:
    """(messages, distinct idempotency keys, distinct queue ids)."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(
                    func.count(),
                    func.count(MessageRow.idempotency_key.distinct()),
                    func.count(MessageRow.queue_id.distinct()),
                )
            ).one()
    finally:
        engine.dispose()
    return row[0], row[1], row[2]


def children(url: str) -> tuple[int, int]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            dkim = conn.scalar(select(func.count()).select_from(DKIMResultRow))
            reasons = conn.scalar(select(func.count()).select_from(OverrideReasonRow))
    finally:
        engine.dispose()
    return dkim or 0, reasons or 0


@pytest.fixture
def writers() -> Iterator[list[HistoryWriter]]:
    """Writers made by a test, closed at its end whatever happens."""
    made: list[HistoryWriter] = []
    yield made
    for writer in made:
        writer.close(timeout=5)


@pytest.fixture
def evaluated(dns_server: TestDNSServer, resolver: Resolver) -> list[tuple[Evaluation, Decision]]:
    """Real evaluations: an aligned DKIM pass and a p=reject failure (with a
    local_policy override reason)."""
    dns_server.set_zone(ZONE)
    config = Config(dns=DNSConfig(nameservers=(dns_server.host,), port=dns_server.port))
    envelope = Envelope.create(
        "192.0.2.1", "mx.example.com", "b@bounce.example.com", ["u@rx.example"]
    )
    signed = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    out = []
    for raw, env in (
        (signed, envelope),
        (
            make_message(from_="alice@example.com"),
            dataclasses.replace(envelope, client_ip="203.0.113.9"),
        ),
    ):
        ev = evaluate(env, Message.from_bytes(raw), resolver.session(), config)
        out.append((ev, decide(ev, config.policy)))
    assert [e.dmarc.result.value for e, _ in out] == ["pass", "fail"]
    return out


def with_queue_id(pair: tuple[Evaluation, Decision], queue_id: str) -> tuple[Evaluation, Decision]:
    ev, decision = pair
    return dataclasses.replace(
        ev, envelope=dataclasses.replace(ev.envelope, queue_id=queue_id)
    ), decision


def journal_lines(state_dir: Path) -> list[dict[str, Any]]:
    """Every row in the journal's segments, oldest first."""
    return [
        json.loads(line)
        for path in sorted(state_dir.glob("history-journal.*.jsonl"))
        # A segment being written is zero-filled past its last row.
        for line in path.read_bytes().partition(b"\0")[0].decode().splitlines()
    ]


def write_segment(state_dir: Path, rows: list[dict[str, Any]], generation: int = 1) -> Path:
    """A journal segment as an earlier run left it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"history-journal.{generation:012d}.jsonl"
    with open(path, "ab") as fh:
        fh.write(encode(rows))
    return path


# -- the normal path ---------------------------------------------------------------


def test_evaluations_are_stored_in_batches(
    migrated: str,
    tmp_path: Path,
    evaluated: list[tuple[Evaluation, Decision]],
    writers: list[HistoryWriter],
) -> None:
    writer = HistoryWriter(migrated, tmp_path / "state", batch_size=100, flush_interval=0.05)
    writers.append(writer)
    writer.start()
    for i in range(1000):
        writer.enqueue(*with_queue_id(evaluated[i % 2], f"Q{i}"))
    assert writer.wait_idle(30)
    assert count(migrated) == (1000, 1000, 1000)
    # 500 signed messages with one signature each; 500 failures with one reason.
    assert children(migrated) == (500, 500)
    stats = writer.stats()
    assert (stats.rows_written, stats.rows_unjournaled, stats.write_errors) == (1000, 0, 0)
    assert stats.queue_depth == 0 and stats.database_up and not stats.catching_up
    # Every row was journaled before it was stored.
    assert len(journal_lines(tmp_path / "state")) == 1000


def test_close_flushes_the_queue(migrated: str, tmp_path: Path) -> None:
    # A flush interval far longer than the test: only close() can write them.
    writer = HistoryWriter(migrated, tmp_path / "state", flush_interval=3600)
    writer.start()
    for i in range(10):
        writer.enqueue_row(make_row(f"Q{i}"))
    assert writer.close(timeout=10)
    assert count(migrated) == (10, 10, 10)


def test_stored_row_equals_the_journaled_shape(
    migrated: str,
    tmp_path: Path,
    evaluated: list[tuple[Evaluation, Decision]],
    writers: list[HistoryWriter],
) -> None:
    row = message_row(*evaluated[1], key="f" * 32)
    writer = HistoryWriter(migrated, tmp_path / "state")
    writers.append(writer)
    writer.start()
    writer.enqueue_row(row)
    assert writer.wait_idle(10)
    engine = db.make_engine(migrated)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(MessageRow.__table__)).mappings().one()
            reasons = conn.execute(select(OverrideReasonRow.__table__)).mappings().all()
    finally:
        engine.dispose()
    for key in ("client_ip", "disposition", "dmarc_result", "policy_domain", "reasons_summary"):
        assert stored[key] == row[key]
    assert stored["idempotency_key"] == "f" * 32
    assert [(r["position"], r["type"], r["comment"]) for r in reasons] == [
        (i, r["type"], r["comment"]) for i, r in enumerate(row["override_reasons"])
    ]


def test_a_batch_of_long_rows_is_stored(migrated: str, tmp_path: Path) -> None:
    # 20 MB of client-supplied text in one batch: more than MariaDB's
    # default max_allowed_packet, which must not make it look like an outage.
    rows = [make_row(f"Q{i}", helo="h" * 100_000) for i in range(200)]
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    for row in rows:
        writer.enqueue_row(row)
    assert writer.wait_idle(60)
    writer.close()
    stats = writer.stats()
    assert (stats.rows_written, stats.rows_unjournaled, stats.write_errors) == (200, 0, 0)
    assert count(migrated) == (200, 200, 200)


def test_an_ipv6_zone_is_not_stored(
    evaluated: list[tuple[Evaluation, Decision]],
) -> None:
    ev, decision = evaluated[0]
    ev = dataclasses.replace(
        ev, envelope=dataclasses.replace(ev.envelope, client_ip="fe80::1%eth0")
    )
    assert message_row(ev, decision)["client_ip"] == "fe80::1"


# -- refusing to start -------------------------------------------------------------


def test_a_database_behind_the_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    db.make_engine(url).dispose()
    writer = HistoryWriter(url, tmp_path / "state")
    with pytest.raises(SchemaError, match="run `dmarcmilter db upgrade`"):
        writer.start()
    # The journal lock was released: another writer may start.
    Journal(tmp_path / "state").close()


def test_one_state_directory_one_writer(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    try:
        with pytest.raises(JournalError, match="locked by another dmarcmilter process"):
            Journal(tmp_path)
    finally:
        first.close()


# -- the database is down ------------------------------------------------------------


def test_unreachable_database_journals_and_never_blocks(tmp_path: Path) -> None:
    writer = HistoryWriter(DEAD_PG, tmp_path, flush_interval=0.05, retry_initial=60)
    writer.start()  # an unreachable database is not a reason to refuse mail
    try:
        started = time.perf_counter()
        for i in range(200):
            writer.enqueue_row(make_row(f"Q{i}"))
        # Generous: what matters is that no call waited for the database.
        assert time.perf_counter() - started < 0.5
        assert not writer.wait_idle(1.0)  # the journal cannot drain
        stats = writer.stats()
        assert stats.catching_up and not stats.database_up
        assert stats.queue_depth == 0  # the rows wait on disk, not in memory
        assert (stats.rows_written, stats.rows_unjournaled, stats.rows_lost) == (0, 0, 0)
    finally:
        writer.close(timeout=10)
    assert [r["queue_id"] for r in journal_lines(tmp_path)] == [f"Q{i}" for i in range(200)]


def test_a_full_queue_is_read_back_from_the_journal(migrated: str, tmp_path: Path) -> None:
    # Batches larger than the queue and a flush interval longer than the
    # test: nothing drains the queue until wait_idle, so it fills up.
    writer = HistoryWriter(migrated, tmp_path, queue_size=10, batch_size=100, flush_interval=3600)
    writer.start()
    for i in range(25):
        writer.enqueue_row(make_row(f"Q{i}"))
    stats = writer.stats()
    assert stats.catching_up and stats.queue_depth == 0
    assert (stats.rows_unjournaled, stats.rows_lost) == (0, 0)
    assert writer.wait_idle(10)
    writer.close()
    assert count(migrated) == (25, 25, 25)


def test_postgresql_outage_during_10000_rows(
    pg_db: str, pg_server: PostgresServer, tmp_path: Path
) -> None:
    outage_during_10000_rows(pg_db, pg_server, tmp_path)


def test_mariadb_outage_during_10000_rows(
    mysql_db: str, mysql_server: MySQLServer, tmp_path: Path
) -> None:
    # PyMySQL's errors for a lost or refused connection must read as the
    # database being down, not as rows it refuses.
    outage_during_10000_rows(mysql_db, mysql_server, tmp_path)


def outage_during_10000_rows(
    url: str, server: PostgresServer | MySQLServer, tmp_path: Path
) -> None:
    db.upgrade(url)
    writer = HistoryWriter(
        url, tmp_path, batch_size=200, flush_interval=0.02, retry_initial=0.1, retry_max=0.5
    )
    writer.start()
    total = 10_000
    outage = threading.Event()

    def produce() -> None:
        for i in range(total):
            writer.enqueue_row(make_row(f"Q{i}"))
            if i == 3000:
                outage.set()
            if i % 100 == 0:
                time.sleep(0.01)  # about 10,000 rows a second, for a second or so

    producer = threading.Thread(target=produce)
    try:
        producer.start()
        assert outage.wait(30)
        server.stop()
        time.sleep(1.0)  # rows keep arriving while the database is down
        journaled_during_outage = writer.stats().catching_up
        server.start()
        producer.join(60)
        assert writer.wait_idle(60), writer.stats()
    finally:
        producer.join(60)
        writer.close()
    assert journaled_during_outage  # the outage really was hit
    stats = writer.stats()
    assert stats.write_errors > 0 and stats.rows_replayed > 0
    assert stats.rows_rejected == 0
    assert count(url) == (total, total, total)
    assert (stats.rows_unjournaled, stats.rows_lost) == (0, 0)
    # Replayed segments are deleted; the one being written stays.
    assert len(list(tmp_path.glob("history-journal.*.jsonl"))) <= 1


def test_replay_skips_rows_already_stored(migrated: str, tmp_path: Path) -> None:
    """As after a crash in the middle of a replay: half the journal left by
    the earlier run is in the database already."""
    rows = [make_row(f"Q{i}") for i in range(100)]
    write_segment(tmp_path, rows)
    engine = db.make_engine(migrated)
    try:
        with engine.begin() as conn:
            insert_rows(conn, rows[:50], skip_existing=False)
    finally:
        engine.dispose()
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    writer.close()
    assert count(migrated) == (100, 100, 100)
    assert children(migrated) == (100, 0)
    assert writer.stats().rows_replayed == 50


def test_torn_last_line_is_dropped(migrated: str, tmp_path: Path) -> None:
    segment = write_segment(tmp_path, [make_row("Q0"), make_row("Q1")])
    with open(segment, "a") as fh:
        fh.write('{"idempotency_key": "abc", "queue')  # a write cut short
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    writer.close()
    assert count(migrated) == (2, 2, 2)
    assert not segment.exists()  # replayed, then deleted
    assert not (tmp_path / REJECTED_FILE).exists()


def test_unreadable_journal_line_is_set_aside(migrated: str, tmp_path: Path) -> None:
    segment = write_segment(tmp_path, [make_row("Q0")])
    with open(segment, "a") as fh:
        fh.write("not json\n")
    write_segment(tmp_path, [make_row("Q1")])
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    writer.close()
    assert count(migrated) == (2, 2, 2)
    (rejected,) = (tmp_path / REJECTED_FILE).read_text().splitlines()
    assert json.loads(rejected)["row"] == {"raw": "not json"}


@SERVERS
def test_a_row_the_database_refuses_does_not_block_the_rest(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = str(request.getfixturevalue(database))
    db.upgrade(url)
    # dmarc_result is VARCHAR(32); PostgreSQL, and MariaDB in strict mode,
    # refuse the longer value (as DataError, not as the database failing).
    rows = [make_row(f"Q{i}") for i in range(10)]
    rows[4]["dmarc_result"] = "x" * 40
    writer = HistoryWriter(url, tmp_path)
    writer.start()
    for row in rows:
        writer.enqueue_row(row)
    assert writer.wait_idle(10)
    writer.close()
    assert count(url) == (9, 9, 9)
    (line,) = (tmp_path / REJECTED_FILE).read_text().splitlines()
    kept = json.loads(line)
    assert kept["row"]["queue_id"] == "Q4" and "too long" in kept["error"]
    stats = writer.stats()
    assert (stats.rows_written, stats.rows_rejected) == (9, 1)


# -- processes: a crash during replay, and a fleet ---------------------------------


def worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.history_worker", *args]


@SERVERS
def test_kill_during_replay_then_restart_stores_each_row_once(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = str(request.getfixturevalue(database))
    db.upgrade(url)
    total = 30_000
    segment = write_segment(tmp_path, [make_row(f"Q{i}") for i in range(total)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        worker("replay", url, str(tmp_path), "--batch-size", "100"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while count(url)[0] < total // 10:
            assert proc.poll() is None, "the replay finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    stored_at_kill = count(url)[0]
    assert 0 < stored_at_kill < total
    done = subprocess.run(
        worker("replay", url, str(tmp_path)), cwd=ROOT, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    assert count(url) == (total, total, total)
    assert children(url) == (total, 0)
    assert not segment.exists()


@SERVERS
def test_a_fleet_of_writers_shares_one_database(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = str(request.getfixturevalue(database))
    db.upgrade(url)
    hosts, each = 4, 5000
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            worker(
                "write", url, str(tmp_path / f"mx{n}"), "--count", str(each), "--prefix", f"mx{n}"
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n in range(hosts)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert count(url) == (hosts * each,) * 3
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            queue_ids = conn.scalars(select(MessageRow.queue_id)).all()
    finally:
        engine.dispose()
    per_host = collections.Counter(q.partition("-")[0] for q in queue_ids)
    assert per_host == {f"mx{n}": each for n in range(hosts)}


# -- text from the wire --------------------------------------------------------------


def test_undecodable_client_text_is_stored_with_replacement_characters(
    migrated: str,
    tmp_path: Path,
    evaluated: list[tuple[Evaluation, Decision]],
    writers: list[HistoryWriter],
) -> None:
    # pymilter hands over bytes that are not UTF-8 as lone surrogates.
    ev, decision = evaluated[0]
    envelope = dataclasses.replace(
        ev.envelope, helo="mx\udcff.example", mail_from="a@b\udcfe.example"
    )
    row = message_row(dataclasses.replace(ev, envelope=envelope), decision)
    assert row["helo"] == "mx\ufffd.example"
    assert row["envelope_from_domain"] == "b\ufffd.example"
    writer = HistoryWriter(migrated, tmp_path)
    writers.append(writer)
    writer.start()
    writer.enqueue_row(row)
    assert writer.wait_idle(10)
    assert count(migrated) == (1, 1, 1)


def test_a_row_the_driver_cannot_encode_is_set_aside(migrated: str, tmp_path: Path) -> None:
    # Were a lone surrogate to reach the writer anyway (a journal written by
    # hand, a bug), the driver refuses the text: that row alone is set aside.
    rows = [make_row(f"Q{i}") for i in range(5)]
    rows[2]["helo"] = "bad\udcff"
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    for row in rows:
        writer.enqueue_row(row)
    assert writer.wait_idle(10)
    writer.close()
    assert count(migrated) == (4, 4, 4)
    (line,) = (tmp_path / REJECTED_FILE).read_bytes().splitlines()
    assert json.loads(line.decode("utf-8", "surrogateescape"))["row"]["queue_id"] == "Q2"
    assert writer.stats().rows_rejected == 1


# -- journal segments ----------------------------------------------------------------


def test_rows_across_many_segments_are_replayed_once(migrated: str, tmp_path: Path) -> None:
    """Rows journaled across dozens of small segments while the database is
    unreachable are all stored, once, by the next writer on that directory,
    which then deletes the segments it replayed."""
    down = HistoryWriter(DEAD_PG, tmp_path, segment_bytes=64 << 10, retry_initial=60)
    down.start()
    for i in range(1500):
        down.enqueue_row(make_row(f"Q{i}"))
    assert down.close(timeout=10)
    assert down.stats().rows_lost == 0
    segments = sorted(tmp_path.glob("history-journal.*.jsonl"))
    assert len(segments) > 10
    writer = HistoryWriter(migrated, tmp_path, segment_bytes=64 << 10)
    writer.start()
    assert writer.wait_idle(30)
    writer.close()
    assert count(migrated) == (1500, 1500, 1500)
    assert writer.stats().rows_replayed == 1500
    assert not any(path.exists() for path in segments)


def test_concurrent_rows_through_rotating_segments_are_stored_once(
    migrated: str, tmp_path: Path
) -> None:
    """Four threads write rows while small segments fill, rotate, are made
    ahead by the writer thread and deleted once stored; a restart on the
    same directory then finds nothing to store again."""
    writer = HistoryWriter(migrated, tmp_path, segment_bytes=64 << 10, flush_interval=0.01)
    writer.start()

    def produce(n: int) -> None:
        for i in range(1000):
            writer.enqueue_row(make_row(f"T{n}-{i}"))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.wait_idle(30)
    writer.close()
    stats = writer.stats()
    assert (stats.rows_written, stats.rows_unjournaled, stats.rows_lost) == (4000, 0, 0)
    assert count(migrated) == (4000, 4000, 4000)
    # Only the last segment (all stored) is left; a new writer re-reads it
    # and stores nothing twice.
    assert len(list(tmp_path.glob("history-journal.*.jsonl"))) <= 2
    again = HistoryWriter(migrated, tmp_path)
    again.start()
    assert again.wait_idle(30)
    again.close()
    assert count(migrated) == (4000, 4000, 4000)
    assert again.stats().rows_replayed == 0
