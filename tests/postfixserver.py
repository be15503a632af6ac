"""A throwaway Postfix instance for the tests, with an SMTP sink behind it.

``PostfixServer`` writes its own ``main.cf`` and ``master.cf`` into a temporary
directory that also holds the instance's queue and data directories, and runs
``postfix -c DIR start`` (and ``stop``, ``flush``) on it.  Nothing of the system's
Postfix is used or touched: not ``/etc/postfix/main.cf``, not ``/var/spool/postfix``,
not the system service.  Several instances can run side by side.

- **Listening:** one ``smtpd`` on ``127.0.0.1`` and a free port (``server.port``),
  set in ``master.cf``.  No daemon runs chrooted.
- **Relaying:** every domain is a relay domain (``relay_domains = static:ALL``) and
  every recipient goes, through ``transport_maps``, either to the sink
  (``smtp:[127.0.0.1]:SINKPORT``) or, with ``sink=False``, to ``discard:`` (for
  throughput runs).  No DNS is used anywhere (``smtp_dns_support_level =
  disabled``, ``smtpd_peername_lookup = no``).
- **Clients:** ``smtpd_authorized_xclient_hosts = 127.0.0.0/8``: the client helpers
  (``send()`` and ``session()``) set the client address, name and HELO name the
  milter sees with ``XCLIENT``, so mail appears to come from anywhere while all
  traffic stays on loopback.  The anvil rate limits are off and the process limits
  raised; queue delays are short.
- **SASL:** a SASL-authenticated client (``{auth_authen}``) is made with
  ``XCLIENT LOGIN=name`` (``login=`` of the client helpers): Postfix records
  ``name`` as the session's SASL user without any authentication exchange and
  hands it to milters as ``{auth_authen}``, with ``{auth_type}`` = ``XCLIENT``.
  No SASL backend is needed: Postfix 3.7 does this with ``smtpd_sasl_auth_enable
  = no``, which is what the instance runs with (no ``AUTH`` is offered).
- **Milter:** ``smtpd_milters`` is the ``milter`` socket spec (``unix:/path`` or
  ``inet:127.0.0.1:PORT``), with ``milter_protocol``, ``milter_default_action``,
  ``milter_macro_daemon_name`` and all the ``milter_*_macros`` set explicitly (the
  ``j``, ``i`` and ``{auth_authen}`` macros included).  ``reconfigure()`` changes
  these (or any main.cf setting) by restarting the instance: same directory, port
  and queue.
- **Delivered mail:** the sink (aiosmtpd, in a thread) keeps every message it
  receives; ``wait_for_delivery()`` returns one (envelope and raw bytes).
- **Held mail:** ``held()`` lists the hold queue (``postqueue -j``), where a
  milter's quarantine puts a message; ``headers(queue_id)`` shows its header
  (``postcat -hq``).
- **Log:** ``maillog_file`` in the temporary directory (through ``postlogd``);
  ``log_tail()`` is added to every error the harness raises.

Postfix's ``master`` must run as root.  When the tests do not run as root, or
Postfix is not installed (Debian's ``postfix`` package; ``make test`` installs it),
``PostfixUnavailable`` is raised: the fixtures skip outside CI and fail in CI.

Every instance records the process that made it (``owner``);
``reap_stale()`` stops and removes instances whose owner has died (a killed test
run), and ``start()`` first stops a master still running in its own directory.

A unix-socket milter must be reachable by the ``postfix`` user: create the
socket in a directory others may traverse (``make_socket_dir()``) and give it
mode 0666 (``allow_postfix()``).
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import glob
import grp
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon import MilterDaemon, merge

HOST = "127.0.0.1"
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
MYHOSTNAME = "mx.dmarcmilter.test"
SINK_HOSTNAME = "sink.dmarcmilter.test"
DAEMON_NAME = "dmarcmilter-test-mta"
DEFAULT_CLIENT_IP = "192.0.2.1"
DEFAULT_HELO = "mail.example.org"
TEMP_PREFIX = "dmarcmilter-postfix-"
COMMAND_TIMEOUT = 60  # seconds, for one postfix/postconf/postqueue run
STOP_TIMEOUT = 10
SMTP_TIMEOUT = 30
DELIVERY_TIMEOUT = 10
PORT_ATTEMPTS = 3
MESSAGE_SIZE_LIMIT = 64 * 1024 * 1024
COMMAND_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
TOOLS = ("postfix", "postconf", "postqueue", "postcat", "postsuper")
COMMAND_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Postfix's defaults (3.7) plus {client_addr} and {client_name} at connect, set
# explicitly so that a change of default cannot take a macro away from the milter
# under test.  Postfix's "i" (the queue id) is empty until the queue file exists:
# with smtpd_delay_open_until_valid_rcpt (the default), from the first accepted
# RCPT on, so not at MAIL FROM.
MILTER_MACROS = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} {client_addr} {client_name} v _",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
    "{mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_data_macros": "i",
    "milter_end_of_header_macros": "i",
    "milter_end_of_data_macros": "i",
    "milter_unknown_command_macros": "",
}

_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
_RECEIVED_ID = re.compile(r"\bwith\s+\S+\s+id\s+([0-9A-Za-z]+)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_KEEP = object()


class PostfixUnavailable(RuntimeError):
    """Postfix is not installed, the tests do not run as root, or the instance could
    not be set up or started."""


class DeliveryTimeout(AssertionError):
    """No matching message reached the sink in time."""


# -- delivered messages ---------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """One message as the sink received it from Postfix."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes  # the raw message, CRLF line ends, dot-unstuffed
    mail_options: tuple[str, ...] = ()
    smtp_utf8: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> email.message.EmailMessage:
        """The message parsed (``email.policy.SMTPUTF8``: UTF-8 header fields kept)."""
        msg = email.message_from_bytes(self.content, policy=email.policy.SMTPUTF8)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    @property
    def header_section(self) -> bytes:
        """The raw header section (without the empty line)."""
        head, _, _ = self.content.partition(b"\r\n\r\n")
        return head

    def header_values(self, name: str) -> list[str]:
        """Every value of the header field ``name``, top first, unfolded, as sent (not
        RFC 2047-decoded), without the space after the colon."""
        values = []
        for line in re.split(rb"\r\n(?![ \t])", self.header_section):
            fname, sep, value = line.partition(b":")
            if sep and fname.strip().lower() == name.lower().encode():
                text = value.decode("utf-8", "surrogateescape")
                values.append(re.sub(r"\r\n(?=[ \t])", "", text).strip())
        return values

    def header(self, name: str) -> str | None:
        """The topmost value of the header field ``name``, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def queue_id(self) -> str | None:
        """The queue id of the test instance, from its Received field (the top one)."""
        received = self.header("Received")
        found = _RECEIVED_ID.search(received or "")
        return found.group(1) if found else None

    @property
    def message_id(self) -> str | None:
        return self.header("Message-ID")


def _matcher(match: Any) -> Callable[[Delivered], bool]:
    if isinstance(match, SendResult):
        if match.queue_id is None:
            raise ValueError(f"the message was not queued: {match}")
        match = match.queue_id
    if callable(match):
        return match  # type: ignore[no-any-return]
    if isinstance(match, str):
        if "@" in match or match.startswith("<"):
            wanted = match.strip()
            bare = wanted.strip("<>")
            return lambda msg: (msg.message_id or "").strip() in (wanted, f"<{bare}>")
        return lambda msg: msg.queue_id == match
    raise TypeError(f"cannot match a delivery with {match!r}")


# -- the SMTP sink --------------------------------------------------------------------


class SMTPSink:
    """An aiosmtpd server on loopback, in a thread, that keeps every message."""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.port = 0
        self.messages: list[Delivered] = []
        self._cond = threading.Condition()
        self._controller: Any = None
        self._sessions: set[Any] = set()

    # aiosmtpd handler hook
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        delivered = Delivered(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""),
            mail_options=tuple(envelope.mail_options),
            smtp_utf8=bool(envelope.smtp_utf8),
        )
        with self._cond:
            self.messages.append(delivered)
            self._cond.notify_all()
        return "250 2.0.0 Ok: delivered to the test sink"

    def start(self) -> SMTPSink:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        sink = self

        class TrackedSMTP(SMTP):
            """Remembers its connections, so that stop() can close them."""

            def connection_made(self, transport: Any) -> None:
                sink._sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                sink._sessions.discard(self)
                super().connection_lost(error)

        class SinkController(Controller):
            def factory(self) -> SMTP:
                return TrackedSMTP(self.handler, **self.SMTP_kwargs)

        last_error: Exception | None = None
        for attempt in range(PORT_ATTEMPTS):
            # After a stop, the same port again if it is still free.
            port = self.port if self.port and attempt == 0 else free_port(self.host)
            controller = SinkController(
                self,
                hostname=self.host,
                port=port,
                server_hostname=SINK_HOSTNAME,
                enable_SMTPUTF8=True,
                data_size_limit=2 * MESSAGE_SIZE_LIMIT,
                ready_timeout=10,
            )
            try:
                controller.start()
            except Exception as exc:  # the port was taken meanwhile
                last_error = exc
                controller.stop(no_assert=True)
                if not controller.loop.is_closed():  # aiosmtpd leaves it open then
                    controller.loop.close()
                continue
            self._controller, self.port = controller, port
            return self
        raise PostfixUnavailable(f"could not start the SMTP sink: {last_error}")

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return

        def close_sessions() -> None:
            for smtp in list(self._sessions):
                if smtp.transport is not None:
                    smtp.transport.close()

        # Close open connections first, so no transport is left for the garbage
        # collector (a ResourceWarning), then let the loop run their callbacks.
        controller.loop.call_soon_threadsafe(close_sessions)
        deadline = time.monotonic() + 2
        while self._sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        controller.stop()

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def wait(self, match: Any, timeout: float = DELIVERY_TIMEOUT) -> Delivered | None:
        predicate = _matcher(match)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)


class ReportSink(SMTPSink):
    """The test SMTP server; ``reply`` (e.g. "451 4.3.0 later") refuses DATA."""

    reply: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reply is not None:
            return self.reply
        return await super().handle_DATA(server, session, envelope)

    def attachments(self) -> dict[str, list[tuple[str, bytes]]]:
        """Per recipient: (filename, gzip content) of each report received."""
        out: dict[str, list[tuple[str, bytes]]] = {}
        for delivered in self.messages:
            msg = email.message_from_bytes(delivered.content, policy=email.policy.default)
            for part in msg.walk():
                if part.get_content_type() == "application/gzip":
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    for rcpt in delivered.rcpt_tos:
                        out.setdefault(rcpt, []).append((part.get_filename() or "", payload))
        return out


# -- the SMTP client ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SendResult:
    """The outcome of one transaction: the final reply (the one to DATA's end, or
    the refusal that ended the transaction earlier), the queue id Postfix
    reported, and every command with its reply."""

    code: int
    text: str
    queue_id: str | None
    transcript: tuple[tuple[str, Reply], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.code == 250 and self.queue_id is not None

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT wants its attribute values."""
    out: list[str] = []
    for char in value:
        if char in "+=" or not ("!" <= char <= "~"):
            out.extend(f"+{byte:02X}" for byte in char.encode())
        else:
            out.append(char)
    return "".join(out)


def _needs_smtputf8(mail_from: str, rcpt_to: Sequence[str], message: bytes) -> bool:
    if not (mail_from + "".join(rcpt_to)).isascii():
        return True
    head, _, _ = message.partition(b"\r\n\r\n")
    return not head.isascii()


class SMTPSession:
    """One SMTP connection to the instance, that never raises on a 4xx or 5xx reply.

    Made by ``PostfixServer.session()``: connected, greeted with EHLO and, unless
    told otherwise, with ``XCLIENT`` setting the client (then EHLO again, as the
    SMTP server requires).  ``send()`` runs a whole transaction; ``mail()``,
    ``rcpt()``, ``data()``, ``rset()`` and ``command()`` single steps.  Use it as a
    context manager, or call ``close()``.
    """

    def __init__(self, host: str, port: int, *, timeout: float = SMTP_TIMEOUT) -> None:
        self.transcript: list[tuple[str, Reply]] = []
        self.smtp = smtplib.SMTP(timeout=timeout)
        self.smtp.command_encoding = "utf-8"
        try:
            code, msg = self.smtp.connect(host, port)
        except BaseException:
            self.smtp.close()
            raise
        self.greeting = Reply(code, msg.decode("utf-8", "replace"))

    def __enter__(self) -> SMTPSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.smtp.sock is not None:
                self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()

    def command(self, verb: str, args: str = "") -> Reply:
        """Send one command and return the reply, whatever its code."""
        line = f"{verb} {args}".strip()
        try:
            code, msg = self.smtp.docmd(verb, args)
        except smtplib.SMTPServerDisconnected:
            reply = Reply(-1, "connection closed by the server")
        else:
            reply = Reply(code, msg.decode("utf-8", "replace"))
        self.transcript.append((line, reply))
        return reply

    def ehlo(self, name: str) -> Reply:
        self.smtp.ehlo_resp = None
        reply = self.command("EHLO", name)
        if reply.code == 250:
            # Let smtplib know the extensions (e.g. for has_extn()).
            self.smtp.ehlo_resp = reply.text.encode()
            self.smtp.does_esmtp = True
            self.smtp.esmtp_features = {}
            for ext in reply.text.splitlines()[1:]:
                keyword, _, params = ext.partition(" ")
                self.smtp.esmtp_features[keyword.lower()] = params
        return reply

    def xclient(
        self,
        *,
        addr: str | None = None,
        name: str | None = None,
        helo: str | None = None,
        login: str | None = None,
        **attrs: str,
    ) -> Reply:
        """``XCLIENT`` with the given attributes (``name=None``: ``[UNAVAILABLE]``).
        The server answers with a new greeting (220); EHLO must follow."""
        items: dict[str, str] = {}
        if addr is not None:
            items["ADDR"] = f"IPV6:{addr}" if ":" in addr else addr
            items["NAME"] = name or "[UNAVAILABLE]"
        elif name is not None:
            items["NAME"] = name
        if helo is not None:
            items["HELO"] = helo
        if login is not None:
            items["LOGIN"] = login
        items.update({key.upper(): value for key, value in attrs.items()})
        return self.command("XCLIENT", " ".join(f"{k}={xtext(v)}" for k, v in items.items()))

    def mail(self, sender: str, *options: str) -> Reply:
        return self.command("MAIL", " ".join([f"FROM:<{sender}>", *options]))

    def rcpt(self, recipient: str, *options: str) -> Reply:
        return self.command("RCPT", " ".join([f"TO:<{recipient}>", *options]))

    def rset(self) -> Reply:
        return self.command("RSET")

    def data(self, message: bytes, *, fix_line_ends: bool = True) -> Reply:
        """DATA, then the message (dot-stuffed; bare LFs made CRLF unless told
        not to) and the final dot."""
        reply = self.command("DATA")
        if reply.code != 354:
            return reply
        if fix_line_ends:
            message = _BARE_LF.sub(b"\r\n", message)
        payload = re.sub(rb"(?m)^\.", b"..", message)
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        try:
            self.smtp.send(payload + b".\r\n")
            code, msg = self.smtp.getreply()
        except smtplib.SMTPServerDisconnected:
            final = Reply(-1, "connection closed by the server")
        else:
            final = Reply(code, msg.decode("utf-8", "replace"))
        self.transcript.append(("<message>", final))
        return final

    def send(
        self,
        mail_from: str,
        rcpt_to: str | Sequence[str],
        message: bytes | str,
        *,
        smtputf8: bool | None = None,
        body: str | None = None,
        mail_options: Sequence[str] = (),
    ) -> SendResult:
        """One transaction: MAIL, RCPT for each recipient, DATA.

        ``smtputf8`` (default: when the envelope or the header section is not
        ASCII) adds ``SMTPUTF8`` to MAIL FROM; ``body`` (default: ``8BITMIME``
        when the message has 8-bit bytes) sets ``BODY=``.  A transaction that
        ends early (MAIL refused, or no recipient accepted) is reset with RSET so
        the session can go on.
        """
        recipients = [rcpt_to] if isinstance(rcpt_to, str) else list(rcpt_to)
        raw = message.encode("utf-8") if isinstance(message, str) else message
        raw = _BARE_LF.sub(b"\r\n", raw)
        if smtputf8 is None:
            smtputf8 = _needs_smtputf8(mail_from, recipients, raw)
        if body is None and not raw.isascii():
            body = "8BITMIME"
        options = list(mail_options)
        if smtputf8:
            options.append("SMTPUTF8")
        if body:
            options.append(f"BODY={body}")
        start = len(self.transcript)

        def result(reply: Reply) -> SendResult:
            found = _QUEUED_AS.search(reply.text) if reply.code == 250 else None
            return SendResult(
                reply.code,
                reply.text,
                found.group(1) if found else None,
                tuple(self.transcript[start:]),
            )

        reply = self.mail(mail_from, *options)
        if reply.code != 250:
            if reply.code > 0:
                self.rset()
            return result(reply)
        accepted = 0
        for recipient in recipients:
            reply = self.rcpt(recipient)
            if reply.code < 0:
                return result(reply)
            accepted += reply.code in (250, 251)
        if not accepted:
            self.rset()
            return result(reply)
        return result(self.data(raw, fix_line_ends=False))


# -- the Postfix instance -------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_tools() -> dict[str, str]:
    """Absolute paths of Postfix's commands; PostfixUnavailable when missing."""
    tools = {}
    for tool in TOOLS:
        path = next(
            (str(Path(d) / tool) for d in COMMAND_DIRS if os.access(Path(d) / tool, os.X_OK)),
            shutil.which(tool),
        )
        if path is None:
            raise PostfixUnavailable(
                f"Postfix's {tool} command not found; install the Debian package 'postfix' "
                "(make test does this as root, without starting the system's Postfix)"
            )
        tools[tool] = path
    return tools


def check_available() -> dict[str, str]:
    """Raise PostfixUnavailable unless a private instance can run here."""
    if os.geteuid() != 0:
        raise PostfixUnavailable("Postfix's master daemon must run as root (the tests are not)")
    tools = find_tools()
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        raise PostfixUnavailable(
            f"the {MAIL_OWNER!r} user or the {SETGID_GROUP!r} group is missing "
            "(they come with the Debian package 'postfix')"
        ) from exc
    return tools


def make_socket_dir(prefix: str = "dmarcmilter-milter-") -> Path:
    """A new temporary directory that the ``postfix`` user may traverse, for unix
    sockets of milters (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def allow_postfix(socket_path: str | os.PathLike[str], timeout: float = 10) -> None:
    """Wait until the unix socket exists, then let every user (smtpd runs as
    ``postfix``) connect to it."""
    path = Path(socket_path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
    path.chmod(0o666)


@contextlib.contextmanager
def milter_for_postfix(
    dns_port: int, config: dict[str, Any] | None = None
) -> Iterator[MilterDaemon]:
    """A ``dmarcmilter run`` on a unix socket that smtpd (user ``postfix``)
    may connect to, with ``config`` changes; stopped and cleaned up after."""
    directory = make_socket_dir()
    changes = merge({"milter": {"socket_mode": "0666"}}, config or {})
    daemon = MilterDaemon(directory, dns_port, changes)
    daemon.base["milter"]["socket_mode"] = "0666"
    daemon.start()
    allow_postfix(daemon.socket)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _process_token(pid: int) -> str:
    """The process's start time (/proc), to tell it from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _daemon_directory() -> str:
    global _DAEMON_DIR
    if _DAEMON_DIR is None:
        postconf = shutil.which("postconf", path=COMMAND_PATH) or "postconf"
        result = subprocess.run(
            [postconf, "-dh", "daemon_directory"],
            env={"PATH": COMMAND_PATH},
            capture_output=True,
            text=True,
            check=True,
        )
        _DAEMON_DIR = result.stdout.strip()
    return _DAEMON_DIR


_DAEMON_DIR: str | None = None


def _master_pid(queue_dir: Path) -> int | None:
    try:
        return int((queue_dir / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _master_running(config_dir: Path) -> bool:
    """Whether a master holds the instance's lock (``master -t``)."""
    if not (config_dir / "main.cf").exists():
        return False
    env = {"PATH": COMMAND_PATH, "MAIL_CONFIG": str(config_dir)}
    result = subprocess.run(
        [f"{_daemon_directory()}/master", "-t"], env=env, capture_output=True, check=False
    )
    return result.returncode != 0


def _stop_master(config_dir: Path, queue_dir: Path) -> None:
    """What ``postfix -c DIR stop`` does (SIGTERM to the master, which ends its
    children), without its one-second sleeps while it waits for the end."""
    if not _master_running(config_dir):
        return
    pid = _master_pid(queue_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    else:
        postfix = shutil.which("postfix", path=COMMAND_PATH) or "postfix"
        subprocess.run(
            [postfix, "-c", str(config_dir), "stop"],
            env={"PATH": COMMAND_PATH},
            capture_output=True,
            timeout=STOP_TIMEOUT + 5,
            check=False,
        )
    deadline = time.monotonic() + STOP_TIMEOUT
    while _master_running(config_dir):
        if time.monotonic() > deadline:
            if pid:  # the master leads its own process group: end it all
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.01)


class PostfixServer:
    """One private Postfix instance and its sink; see the module docstring."""

    def __init__(
        self,
        *,
        milter: str | None = None,
        milter_default_action: str = "tempfail",
        milter_protocol: int = 6,
        settings: Mapping[str, object] | None = None,
        sink: bool = True,
    ) -> None:
        self.tools = check_available()
        self.milter = milter
        self.milter_default_action = milter_default_action
        self.milter_protocol = milter_protocol
        self.settings: dict[str, object] = dict(settings or {})
        self.use_sink = sink
        self.sink: SMTPSink | None = None
        self.port = 0
        self.host = HOST
        self.running = False
        self.base_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        # smtpd and the other daemons run as the postfix user: let them in.
        self.base_dir.chmod(0o755)
        self.config_dir = self.base_dir / "etc"
        self.queue_dir = self.base_dir / "queue"
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postfix.log"
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(mode=0o755)
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        self.data_dir.chmod(0o700)
        (self.base_dir / "owner").write_text(f"{os.getpid()} {_process_token(os.getpid())}\n")

    # -- configuration ------------------------------------------------------------

    def main_cf(self) -> dict[str, object]:
        """The main.cf settings, in order; ``settings`` last, overriding."""
        if self.use_sink:
            assert self.sink is not None
            transport = f"smtp:[{HOST}]:{self.sink.port}"
        else:
            transport = "discard:"
        conf: dict[str, object] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            "syslog_name": "postfix-test",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.base_dir,
            "myhostname": MYHOSTNAME,
            "mydomain": "dmarcmilter.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": HOST,
            # IPv6 on, or XCLIENT refuses IPv6 client addresses; only the
            # IPv4 loopback address is listened on.
            "inet_protocols": "ipv4, ipv6",
            "mynetworks": "127.0.0.0/8",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            # Every domain is a relay domain, and everything goes to the sink.
            "relay_domains": "static:ALL",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "transport_maps": f"static:{transport}",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": False,
            "smtp_connection_cache_on_demand": False,
            "smtp_connect_timeout": "5s",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtputf8_enable": True,
            "message_size_limit": MESSAGE_SIZE_LIMIT,
            "mailbox_size_limit": 0,
            "disable_vrfy_command": True,
            "biff": False,
            "smtpd_banner": "$myhostname ESMTP Postfix (dmarcmilter test instance)",
            # Fast: no waiting anywhere.
            "in_flow_delay": "0s",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtpd_error_sleep_time": "0s",
            "smtpd_soft_error_limit": 1000,
            "smtpd_hard_error_limit": 1000,
            # Load: no anvil limits, many processes.
            "default_process_limit": 200,
            "default_destination_concurrency_limit": 50,
            "smtpd_client_connection_count_limit": 0,
            "smtpd_client_connection_rate_limit": 0,
            "smtpd_client_message_rate_limit": 0,
            "smtpd_client_recipient_rate_limit": 0,
            "smtpd_client_new_tls_session_rate_limit": 0,
            "smtpd_client_auth_rate_limit": 0,
            # XCLIENT LOGIN= gives milters {auth_authen} without a SASL server.
            "smtpd_sasl_auth_enable": False,
            # The milter.
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": "",
            "milter_protocol": self.milter_protocol,
            "milter_default_action": self.milter_default_action,
            "milter_macro_daemon_name": DAEMON_NAME,
            "milter_connect_timeout": "5s",
            **MILTER_MACROS,
        }
        conf.update(self.settings)
        return conf

    def master_cf(self) -> str:
        """master.cf: one smtpd on 127.0.0.1:port, the rest as Debian's (unchrooted)."""
        services = [
            f"{HOST}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "# Written by tests/postfixserver.py\n" + "\n".join(services) + "\n"

    def _write_config(self) -> None:
        lines = ["# Written by tests/postfixserver.py"]
        lines += [f"{key} = {_format_value(value)}" for key, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        # Postfix rereads a configuration file modified within the current second
        # until it is older (about 2 s of start-up): date the files back.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # -- commands -----------------------------------------------------------------

    def run(
        self, tool: str, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> str:
        """Run a Postfix command on this instance (``-c`` is added); its stdout."""
        argv = [self.tools.get(tool, tool), "-c", str(self.config_dir), *args]
        env = {"PATH": COMMAND_PATH, "LC_ALL": "C", "TZ": os.environ.get("TZ", "UTC")}
        # Output goes to files, not pipes: the master daemon that `postfix start`
        # leaves behind would hold a pipe open, and reading it to its end would wait.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                returncode = subprocess.run(
                    argv,
                    env=env,
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    timeout=timeout,
                    check=False,
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise PostfixUnavailable(
                    f"{' '.join(argv)} failed: {exc}{self.log_tail()}"
                ) from exc
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
        if check and returncode != 0:
            output = (stdout + stderr).strip()
            raise PostfixUnavailable(
                f"{' '.join(argv)} exited with {returncode}: {output}{self.log_tail()}"
            )
        return stdout

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\nPostfix log ({self.log_file}):\n{tail}" if tail else ""

    def master_pid(self) -> int | None:
        return _master_pid(self.queue_dir)

    def master_running(self) -> bool:
        """Whether a master holds this instance's lock (``master -t``)."""
        return _master_running(self.config_dir)

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> PostfixServer:
        """Start the sink and the instance (on a free port the first time, the
        same one afterwards); ready to accept mail when this returns."""
        if self.running:
            return self
        if self.use_sink and self.sink is None:
            self.sink = SMTPSink().start()
        try:
            if self.master_running():  # a leftover of an earlier run in this directory
                self._stop_master()
            attempts = PORT_ATTEMPTS if self.port == 0 else 1
            for attempt in range(attempts):
                if attempts > 1:
                    self.port = free_port()
                self._write_config()
                try:
                    self.run("postfix", "start")
                    break
                except PostfixUnavailable:
                    if attempt == attempts - 1 or "Address already in use" not in self.log_tail():
                        raise
            self.running = True
            self._wait_listening()
        except BaseException:
            self._stop_master()
            raise
        return self

    def _wait_listening(self, timeout: float = 10) -> None:
        """Until the port is in LISTEN state.  (``postfix start`` returns once the
        master has bound it; this only makes sure.)  Read from /proc/net/tcp, not
        by connecting: a test connection would reach the milter too."""
        wanted = f"{socket.inet_aton(self.host)[::-1].hex().upper()}:{self.port:04X}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
            except OSError:  # no /proc: trust postfix start
                return
            for line in lines:
                fields = line.split()
                if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                    return
            if time.monotonic() > deadline:
                raise PostfixUnavailable(
                    f"nothing listens on {self.host}:{self.port}{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """``postfix stop`` (the sink keeps running; queued mail stays queued)."""
        self._stop_master()
        self.running = False

    def _stop_master(self) -> None:
        _stop_master(self.config_dir, self.queue_dir)

    def restart(self) -> None:
        self.stop()
        self.start()

    def reconfigure(
        self,
        *,
        milter: str | object | None = _KEEP,
        milter_default_action: str | None = None,
        milter_protocol: int | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        """Change the milter or other main.cf settings, then restart the instance
        (``postfix reload`` would leave a window in which an old smtpd serves a new
        connection).  ``settings`` are added to the earlier ones."""
        if milter is not _KEEP:
            assert milter is None or isinstance(milter, str)
            self.milter = milter
        if milter_default_action is not None:
            self.milter_default_action = milter_default_action
        if milter_protocol is not None:
            self.milter_protocol = milter_protocol
        if settings:
            self.settings.update(settings)
        self.restart()

    def postconf(self, name: str) -> str:
        """The value of a main.cf parameter as this instance sees it."""
        return self.run("postconf", "-h", name).strip()

    def cleanup(self) -> None:
        """Stop the instance and the sink and remove the directory."""
        try:
            self._stop_master()
            self.running = False
        finally:
            try:
                if self.sink is not None:
                    self.sink.stop()
            finally:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostfixServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- mail in ------------------------------------------------------------------

    def session(
        self,
        *,
        client_ip: str | None = DEFAULT_CLIENT_IP,
        helo: str = DEFAULT_HELO,
        client_name: str | None = None,
        login: str | None = None,
        xclient: bool = True,
        timeout: float = SMTP_TIMEOUT,
    ) -> SMTPSession:
        """An SMTP session, greeted: EHLO, then (with ``xclient``) ``XCLIENT
        ADDR=client_ip NAME=client_name HELO=helo [LOGIN=login]`` and EHLO again.
        ``client_name=None`` is an unknown name (``[UNAVAILABLE]``; the milter sees
        ``[client_ip]``).  Postfix refuses a second XCLIENT in a session: the new
        client address is no longer an authorized one."""
        session = SMTPSession(self.host, self.port, timeout=timeout)
        try:
            if session.greeting.code != 220:
                raise PostfixUnavailable(f"smtpd greeted with {session.greeting}")
            if xclient:
                reply = session.ehlo("localhost")
                if reply.code != 250:
                    raise PostfixUnavailable(f"EHLO refused: {reply}{self.log_tail()}")
                reply = session.xclient(addr=client_ip, name=client_name, helo=helo, login=login)
                if reply.code != 220:
                    raise PostfixUnavailable(f"XCLIENT refused: {reply}{self.log_tail()}")
            session.ehlo(helo)
        except BaseException:
            session.close()
            raise
        return session

    def send(
        self,
        mail_from: str,
        rcpt_to: str | Sequence[str],
        message: bytes | str,
        *,
        client_ip: str = DEFAULT_CLIENT_IP,
        helo: str = DEFAULT_HELO,
        client_name: str | None = None,
        login: str | None = None,
        smtputf8: bool | None = None,
        body: str | None = None,
    ) -> SendResult:
        """One message in one session (see ``session()`` and ``SMTPSession.send()``):
        the final reply and the queue id, never an exception for a 4xx or 5xx."""
        with self.session(
            client_ip=client_ip, helo=helo, client_name=client_name, login=login
        ) as session:
            return session.send(mail_from, rcpt_to, message, smtputf8=smtputf8, body=body)

    # -- mail out -----------------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivered]:
        """Every message the sink has received, oldest first."""
        if self.sink is None:
            return []
        with self.sink._cond:
            return list(self.sink.messages)

    def wait_for_delivery(self, match: Any, timeout: float = DELIVERY_TIMEOUT) -> Delivered:
        """The first delivered message matching ``match``: a queue id of this
        instance (a ``SendResult`` stands for its queue id), a Message-ID (with
        an ``@``), or a predicate on ``Delivered``.  DeliveryTimeout (an
        AssertionError), with the queue and the log, when none arrives in time."""
        if self.sink is None:
            raise RuntimeError("this instance discards its mail (sink=False)")
        found = self.sink.wait(match, timeout)
        if found is None:
            raise DeliveryTimeout(
                f"no delivery matching {match!r} within {timeout} s; "
                f"queue: {self.queue()}{self.log_tail()}"
            )
        return found

    def queue(self) -> list[dict[str, Any]]:
        """Every queued message, as ``postqueue -j`` lists it."""
        out = self.run("postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def held(self) -> list[dict[str, Any]]:
        """The messages in the hold queue (a milter's quarantine puts them there)."""
        return [entry for entry in self.queue() if entry.get("queue_name") == "hold"]

    def headers(self, queue_id: str) -> str:
        """The header section of a queued message, as ``postcat -hq`` shows it
        (the milter's changes included)."""
        return self.run("postcat", "-hq", queue_id)

    def flush(self) -> None:
        """``postfix flush``: try to deliver the deferred mail now."""
        self.run("postfix", "flush")

    def release(self, queue_id: str = "ALL") -> None:
        """Move a message (or all) from the hold queue back to delivery, now."""
        self.run("postsuper", "-H", queue_id)
        if queue_id == "ALL":
            self.flush()
        else:
            self.run("postqueue", "-i", queue_id)

    def clear_queue(self) -> None:
        """Delete every queued message (``postsuper -d ALL``) and forget deliveries."""
        self.run("postsuper", "-d", "ALL")
        if self.sink is not None:
            self.sink.clear()


# -- sets of instances ----------------------------------------------------------------


def reap_stale(tempdir: str | None = None) -> list[Path]:
    """Stop and remove the instances whose owning process is gone (a test run that
    was killed), and return their directories.  Instances of live processes, such
    as a concurrent test run, are left alone."""
    reaped = []
    pattern = os.path.join(tempdir or tempfile.gettempdir(), TEMP_PREFIX + "*")
    for name in glob.glob(pattern):
        base = Path(name)
        try:
            pid_text, _, token = (base / "owner").read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if _process_token(pid) == token and token:
            continue  # its owner still runs
        _stop_master(base / "etc", base / "queue")
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


class PostfixInstances:
    """Starts instances and removes them all at the end (the session fixture)."""

    def __init__(self) -> None:
        self.servers: list[PostfixServer] = []

    def start(self, **kwargs: Any) -> PostfixServer:
        """A running instance; ``kwargs`` as for ``PostfixServer``."""
        server = PostfixServer(**kwargs)
        self.servers.append(server)
        try:
            return server.start()
        except BaseException:
            self.remove(server)
            raise

    def remove(self, server: PostfixServer) -> None:
        if server in self.servers:
            self.servers.remove(server)
        server.cleanup()

    def cleanup(self) -> None:
        errors = []
        for server in list(self.servers):
            try:
                self.remove(server)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
