"""dmarcmilter behind a real Postfix.

A private Postfix instance (tests/postfixserver.py) has ``smtpd_milters``
pointing at a real ``dmarcmilter run`` process on a unix socket; clients set
their address and HELO with XCLIENT; mail is delivered to an SMTP sink the
tests read, or held in Postfix's hold queue.  The DNS is the loopback test
server.  Each test writes the milter's configuration and reloads it with
SIGHUP (it applies to the next SMTP session), so one Postfix and one milter
serve the module.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.postfixserver import (
    PostfixInstances,
    PostfixServer,
    milter_for_postfix,
)
from tests.signing import dkim_sign, dkim_zone, make_message

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@example.com")],
    "example.org": [("A", "192.0.2.90")],
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.slow.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
}
GOOD_IP, BAD_IP = "192.0.2.1", "203.0.113.66"
GOOD_FROM = "bounce@bounce.example.com"
RCPT = "user@receiver.example"
AUTHSERV_ID = "mx.receiver.example"


@pytest.fixture(scope="module")
def milter(dns_server_session: TestDNSServer) -> Iterator[MilterDaemon]:
    with milter_for_postfix(dns_server_session.port) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def postfix(postfix_instances: PostfixInstances, milter: MilterDaemon) -> PostfixServer:
    return postfix_instances.start(milter=f"unix:{milter.socket}", milter_default_action="tempfail")


@pytest.fixture
def mta(
    postfix: PostfixServer, milter: MilterDaemon, dns_server: TestDNSServer
) -> Iterator[PostfixServer]:
    dns_server.set_zone(ZONE)
    milter.reload({})
    postfix.clear_queue()
    yield postfix
    postfix.clear_queue()


def signed(**kw: Any) -> bytes:
    return dkim_sign(make_message(from_="alice@example.com", **kw), "example.com", "s1")


def our_results(values: list[str]) -> list[str]:
    return [v for v in values if v.split(";")[0].strip() == AUTHSERV_ID]


def test_pass_is_delivered_with_authentication_results_on_top(mta: PostfixServer) -> None:
    sent = mta.send(GOOD_FROM, RCPT, signed(), client_ip=GOOD_IP, helo="mx.example.com")
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent)
    first_line = delivered.header_section.split(b"\r\n", 1)[0]
    assert first_line.startswith(b"Authentication-Results: " + AUTHSERV_ID.encode() + b";")
    value = delivered.header("Authentication-Results")
    assert value is not None
    assert "dkim=pass header.d=example.com header.s=s1" in value
    assert "spf=pass smtp.mailfrom=bounce.example.com" in value
    assert "dmarc=pass policy.dmarc=reject header.from=example.com" in value
    assert delivered.header("X-Spam-Flag") is None


def test_rejection_enabled_gives_the_client_550(mta: PostfixServer, milter: MilterDaemon) -> None:
    milter.reload({"policy": {"enforce_reject": True}})
    sent = mta.send(
        "x@elsewhere.example", RCPT, make_message(from_="ceo@example.com"), client_ip=BAD_IP
    )
    assert (sent.code, sent.text) == (
        550,
        "5.7.1 Message rejected per DMARC policy for example.com",
    )
    assert mta.queue() == []


def test_quarantine_header_mode(mta: PostfixServer) -> None:
    sent = mta.send(
        "x@elsewhere.example", RCPT, make_message(from_="bob@example.org"), client_ip=BAD_IP
    )
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent)
    assert delivered.header("X-Spam-Flag") == "YES"
    value = delivered.header("Authentication-Results")
    assert (
        value is not None and "dmarc=fail policy.dmarc=quarantine header.from=example.org" in value
    )


def test_quarantine_hold_mode(mta: PostfixServer, milter: MilterDaemon) -> None:
    milter.reload({"policy": {"quarantine_action": "hold"}})
    sent = mta.send(
        "x@elsewhere.example", RCPT, make_message(from_="ceo@example.com"), client_ip=BAD_IP
    )
    assert sent.accepted, sent.reply
    held = mta.held()
    assert [entry["queue_id"] for entry in held] == [sent.queue_id]
    assert sent.queue_id is not None
    headers = mta.headers(sent.queue_id)
    assert "dmarc=fail policy.dmarc=reject header.from=example.com" in headers
    assert "X-Spam-Flag" not in headers
    assert mta.deliveries == []


@pytest.mark.parametrize("action", ["accept", "tempfail"])
def test_temperror(mta: PostfixServer, milter: MilterDaemon, action: str) -> None:
    milter.reload({"policy": {"temperror_action": action}})
    sent = mta.send(
        "x@elsewhere.example", RCPT, make_message(from_="a@slow.example"), client_ip=BAD_IP
    )
    if action == "tempfail":
        assert (sent.code, sent.text) == (
            451,
            "4.7.0 DMARC policy for slow.example could not be checked; try again later",
        )
        return
    assert sent.accepted, sent.reply
    value = mta.wait_for_delivery(sent).header("Authentication-Results")
    assert value is not None and "dmarc=temperror" in value


def test_forged_results_are_removed(mta: PostfixServer) -> None:
    message = make_message(
        from_="ceo@example.com",
        extra_headers=[
            ("Authentication-Results", f"{AUTHSERV_ID}; dmarc=pass header.from=example.com"),
            ("Authentication-Results", "upstream.example; spf=pass smtp.mailfrom=a@b.example"),
            ("Authentication-Results", f"{AUTHSERV_ID.upper()}; dkim=pass header.d=example.com"),
        ],
    )
    sent = mta.send("x@elsewhere.example", RCPT, message, client_ip=BAD_IP)
    delivered = mta.wait_for_delivery(sent)
    values = delivered.header_values("Authentication-Results")
    ours = our_results(values)
    assert len(ours) == 1 and "dmarc=fail" in ours[0]
    assert [v for v in values if v not in ours] == [
        "upstream.example; spf=pass smtp.mailfrom=a@b.example"
    ]


@pytest.mark.parametrize("client", ["sasl", "trusted network"])
def test_trusted_clients_are_skipped(mta: PostfixServer, milter: MilterDaemon, client: str) -> None:
    milter.reload({"clients": {"trusted_networks": ["127.0.0.0/8", "198.51.100.0/24"]}})
    forged = ("Authentication-Results", f"{AUTHSERV_ID}; dmarc=pass header.from=example.com")
    message = make_message(from_="ceo@example.com", extra_headers=[forged])
    if client == "sasl":
        sent = mta.send("ceo@example.com", RCPT, message, client_ip=BAD_IP, login="alice")
    else:
        sent = mta.send("ceo@example.com", RCPT, message, client_ip="198.51.100.7")
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent)
    # Not evaluated: no results of ours, no marking; the forgery is gone all the same.
    assert our_results(delivered.header_values("Authentication-Results")) == []
    assert delivered.header("X-Spam-Flag") is None
    line = milter.wait_log("message", timeout=5)[-1]
    assert line["queue_id"] == sent.queue_id
    assert line["skipped"] == ("authenticated" if client == "sasl" else "trusted_network")


def test_two_messages_in_one_session(mta: PostfixServer) -> None:
    with mta.session(client_ip=GOOD_IP, helo="mx.example.com") as session:
        first = session.send(GOOD_FROM, RCPT, signed(subject="one"))
        second = session.send("x@elsewhere.example", RCPT, make_message(from_="bob@example.org"))
    one = mta.wait_for_delivery(first)
    two = mta.wait_for_delivery(second)
    assert "dmarc=pass" in (one.header("Authentication-Results") or "")
    assert one.header("X-Spam-Flag") is None
    assert "dmarc=fail" in (two.header("Authentication-Results") or "")
    assert two.header("X-Spam-Flag") == "YES"


def test_rset_in_the_middle_of_a_transaction(mta: PostfixServer) -> None:
    with mta.session(client_ip=GOOD_IP, helo="mx.example.com") as session:
        assert session.mail("x@elsewhere.example").code == 250
        assert session.rcpt(RCPT).code == 250
        assert session.rset().code == 250
        sent = session.send(GOOD_FROM, RCPT, signed())
    delivered = mta.wait_for_delivery(sent)
    assert "dmarc=pass" in (delivered.header("Authentication-Results") or "")


def test_a_ten_megabyte_message(mta: PostfixServer) -> None:
    body = ("z" * 998 + "\n") * 10_000  # 10 MB, under Postfix's default size limit
    sent = mta.send(GOOD_FROM, RCPT, signed(body=body), client_ip=GOOD_IP, helo="mx.example.com")
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent, timeout=60)
    assert len(delivered.content) > 10_000_000
    value = delivered.header("Authentication-Results") or ""
    assert "dkim=pass" in value and "dmarc=pass" in value


def test_an_8bit_smtputf8_message(mta: PostfixServer) -> None:
    message = signed(subject="Grüße aus Köln ✓", body="Grüße, 日本語\n")
    sent = mta.send(
        "bounce@bounce.example.com",
        "josé@receiver.example",
        message,
        client_ip=GOOD_IP,
        helo="mx.example.com",
    )
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent)
    assert delivered.smtp_utf8
    value = delivered.header("Authentication-Results") or ""
    assert "dkim=pass" in value and "dmarc=pass" in value


def test_every_message_is_logged_and_recorded_under_its_queue_id(
    mta: PostfixServer, milter: MilterDaemon
) -> None:
    sent = mta.send(
        "x@elsewhere.example", RCPT, make_message(from_="ceo@example.com"), client_ip=BAD_IP
    )
    mta.wait_for_delivery(sent)
    lines = [
        line
        for line in milter.wait_log("message", timeout=5)
        if line.get("queue_id") == sent.queue_id
    ]
    assert len(lines) == 1
    assert (lines[0]["client_ip"], lines[0]["dmarc"], lines[0]["action"]) == (
        BAD_IP,
        "fail",
        "quarantine:header",
    )
    history = Path(milter.database_url.removeprefix("sqlite:///"))
    rows: list[tuple[Any, ...]] = []
    for _ in range(100):
        with sqlite3.connect(history) as conn:
            rows = conn.execute(
                "SELECT client_ip, header_from_domain, dmarc_result, disposition "
                "FROM messages WHERE queue_id = ?",
                (sent.queue_id,),
            ).fetchall()
        if rows:
            break
        time.sleep(0.05)
    assert rows == [(BAD_IP, "example.com", "fail", "quarantine")]
