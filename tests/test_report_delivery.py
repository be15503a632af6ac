"""Report delivery: SMTP to a real (aiosmtpd) relay on loopback, and the
sendmail command (RFC 5321, RFC 3207 STARTTLS, RFC 4954 AUTH; digest §6.3)."""

from __future__ import annotations

import datetime
import email
import email.policy
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.errors import ConfigError
from dmarcmilter.report import delivery
from dmarcmilter.report.delivery import (
    DeliveryOutcome,
    DeliveryResult,
    SendmailTransport,
    SMTPSettings,
    SMTPTransport,
    Transport,
)
from dmarcmilter.report.mail import build_report_message, report_filename
from tests.postfixserver import free_port

HOST = "127.0.0.1"
SENDER = "dmarc-reports@receiver.example"
RCPT = "rua@example.com"
REPORT_ID = "abcdef0123456789"
BEGIN = 1_700_006_400
END = BEGIN + 86_399


def report(report_id: str = REPORT_ID) -> bytes:
    return build_report_message(
        from_address=SENDER,
        to_address=RCPT,
        receiver="mail.receiver.example",
        submitter="mail.receiver.example",
        org_name="Receiver Example",
        policy_domain="example.com",
        begin=BEGIN,
        end=END,
        report_id=report_id,
        attachment=b"\x1f\x8b" + os.urandom(3000),
        filename=report_filename("mail.receiver.example", "example.com", BEGIN, END, report_id),
        date=datetime.datetime(2023, 11, 16, tzinfo=datetime.UTC),
    )


# -- the relay -----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    content: bytes
    tls: bool
    authenticated: bool


class Recorder:
    """aiosmtpd handler: keeps what arrives, answers RCPT and DATA as told."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.rset_replies: list[str] = []
        self.rsets = 0
        self.logins: list[tuple[str, str]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply is not None:
            return self.data_reply
        self.messages.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                mail_options=tuple(envelope.mail_options),
                content=bytes(envelope.original_content),
                tls=session.ssl is not None,
                authenticated=bool(session.authenticated),
            )
        )
        return "250 2.0.0 Ok: queued as TEST"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.rsets += 1
        return self.rset_replies.pop(0) if self.rset_replies else "250 2.0.0 Ok"

    def authenticator(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult

        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((mechanism, login))
        # handled=False: aiosmtpd sends the 535 itself.
        return AuthResult(success=(login, password) == ("reporter", "s3cret"), handled=False)


class Relay:
    """An aiosmtpd server on loopback in a thread that counts its connections
    and can drop them."""

    def __init__(self, port: int | None = None, **smtp_kwargs: Any) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        self.handler = Recorder()
        self.connections = 0
        self._sessions: set[Any] = set()
        relay = self

        class TrackedSMTP(SMTP):
            def connection_made(self, transport: Any) -> None:
                relay.connections += 1
                relay._sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                relay._sessions.discard(self)
                super().connection_lost(error)

        class TrackedController(Controller):
            def factory(self) -> SMTP:
                return TrackedSMTP(self.handler, **self.SMTP_kwargs)

        if "authenticator" in smtp_kwargs:
            smtp_kwargs["authenticator"] = self.handler.authenticator
        self.port = port or free_port(HOST)
        self.controller = TrackedController(
            self.handler,
            hostname=HOST,
            port=self.port,
            server_hostname="relay.test",
            ready_timeout=5,
            **smtp_kwargs,
        )
        self.controller.start()
        self._wait(lambda: not self._sessions)  # the controller's own readiness probe
        self.connections = 0

    def settings(self, **overrides: Any) -> SMTPSettings:
        values: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "helo_name": "reporter.test",
            "timeout": 5.0,
        }
        values.update(overrides)
        return SMTPSettings(**values)

    def drop_connections(self) -> None:
        def close() -> None:
            for smtp in list(self._sessions):
                for transport in (smtp.transport, smtp._original_transport):
                    if transport is not None:
                        transport.close()

        self.controller.loop.call_soon_threadsafe(close)
        self._wait(lambda: all(map(self._closed, list(self._sessions))))

    @staticmethod
    def _closed(smtp: Any) -> bool:
        # After a failed TLS handshake asyncio never reports the loss to the
        # SMTP protocol (it was not yet the TLS layer's connected app), so
        # that session stays listed; its socket transport is what counts.
        socket_transport = smtp._original_transport
        return socket_transport is not None and socket_transport.is_closing()

    def stop(self) -> None:
        self.drop_connections()
        self.controller.stop()

    @staticmethod
    def _wait(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 3
        while not condition():
            assert time.monotonic() < deadline, "the relay did not settle"
            time.sleep(0.01)


@pytest.fixture
def make_relay() -> Iterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    def make(port: int | None = None, **smtp_kwargs: Any) -> Relay:
        relay = Relay(port, **smtp_kwargs)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.stop()


@pytest.fixture
def relay(make_relay: Callable[..., Relay]) -> Relay:
    return make_relay()


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=relay.test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:relay.test",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return Certificate(cert, key)


@pytest.fixture
def tls_relay(make_relay: Callable[..., Relay], certificate: Certificate) -> Relay:
    return make_relay(
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=True,  # replaced by the Recorder's
    )


def parsed(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.default)


# -- SMTP ----------------------------------------------------------------------------


def test_transports_satisfy_the_protocol() -> None:
    transports: list[Transport] = [SMTPTransport(SMTPSettings()), SendmailTransport()]
    for transport in transports:
        transport.close()


def test_sent_and_received_intact(relay: Relay) -> None:
    message = report()
    with SMTPTransport(relay.settings(starttls="off")) as transport:
        result = transport.send(SENDER, RCPT, message)
    assert result == DeliveryResult(
        DeliveryOutcome.SENT, f"250 2.0.0 Ok: queued as TEST ({HOST}:{relay.port})"
    )
    [received] = relay.handler.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, (RCPT,))
    assert f"SIZE={len(message)}" in received.mail_options
    assert received.content == message
    assert parsed(received.content).as_bytes() == parsed(message).as_bytes()
    assert not received.tls


def test_idn_recipient_domain_goes_as_a_label(relay: Relay) -> None:
    with SMTPTransport(relay.settings()) as transport:
        result = transport.send(SENDER, "rua@bücher.example", report())
    assert result.outcome is DeliveryOutcome.SENT
    assert relay.handler.messages[0].rcpt_tos == ("rua@xn--bcher-kva.example",)


def test_4xx_is_tempfail(relay: Relay) -> None:
    relay.handler.data_reply = "451 4.3.0 try later"
    with SMTPTransport(relay.settings()) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert result == DeliveryResult(
        DeliveryOutcome.TEMPFAIL, f"451 4.3.0 try later ({HOST}:{relay.port})"
    )


def test_5xx_on_rcpt_is_permfail_and_the_connection_goes_on(relay: Relay) -> None:
    relay.handler.rcpt_reply = "550 5.1.1 no such user"
    with SMTPTransport(relay.settings()) as transport:
        result = transport.send(SENDER, RCPT, report())
        assert result == DeliveryResult(
            DeliveryOutcome.PERMFAIL,
            f"550 5.1.1 no such user ({HOST}:{relay.port})",
            recipient_refused=True,
        )
        relay.handler.rcpt_reply = None
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
    assert relay.connections == 1
    assert relay.handler.rsets == 1


@pytest.mark.parametrize(
    ("rcpt_reply", "data_reply", "outcome", "refused"),
    [
        # The mailbox is gone or unusable: a hard bounce of the destination.
        ("550 5.1.1 no such user", None, DeliveryOutcome.PERMFAIL, True),
        ("553 5.1.3 bad destination mailbox syntax", None, DeliveryOutcome.PERMFAIL, True),
        ("551 5.1.10 null MX", None, DeliveryOutcome.PERMFAIL, True),
        ("550 5.2.1 mailbox disabled", None, DeliveryOutcome.PERMFAIL, True),
        ("550 no such user here", None, DeliveryOutcome.PERMFAIL, True),
        # About us, the relay or the message, not the mailbox: a failed
        # report, but no reason to suppress the destination.
        ("554 5.7.1 Relay access denied", None, DeliveryOutcome.PERMFAIL, False),
        ("550 5.7.1 our policy says no", None, DeliveryOutcome.PERMFAIL, False),
        ("553 5.1.8 sender domain does not exist", None, DeliveryOutcome.PERMFAIL, False),
        ("552 5.2.3 message too large", None, DeliveryOutcome.PERMFAIL, False),
        ("554 transaction failed", None, DeliveryOutcome.PERMFAIL, False),
        ("530 5.7.0 Must issue a STARTTLS command first", None, DeliveryOutcome.TEMPFAIL, False),
        ("450 4.1.1 mailbox busy", None, DeliveryOutcome.TEMPFAIL, False),
        (None, "550 5.1.1 no such user", DeliveryOutcome.PERMFAIL, False),
    ],
)
def test_only_a_permanent_refusal_of_the_mailbox_is_a_hard_bounce(
    relay: Relay,
    rcpt_reply: str | None,
    data_reply: str | None,
    outcome: DeliveryOutcome,
    refused: bool,
) -> None:
    relay.handler.rcpt_reply = rcpt_reply
    relay.handler.data_reply = data_reply
    with SMTPTransport(relay.settings()) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert (result.outcome, result.recipient_refused) == (outcome, refused)


def test_no_server_is_tempfail() -> None:
    port = free_port(HOST)  # bound and released: nothing listens there
    settings = SMTPSettings(host=HOST, port=port, helo_name="reporter.test", timeout=2)
    with SMTPTransport(settings) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert result.detail.startswith("cannot connect: ")
    assert result.detail.endswith(f"({HOST}:{port})")


def test_a_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)  # never accepted, never greeted
        port = listener.getsockname()[1]
        settings = SMTPSettings(host=HOST, port=port, helo_name="reporter.test", timeout=0.3)
        started = time.monotonic()
        with SMTPTransport(settings) as transport:
            result = transport.send(SENDER, RCPT, report())
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert "timed out" in result.detail
    assert time.monotonic() - started < 3


def test_several_sends_share_one_connection(relay: Relay) -> None:
    with SMTPTransport(relay.settings()) as transport:
        for n in range(3):
            assert transport.send(SENDER, RCPT, report(f"id{n}")).outcome is DeliveryOutcome.SENT
    assert relay.connections == 1
    assert relay.handler.rsets == 2  # between the messages
    ids = [parsed(m.content)["Message-ID"] for m in relay.handler.messages]
    assert ids == [f"<id{n}@mail.receiver.example>" for n in range(3)]


def test_reconnects_when_the_server_dropped_the_connection(relay: Relay) -> None:
    with SMTPTransport(relay.settings()) as transport:
        assert transport.send(SENDER, RCPT, report("one")).outcome is DeliveryOutcome.SENT
        relay.drop_connections()
        assert transport.send(SENDER, RCPT, report("two")).outcome is DeliveryOutcome.SENT
    assert relay.connections == 2
    assert len(relay.handler.messages) == 2


def test_reconnects_after_421_to_rset(relay: Relay) -> None:
    relay.handler.rset_replies.append("421 4.3.2 shutting down")
    with SMTPTransport(relay.settings()) as transport:
        assert transport.send(SENDER, RCPT, report("one")).outcome is DeliveryOutcome.SENT
        assert transport.send(SENDER, RCPT, report("two")).outcome is DeliveryOutcome.SENT
    assert relay.connections == 2


def test_after_a_tempfail_the_next_send_connects_afresh(
    make_relay: Callable[..., Relay],
) -> None:
    port = free_port(HOST)
    settings = SMTPSettings(host=HOST, port=port, helo_name="reporter.test", timeout=2)
    with SMTPTransport(settings) as transport:
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.TEMPFAIL
        relay = make_relay(port=port)  # the relay comes back
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
    assert len(relay.handler.messages) == 1


def test_bad_addresses_are_permfail_without_connecting() -> None:
    with SMTPTransport(SMTPSettings(host=HOST, port=free_port(HOST))) as transport:
        for sender, rcpt in [(SENDER, "rüa@example.com"), (SENDER, "a@b\r\nRSET"), ("x", RCPT)]:
            result = transport.send(sender, rcpt, report())
            assert result.outcome is DeliveryOutcome.PERMFAIL, (sender, rcpt)
            assert "\n" not in result.detail


# -- STARTTLS and AUTH ---------------------------------------------------------------


def test_opportunistic_uses_starttls_when_offered(
    tls_relay: Relay, certificate: Certificate
) -> None:
    with SMTPTransport(tls_relay.settings(ca_file=str(certificate.cert))) as transport:
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
        assert transport.tls_active
    assert tls_relay.handler.messages[0].tls


def test_opportunistic_goes_plain_when_not_offered(relay: Relay) -> None:
    with SMTPTransport(relay.settings(starttls="opportunistic")) as transport:
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
        assert not transport.tls_active
    assert not relay.handler.messages[0].tls


def test_required_starttls_not_offered_is_tempfail(relay: Relay) -> None:
    with SMTPTransport(relay.settings(starttls="required")) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert result == DeliveryResult(
        DeliveryOutcome.TEMPFAIL, f"STARTTLS required but not offered ({HOST}:{relay.port})"
    )
    assert relay.handler.messages == []


def test_required_starttls_offered(tls_relay: Relay) -> None:
    settings = tls_relay.settings(starttls="required", verify_tls=False)
    with SMTPTransport(settings) as transport:
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
    assert tls_relay.handler.messages[0].tls


def test_failed_handshake_is_tempfail_without_plaintext_fallback(tls_relay: Relay) -> None:
    # The system trust store does not know the self-signed certificate.
    with SMTPTransport(tls_relay.settings()) as transport:
        result = transport.send(SENDER, RCPT, report())
        assert not transport.tls_active
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert result.detail.startswith("TLS handshake failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert tls_relay.handler.messages == []


def test_starttls_off_against_a_relay_that_insists_is_tempfail(tls_relay: Relay) -> None:
    with SMTPTransport(tls_relay.settings(starttls="off")) as transport:
        result = transport.send(SENDER, RCPT, report())
    # 530 "Must issue a STARTTLS command first" is about the session, not the report.
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert result.detail.startswith("530 ")


def test_auth_after_starttls(tls_relay: Relay, certificate: Certificate) -> None:
    settings = tls_relay.settings(
        ca_file=str(certificate.cert), username="reporter", password="s3cret"
    )
    with SMTPTransport(settings) as transport:
        assert transport.send(SENDER, RCPT, report()).outcome is DeliveryOutcome.SENT
    assert [login for _, login in tls_relay.handler.logins] == ["reporter"]
    assert tls_relay.handler.messages[0].authenticated
    assert tls_relay.handler.messages[0].tls


def test_rejected_login_is_tempfail(tls_relay: Relay) -> None:
    settings = tls_relay.settings(verify_tls=False, username="reporter", password="wrong")
    with SMTPTransport(settings) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert result.detail.startswith("AUTH failed: 535 ")
    assert tls_relay.handler.messages == []


def test_no_auth_over_plaintext_to_a_remote_relay(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The relay is on loopback; pretend it is not, as a remote one would be.
    monkeypatch.setattr(delivery, "is_loopback", lambda host: False)
    settings = relay.settings(username="reporter", password="s3cret")
    with SMTPTransport(settings) as transport:
        result = transport.send(SENDER, RCPT, report())
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert "not sending AUTH over an unencrypted connection" in result.detail
    assert relay.handler.logins == [] and relay.handler.messages == []


@pytest.mark.parametrize(
    "settings",
    [
        {"starttls": "yes"},
        {"username": "reporter"},  # no password
        {"host": "smtp.example", "starttls": "off", "username": "u", "password": "p"},
        {"port": 0},
        {"timeout": 0},
    ],
)
def test_unusable_settings_are_config_errors(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SMTPSettings(**settings)


def test_plaintext_auth_to_loopback_is_allowed() -> None:
    for host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        SMTPSettings(host=host, starttls="off", username="u", password="p")
    assert not delivery.is_loopback("smtp.example")


# -- sendmail ------------------------------------------------------------------------


def fake_sendmail(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """A stand-in for the sendmail command that records argv and stdin."""
    record = tmp_path / "record"
    script = tmp_path / "sendmail"
    script.write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{record}.argv'\ncat > '{record}.stdin'\n{body}\n"
    )
    script.chmod(0o755)
    return script, record


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0, DeliveryOutcome.SENT), (75, DeliveryOutcome.TEMPFAIL), (67, DeliveryOutcome.PERMFAIL)],
)
def test_sendmail_exit_status(tmp_path: Path, status: int, outcome: DeliveryOutcome) -> None:
    script, record = fake_sendmail(tmp_path, f"echo 'told to exit {status}' >&2; exit {status}")
    message = report()
    with SendmailTransport(str(script), timeout=10) as transport:
        result = transport.send(SENDER, RCPT, message)
    assert result.outcome is outcome
    argv = Path(f"{record}.argv").read_text().splitlines()
    assert argv == ["-i", "-f", SENDER, "--", RCPT]
    # Local submission takes UNIX line ends.
    assert Path(f"{record}.stdin").read_bytes() == message.replace(b"\r\n", b"\n")
    if status:
        assert f"exited with {status}" in result.detail
        assert f"told to exit {status}" in result.detail
    if status == 67:
        assert "EX_NOUSER" in result.detail


def test_sendmail_recipient_cannot_become_an_option(tmp_path: Path) -> None:
    script, record = fake_sendmail(tmp_path, "exit 0")
    result = SendmailTransport(str(script)).send(SENDER, "-oQ/tmp@example.com", report())
    assert result.outcome is DeliveryOutcome.SENT
    argv = Path(f"{record}.argv").read_text().splitlines()
    assert argv[-2:] == ["--", "-oQ/tmp@example.com"]


def test_sendmail_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sendmail"
    result = SendmailTransport(str(missing)).send(SENDER, RCPT, report())
    assert result == DeliveryResult(
        DeliveryOutcome.TEMPFAIL, f"sendmail program not found: {missing}"
    )


def test_sendmail_not_executable(tmp_path: Path) -> None:
    script, _ = fake_sendmail(tmp_path, "exit 0")
    script.chmod(0o644)
    result = SendmailTransport(str(script)).send(SENDER, RCPT, report())
    assert result.outcome is DeliveryOutcome.TEMPFAIL
    assert result.detail.startswith(f"cannot run {script}: ")


def test_sendmail_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script, _ = fake_sendmail(tmp_path, f"sleep 30 & echo $! > '{pid_file}'; wait")
    started = time.monotonic()
    result = SendmailTransport(str(script), timeout=0.5).send(SENDER, RCPT, report())
    assert time.monotonic() - started < 5
    assert result == DeliveryResult(DeliveryOutcome.TEMPFAIL, f"{script} timed out after 0.5 s")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while _alive(child):
        assert time.monotonic() < deadline, "the sendmail's child survived the timeout"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_sendmail_bad_addresses_are_permfail(tmp_path: Path) -> None:
    script, record = fake_sendmail(tmp_path, "exit 0")
    result = SendmailTransport(str(script)).send(SENDER, "rua@example.com\nx", report())
    assert result.outcome is DeliveryOutcome.PERMFAIL
    assert not Path(f"{record}.argv").exists()
