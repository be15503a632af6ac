"""The throwaway Postfix (tests/postfixserver.py): mail goes through a real Postfix
to the sink, with the client set by XCLIENT; a milter (a small pymilter probe
written here, not dmarcmilter) sees the connection and its macros, adds header
fields, rejects and quarantines.

The probe runs ``Milter.runmilter`` in a child process of its own, not in a thread
of the test process: libmilter's state is process-global and good for a single
run (after ``smfi_stop`` a second ``smfi_main`` returns at once), and another
module's session fixture (tests/test_milterclient.py) already runs a libmilter
in the test process.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Milter
import pytest

from tests.postfixserver import (
    MYHOSTNAME,
    DeliveryTimeout,
    PostfixInstances,
    PostfixServer,
    SMTPSession,
    allow_postfix,
    make_socket_dir,
    reap_stale,
)

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


def make_message(
    subject: str = "Test",
    *,
    msgid: str | None = None,
    extra: str = "",
    body: str = "Hello.\r\n",
    author: str = SENDER,
) -> bytes:
    msgid = msgid or f"<{time.monotonic_ns()}.{os.getpid()}@example.org>"
    return (
        f"From: <{author}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n"
        f"Message-ID: {msgid}\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n{extra}\r\n{body}"
    ).encode()


# -- the probe milter ---------------------------------------------------------------


class ProbeMilter(Milter.Base):
    """Reports what it saw in X-Probe-* header fields; ``X-Probe-Action:
    reject|quarantine|tempfail`` in the message makes it do that instead."""

    def __init__(self) -> None:
        self.client = self.helo = ""
        self.macros: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self.mail_from = ""
        self.auth = ""
        self.action = ""
        self.body_bytes = 0

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        ip = hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr)
        self.client = f"{hostname} {ip}"
        for macro in ("j", "{daemon_name}", "{client_addr}"):
            self.macros[macro] = self.getsymval(macro) or ""
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = hostname
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from: str, *params: str) -> int:
        self.reset()
        self.mail_from = mail_from
        self.auth = self.getsymval("{auth_authen}") or ""
        self.macros["{auth_type}"] = self.getsymval("{auth_type}") or ""
        self.macros["i@mail"] = self.getsymval("i") or ""
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        if name.lower() == "x-probe-action":
            self.action = value.strip()
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        self.body_bytes += len(chunk)
        return Milter.CONTINUE

    def eom(self) -> int:
        queue_id = self.getsymval("i") or ""
        if self.action == "reject":
            self.setreply("550", "5.7.1", "Rejected by the probe milter")
            return Milter.REJECT
        if self.action == "tempfail":
            self.setreply("451", "4.7.1", "Try again, says the probe milter")
            return Milter.TEMPFAIL
        if self.action == "quarantine":
            self.quarantine("held by the probe milter")
        self.addheader("X-Probe", "seen")
        self.addheader("X-Probe-Client", self.client)
        self.addheader("X-Probe-Helo", self.helo)
        self.addheader("X-Probe-Mail", self.mail_from)
        self.addheader("X-Probe-Auth", self.auth or "none")
        self.addheader("X-Probe-Body-Bytes", str(self.body_bytes))
        macros = "; ".join(f"{k}={v}" for k, v in sorted(self.macros.items()))
        self.addheader("X-Probe-Macros", f"i={queue_id}; {macros}")
        return Milter.CONTINUE


def serve_probe(socket_path: str) -> None:
    """The probe milter's process (see the module docstring)."""
    Milter.factory = ProbeMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.QUARANTINE)
    Milter.runmilter("probe", f"unix:{socket_path}", timeout=60)


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def probe_milter() -> Iterator[str]:
    """The probe milter on a unix socket, for the module: the smtpd_milters value."""
    socket_dir = make_socket_dir()
    path = socket_dir / "probe.sock"
    code = f"from tests.test_postfixserver import serve_probe; serve_probe({str(path)!r})"
    with (socket_dir / "probe.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10
        while True:  # listening (bind() makes the file, listen() comes after)
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(path))
                    break
                except OSError as exc:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log_text = (socket_dir / "probe.log").read_text()
                        raise RuntimeError(f"the probe milter did not start: {log_text}") from exc
            time.sleep(0.01)
        allow_postfix(path)
        yield f"unix:{path}"
        assert proc.poll() is None, (socket_dir / "probe.log").read_text()
    finally:
        # SIGKILL: libmilter would answer SIGTERM only after its 5-second poll.
        proc.kill()
        proc.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_instance(postfix_instances: PostfixInstances, probe_milter: str) -> PostfixServer:
    return postfix_instances.start(milter=probe_milter)


@pytest.fixture
def milter_postfix(probe_instance: PostfixServer) -> Iterator[PostfixServer]:
    """The module's instance with the probe milter, queue and sink emptied."""
    probe_instance.clear_queue()
    yield probe_instance
    probe_instance.clear_queue()


def _alive(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has: the master is
    a daemon, and reaping it is up to pid 1)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- without a milter ---------------------------------------------------------------


def test_plain_delivery_with_xclient_client(postfix_server: PostfixServer) -> None:
    message = make_message(msgid="<plain.1@example.org>")
    result = postfix_server.send(
        SENDER,
        [RECIPIENT, "carol@example.com"],
        message,
        client_ip="192.0.2.7",
        helo="mx.example.org",
        client_name="mx.example.org",
    )
    assert result.code == 250, result
    assert result.accepted and result.queue_id
    delivered = postfix_server.wait_for_delivery(result)
    assert delivered.mail_from == SENDER
    assert sorted(delivered.rcpt_tos) == ["bob@example.net", "carol@example.com"]
    assert delivered.queue_id == result.queue_id
    received = delivered.header("Received") or ""
    assert received.startswith("from mx.example.org (mx.example.org [192.0.2.7])"), received
    assert f"by {MYHOSTNAME} (Postfix) with ESMTP id {result.queue_id}" in received
    assert delivered.message_id == "<plain.1@example.org>"
    assert postfix_server.wait_for_delivery("plain.1@example.org") is delivered
    assert delivered.content.endswith(b"\r\n\r\nHello.\r\n")
    assert postfix_server.queue() == []


def test_unknown_client_name_and_ipv6(postfix_server: PostfixServer) -> None:
    first = postfix_server.send(SENDER, RECIPIENT, make_message(), client_ip="192.0.2.8")
    second = postfix_server.send(
        SENDER, RECIPIENT, make_message(), client_ip="2001:db8::25", helo="v6.example.org"
    )
    received = postfix_server.wait_for_delivery(first).header("Received") or ""
    assert received.startswith("from mail.example.org (unknown [192.0.2.8])"), received
    received = postfix_server.wait_for_delivery(second).header("Received") or ""
    assert received.startswith("from v6.example.org (unknown [IPv6:2001:db8::25])"), received


def test_discarding_instance(postfix_instances: PostfixInstances) -> None:
    server = postfix_instances.start(sink=False)
    try:
        results = [server.send(SENDER, RECIPIENT, make_message()) for _ in range(5)]
        assert all(r.accepted for r in results), results
        deadline = time.monotonic() + 10
        while server.queue() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.queue() == []
        assert server.postconf("transport_maps") == "static:discard:"
    finally:
        postfix_instances.remove(server)


def test_no_system_postfix_used(postfix_server: PostfixServer) -> None:
    base = str(postfix_server.base_dir)
    for name in ("queue_directory", "data_directory", "maillog_file"):
        assert postfix_server.postconf(name).startswith(base)
    master_cf = (postfix_server.config_dir / "master.cf").read_text()
    assert f"127.0.0.1:{postfix_server.port} inet n - n - - smtpd" in master_cf
    assert "starting the Postfix mail system" in postfix_server.log_file.read_text()


def test_stop_start_keeps_queue_and_port(postfix_server: PostfixServer) -> None:
    port = postfix_server.port
    sink = postfix_server.sink
    assert sink is not None
    sink.stop()  # deliveries are deferred meanwhile
    result = postfix_server.send(SENDER, RECIPIENT, make_message())
    assert result.accepted
    assert [entry["queue_id"] for entry in postfix_server.queue()] == [result.queue_id]
    postfix_server.stop()
    assert not postfix_server.master_running()
    sink.start()
    postfix_server.start()  # main.cf follows the sink, should its port have changed
    assert postfix_server.port == port
    postfix_server.flush()
    delivered = postfix_server.wait_for_delivery(result)
    assert delivered.rcpt_tos == (RECIPIENT,)


def test_delivery_timeout_shows_queue_and_log(postfix_server: PostfixServer) -> None:
    with pytest.raises(DeliveryTimeout, match=r"(?s)queue: \[\].*Postfix log"):
        postfix_server.wait_for_delivery("NOSUCHID", timeout=0.1)


def test_stale_instance_is_reaped(postfix_instances: PostfixInstances) -> None:
    server = PostfixServer(sink=False)  # not one of postfix_instances
    try:
        server.start()
        pid = server.master_pid()
        assert pid and server.master_running()
        # As if the test run that made it had been killed: its owner is gone.
        (server.base_dir / "owner").write_text("1 not-the-same-process\n")
        reaped = reap_stale()
        assert server.base_dir in reaped
        assert not server.base_dir.exists()
        assert not _alive(pid)
    finally:
        server.cleanup()


# -- with the probe milter ----------------------------------------------------------


def test_milter_adds_header_and_sees_xclient_client(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(
        SENDER,
        RECIPIENT,
        make_message(),
        client_ip="198.51.100.9",
        helo="relay.example.org",
        client_name="relay.example.org",
    )
    assert result.accepted, result
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.header("X-Probe") == "seen"
    assert delivered.header("X-Probe-Client") == "relay.example.org 198.51.100.9"
    assert delivered.header("X-Probe-Helo") == "relay.example.org"
    assert delivered.header("X-Probe-Mail") == f"<{SENDER}>"
    assert delivered.header("X-Probe-Auth") == "none"
    macros = dict(
        item.split("=", 1) for item in (delivered.header("X-Probe-Macros") or "").split("; ")
    )
    assert macros["i"] == result.queue_id
    assert macros["i@mail"] == ""  # no queue file yet at MAIL FROM
    assert macros["j"] == MYHOSTNAME
    assert macros["{daemon_name}"] == "dmarcmilter-test-mta"
    assert macros["{client_addr}"] == "198.51.100.9"
    # Added by the milter: below Postfix's own Received field.
    names = [line.split(b":")[0] for line in delivered.header_section.split(b"\r\n")]
    assert names.index(b"X-Probe") > names.index(b"Received")


def test_unknown_client_name_reaches_milter_as_address(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(SENDER, RECIPIENT, make_message(), client_ip="203.0.113.5")
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.header("X-Probe-Client") == "[203.0.113.5] 203.0.113.5"


def test_xclient_login_is_auth_authen(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(SENDER, RECIPIENT, make_message(), login="alice@example.org")
    assert result.accepted, result
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.header("X-Probe-Auth") == "alice@example.org"
    assert "{auth_type}=XCLIENT" in (delivered.header("X-Probe-Macros") or "")


def test_milter_reject(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(
        SENDER, RECIPIENT, make_message(extra="X-Probe-Action: reject\r\n")
    )
    assert result.code == 550
    assert result.text == "5.7.1 Rejected by the probe milter"
    assert result.queue_id is None
    assert milter_postfix.queue() == []
    assert milter_postfix.deliveries == []


def test_milter_tempfail(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(
        SENDER, RECIPIENT, make_message(extra="X-Probe-Action: tempfail\r\n")
    )
    assert (result.code, result.text) == (451, "4.7.1 Try again, says the probe milter")


def test_milter_quarantine_holds(milter_postfix: PostfixServer) -> None:
    result = milter_postfix.send(
        SENDER,
        RECIPIENT,
        make_message("Hold me", extra="X-Probe-Action: quarantine\r\n"),
    )
    assert result.accepted, result
    held = milter_postfix.held()
    assert [entry["queue_id"] for entry in held] == [result.queue_id]
    assert held[0]["sender"] == SENDER
    assert [r["address"] for r in held[0]["recipients"]] == [RECIPIENT]
    headers = milter_postfix.headers(result.queue_id or "")
    assert "Subject: Hold me" in headers
    assert "X-Probe: seen" in headers
    assert re.search(
        r"^Received: from mail\.example\.org \(unknown \[192\.0\.2\.1\]\)", headers, re.M
    )
    assert milter_postfix.deliveries == []
    # Released, it is delivered as it was held.
    milter_postfix.release(result.queue_id or "")
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.header("X-Probe") == "seen"
    assert milter_postfix.held() == []


def test_two_messages_in_one_session(milter_postfix: PostfixServer) -> None:
    with milter_postfix.session(client_ip="192.0.2.44", helo="two.example.org") as session:
        first = session.send(SENDER, RECIPIENT, make_message("one"))
        second = session.send("carol@example.com", RECIPIENT, make_message("two"))
        # Postfix refuses a second XCLIENT: the client is no longer authorized.
        again = session.xclient(addr="192.0.2.45")
    assert first.accepted and second.accepted
    assert first.queue_id != second.queue_id
    assert again.code == 550
    one = milter_postfix.wait_for_delivery(first)
    two = milter_postfix.wait_for_delivery(second)
    assert one.header("X-Probe-Mail") == f"<{SENDER}>"
    assert two.header("X-Probe-Mail") == "<carol@example.com>"
    for delivered in (one, two):
        assert delivered.header("X-Probe-Client") == "[192.0.2.44] 192.0.2.44"
        assert delivered.header("X-Probe-Helo") == "two.example.org"


def test_rset_in_the_middle_of_a_transaction(milter_postfix: PostfixServer) -> None:
    with milter_postfix.session() as session:
        assert session.mail("mallory@example.com").code == 250
        assert session.rcpt(RECIPIENT).code == 250
        assert session.rset().code == 250
        result = session.send(SENDER, RECIPIENT, make_message())
        assert [line for line, _ in session.transcript][-4:] == [
            f"MAIL FROM:<{SENDER}>",
            f"RCPT TO:<{RECIPIENT}>",
            "DATA",
            "<message>",
        ]
    assert result.accepted, result
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.mail_from == SENDER
    assert delivered.header("X-Probe-Mail") == f"<{SENDER}>"
    assert len(milter_postfix.deliveries) == 1


def test_refused_recipient_does_not_raise(milter_postfix: PostfixServer) -> None:
    with milter_postfix.session() as session:
        result = session.send(SENDER, "bad address@", make_message())
        assert result.code == 501 and result.queue_id is None
        assert session.transcript[-1] == ("RSET", session.transcript[-1][1])
        assert session.send(SENDER, RECIPIENT, make_message()).accepted


def test_smtputf8_message(milter_postfix: PostfixServer) -> None:
    sender = "jörg@bücher.example"
    recipient = "zoë@exämple.net"
    message = (
        "From: Jörg <jörg@bücher.example>\r\nTo: <zoë@exämple.net>\r\n"
        "Subject: Grüße aus Köln\r\nMessage-ID: <utf8.1@bücher.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nSchöne Grüße.\r\n"
    ).encode()
    with milter_postfix.session() as session:
        result = session.send(sender, recipient, message)
        assert result.transcript[0][0] == f"MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME"
    assert result.accepted, result
    delivered = milter_postfix.wait_for_delivery(result)
    assert delivered.mail_from == sender
    assert delivered.rcpt_tos == (recipient,)
    assert delivered.smtp_utf8
    assert "Subject: Grüße aus Köln".encode() in delivered.content
    assert delivered.message["Subject"] == "Grüße aus Köln"
    assert delivered.header("X-Probe-Mail") == f"<{sender}>"
    assert delivered.content.endswith("Schöne Grüße.\r\n".encode())


def test_ten_megabyte_message(milter_postfix: PostfixServer) -> None:
    line = base64.b64encode(os.urandom(57)).decode() + "\r\n"  # 78 bytes a line
    body = line * (10 * 1024 * 1024 // len(line) + 1)
    message = make_message("Big", body=body)
    assert len(message) > 10 * 1024 * 1024
    result = milter_postfix.send(SENDER, RECIPIENT, message)
    assert result.accepted, result
    delivered = milter_postfix.wait_for_delivery(result, timeout=60)
    assert delivered.header("X-Probe-Body-Bytes") == str(len(body))
    assert delivered.content.endswith(body.encode())


def test_milter_down_follows_default_action(postfix_instances: PostfixInstances) -> None:
    missing = make_socket_dir() / "none.sock"
    try:
        server = postfix_instances.start(milter=f"unix:{missing}")
        try:
            result = server.send(SENDER, RECIPIENT, make_message())
            assert result.code == 451 and result.text.startswith("4.7.1"), result
            server.reconfigure(milter_default_action="accept")
            result = server.send(SENDER, RECIPIENT, make_message())
            assert result.accepted, result
            assert server.wait_for_delivery(result).header("X-Probe") is None
        finally:
            postfix_instances.remove(server)
    finally:
        missing.parent.rmdir()


def test_session_without_xclient(postfix_server: PostfixServer) -> None:
    with postfix_server.session(xclient=False, helo="plain.example.org") as session:
        assert isinstance(session, SMTPSession)
        assert session.greeting.code == 220
        assert session.smtp.has_extn("smtputf8")
        assert session.smtp.has_extn("xclient")  # 127.0.0.1 may use it
        result = session.send(SENDER, RECIPIENT, make_message())
    received = postfix_server.wait_for_delivery(result).header("Received") or ""
    assert received.startswith("from plain.example.org (unknown [127.0.0.1])"), received
