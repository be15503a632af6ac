"""Failure reports end to end, behind a real Postfix.

Mail that fails DMARC goes through a private Postfix whose ``smtpd_milters``
is the real daemon; ``dmarcmilter report --kind failure`` (a real
subprocess, the daemon's own configuration) turns what the milter recorded
into reports and sends them to an SMTP sink that stands for the reporting
smarthost.  The tests show that the mail path never waits on reporting
(the sink down changes nothing for the mail), that nothing recorded is lost
while the sink is down, that a delivery status notification for one of our
reports, sent through Postfix and the milter, suppresses its destination
until ``suppress remove`` lifts it, and that our own report mail coming back
through the milter is never reported on.

Time is the one thing moved by hand: a merge window closes after
``merge_minutes``, and a failed delivery is retried after 15 minutes, so the
tests move the recorded arrival times and the retry time back instead of
waiting.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from dmarcmilter.history import db
from dmarcmilter.history.models import (
    FailureIncidentRow,
    MessageRow,
    ReportBounceRow,
    ReportDeliveryRow,
    ReportRow,
)
from dmarcmilter.report.failure import FailureKind
from dmarcmilter.report.failure_mail import (
    DeliveryResult,
    FailureIncident,
    FailureReportSettings,
    build_failure_report,
    failure_report_bytes,
)
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.postfixserver import (
    Delivered,
    PostfixInstances,
    PostfixServer,
    SMTPSink,
    free_port,
    milter_for_postfix,
)
from tests.signing import make_message

ROOT = Path(__file__).resolve().parent.parent
REPORT_ADDRESS = "dmarc-reports@receiver.example"
SUBMITTER = "mx.receiver.example"
RUF = "ruf@example.com"
BAD_IP, DSN_IP = "203.0.113.66", "198.51.100.25"
RCPT = "user@receiver.example"
ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", f"v=DMARC1; p=none; fo=1; ruf=mailto:{RUF}")],
    # Our own domain asks for failure reports too: without the loop guard,
    # our report mail failing DMARC here would be reported on.
    "_dmarc.receiver.example": [("TXT", "v=DMARC1; p=none; fo=1; ruf=mailto:ruf@receiver.example")],
}


@pytest.fixture(scope="module")
def report_sink() -> Iterator[SMTPSink]:
    """The reporting smarthost: its port is chosen now, the server started by
    the tests, so that it can be down first."""
    sink = SMTPSink()
    sink.port = free_port()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def milter(dns_server_session: TestDNSServer, report_sink: SMTPSink) -> Iterator[MilterDaemon]:
    config = {
        "failure_reports": {"enabled": True},
        "report": {
            "org_name": "Receiver Example",
            "from_address": REPORT_ADDRESS,
            "submitter": SUBMITTER,
            "smtp_host": "127.0.0.1",
            "smtp_port": report_sink.port,
            "smtp_starttls": "off",
            "smtp_timeout": 5,
            "suppress_after_bounces": 1,
        },
    }
    with milter_for_postfix(dns_server_session.port, config) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def postfix(postfix_instances: PostfixInstances, milter: MilterDaemon) -> PostfixServer:
    return postfix_instances.start(milter=f"unix:{milter.socket}", milter_default_action="tempfail")


@pytest.fixture(scope="module")
def engine(milter: MilterDaemon) -> Iterator[Engine]:
    engine = db.make_engine(milter.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def mta(postfix: PostfixServer, dns_server: TestDNSServer) -> Iterator[PostfixServer]:
    dns_server.set_zone(ZONE)
    postfix.clear_queue()
    yield postfix
    postfix.clear_queue()


def report(milter: MilterDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", *args, "--config", str(milter.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pending_incidents(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(FailureIncidentRow.id).where(FailureIncidentRow.status == "pending")
            )
        )


def send_failures(mta: PostfixServer, engine: Engine, count: int) -> None:
    """``count`` messages that fail DMARC for example.com, accepted by
    Postfix (p=none), each recorded with a pending incident."""
    before = len(pending_incidents(engine))
    for n in range(count):
        sent = mta.send(
            "x@elsewhere.example",
            RCPT,
            make_message(from_="alice@example.com", message_id=f"<fail{n}.{time.time_ns()}@x>"),
            client_ip=BAD_IP,
            helo="mail.elsewhere.example",
        )
        assert sent.accepted, sent.reply
    eventually(
        lambda: len(pending_incidents(engine)) == before + count, f"{count} recorded incidents"
    )


def close_windows(engine: Engine) -> None:
    """Time passes: every pending incident's merge window is over."""
    with engine.begin() as conn:
        rows = conn.execute(
            select(FailureIncidentRow.id, FailureIncidentRow.arrived_at).where(
                FailureIncidentRow.status == "pending"
            )
        ).all()
        for pk, arrived in rows:
            conn.execute(
                update(FailureIncidentRow)
                .where(FailureIncidentRow.id == pk)
                .values(arrived_at=arrived - dt.timedelta(hours=1))
            )


def retry_now(engine: Engine) -> None:
    """Time passes: every pending delivery is due again."""
    with engine.begin() as conn:
        conn.execute(
            update(ReportDeliveryRow)
            .where(ReportDeliveryRow.status == "pending")
            .values(next_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )


def deliveries(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [
            (address, status)
            for address, status in conn.execute(
                select(ReportDeliveryRow.address, ReportDeliveryRow.status)
                .join(ReportRow, ReportRow.id == ReportDeliveryRow.report_pk)
                .where(ReportRow.kind == "failure")
                .order_by(ReportDeliveryRow.id)
            )
        ]


def feedback_fields(delivered: Delivered) -> dict[str, str]:
    msg = email.message_from_bytes(delivered.content, policy=email.policy.default)
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            payload = part.get_payload()
            text = payload[0].as_string() if isinstance(payload, list) else str(payload)
            return dict(
                (name.strip(), value.strip())
                for name, _, value in (line.partition(":") for line in text.splitlines())
                if value
            )
    raise AssertionError("no message/feedback-report part")


def dsn(report_message_id: str, address: str) -> bytes:
    """The bounce a destination's MTA sends back for one of our reports."""
    text = f"""\
From: MAILER-DAEMON@mx.dest.example (Mail Delivery System)
To: {REPORT_ADDRESS}
Subject: Undelivered Mail Returned to Sender
Date: Sat, 5 Dec 2026 08:00:05 +0000
Message-ID: <bounce.{time.time_ns()}@mx.example.com>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B/mx.example.com"

--B/mx.example.com
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.

--B/mx.example.com
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com

Final-Recipient: rfc822; {address}
Original-Recipient: rfc822;{address}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{address}>: Recipient address rejected: User unknown

--B/mx.example.com
Content-Type: text/rfc822-headers

From: {REPORT_ADDRESS}
To: {address}
Subject: DMARC failure report
Message-ID: {report_message_id}

--B/mx.example.com--
"""
    return text.replace("\n", "\r\n").encode()


def test_reports_wait_for_a_dead_smarthost_a_bounce_suppresses_and_remove_lifts(
    mta: PostfixServer, milter: MilterDaemon, engine: Engine, report_sink: SMTPSink
) -> None:
    # The smarthost is down.  The mail path does not notice: every message
    # is accepted and recorded, and a run of the report job only leaves its
    # delivery pending.
    send_failures(mta, engine, 3)
    close_windows(engine)
    run = report(milter, "report", "--kind", "failure", "--verbose")
    assert run.returncode in (0, 1), run.stderr
    assert deliveries(engine) == [(RUF, "pending")]
    send_failures(mta, engine, 2)

    # Back up: the pending report goes out, with the three failures merged.
    report_sink.start()
    retry_now(engine)
    run = report(milter, "report", "--kind", "failure")
    assert run.returncode == 0, run.stderr
    assert deliveries(engine) == [(RUF, "sent")]
    first = eventually(lambda: report_sink.messages[:1], "the first report")[0]
    assert first.rcpt_tos == (RUF,)
    fields = feedback_fields(first)
    assert fields["Feedback-Type"] == "auth-failure"
    assert fields["Reported-Domain"] == "example.com"
    assert fields["Source-IP"] == BAD_IP
    assert fields["Incidents"] == "3"
    message_id = first.message_id
    assert message_id is not None and message_id.endswith(f"@{SUBMITTER}>")

    # The destination bounces it.  The bounce comes in through Postfix and
    # the milter, and one hard bounce suppresses the destination
    # (suppress_after_bounces = 1): the next report is not sent there.
    sent = mta.send(
        "", REPORT_ADDRESS, dsn(message_id, RUF), client_ip=DSN_IP, helo="mx.example.com"
    )
    assert sent.accepted, sent.reply
    with engine.connect() as conn:
        eventually(
            lambda: conn.execute(select(ReportBounceRow.address)).all(), "the recorded bounce"
        )
    close_windows(engine)
    run = report(milter, "report", "--kind", "failure")
    assert run.returncode == 0, run.stderr
    listed = json.loads(report(milter, "suppress", "list", "--json").stdout)
    assert [(e["target"], e["state"], e["source"]) for e in listed] == [
        (RUF, "suppressed", "bounce")
    ]
    assert deliveries(engine) == [(RUF, "sent"), (RUF, "suppressed")]
    assert len(report_sink.messages) == 1

    # Lifted by hand: reports go there again.
    removed = report(milter, "suppress", "remove", RUF)
    assert removed.returncode == 0, removed.stderr
    send_failures(mta, engine, 1)
    close_windows(engine)
    run = report(milter, "report", "--kind", "failure")
    assert run.returncode == 0, run.stderr
    assert deliveries(engine)[-1] == (RUF, "sent")
    eventually(lambda: len(report_sink.messages) == 2, "the report after remove")


def our_failure_report() -> bytes:
    """A failure report of ours, as the sender makes it (with a delivery
    token in its Message-ID)."""
    incident = FailureIncident(
        kind=FailureKind.DMARC,
        reported_domain="example.com",
        source_ip=BAD_IP,
        arrival_date=dt.datetime.now(dt.UTC),
        mail_from="x@elsewhere.example",
        rcpt_to=(RCPT,),
        authentication_results=f"{SUBMITTER}; dmarc=fail header.from=example.com",
        delivery_result=DeliveryResult.DELIVERED,
        headers=(("From", " alice@example.com"), ("Subject", " hello")),
    )
    settings = FailureReportSettings(
        from_address=REPORT_ADDRESS, submitter=SUBMITTER, org_name="Receiver Example"
    )
    message = build_failure_report(
        incident,
        to_address=RUF,
        report_id="f0123456789abcdef",
        date=dt.datetime.now(dt.UTC),
        settings=settings,
        message_token=secrets.token_hex(16),
    )
    return failure_report_bytes(message)


def test_our_own_failure_report_coming_back_is_not_reported_on(
    mta: PostfixServer, milter: MilterDaemon, engine: Engine
) -> None:
    ours = our_failure_report()
    with engine.connect() as conn:
        messages_before = len(conn.scalars(select(MessageRow.id)).all())
    incidents_before = len(pending_incidents(engine))
    # Our report mail, relayed to the destination through an MTA with this
    # milter on it (here: the same one).  It fails DMARC for our own domain
    # from this client, and our record has no ruf anyway; the loop guard is
    # what keeps it out of the history, so no report is ever made on it.
    sent = mta.send(REPORT_ADDRESS, RUF, ours, client_ip=BAD_IP, helo="mx.receiver.example")
    assert sent.accepted, sent.reply
    own = eventually(
        lambda: [
            line for line in milter.log_lines("message") if line.get("queue_id") == sent.queue_id
        ],
        "the milter's line for our report",
    )
    assert own[-1].get("own_report") == "true"
    assert own[-1].get("dmarc") == "fail"
    # One ordinary failure after it: the writer keeps the order, so once its
    # incident is stored, our report's row would be stored too.
    send_failures(mta, engine, 1)
    with engine.connect() as conn:
        assert len(conn.scalars(select(MessageRow.id)).all()) == messages_before + 1
    assert len(pending_incidents(engine)) == incidents_before + 1
