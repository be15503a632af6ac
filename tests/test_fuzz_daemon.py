"""Random milter-protocol sessions against the real daemon.

Each example opens a connection to one ``dmarcmilter run`` process and sends
transactions with garbage in every value: bytes that are not UTF-8, NULs
stripped by the protocol, hostile From fields, DKIM-Signature and ARC
fields, forged Authentication-Results.  The transactions come in an MTA's
order (libmilter, not the daemon, judges commands out of order), with the
optional steps left out at random, several per connection, some aborted,
with or without HELO.  The daemon must answer every end of message, never
crash, never log a traceback, and still give the right verdict to a plain
message afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarcmilter.authres.parse import authserv_id_of
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.milterclient import MilterClient
from tests.test_fuzz_properties import _ARC_FIELDS, _ARC_TAGS, _DKIM_TAGS, _FROM_TEXT, _tag_list

ZONE: dict[str, Any] = {
    "_dmarc.victim.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.broken.example": "SERVFAIL",
    "attacker.net": [("TXT", "v=spf1 +all")],
}
BAD_IP = "203.0.113.66"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, dns_server_session: TestDNSServer
) -> Iterator[MilterDaemon]:
    dns_server_session.set_zone(ZONE)
    daemon = MilterDaemon(
        tmp_path_factory.mktemp("fuzzd"),
        dns_server_session.port,
        {"policy": {"enforce_reject": True, "out_of_scope": "reject"}},
    ).start()
    yield daemon
    assert daemon.stop() == 0
    dns_server_session.set_zone({})


_GARBAGE = st.binary(max_size=16).map(lambda b: b.replace(b"\0", b""))
_TEXT = st.one_of(_FROM_TEXT.map(lambda t: t.replace("\0", "")), _GARBAGE)
_FIELD = st.one_of(
    st.tuples(
        st.just("From"),
        st.one_of(
            st.sampled_from(
                [
                    " CEO <ceo@victim.example>",
                    " CEO <ceo@bank.example> (",
                    " CEO <ceo@bank.example>>",
                    " ceo@victim.example, x@attacker.net",
                ]
            ),
            _TEXT,
        ),
    ),
    st.tuples(st.just("DKIM-Signature"), _tag_list(_DKIM_TAGS).map(lambda t: " " + t)),
    st.tuples(_ARC_FIELDS, _tag_list(_ARC_TAGS).map(lambda t: " " + t)),
    st.tuples(
        st.just("Authentication-Results"),
        st.just(" mx.receiver.example; dmarc=pass header.from=victim.example"),
    ),
    st.tuples(st.sampled_from(["Subject", "X-Junk", "To"]), _TEXT),
)
_ADDRESS = st.one_of(
    st.sampled_from(["a@victim.example", "", "x@attacker.net"]),
    _GARBAGE.map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@st.composite
def _transaction(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """MAIL to end of message in an MTA's order, with optional steps left
    out (no header, no end-of-header, no body), or cut short by an abort.
    (An end of message without a recipient is never answered by libmilter,
    and no MTA sends one.)"""
    steps: list[tuple[Any, ...]] = [("mail", draw(_ADDRESS))]
    steps += [("rcpt", a) for a in draw(st.lists(_ADDRESS, min_size=1, max_size=2))]
    steps += [("header", *f) for f in draw(st.lists(_FIELD, max_size=6))]
    if draw(st.booleans()):
        steps.append(("eoh",))
    # An empty body chunk is a protocol error (no MTA sends one), so bodies
    # have at least one byte.
    steps += [("body", b) for b in draw(st.lists(st.binary(min_size=1, max_size=200), max_size=2))]
    if draw(st.integers(0, 4)):
        steps.append(("eom",))
    else:
        steps = [*steps[: draw(st.integers(1, len(steps)))], ("abort",)]
    return steps


_HOSTS = st.one_of(st.sampled_from(["mx.sender.example", "[203.0.113.66]"]), _GARBAGE)


def _step(client: MilterClient, step: tuple[Any, ...]) -> None:
    name, *args = step
    if name == "mail":
        client.mail(args[0], macros={"i": "FUZZ1"})
    elif name == "rcpt":
        client.rcpt(args[0])
    elif name == "header":
        client.header(args[0], args[1])
    elif name == "body":
        client.body(args[0])
    elif name == "eom":
        eom = client.end_of_message()
        assert eom.reply.kind in ("continue", "accept", "reject", "tempfail", "replycode")
    else:
        getattr(client, name)()


@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_HOSTS, st.booleans(), st.lists(_transaction(), min_size=1, max_size=4))
def test_daemon_survives_random_sessions(
    daemon: MilterDaemon,
    host: str | bytes,
    helo: bool,
    transactions: list[list[tuple[Any, ...]]],
) -> None:
    client = MilterClient(daemon.socket, timeout=10.0)
    try:
        client.negotiate()
        client.connect(host, BAD_IP)  # type: ignore[arg-type]
        if helo:
            client.helo(host)  # type: ignore[arg-type]
        for steps in transactions:
            for step in steps:
                _step(client, step)
        client.quit()
    finally:
        client.close()
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_daemon_after_fuzzing_still_judges_correctly(daemon: MilterDaemon) -> None:
    # Runs after the random sessions (file order): the same process still
    # evaluates a plain spoof of a p=reject domain and refuses it.
    client = MilterClient(daemon.socket, timeout=10.0)
    try:
        client.negotiate()
        client.connect("mx.sender.example", BAD_IP)
        client.helo("mx.sender.example")
        eom = client.send_message(
            b"From: CEO <ceo@victim.example>\r\nTo: x@receiver.example\r\n"
            b"Subject: pay\r\n\r\nhi\r\n",
            sender="x@attacker.example",
            recipients=["x@receiver.example"],
        )
    finally:
        client.close()
    assert eom.reply.kind == "replycode" and eom.reply.code == "550", eom.reply
    log = daemon.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_host_name_that_is_not_utf8_still_gets_our_header(daemon: MilterDaemon) -> None:
    # Found by the random sessions: pymilter cannot decode the host name and
    # never calls connect().  The message is evaluated from {client_addr},
    # but our Authentication-Results then names no authserv-id (" ;"), so it
    # is invalid and a reader cannot tell it is ours.
    client = MilterClient(daemon.socket, timeout=10.0)
    try:
        client.negotiate()
        # Postfix sends the address in {client_addr} with the connect event.
        client.connect(
            b"\xcc.sender.example",  # type: ignore[arg-type]
            BAD_IP,
            macros={"{client_addr}": BAD_IP, "j": "mx.receiver.example"},
        )
        client.helo("mx.sender.example")
        eom = client.send_message(
            b"From: CEO <ceo@bank.example>\r\nTo: x@receiver.example\r\n\r\nhi\r\n",
            sender="x@attacker.example",
            recipients=["x@receiver.example"],
        )
    finally:
        client.close()
    ours = [m.value for m in eom.modifications if m.name == "Authentication-Results"]
    assert len(ours) == 1 and ours[0] is not None
    assert authserv_id_of(ours[0]) == "mx.receiver.example", ours
