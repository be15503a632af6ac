"""Tests of tests/milterclient.py against real pymilter/libmilter milters, in-process.

libmilter's smfi_main() can run only once per process, so one milter server runs
for the whole session in a background thread, on a unix socket in a temporary
directory.  Its behaviour is switched per test through ``BEHAVIOUR``: the factory
instantiates ``BEHAVIOUR["class"]`` for each connection, and ``RecordingMilter``
looks up ``BEHAVIOUR[<callback name>]`` for what to answer.  Every milter records
what it saw in ``EVENTS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import Milter
import milter
import pytest

from tests import milterclient as mc
from tests.milterclient import (
    ALL_PROTOCOL_FLAGS,
    MilterClient,
    MilterConnectionClosed,
    MilterProtocolError,
    MilterTimeout,
    Modification,
    Packet,
    Reply,
    apply_modifications,
    parse_message,
)

# --- the in-process milter server ------------------------------------------------------

BEHAVIOUR: dict[str, Any] = {}
EVENTS: list[tuple[Any, ...]] = []
OPEN: set[int] = set()
_LOCK = threading.Lock()
_CONN_IDS = itertools.count(1)


def events(kind: str | None = None) -> list[tuple[Any, ...]]:
    """Recorded events as ``(kind, *details)``, optionally of one kind."""
    with _LOCK:
        found = [e[1:] for e in EVENTS]
    return [e for e in found if kind is None or e[0] == kind]


def kinds() -> list[str]:
    return [e[0] for e in events()]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; events: {events()}")
        time.sleep(0.005)


class _Recording:
    """Bookkeeping shared by the test milters.

    It defines none of pymilter's optional callbacks (connect, hello, envfrom,
    envrcpt, data, header, eoh, body, unknown), so each milter class's protocol
    mask comes from its own callbacks.  (pymilter caches the mask in a class
    attribute, which a subclass inherits: a subclass of a milter that has already
    negotiated gets its parent's mask, whatever its own decorators say.)
    """

    _protocol: int
    _actions: int

    def __init__(self) -> None:
        self.conn = next(_CONN_IDS)
        with _LOCK:
            OPEN.add(self.conn)

    def record(self, *event: Any) -> None:
        with _LOCK:
            EVENTS.append((self.conn, *event))

    def symval(self, *names: str) -> dict[str, str | None]:
        return {name: self.getsymval(name) for name in names}  # type: ignore[attr-defined]

    def negotiate(self, opts: list[int]) -> int:
        rc: int = super().negotiate(opts)  # type: ignore[misc]
        self.record("negotiate", self._protocol, self._actions)
        return rc

    def eom(self) -> int:
        self.record("eom", self.symval("i", "j", "{auth_authen}", "{daemon_name}"))
        action = BEHAVIOUR.get("eom")
        return int(action(self)) if action else Milter.CONTINUE

    def abort(self) -> int:
        self.record("abort")
        return Milter.CONTINUE

    def close(self) -> int:
        self.record("close")
        with _LOCK:
            OPEN.discard(self.conn)
        return Milter.CONTINUE


class RecordingMilter(_Recording, Milter.Base):
    """Takes every step; answers from BEHAVIOUR, by default CONTINUE."""

    def _answer(self, step: str) -> int:
        action = BEHAVIOUR.get(step)
        return int(action(self)) if action else Milter.CONTINUE

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.record("connect", hostname, family, hostaddr, self.symval("j", "{daemon_name}"))
        return self._answer("connect")

    def hello(self, hostname: str) -> int:
        self.record("helo", hostname)
        return self._answer("hello")

    def envfrom(self, sender: str, *args: str) -> int:
        macros = self.symval("i", "{auth_authen}", "{auth_type}")
        self.record("mail", sender, args, macros)
        return self._answer("envfrom")

    def envrcpt(self, rcpt: str, *args: str) -> int:
        self.record("rcpt", rcpt, args, self.symval("{rcpt_addr}"))
        return self._answer(f"envrcpt:{rcpt}")

    def data(self) -> int:
        self.record("data")
        return self._answer("data")

    def header(self, name: str, value: str) -> int:
        self.record("header", name, value)
        return self._answer("header")

    def eoh(self) -> int:
        self.record("eoh", self.symval("i"))
        self.body_hash = hashlib.sha256()
        self.body_chunks: list[int] = []
        return self._answer("eoh")

    def body(self, chunk: bytes) -> int:
        self.body_hash.update(chunk)
        self.body_chunks.append(len(chunk))
        return self._answer("body")

    def eom(self) -> int:
        if hasattr(self, "body_hash"):
            self.record("body", self.body_hash.hexdigest(), self.body_chunks)
            del self.body_hash
        return super().eom()


class NoReplyMilter(_Recording, Milter.Base):
    """Declares @noreply and @nocallback steps; every other optional callback is
    inherited from Milter.Base, where it is @nocallback."""

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.record("connect", hostname)
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt: str, *args: str) -> int:
        self.record("rcpt", rcpt)
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        self.record("header", name, value)
        return Milter.CONTINUE

    @Milter.nocallback
    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE


class SymlistMilter(_Recording, Milter.Base):
    """Asks for macro lists (SMFIF_SETSYMLIST) through the low-level context."""

    def negotiate(self, opts: list[int]) -> int:
        rc = super().negotiate(opts)
        self._ctx.setsymlist(Milter.M_ENVFROM, "{auth_authen} i")
        self._ctx.setsymlist(Milter.M_EOM, "i")
        return rc


class DecoratedSymlistMilter(_Recording, Milter.Base):
    """@Milter.symlist, which pymilter 1.0.5 breaks on Python 3."""

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        self.record("header", name, value)
        return Milter.CONTINUE

    @Milter.symlist("i")
    def eom(self) -> int:
        return super().eom()


@Milter.header_leading_space
class LeadingSpaceMilter(_Recording, Milter.Base):
    def header(self, name: str, value: str) -> int:
        self.record("header", name, value)
        return Milter.CONTINUE


def _factory() -> Milter.Base:
    cls: type[Milter.Base] = BEHAVIOUR.get("class", RecordingMilter)
    return cls()


def _stop_milter(path: str, thread: threading.Thread) -> None:
    # milter.stop() waits for libmilter's listener, which holds its lock in a
    # select() with a 5-second timeout; a connection attempt wakes it up.
    stopper = threading.Thread(target=milter.stop, name="milter-stop", daemon=True)
    stopper.start()
    deadline = time.monotonic() + 10
    while stopper.is_alive() and time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
            sock.connect(path)
        stopper.join(0.05)
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def milter_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pymilter server on a unix socket, for the whole session."""
    path = str(tmp_path_factory.mktemp("milter") / "milter.sock")
    Milter.factory = _factory
    # What Milter.runmilter() does, minus the blocking milter.main().
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.setconn("unix:" + path)
    milter.register(
        "milterclient-test",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )
    milter.opensocket(True)
    thread = threading.Thread(target=milter.main, name="libmilter", daemon=True)
    thread.start()
    yield path
    _stop_milter(path, thread)
    assert not thread.is_alive(), "libmilter did not stop"


@pytest.fixture(autouse=True)
def behaviour(milter_socket: str) -> Iterator[dict[str, Any]]:
    BEHAVIOUR.clear()
    with _LOCK:
        EVENTS.clear()
    yield BEHAVIOUR
    # Every milter connection of the test must be closed before the next test.
    wait_for(lambda: not OPEN)
    BEHAVIOUR.clear()


@pytest.fixture
def client(milter_socket: str) -> Iterator[MilterClient]:
    with MilterClient(milter_socket) as c:
        yield c


def start_session(c: MilterClient, **negotiate: int) -> mc.Negotiated:
    negotiated = c.negotiate(**negotiate)
    c.connect("mail.example.org", "192.0.2.1", 41234)
    c.helo("mail.example.org")
    return negotiated


def sent(c: MilterClient) -> list[Packet]:
    return [p for direction, p in c.transcript if direction == "send"]


MESSAGE = (
    b"Received: from mail.example.org (mail.example.org [192.0.2.1])\r\n"
    b"\tby relay.example.net; Mon, 1 Dec 2025 10:00:00 +0000\r\n"
    b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=example.org\r\n"
    b"Authentication-Results: mx.example.net; dmarc=pass header.from=example.org\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel;\r\n"
    b"\th=from:to:subject; bh=abc=;\r\n"
    b"\tb=def=\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"-- Alice\r\n"
)


# --- negotiation -------------------------------------------------------------------------


def test_negotiation_of_a_milter_that_takes_every_step(client: MilterClient) -> None:
    negotiated = client.negotiate()
    assert negotiated.version == 6
    assert negotiated.actions == mc.ALL_ACTIONS
    # Every step wanted, with replies; only SKIP is understood and UNKNOWN declined.
    assert negotiated.protocol == mc.SMFIP_SKIP | mc.SMFIP_NOUNKNOWN
    assert negotiated.macros == {}
    client.connect("h", "192.0.2.1")  # a reply proves the milter side is done
    assert events("negotiate") == [("negotiate", negotiated.protocol, mc.ALL_ACTIONS)]


def test_negotiation_reflects_noreply_and_nocallback(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    behaviour["class"] = NoReplyMilter
    negotiated = client.negotiate()
    assert negotiated.protocol == (
        mc.SMFIP_SKIP
        | mc.SMFIP_NR_CONN  # @noreply connect
        | mc.SMFIP_NR_RCPT  # @noreply envrcpt
        | mc.SMFIP_NR_HDR  # @noreply header
        | mc.SMFIP_NOBODY  # @nocallback body
        # Milter.Base's own @nocallback defaults:
        | mc.SMFIP_NOHELO
        | mc.SMFIP_NOMAIL
        | mc.SMFIP_NODATA
        | mc.SMFIP_NOEOH
        | mc.SMFIP_NOUNKNOWN
    )
    assert negotiated.macros == {}


def test_negotiated_macro_lists(client: MilterClient, behaviour: dict[str, Any]) -> None:
    behaviour["class"] = SymlistMilter
    negotiated = client.negotiate()
    assert negotiated.macros == {mc.SMFIM_ENVFROM: ("{auth_authen}", "i"), mc.SMFIM_EOM: ("i",)}


def test_pymilter_symlist_decorator_voids_the_negotiation(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    """pymilter 1.0.5's Base.setsymlist() passes bytes where its C setsymlist()
    wants str; Base.negotiate() swallows the TypeError and answers ALL_OPTS, so
    libmilter falls back to its defaults: no macro list, and the @noreply
    decorators are lost too.  If this starts failing, pymilter was fixed."""
    behaviour["class"] = DecoratedSymlistMilter
    negotiated = client.negotiate()
    assert (negotiated.protocol, negotiated.macros) == (mc.SMFIP_SKIP, {})


def test_steps_declined_are_not_sent_and_noreply_steps_not_waited_for(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    behaviour["class"] = NoReplyMilter
    client.negotiate()
    assert client.connect("h.example", "192.0.2.1").kind == "noreply"
    assert client.helo("h.example", macros={"j": "mx.example.net"}).kind == (
        "skipped-by-negotiation"
    )
    result = client.send_message(
        MESSAGE,
        sender="alice@example.org",
        recipients=["bob@example.net"],
        macros_mail={"i": "4ABC", "{auth_authen}": "alice"},
        macros_eom={"i": "4ABC"},
    )
    assert [(stage, reply.kind) for stage, reply in result.steps] == [
        ("mail", "skipped-by-negotiation"),
        ("rcpt", "noreply"),
        ("data", "skipped-by-negotiation"),
        *[("header", "noreply")] * 7,
        ("eoh", "skipped-by-negotiation"),
        ("body", "skipped-by-negotiation"),
        ("eom", "continue"),
    ]
    commands = [p.command for p in sent(client)]
    # Declined steps never go out; their macros do, as Postfix sends them.
    assert b"H" not in commands and b"M" not in commands and b"T" not in commands
    assert b"N" not in commands and b"B" not in commands
    assert Packet(b"D", b"Hj\0mx.example.net\0") in sent(client)
    assert commands[-1] == b"A"  # Postfix aborts after every transaction
    # The milter got the noreply steps, and the macros of the declined MAIL step.
    # It also gets an abort() after the complete message: libmilter ignores an
    # SMFIC_ABORT after end of message, unless some connection in the process has
    # negotiated SMFIP_NOMAIL (as this one did).  fix_stm() then marks MAIL as
    # skippable in libmilter's process-global state table, which makes
    # end-of-message -> abort a valid transition for every later connection.
    wait_for(lambda: "abort" in kinds())
    assert [e[0] for e in events() if e[0] != "negotiate"] == [
        "connect",
        "rcpt",
        *["header"] * 7,
        "eom",
        "abort",
    ]
    assert events("eom")[0][1]["{auth_authen}"] == "alice"
    assert events("eom")[0][1]["i"] == "4ABC"


def test_libmilter_fakes_noreply_for_an_mta_without_it(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    behaviour["class"] = NoReplyMilter
    offer = ALL_PROTOCOL_FLAGS & ~(mc.SMFIP_NR_HDR | mc.SMFIP_NR_RCPT | mc.SMFIP_NR_CONN)
    negotiated = client.negotiate(protocol=offer)
    assert not negotiated.protocol & (mc.SMFIP_NR_HDR | mc.SMFIP_NR_RCPT | mc.SMFIP_NR_CONN)
    assert client.connect("h", "192.0.2.1").kind == "continue"
    client.mail("a@example.org")
    assert client.rcpt("b@example.net").kind == "continue"
    assert client.header("Subject", " x").kind == "continue"
    # The milter itself still believes it negotiated "no reply".
    milter_protocol = events("negotiate")[0][1]
    assert milter_protocol & mc.SMFIP_NR_HDR


@pytest.mark.parametrize(
    ("milter_class", "leadspc_supported", "expected"),
    [
        (RecordingMilter, True, "a=1;\n\tb=2 "),
        (LeadingSpaceMilter, True, " a=1;\n\tb=2 "),
        (LeadingSpaceMilter, False, "a=1;\n\tb=2 "),
    ],
    ids=["stripped", "leadspc", "leadspc-not-offered"],
)
def test_header_values_and_leading_space(
    milter_socket: str,
    behaviour: dict[str, Any],
    milter_class: type[Milter.Base],
    leadspc_supported: bool,
    expected: str,
) -> None:
    behaviour["class"] = milter_class
    with MilterClient(milter_socket, leadspc_supported=leadspc_supported) as c:
        negotiated = start_session(c)
        assert negotiated.has(mc.SMFIP_HDR_LEADSPC) == (expected.startswith(" "))
        c.mail("a@example.org")
        c.rcpt("b@example.net")
        c.data()
        # As in the message after "X-Test:"; CRLF of the fold goes out as LF.
        c.header("X-Test", " a=1;\r\n\tb=2 ")
        c.header("X-Tab", "\tvalue")
        c.eoh()
        c.end_of_message()
    headers = events("header")
    assert headers == [("header", "X-Test", expected), ("header", "X-Tab", "\tvalue")]


# --- macros ----------------------------------------------------------------------------


def test_macros_reach_the_milter(client: MilterClient) -> None:
    client.negotiate()
    client.connect(
        "mail.example.org",
        "192.0.2.1",
        41234,
        macros={"j": "mx.example.net", "{daemon_name}": "smtpd"},
    )
    client.helo("mail.example.org")
    client.mail(
        "alice@example.org",
        "BODY=8BITMIME",
        macros={"i": "4ABC", "{auth_authen}": "alice", "{auth_type}": "PLAIN"},
    )
    client.rcpt("bob@example.net", macros={"{rcpt_addr}": "bob@example.net"})
    client.data()
    client.eoh(macros={"i": "4ABC"})
    result = client.end_of_message(macros={"i": "4ABC-eom"})
    assert result.reply.kind == "continue"
    assert events("connect") == [
        (
            "connect",
            "mail.example.org",
            socket.AF_INET,
            ("192.0.2.1", 41234),
            {"j": "mx.example.net", "{daemon_name}": "smtpd"},
        )
    ]
    assert events("mail") == [
        (
            "mail",
            "<alice@example.org>",
            ("BODY=8BITMIME",),
            {"i": "4ABC", "{auth_authen}": "alice", "{auth_type}": "PLAIN"},
        )
    ]
    assert events("rcpt") == [("rcpt", "<bob@example.net>", (), {"{rcpt_addr}": "bob@example.net"})]
    # At end of message, the eom macros first, then those of earlier stages.
    assert events("eom")[0][1] == {
        "i": "4ABC-eom",
        "j": "mx.example.net",
        "{auth_authen}": "alice",
        "{daemon_name}": "smtpd",
    }


def test_connect_families(milter_socket: str) -> None:
    with MilterClient(milter_socket) as c:
        c.negotiate()
        c.connect("[2001:db8::1]", "2001:db8::1", 50000, family="6")
    with MilterClient(milter_socket) as c:
        c.negotiate()
        c.connect("localhost", "/var/run/smtp", family="L")
    with MilterClient(milter_socket) as c:
        c.negotiate()
        c.connect("unknown", "", family="U")
    wait_for(lambda: len(events("connect")) == 3)
    found = {e[1]: (e[2], e[3]) for e in events("connect")}
    assert found["[2001:db8::1]"][0] == socket.AF_INET6
    assert found["[2001:db8::1]"][1][:2] == ("2001:db8::1", 50000)
    assert found["localhost"] == (socket.AF_UNIX, "/var/run/smtp")
    assert found["unknown"] == (0, None)  # pymilter's family for SMFIA_UNKNOWN


# --- end of message ----------------------------------------------------------------------


def test_insheader_chgheader_delete_and_quarantine_packets(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    def eom(m: Milter.Base) -> int:
        m.progress()
        m.addheader("Authentication-Results", "mx.example.net; dmarc=fail", 0)
        m.chgheader("Authentication-Results", 2, None)
        m.quarantine("DMARC policy quarantine")
        return Milter.CONTINUE

    behaviour["eom"] = eom
    start_session(client)
    result = client.send_message(MESSAGE, sender="alice@example.org", recipients=["bob@x.net"])
    assert result.stage == "eom"
    assert result.reply == Reply("continue", progress=1)
    assert [m.packet for m in result.modifications] == [
        Packet(b"i", b"\0\0\0\0Authentication-Results\0mx.example.net; dmarc=fail\0"),
        Packet(b"m", struct.pack(">I", 2) + b"Authentication-Results\0\0"),
        Packet(b"q", b"DMARC policy quarantine\0"),
    ]
    ins, delete, quarantine = result.modifications
    assert (ins.kind, ins.index, ins.name, ins.value) == (
        "insheader",
        0,
        "Authentication-Results",
        "mx.example.net; dmarc=fail",
    )
    assert (delete.kind, delete.index, delete.value) == ("chgheader", 2, "")
    assert (quarantine.kind, quarantine.reason) == ("quarantine", "DMARC policy quarantine")

    headers, _ = parse_message(MESSAGE)
    own = ("Received", " from client by mx.example.net")
    delivered = apply_modifications(headers, result.modifications, mta_header=own)
    names_values = [(n, v.split(";")[0].split("\n")[0].strip()) for n, v in delivered]
    # insheader 0 lands above Postfix's own Received: header; the 2nd A-R is gone.
    assert names_values[:4] == [
        ("Authentication-Results", "mx.example.net"),
        ("Received", "from client by mx.example.net"),
        ("Received", "from mail.example.org (mail.example.org [192.0.2.1])"),
        ("Authentication-Results", "relay.example.net"),
    ]
    assert [v for n, v in names_values].count("mx.example.net") == 1


def test_chgheader_indices_are_sent_verbatim(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    """libmilter passes indices through; what they mean is up to the MTA."""

    def eom(m: Milter.Base) -> int:
        m.chgheader("Authentication-Results", 1, "")
        m.chgheader("Authentication-Results", 2, "")
        return Milter.ACCEPT

    behaviour["eom"] = eom
    start_session(client)
    message = (
        b"Authentication-Results: one\r\n"
        b"Authentication-Results: two\r\n"
        b"Authentication-Results: three\r\n"
        b"\r\n"
    )
    result = client.send_message(message, sender="a@example.org", recipients=["b@example.net"])
    assert [m.packet.data[:4] for m in result.modifications] == [
        struct.pack(">I", 1),
        struct.pack(">I", 2),
    ]
    assert result.reply.kind == "accept"
    headers, body = parse_message(message)
    assert body == b""
    # Postfix applies them one after the other: "1 then 2" removes one and three.
    assert apply_modifications(headers, result.modifications) == [
        ("Authentication-Results", " two")
    ]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            lambda m: m.setreply("550", "5.7.1", "DMARC policy violation") or Milter.REJECT,
            Reply(
                "replycode",
                code="550",
                xcode="5.7.1",
                text="DMARC policy violation",
                raw="550 5.7.1 DMARC policy violation",
            ),
        ),
        (lambda m: Milter.REJECT, Reply("reject")),
        (lambda m: Milter.TEMPFAIL, Reply("tempfail")),
        (
            lambda m: m.setreply("451", "4.7.1", "try 100%% later") or Milter.TEMPFAIL,
            Reply(
                "replycode",
                code="451",
                xcode="4.7.1",
                text="try 100% later",
                raw="451 4.7.1 try 100%% later",
            ),
        ),
        (lambda m: Milter.DISCARD, Reply("discard")),
        (lambda m: Milter.ACCEPT, Reply("accept")),
    ],
    ids=["setreply-reject", "reject", "tempfail", "setreply-tempfail", "discard", "accept"],
)
def test_final_replies_at_end_of_message(
    client: MilterClient,
    behaviour: dict[str, Any],
    answer: Callable[[Milter.Base], int],
    expected: Reply,
) -> None:
    behaviour["eom"] = answer
    start_session(client)
    result = client.send_message(MESSAGE, sender="a@example.org", recipients=["b@example.net"])
    assert (result.stage, result.reply, result.modifications) == ("eom", expected, [])


def test_reject_at_mail_ends_the_transaction(
    client: MilterClient, behaviour: dict[str, Any]
) -> None:
    behaviour["envfrom"] = lambda m: m.setreply("550", "5.7.1", "go away") or Milter.REJECT
    start_session(client)
    result = client.send_message(MESSAGE, sender="a@example.org", recipients=["b@example.net"])
    assert (result.stage, result.reply.code, result.reply.text) == ("mail", "550", "go away")
    assert sent(client)[-1].command == b"M"  # no RCPT, and no ABORT: there was no MAIL
    # The session goes on.
    behaviour.pop("envfrom")
    result = client.send_message(MESSAGE, sender="a@example.org", recipients=["b@example.net"])
    assert result.reply.kind == "continue"


def test_a_rejected_recipient_is_dropped(client: MilterClient, behaviour: dict[str, Any]) -> None:
    behaviour["envrcpt:<nobody@example.net>"] = lambda m: Milter.REJECT
    start_session(client)
    result = client.send_message(
        MESSAGE,
        sender="a@example.org",
        recipients=["nobody@example.net", "bob@example.net"],
    )
    assert [r.kind for stage, r in result.steps if stage == "rcpt"] == ["reject", "continue"]
    assert result.stage == "eom"
    result = client.send_message(MESSAGE, sender="a@example.org", recipients=["nobody@example.net"])
    assert (result.stage, result.reply.kind) == ("rcpt", "reject")


# --- sessions ----------------------------------------------------------------------------


def test_two_messages_on_one_connection_and_an_abort(client: MilterClient) -> None:
    start_session(client)
    first = client.send_message(
        MESSAGE, sender="a@example.org", recipients=["b@example.net"], macros_eom={"i": "Q1"}
    )
    assert first.reply.kind == "continue"
    # An aborted transaction: the milter's abort() runs.
    client.mail("c@example.org", macros={"i": "Q2"})
    client.rcpt("d@example.net")
    client.data()
    client.header("Subject", " half a message")
    client.abort()
    wait_for(lambda: "abort" in kinds())
    second = client.send_message(
        MESSAGE, sender="e@example.org", recipients=["f@example.net"], macros_eom={"i": "Q3"}
    )
    assert second.reply.kind == "continue"
    found = kinds()
    mails = [i for i, kind in enumerate(found) if kind == "mail"]
    assert found[mails[1] : mails[2]] == ["mail", "rcpt", "data", "header", "abort"]
    # (Whether abort() also runs for the SMFIC_ABORT sent after a complete message
    # depends on libmilter's process-wide state: see the NO*-flags test above.)
    assert [e[1] for e in events("mail")] == [
        "<a@example.org>",
        "<c@example.org>",
        "<e@example.org>",
    ]
    assert [e[1]["i"] for e in events("eom")] == ["Q1", "Q3"]
    with _LOCK:
        connections = {e[0] for e in EVENTS}
    assert len(connections) == 1  # one milter object for the whole SMTP session


def test_quit_new_connection_after_a_message(client: MilterClient) -> None:
    """SMFIC_QUIT_NC (Sendmail's, not Postfix's) ends the SMTP session and keeps
    the milter connection; libmilter accepts it only after end of message (or
    UNKNOWN); anywhere else it drops it silently, and the next command too."""
    start_session(client)
    # No Postfix-style SMFIC_ABORT after the message: libmilter would drop it and
    # fall back to its HELO state, from which QUIT_NC is not accepted either.
    client.send_message(
        MESSAGE, sender="a@example.org", recipients=["b@example.net"], abort_after=False
    )
    client.quit_new_connection()
    assert client.connect("second.example", "192.0.2.2").kind == "continue"
    assert client.mail("c@example.org").kind == "continue"
    with _LOCK:
        conn_of = [(e[0], e[1]) for e in EVENTS if e[1] in ("connect", "close")]
    first, second = conn_of[0][0], conn_of[-1][0]
    assert conn_of == [(first, "connect"), (first, "close"), (second, "connect")]
    assert second != first  # a new milter object for the new SMTP session


def test_large_body_in_chunks(client: MilterClient) -> None:
    line = b"0123456789" * 9 + b"abcdefgh"  # 98 bytes, 100 with CRLF
    body = line + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + body * 100_000  # 10,000,000 bytes of body
    start_session(client)
    started = time.perf_counter()
    result = client.send_message(raw, sender="a@example.org", recipients=["b@example.net"])
    elapsed = time.perf_counter() - started
    assert result.reply.kind == "continue"
    (_, digest, chunks) = events("body")[0]
    assert digest == hashlib.sha256(body * 100_000).hexdigest()
    assert sum(chunks) == 10_000_000
    assert max(chunks) == 65535 and len(chunks) == -(-10_000_000 // 65535)
    assert elapsed < 30


def test_skip_stops_further_body_chunks(client: MilterClient, behaviour: dict[str, Any]) -> None:
    behaviour["body"] = lambda m: Milter.SKIP
    start_session(client)
    raw = b"Subject: skip\r\n\r\n" + b"x" * 200_000
    result = client.send_message(raw, sender="a@example.org", recipients=["b@example.net"])
    assert dict(result.steps)["body"].kind == "skip"
    assert result.reply.kind == "continue"
    assert events("body")[0][2] == [65535]
    assert [p.command for p in sent(client)].count(b"B") == 1


def test_8bit_header_bytes_round_trip(client: MilterClient) -> None:
    subject = "Grüße ✓ from Zürich".encode() + b" \xff\xfe raw"
    raw = b"Subject: " + subject + b"\r\nFrom: =?utf-8?q?x?= <\xc3\xa9@example.org>\r\n\r\nbody\r\n"
    start_session(client)
    client.send_message(raw, sender="a@example.org", recipients=["b@example.net"])
    values = [e[2] for e in events("header")]
    # pymilter decodes with surrogateescape: the original bytes come back exactly.
    assert [v.encode("utf-8", "surrogateescape") for v in values] == [
        subject,
        b"=?utf-8?q?x?= <\xc3\xa9@example.org>",
    ]
    header_packets = [p.data for p in sent(client) if p.command == b"L"]
    assert header_packets[0] == b"Subject\0" + subject + b"\0"


# --- errors ------------------------------------------------------------------------------


def test_timeout(milter_socket: str, behaviour: dict[str, Any]) -> None:
    def slow_eom(m: Milter.Base) -> int:
        time.sleep(0.5)
        return Milter.CONTINUE

    behaviour["eom"] = slow_eom
    with MilterClient(milter_socket, timeout=0.1) as c:
        start_session(c)
        c.mail("a@example.org")
        c.rcpt("b@example.net")
        with pytest.raises(MilterTimeout):
            c.end_of_message()
        c.close()


def test_no_milter_listening(tmp_path: Path) -> None:
    with pytest.raises(MilterConnectionClosed):
        MilterClient(str(tmp_path / "nothing.sock"))


def test_the_milter_closes_on_a_bad_connect_packet(milter_socket: str) -> None:
    with MilterClient(milter_socket) as c:
        c.negotiate()
        with pytest.raises(MilterConnectionClosed):
            c.connect("h", "192.0.2.1", family="6")  # not an IPv6 address
        assert c.closed


class ScriptedMilter:
    """A TCP 'milter' that answers each packet it reads with scripted packets."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.received: list[bytes] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            for answer in self.answers:
                header = conn.recv(4, socket.MSG_WAITALL)
                if len(header) < 4:
                    return
                (length,) = struct.unpack(">I", header)
                self.received.append(conn.recv(length, socket.MSG_WAITALL))
                for command_and_data in answer:
                    conn.sendall(struct.pack(">I", len(command_and_data)) + command_and_data)

    def close(self) -> None:
        self.thread.join(5)
        self.server.close()


def test_tcp_and_protocol_errors() -> None:
    optneg = b"O" + struct.pack(">III", 6, 0x1FF, 0x400)
    symlists = struct.pack(">I", 2) + b"{auth_authen} i\0" + struct.pack(">I", 5) + b"i\0"
    fake = ScriptedMilter([[optneg + symlists], [b"p", b"p", b"c"], [b"cX"]])
    try:
        with MilterClient(fake.address) as c:
            negotiated = c.negotiate()
            assert negotiated.macros == {2: ("{auth_authen}", "i"), 5: ("i",)}
            assert c.connect("h", "192.0.2.1") == Reply("continue", progress=2)
            with pytest.raises(MilterProtocolError, match="followed by data"):
                c.helo("h")
    finally:
        fake.close()
    assert fake.received[1] == b"Ch\x004" + struct.pack(">H", 25) + b"192.0.2.1\0"

    fake = ScriptedMilter([[b"O" + struct.pack(">III", 6, 0x1FF, 0)], [b"h" + b"X\0y\0"]])
    try:
        with MilterClient(fake.address) as c:
            c.negotiate()
            with pytest.raises(MilterProtocolError, match="only allowed at end of message"):
                c.connect("h", "192.0.2.1")
    finally:
        fake.close()

    fake = ScriptedMilter([[b"O" + struct.pack(">III", 6, 0x1FF, 0)]])
    try:
        with (
            MilterClient(fake.address) as c,
            pytest.raises(MilterProtocolError, match="beyond those offered"),
        ):
            c.negotiate(actions=mc.SMFIF_ADDHDRS)
    finally:
        fake.close()


# --- parsing and applying ----------------------------------------------------------------


def test_parse_message() -> None:
    headers, body = parse_message(MESSAGE)
    assert headers[0] == (
        "Received",
        " from mail.example.org (mail.example.org [192.0.2.1])\n"
        "\tby relay.example.net; Mon, 1 Dec 2025 10:00:00 +0000",
    )
    assert headers[3][0] == "DKIM-Signature"
    assert headers[3][1].count("\n\t") == 2
    assert [n for n, _ in headers][-3:] == ["From", "To", "Subject"]
    assert body == b"Hello Bob,\r\n\r\n-- Alice\r\n"
    # LF line ends, a colon after spaces, no blank line before a non-header line,
    # no final line end.
    headers, body = parse_message(b"A : 1\nB:2\n  3\nnot a header\nlast")
    assert headers == [("A", " 1"), ("B", "2\n  3")]
    assert body == b"not a header\r\nlast\r\n"
    assert parse_message(b"") == ([], b"")


def _mod(kind: str, name: str, value: str, index: int | None = None) -> Modification:
    return Modification(kind, Packet(b"?", b""), name=name, value=value, index=index)  # type: ignore[arg-type]


def test_apply_modifications_follows_postfix() -> None:
    headers = [("From", " a"), ("X-A", " 1"), ("Subject", " s"), ("x-a", " 2")]
    own = ("Received", " by mx")
    # chgheader: per-name index counting case-insensitively, 0 means 1, empty deletes,
    # a missing one is appended.
    assert apply_modifications(headers, [_mod("chgheader", "X-A", "new", 2)]) == [
        ("From", " a"),
        ("X-A", " 1"),
        ("Subject", " s"),
        ("X-A", " new"),
    ]
    assert apply_modifications(headers, [_mod("chgheader", "X-A", "", 0)])[1] == (
        "Subject",
        " s",
    )
    assert apply_modifications(headers, [_mod("chgheader", "X-B", "b", 1)])[-1] == ("X-B", " b")
    assert apply_modifications(headers, [_mod("chgheader", "X-B", "", 1)]) == headers
    # Deleting index 2 twice removes original 2 and 3.
    many = [("A", f" {i}") for i in range(1, 5)]
    twice = [_mod("chgheader", "A", "", 2), _mod("chgheader", "A", "", 2)]
    assert apply_modifications(many, twice) == [("A", " 1"), ("A", " 4")]
    # insheader counts every header, including the MTA's hidden own one.
    assert apply_modifications(headers, [_mod("insheader", "H", "v", 1)], mta_header=own)[:2] == [
        own,
        ("H", " v"),
    ]
    assert apply_modifications(headers, [_mod("insheader", "H", "v", 99)])[-1] == ("H", " v")
    # chgheader never touches the hidden header, and values keep their own leading
    # whitespace with leadspc.
    result = apply_modifications(
        [("Received", " theirs")],
        [_mod("chgheader", "Received", "\tmine", 1)],
        mta_header=own,
        leadspc=True,
    )
    assert result == [own, ("Received", "\tmine")]
    assert apply_modifications(headers, [_mod("addheader", "Z", "z")])[-1] == ("Z", " z")
