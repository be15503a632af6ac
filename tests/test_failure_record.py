"""What the milter records for the report job: failure incidents (RFC 9991),
late marks, and the hard bounces of delivery status notifications.

The milter runs as the real daemon over the milter protocol (the history is
SQLite in its state directory, the DNS the loopback test server); the
writer's journal, replay and late marks are tested against the writer
itself.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.config import Config, DNSConfig, FailureReportsConfig
from dmarcmilter.evaluation import Envelope, evaluate
from dmarcmilter.history import db
from dmarcmilter.history.rows import (
    MAX_BOUNCES_PER_MESSAGE,
    MAX_SAMPLE_BODY_BYTES,
    MAX_SAMPLE_HEADER_BYTES,
    MAX_SAMPLE_RECIPIENTS,
    MAX_SAMPLE_SIGNATURES,
    FailureMaterial,
    bounce_row,
    bounces_line,
    domain_selected,
    failure_sample,
    incident_from_sample,
    is_late,
)
from dmarcmilter.history.writer import HistoryWriter
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
from dmarcmilter.report.failure import FailureKind
from dmarcmilter.report.failure_mail import (
    DeliveryResult,
    FailedSignature,
    FailureIncident,
)
from dmarcmilter.report.mail import report_message_id
from dmarcmilter.resolver import Resolver
from tests.daemon import MilterDaemon, daemons
from tests.dnsserver import TestDNSServer
from tests.history_worker import make_row
from tests.milterclient import EndOfMessage, MilterClient
from tests.signing import dkim_sign, dkim_zone, make_message
from tests.test_history_writer import journal_lines, write_segment

GOOD_IP, BAD_IP = "192.0.2.1", "203.0.113.66"
REPORT_ADDRESS = "dmarc-reports@receiver.example"
SUBMITTER = "mx.receiver.example"

ZONE: dict[str, Any] = {
    # fo=1, DMARC fail for mail from BAD_IP.
    "_dmarc.fo1.example": [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@fo1.example; fo=1")],
    # fo=d: SPF passes aligned from GOOD_IP, so only DKIM can fail.
    "_dmarc.fod.example": [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@fod.example; fo=d")],
    "bounce.fod.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    # fo=s, and an SPF record that fails BAD_IP.
    "_dmarc.fos.example": [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@fos.example; fo=s")],
    "fos.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    # A public suffix's record: its ruf is never used.
    "_dmarc.psd.example": [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@psd.example; psd=y")],
    # No ruf at all.
    "_dmarc.norm.example": [("TXT", "v=DMARC1; p=none; rua=mailto:agg@norm.example")],
    # Our own domain, whose record asks for failure reports too.
    "_dmarc.receiver.example": [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@receiver.example; fo=1")],
    **dkim_zone("fod.example", "s1"),
    **dkim_zone("receiver.example", "s1"),
}

Start = Callable[..., MilterDaemon]

ON: dict[str, Any] = {"failure_reports": {"enabled": True}}


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    dns_server.set_zone(ZONE)
    base = {
        "report": {
            "org_name": "Receiver Example",
            "from_address": REPORT_ADDRESS,
            "submitter": SUBMITTER,
        },
        "clients": {"trusted_networks": ["198.51.100.0/24"]},
    }
    with daemons(tmp_path, dns_server.port, base) as start_daemon:
        yield start_daemon


def send(
    daemon: MilterDaemon,
    message: bytes,
    *,
    ip: str = BAD_IP,
    sender: str = "x@elsewhere.example",
    recipients: tuple[str, ...] = ("user@receiver.example",),
    queue_id: str = "Q1",
) -> EndOfMessage:
    client = MilterClient(daemon.socket)
    try:
        client.negotiate()
        client.connect("mx.sender.example", ip)
        client.helo("mx.sender.example")
        return client.send_message(
            message,
            sender=sender,
            recipients=list(recipients),
            macros_mail={"i": queue_id},
            macros_eom={"i": queue_id},
        )
    finally:
        client.quit()
        client.close()


def query(daemon: MilterDaemon, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(daemon.state_dir / "history.sqlite3") as conn:
        return conn.execute(sql).fetchall()


def incidents(daemon: MilterDaemon) -> list[dict[str, Any]]:
    """The failure_incidents rows, after the daemon stopped (all written)."""
    rows = query(
        daemon,
        "SELECT m.queue_id, f.policy_domain, f.reported_domain, f.source_ip, f.kinds, f.ruf, "
        "f.status, f.sample, f.arrived_at, m.arrived_at "
        "FROM failure_incidents f JOIN messages m ON m.id = f.message_pk ORDER BY f.id",
    )
    names = ("queue_id", "policy_domain", "reported_domain", "source_ip", "kinds", "ruf")
    out = []
    for row in rows:
        item = dict(zip(names, row, strict=False))
        item["status"], item["sample"] = row[6], json.loads(row[7])
        # SQLite keeps the text as each path wrote it: compare the instants.
        item["same_time"] = _instant(row[8]) == _instant(row[9])
        out.append(item)
    return out


def _instant(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def ar_value(eom: EndOfMessage) -> str:
    (mod,) = [
        m for m in eom.modifications if m.kind == "insheader" and m.name == "Authentication-Results"
    ]
    assert mod.value is not None
    return mod.value.strip()


# -- failure incidents through the daemon ------------------------------------------------


def test_a_dmarc_failure_with_fo_1_records_one_pending_incident(start: Start) -> None:
    daemon = start(ON)
    message = make_message(from_="Alice <alice@fo1.example>", subject="Invoice 42")
    eom = send(
        daemon,
        message,
        sender="bounce@elsewhere.example",
        recipients=("one@receiver.example", "two@receiver.example"),
        queue_id="F1",
    )
    assert eom.reply.kind == "continue"
    added = ar_value(eom)
    assert daemon.stop() == 0
    (incident,) = incidents(daemon)
    assert {k: incident[k] for k in ("queue_id", "policy_domain", "reported_domain")} == {
        "queue_id": "F1",
        "policy_domain": "fo1.example",
        "reported_domain": "fo1.example",
    }
    assert incident["source_ip"] == BAD_IP
    assert incident["kinds"] == "dmarc"
    assert incident["ruf"] == "mailto:ruf@fo1.example"
    assert incident["status"] == "pending"
    assert incident["same_time"]
    sample = incident["sample"]
    assert sample["mail_from"] == "bounce@elsewhere.example"
    assert sample["rcpt_to"] == ["one@receiver.example", "two@receiver.example"]
    assert sample["source_ip"] == BAD_IP
    assert sample["authentication_results"] == added
    assert "dmarc=fail" in added
    assert sample["delivery_result"] == "delivered"
    names = [name for name, _ in sample["headers"]]
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    assert ["Subject", "Invoice 42"] in [[n, v.strip()] for n, v in sample["headers"]]
    assert sample["body"] is None  # include_body is off by default
    assert sample["cut"] == []
    # The sample is what the sender turns back into an incident.
    back = incident_from_sample(sample, FailureKind.DMARC)
    assert (back.reported_domain, back.mail_from) == ("fo1.example", "bounce@elsewhere.example")


def test_nothing_is_recorded_when_failure_reports_are_off(start: Start) -> None:
    daemon = start()  # enabled = false is the default
    send(daemon, make_message(from_="alice@fo1.example"), queue_id="F1")
    assert daemon.stop() == 0
    assert query(daemon, "SELECT queue_id FROM messages") == [("F1",)]
    assert incidents(daemon) == []


def test_domains_and_skip_domains_select_author_domains(
    start: Start, dns_server: TestDNSServer
) -> None:
    zone = dict(ZONE)
    for name in ("sub.fo1.example", "notfo1.example", "skip.fo1.example", "deep.skip.fo1.example"):
        zone[f"_dmarc.{name}"] = [("TXT", f"v=DMARC1; p=none; ruf=mailto:ruf@{name}; fo=1")]
    daemon = start(
        {
            "failure_reports": {
                "enabled": True,
                "domains": ["FO1.example", "fos.example"],
                "skip_domains": ["skip.fo1.example"],
            }
        }
    )
    dns_server.set_zone(zone)
    authors = [
        ("A1", "fo1.example"),  # listed (listed in upper case)
        ("A2", "Sub.FO1.example"),  # under a listed domain
        ("A3", "notfo1.example"),  # ends with the same letters: not under it
        ("A4", "skip.fo1.example"),  # skipped, though under a listed domain
        ("A5", "deep.skip.fo1.example"),  # under a skipped domain
        ("A6", "norm.example"),  # not listed (and no ruf)
    ]
    for queue_id, domain in authors:
        send(daemon, make_message(from_=f"alice@{domain}"), queue_id=queue_id)
    assert daemon.stop() == 0
    assert [(i["queue_id"], i["reported_domain"]) for i in incidents(daemon)] == [
        ("A1", "fo1.example"),
        ("A2", "sub.fo1.example"),
    ]
    assert len(query(daemon, "SELECT id FROM messages")) == len(authors)


def test_ruf_of_a_psd_record_is_never_used(start: Start) -> None:
    daemon = start(ON)
    send(daemon, make_message(from_="alice@psd.example"), queue_id="P1")
    send(daemon, make_message(from_="alice@norm.example"), queue_id="P2")
    assert daemon.stop() == 0
    assert incidents(daemon) == []


def test_a_dkim_only_failure_under_fo_d(start: Start) -> None:
    daemon = start(ON)
    signed = dkim_sign(make_message(from_="alice@fod.example"), "fod.example", "s1")
    tampered = signed.replace(b"the report", b"the rep0rt", 1)
    assert tampered != signed
    # SPF passes aligned (DMARC passes): only the broken signature is due.
    send(daemon, tampered, ip=GOOD_IP, sender="b@bounce.fod.example", queue_id="D1")
    send(daemon, signed, ip=GOOD_IP, sender="b@bounce.fod.example", queue_id="D2")
    assert daemon.stop() == 0
    (incident,) = incidents(daemon)
    assert (incident["queue_id"], incident["kinds"]) == ("D1", "dkim")
    (failed,) = incident["sample"]["dkim_failed"]
    assert (failed["domain"], failed["selector"], failed["result"]) == ("fod.example", "s1", "fail")
    assert failed["aligned"] is True


def test_a_signature_left_unverified_at_our_body_limit_is_not_blamed(start: Start) -> None:
    daemon = start({**ON, "milter": {"max_body_bytes": 1024}})
    big = dkim_sign(
        make_message(from_="alice@fod.example", body="x" * 60 + "\n" * 1 + "y" * 4000),
        "fod.example",
        "s1",
    )
    send(daemon, big, ip=GOOD_IP, sender="b@bounce.fod.example", queue_id="U1")
    lines = daemon.wait_log("message")
    assert lines[0]["dkim"] == "permerror:fod.example"
    assert lines[0].get("body_cut") == "true"
    assert daemon.stop() == 0
    assert query(daemon, "SELECT queue_id FROM messages") == [("U1",)]
    assert incidents(daemon) == []


def test_include_body_stores_the_body_capped(start: Start) -> None:
    daemon = start({"failure_reports": {"enabled": True, "include_body": True}})
    small = "Hello,\r\nsee http://phish.example/x\r\n"
    send(daemon, make_message(from_="alice@fo1.example", body=small), queue_id="B1")
    large = "z" * (MAX_SAMPLE_BODY_BYTES + 5000)
    send(daemon, make_message(from_="alice@fo1.example", body=large), queue_id="B2")
    assert daemon.stop() == 0
    first, second = incidents(daemon)
    assert base64.b64decode(first["sample"]["body"]) == small.encode()
    body = base64.b64decode(second["sample"]["body"])
    assert len(body) == MAX_SAMPLE_BODY_BYTES
    assert body == large.encode()[:MAX_SAMPLE_BODY_BYTES]
    # The CRLF at the end of the body is part of it: 5000 + 2 bytes more.
    assert second["sample"]["cut"] == ["5002 bytes of the body"]


def test_our_own_failure_report_mail_coming_back_is_not_recorded(start: Start) -> None:
    """The loop guard for failure reports: our report mail (From the report
    address, Message-ID <id.token@submitter>) fails DMARC here and its
    domain's record asks for failure reports, yet nothing is recorded."""
    daemon = start(ON)
    own_id = report_message_id(SUBMITTER, "a1b2c3d4e5f6", "9f8e7d6c5b4a")
    ours = make_message(
        from_=f"Receiver Example <{REPORT_ADDRESS}>",
        subject="DMARC failure report for fo1.example from 203.0.113.66",
        message_id=own_id,
    )
    theirs = make_message(from_=f"<{REPORT_ADDRESS}>", message_id="<other@mx.other.example>")
    send(daemon, ours, queue_id="R1")
    send(daemon, theirs, queue_id="R2")
    lines = daemon.wait_log("message", 2)
    assert [(line["queue_id"], line["dmarc"], line.get("own_report")) for line in lines] == [
        ("R1", "fail", "true"),
        ("R2", "fail", None),
    ]
    assert daemon.stop() == 0
    assert query(daemon, "SELECT queue_id FROM messages") == [("R2",)]
    assert [i["queue_id"] for i in incidents(daemon)] == ["R2"]


# -- bounces of our report mail -----------------------------------------------------------

REPORT_MESSAGE_ID = report_message_id(SUBMITTER, "r0123456789", "tok9876543210")


def dsn(
    recipients: list[tuple[str, str, str]],
    *,
    message_id: str = REPORT_MESSAGE_ID,
    to: str = REPORT_ADDRESS,
    padding: int = 0,
) -> bytes:
    """A Postfix-style bounce: (address, action, status) per recipient."""
    groups = "\n".join(
        f"Final-Recipient: rfc822; {address}\nOriginal-Recipient: rfc822;{address}\n"
        f"Action: {action}\nStatus: {status}\nRemote-MTA: dns; mx.dest.example\n"
        f"Diagnostic-Code: smtp; 550 {status} <{address}>: Recipient address rejected\n"
        for address, action, status in recipients
    )
    text = f"""\
From: MAILER-DAEMON@mx.receiver.example (Mail Delivery System)
To: {to}
Subject: Undelivered Mail Returned to Sender
Date: Sat,  5 Dec 2026 01:00:05 +0000 (UTC)
Message-Id: <20261205010005.7A1B2C3D4E@mx.receiver.example>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B/mx.receiver.example"

--B/mx.receiver.example
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.
{"x" * padding}
--B/mx.receiver.example
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.example
Arrival-Date: Sat,  5 Dec 2026 01:00:03 +0000 (UTC)

{groups}
--B/mx.receiver.example
Content-Type: text/rfc822-headers

From: {REPORT_ADDRESS}
To: ruf@fo1.example
Subject: DMARC failure report
Message-ID: {message_id}

--B/mx.receiver.example--
"""
    return text.replace("\n", "\r\n").encode()


def bounces(daemon: MilterDaemon) -> list[tuple[Any, ...]]:
    return query(
        daemon,
        "SELECT original_message_id, address, status, diagnostic, reporting_mta, "
        "processed_at, outcome FROM report_bounces ORDER BY id",
    )


def test_a_dsn_to_the_report_address_is_recorded_from_a_trusted_or_evaluated_client(
    start: Start,
) -> None:
    daemon = start()  # no failure reports needed: bounces are of any report
    hard = [("ruf@fo1.example", "failed", "5.1.1")]
    # Relayed by the local smarthost: a trusted client, not evaluated.
    send(daemon, dsn(hard), ip="198.51.100.7", sender="", recipients=(REPORT_ADDRESS,))
    # Straight from the destination's MTA: evaluated (and recorded).
    send(
        daemon,
        dsn([("agg@fos.example", "failed", "5.2.1")]),
        sender="",
        recipients=("Dmarc-Reports@RECEIVER.example",),
        queue_id="E1",
    )
    lines = daemon.wait_log("message", 2)
    assert [(line.get("skipped"), line.get("report_bounces")) for line in lines] == [
        ("trusted_network", "1"),
        (None, "1"),
    ]
    assert daemon.stop() == 0
    assert bounces(daemon) == [
        (
            REPORT_MESSAGE_ID,
            "ruf@fo1.example",
            "5.1.1",
            "smtp; 550 5.1.1 <ruf@fo1.example>: Recipient address rejected",
            "mx.receiver.example",
            None,
            None,
        ),
        (
            REPORT_MESSAGE_ID,
            "agg@fos.example",
            "5.2.1",
            "smtp; 550 5.2.1 <agg@fos.example>: Recipient address rejected",
            "mx.receiver.example",
            None,
            None,
        ),
    ]
    assert query(daemon, "SELECT queue_id FROM messages") == [("E1",)]


def test_no_bounce_is_recorded_without_a_hard_bounce_or_for_another_address(
    start: Start,
) -> None:
    daemon = start()
    soft = [("a@fo1.example", "delayed", "4.4.1"), ("b@fo1.example", "failed", "4.4.7")]
    send(daemon, dsn(soft), ip="198.51.100.7", sender="", recipients=(REPORT_ADDRESS,))
    hard = [("c@fo1.example", "failed", "5.1.1")]
    # A hard bounce, but to someone else.
    send(daemon, dsn(hard), ip="198.51.100.7", sender="", recipients=("postmaster@x.example",))
    # A hard bounce without the original's Message-ID.
    no_id = dsn(hard).replace(f"Message-ID: {REPORT_MESSAGE_ID}".encode(), b"X-No: id")
    send(daemon, no_id, ip="198.51.100.7", sender="", recipients=(REPORT_ADDRESS,))
    # Not a DSN at all.
    send(
        daemon,
        make_message(from_="x@fo1.example"),
        ip="198.51.100.7",
        recipients=(REPORT_ADDRESS,),
    )
    daemon.wait_log("message", 4)
    assert daemon.stop() == 0
    assert bounces(daemon) == []


def test_a_hostile_dsn_is_bounded(start: Start) -> None:
    daemon = start()
    many = [(f"r{i}@fo1.example", "failed", "5.1.1") for i in range(400)]
    send(daemon, dsn(many), ip="198.51.100.7", sender="", recipients=(REPORT_ADDRESS,))
    # Megabytes before the delivery-status part: not read as a DSN at all.
    huge = dsn([("h@fo1.example", "failed", "5.1.1")], padding=3 << 20)
    send(daemon, huge, ip="198.51.100.7", sender="", recipients=(REPORT_ADDRESS,))
    lines = daemon.wait_log("message", 2)
    assert [line.get("report_bounces") for line in lines] == [
        str(MAX_BOUNCES_PER_MESSAGE),
        None,
    ]
    assert daemon.stop() == 0
    stored = bounces(daemon)
    assert len(stored) == MAX_BOUNCES_PER_MESSAGE
    assert [row[1] for row in stored] == [f"r{i}@fo1.example" for i in range(50)]


# -- the writer: journal, replay, late marks ------------------------------------------


DEAD_PG = "postgresql+psycopg://postgres@127.0.0.1:9/none"


@pytest.fixture
def failing(dns_server: TestDNSServer, resolver: Resolver) -> tuple[Any, ...]:
    """A real evaluation of a DMARC failure whose record has ruf and fo=1."""
    dns_server.set_zone(ZONE)
    config = Config(dns=DNSConfig(nameservers=(dns_server.host,), port=dns_server.port))
    raw = make_message(from_="alice@fo1.example")
    message = Message.from_bytes(raw)
    envelope = Envelope.create(BAD_IP, "mx.sender.example", "x@elsewhere.example", ["u@rx.example"])
    evaluation = evaluate(envelope, message, resolver.session(), config)
    assert evaluation.dmarc.result.value == "fail"
    material = FailureMaterial(
        FailureReportsConfig(enabled=True), list(message.headers), "", "mx.receiver.example"
    )
    return evaluation, decide(evaluation, config.policy), material


def count_rows(url: str, table: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() or 0)
    finally:
        engine.dispose()


def test_database_down_the_incident_is_journaled_and_replayed_once(
    migrated: str, tmp_path: Path, failing: tuple[Any, ...]
) -> None:
    evaluation, decision, material = failing
    state = tmp_path / "journal"
    writer = HistoryWriter(DEAD_PG, state, flush_interval=0.05, retry_initial=60)
    writer.start()
    writer.enqueue(evaluation, decision, material)
    writer.enqueue(evaluation, decision)  # failure reports off: no entry
    writer.close(timeout=10)
    first, second, incident = journal_lines(state)
    assert "failure" not in first and "failure" not in second
    # The incident was built on the writer thread, and journaled after its
    # message's line.
    assert incident["failure_of"] == first["idempotency_key"]
    assert incident["failure"]["kinds"] == "dmarc"
    # Without an Authentication-Results value from the milter (it adds
    # none to a message it refuses), the writer renders one for the report.
    assert "dmarc=fail" in incident["failure"]["sample"]["authentication_results"]
    lines = [first, second, incident]
    # The database is back; the journal is replayed, then replayed again
    # as after a crash before the segment was deleted.
    for _ in range(2):
        write_segment(state, lines, generation=7)
        writer = HistoryWriter(migrated, state)
        writer.start()
        assert writer.wait_idle(10)
        writer.close()
        assert count_rows(migrated, "messages") == 2
        assert count_rows(migrated, "failure_incidents") == 1


def test_rows_from_older_versions_replay_without_an_incident(migrated: str, tmp_path: Path) -> None:
    write_segment(tmp_path, [make_row("OLD1"), make_row("OLD2")])
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    writer.close()
    assert count_rows(migrated, "messages") == 2
    assert count_rows(migrated, "failure_incidents") == 0


def test_a_journal_replayed_the_next_day_marks_its_rows_late(migrated: str, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    yesterday = (now - dt.timedelta(days=1)).isoformat()
    old = [make_row(f"L{i}", arrived_at=yesterday) for i in range(3)]
    write_segment(tmp_path, old)
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    # Written the day they arrived: not late.
    for i in range(2):
        writer.enqueue_row(make_row(f"N{i}", arrived_at=dt.datetime.now(dt.UTC).isoformat()))
    assert writer.wait_idle(10)
    writer.close()
    engine = db.make_engine(migrated)
    try:
        with engine.connect() as conn:
            late = conn.exec_driver_sql(
                "SELECT m.queue_id, l.claim FROM late_messages l "
                "JOIN messages m ON m.id = l.message_pk ORDER BY m.queue_id"
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in late] == [("L0", None), ("L1", None), ("L2", None)]


def test_the_late_rule_is_the_end_of_the_utc_day() -> None:
    utc = dt.UTC
    arrived = dt.datetime(2026, 12, 4, 23, 59, 59, 999999, tzinfo=utc)
    assert not is_late(arrived, dt.datetime(2026, 12, 4, 23, 59, 59, 999999, tzinfo=utc))
    assert is_late(arrived, dt.datetime(2026, 12, 5, 0, 0, tzinfo=utc))
    # Another offset, the same instant: the UTC day counts.
    plus_two = dt.timezone(dt.timedelta(hours=2))
    early = dt.datetime(2026, 12, 5, 1, 0, tzinfo=plus_two)  # 23:00 UTC on the 4th
    assert is_late(early, dt.datetime(2026, 12, 5, 0, 0, tzinfo=utc))
    assert not is_late(early, dt.datetime(2026, 12, 4, 23, 30, tzinfo=utc))


def test_bounce_lines_replay_once(migrated: str, tmp_path: Path) -> None:
    received = dt.datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=dt.UTC)
    line = bounces_line(
        [
            bounce_row(received, "<r.t@mx>", "a@x.example", "5.1.1", "550 no", "dns; mx"),
            bounce_row(received, "<r.t@mx>", "b@x.example", "5.1.1", "550 no", "dns; mx"),
        ]
    )
    message = make_row("M1")
    for _ in range(2):
        write_segment(tmp_path, [line, message], generation=3)
        writer = HistoryWriter(migrated, tmp_path)
        writer.start()
        assert writer.wait_idle(10)
        writer.close()
        assert count_rows(migrated, "report_bounces") == 2
        assert count_rows(migrated, "messages") == 1


def test_bounce_values_are_capped() -> None:
    row = bounce_row(
        dt.datetime.now(dt.UTC),
        "<" + "i" * 5000 + ">",
        "a" * 900,
        "5.1.1" * 20,
        "d" * 9000,
        "m" * 900,
    )
    assert len(row["original_message_id"].encode()) <= 998
    assert len(row["address"].encode()) <= 510
    assert len(row["status"]) <= 32
    assert len(row["diagnostic"].encode()) <= 512
    assert len(row["reporting_mta"].encode()) <= 255


# -- the pieces --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "domains", "skip", "selected"),
    [
        ("example.com", (), (), True),
        ("EXAMPLE.com.", ("example.COM",), (), True),
        ("a.b.example.com", ("example.com",), (), True),
        ("notexample.com", ("example.com",), (), False),
        ("example.com", ("a.example.com",), (), False),
        ("a.example.com", ("example.com",), ("A.example.com",), False),
        ("x.a.example.com", (), ("a.example.com",), False),
        ("b.example.com", (), ("a.example.com",), True),
        ("", (), (), False),
    ],
)
def test_domain_selection(
    domain: str, domains: tuple[str, ...], skip: tuple[str, ...], selected: bool
) -> None:
    settings = FailureReportsConfig(enabled=True, domains=domains, skip_domains=skip)
    assert domain_selected(domain, settings) is selected


def incident(**changes: Any) -> FailureIncident:
    base = FailureIncident(
        kind=FailureKind.DKIM,
        reported_domain="example.com",
        source_ip="2001:db8::1",
        arrival_date=dt.datetime(2026, 12, 5, 6, 7, 8, tzinfo=dt.UTC),
        mail_from="bounce@example.net",
        rcpt_to=("u@rx.example",),
        authentication_results="mx; dmarc=fail header.from=example.com",
        delivery_result=DeliveryResult.SPAM,
        headers=(("From", " a@example.com"), ("Subject", " caf\udce9")),
        dkim_failed=(
            FailedSignature("example.com", "s1", "fail", "@example.com", True, "body hash"),
        ),
        spf_domain="example.net",
        spf_result="softfail",
        spf_aligned=False,
        spf_record="v=spf1 -all",
        body=b"\x00\xffbody",
    )
    return dataclasses.replace(base, **changes)


def test_a_sample_round_trips() -> None:
    original = incident()
    sample = failure_sample(original)
    # JSON-safe: what the journal and the sample column hold.
    again = json.loads(json.dumps(sample))
    back = incident_from_sample(again, FailureKind.SPF, incidents=3)
    # Text that was not UTF-8 becomes U+FFFD; the rest is the same.
    assert back == dataclasses.replace(
        original,
        kind=FailureKind.SPF,
        incidents=3,
        headers=(("From", " a@example.com"), ("Subject", " caf\ufffd")),
    )
    assert sample["cut"] == []


def test_a_sample_is_capped_and_says_so() -> None:
    field = ("X-Filler", "v" * 1000)
    headers = (("From", "a@example.com"), *([field] * 200))
    signature = FailedSignature("e.example", "s", "fail", "", False, "r" * 5000)
    big = incident(
        headers=headers,
        rcpt_to=tuple(f"r{i}@rx.example" for i in range(MAX_SAMPLE_RECIPIENTS + 7)),
        body=b"b" * (MAX_SAMPLE_BODY_BYTES + 10),
        dkim_failed=(signature,) * (MAX_SAMPLE_SIGNATURES + 2),
        authentication_results="a" * 20_000,
        spf_record="v=spf1 " + "ip4:192.0.2.1 " * 200,
    )
    sample = failure_sample(big)
    kept = sample["headers"]
    assert sum(len(n) + len(v) + 4 for n, v in kept) <= MAX_SAMPLE_HEADER_BYTES
    assert 1 < len(kept) < len(headers)
    assert sample["cut"] == [
        f"{len(headers) - len(kept)} header fields",
        "7 recipients",
        "10 bytes of the body",
        "2 DKIM signatures",
    ]
    assert len(sample["rcpt_to"]) == MAX_SAMPLE_RECIPIENTS
    assert len(base64.b64decode(sample["body"])) == MAX_SAMPLE_BODY_BYTES
    assert len(sample["dkim_failed"]) == MAX_SAMPLE_SIGNATURES
    assert sample["dkim_failed"][0]["reason"].endswith(" [truncated]")
    assert len(sample["authentication_results"]) <= 8192
    assert sample["spf_record"].endswith(" [truncated]")
    back = incident_from_sample(json.loads(json.dumps(sample)), FailureKind.DKIM)
    assert len(back.headers) == len(kept)


def test_a_damaged_sample_is_refused() -> None:
    sample = failure_sample(incident())
    for key in ("headers", "arrival_date", "delivery_result"):
        damaged = {**sample, key: "nonsense"}
        with pytest.raises((KeyError, TypeError, ValueError)):
            incident_from_sample(damaged, FailureKind.DMARC)


def test_an_spf_failure_under_fo_s_keeps_the_record_evaluated(start: Start) -> None:
    daemon = start(ON)
    send(daemon, make_message(from_="alice@fos.example"), sender="x@fos.example", queue_id="S1")
    assert daemon.stop() == 0
    (incident,) = incidents(daemon)
    assert incident["kinds"] == "spf"
    sample = incident["sample"]
    assert (sample["spf_domain"], sample["spf_result"]) == ("fos.example", "fail")
    assert sample["spf_aligned"] is True
    # RFC 6652 SPF-DNS: the record that failed the client.
    assert sample["spf_record"] == "v=spf1 ip4:192.0.2.0/24 -all"


def test_the_spf_result_keeps_the_top_record_only(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    from dmarcmilter.spf import MAX_RECORD_CHARS, check_spf

    long_record = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(200)) + " -all"
    dns_server.set_zone(
        {
            "inc.example": [("TXT", "v=spf1 include:other.example -all")],
            "other.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "long.example": [("TXT", long_record)],
        }
    )
    session = resolver.session()
    passed = check_spf(session, GOOD_IP, "h.example", "a@inc.example", check_helo=False).mfrom
    assert (passed.result.value, passed.record) == ("pass", "v=spf1 include:other.example -all")
    none = check_spf(session, GOOD_IP, "h.example", "a@nothing.example", check_helo=False).mfrom
    assert (none.result.value, none.record) == ("none", "")
    long = check_spf(session, BAD_IP, "h.example", "a@long.example", check_helo=False).mfrom
    assert long.result.value == "fail"
    assert long.record == long_record[:MAX_RECORD_CHARS]


def test_signatures_past_max_signatures_are_not_failed_verifications(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    from dmarcmilter.config import DKIMConfig
    from dmarcmilter.report.failure import failure_reports_due

    dns_server.set_zone(ZONE)
    config = Config(
        dns=DNSConfig(nameservers=(dns_server.host,), port=dns_server.port),
        dkim=DKIMConfig(max_signatures=1),
    )
    twice = dkim_sign(
        dkim_sign(make_message(from_="alice@fod.example"), "fod.example", "s1"),
        "fod.example",
        "s1",
    )
    envelope = Envelope.create(GOOD_IP, "h.example", "b@bounce.fod.example")
    evaluation = evaluate(envelope, Message.from_bytes(twice), resolver.session(), config)
    results = [(s.result.value, s.reason, s.unverified) for s in evaluation.dkim.signatures]
    assert results == [("pass", "", False), ("permerror", "too many signatures", True)]
    assert not failure_reports_due(evaluation.dmarc).due


def test_an_incident_whose_message_is_not_stored_is_set_aside(
    migrated: str, tmp_path: Path
) -> None:
    from dmarcmilter.history.journal import REJECTED_FILE
    from dmarcmilter.history.rows import failure_line

    stored, missing = make_row("M1"), make_row("M2")
    entry = {
        "policy_domain": "example.com",
        "reported_domain": "example.com",
        "source_ip": "192.0.2.1",
        "kinds": "dmarc",
        "ruf": "mailto:f@example.com",
        "sample": {"headers": []},
    }
    # M2's own line is gone (it was refused and set aside, say).
    write_segment(tmp_path, [stored, failure_line(stored, entry), failure_line(missing, entry)])
    writer = HistoryWriter(migrated, tmp_path)
    writer.start()
    assert writer.wait_idle(10)
    writer.close()
    assert count_rows(migrated, "failure_incidents") == 1
    (line,) = (tmp_path / REJECTED_FILE).read_text().splitlines()
    kept = json.loads(line)
    assert kept["error"] == "the message of this failure incident is not stored"
    assert kept["row"]["failure_of"] == missing["idempotency_key"]


def test_incidents_waiting_past_the_bound_are_counted_and_logged(
    failing: tuple[Any, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import dmarcmilter.history.writer as writer_module

    evaluation, decision, material = failing
    monkeypatch.setattr(writer_module, "MAX_PENDING_FAILURES", 2)
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    db.upgrade(url)
    # The writer thread sleeps: nothing takes the waiting incidents.
    writer = HistoryWriter(url, tmp_path / "j", flush_interval=3600, batch_size=1000)
    writer.start()
    for _ in range(5):
        writer.enqueue(evaluation, decision, material)
    assert writer.stats().failures_lost == 3
    assert writer.wait_idle(10)
    writer.close()
    assert count_rows(url, "messages") == 5
    assert count_rows(url, "failure_incidents") == 2
    assert "3 failure incidents not recorded" in caplog.text


def test_incidents_waiting_past_the_byte_bound_are_counted_and_logged(
    failing: tuple[Any, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Few incidents, but with huge header sections: the bytes they pin are
    bounded too, not only their number."""
    import dmarcmilter.history.writer as writer_module

    evaluation, decision, material = failing
    monkeypatch.setattr(writer_module, "MAX_PENDING_FAILURE_BYTES", 10 * 1024 * 1024)
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    db.upgrade(url)
    writer = HistoryWriter(url, tmp_path / "j", flush_interval=3600, batch_size=1000)
    writer.start()
    huge = material._replace(header_bytes=4 * 1024 * 1024)  # as the milter counted them
    for _ in range(4):
        writer.enqueue(evaluation, decision, huge)
    assert writer.stats().failures_lost == 2
    assert writer.wait_idle(10)
    # Once taken, their room is free again.
    writer.enqueue(evaluation, decision, huge)
    assert writer.stats().failures_lost == 2
    assert writer.wait_idle(10)
    writer.close()
    assert count_rows(url, "messages") == 5
    assert count_rows(url, "failure_incidents") == 3
    assert "2 failure incidents not recorded" in caplog.text


def test_a_dmarc_report_does_not_name_a_signature_we_left_unverified(
    start: Start, dns_server: TestDNSServer
) -> None:
    zone = dict(ZONE)
    zone["_dmarc.fod.example"] = [("TXT", "v=DMARC1; p=none; ruf=mailto:ruf@fod.example; fo=1")]
    daemon = start({**ON, "milter": {"max_body_bytes": 1024}})
    dns_server.set_zone(zone)
    big = dkim_sign(make_message(from_="alice@fod.example", body="y" * 4000), "fod.example", "s1")
    small = dkim_sign(make_message(from_="alice@fod.example"), "fod.example", "s1")
    broken = small.replace(b"the report", b"the rep0rt", 1)
    # SPF fails to align (another MAIL FROM domain): DMARC fails, fo=1.
    send(daemon, big, sender="b@elsewhere.example", queue_id="U1")
    send(daemon, broken, sender="b@elsewhere.example", queue_id="U2")
    assert daemon.stop() == 0
    first, second = incidents(daemon)
    assert (first["queue_id"], first["kinds"]) == ("U1", "dmarc")
    assert first["sample"]["dkim_failed"] == []
    assert "body larger than 1024 bytes" in first["sample"]["authentication_results"]
    # A signature that did fail is named.
    assert [s["result"] for s in second["sample"]["dkim_failed"]] == ["fail"]


def test_a_bounce_of_other_mail_to_the_report_address_is_not_recorded(start: Start) -> None:
    daemon = start()
    hard = [("a@fo1.example", "failed", "5.1.1")]
    others = [
        "<20261205.abc@mx.other.example>",  # someone else's mail
        report_message_id("mx.other.example", "r1", "t1"),  # another submitter
        f"<r0123456789@{SUBMITTER}>",  # our form without a delivery token
    ]
    for message_id in others:
        send(
            daemon,
            dsn(hard, message_id=message_id),
            ip="198.51.100.7",
            sender="",
            recipients=(REPORT_ADDRESS,),
        )
    daemon.wait_log("message", len(others))
    assert daemon.stop() == 0
    assert bounces(daemon) == []


def test_a_tempfailed_message_gets_its_incident_when_it_is_answered(
    failing: tuple[Any, ...],
) -> None:
    from dmarcmilter.history.rows import failure_entry
    from dmarcmilter.policy import Action

    evaluation, decision, material = failing
    assert failure_entry(evaluation, decision, material) is not None
    deferred = dataclasses.replace(decision, action=Action.TEMPFAIL)
    assert failure_entry(evaluation, deferred, material) is None


def test_database_down_under_the_daemon_then_replayed_once(start: Start) -> None:
    """The daemon runs with its database down: the failing message's row
    and its incident wait in the journal; the next start, with the database
    back, stores each once.  (A second replay of the same lines stores
    nothing again: test_database_down_the_incident_is_journaled_and_replayed_once.)"""
    daemon = start({**ON, "database": {"url": DEAD_PG}})
    send(daemon, make_message(from_="alice@fo1.example"), queue_id="J1")
    send(daemon, make_message(from_="alice@norm.example"), queue_id="J2")
    daemon.wait_log("message", 2)
    assert daemon.stop() == 0
    lines = journal_lines(daemon.state_dir)
    assert [line.get("queue_id") for line in lines] == ["J1", "J2", None]
    assert lines[2]["failure_of"] == lines[0]["idempotency_key"]
    daemon.write_config(
        {
            "failure_reports": {"enabled": True},
            "report": {"org_name": "R", "from_address": REPORT_ADDRESS},
        }
    )
    replayed = daemon.log_text().count("history journal replayed")
    daemon.start(wait=False)
    deadline = time.monotonic() + 30
    while daemon.log_text().count("history journal replayed") == replayed:
        assert time.monotonic() < deadline, daemon.log_text()[-2000:]
        time.sleep(0.02)
    assert daemon.stop() == 0
    assert query(daemon, "SELECT queue_id FROM messages ORDER BY id") == [("J1",), ("J2",)]
    assert [i["queue_id"] for i in incidents(daemon)] == ["J1"]
    assert journal_lines(daemon.state_dir) == []
