"""Sending report messages: SMTP to a smarthost, or the local sendmail command
(RFC 9990 §3 report delivery; digest §6.3).

- :class:`SMTPTransport` speaks SMTP (RFC 5321) to one relay and keeps the
  connection open across the many reports of a run, with RSET between
  transactions.  STARTTLS (RFC 3207) is used when offered ("opportunistic", the
  default, as RFC 9990 asks delivery to use TLS), insisted on ("required") or
  left alone ("off").  AUTH (RFC 4954) is only sent inside TLS, except to a
  loopback relay, where nothing crosses the network.
- :class:`SendmailTransport` hands each message to ``sendmail -i -f FROM -- RCPT``
  and reads the outcome from its exit status (``sysexits.h``).

Neither raises for a failed delivery: every smtplib, ssl, socket and subprocess
exception is translated here, where those libraries are called, into a
:class:`DeliveryResult` whose outcome tells the caller whether to retry.  A
setting that can never work (an unknown STARTTLS mode, AUTH over plaintext to a
remote host) is a :class:`~dmarcmilter.errors.ConfigError` when the transport is
made.

TEMPFAIL covers everything that is not the fault of this message or recipient
(4xx replies, network and TLS trouble, a rejected login, a broken local
sendmail), so a report survives until the problem is fixed; PERMFAIL is kept
for 5xx replies to the transaction (MAIL, RCPT, DATA) and the sendmail exit
codes that mean the same.  Of those, only a 5xx reply to RCPT that is about
the mailbox marks the result :attr:`DeliveryResult.recipient_refused`: that
one, unlike a refused sender or message, says the destination is dead, and
the outbox counts it as a hard bounce (digest §6.3, bounce-driven
suppression).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from ..errors import ConfigError
from .mail import normalize_address

STARTTLS_MODES = ("opportunistic", "required", "off")
MAX_DETAIL = 500  # characters of a server reply or error kept in a result
# RFC 3463 enhanced status codes that are about the recipient's mailbox: X.1.X
# addressing status (but X.1.7 and X.1.8, the sender's) and X.2.1 (disabled)
# and X.2.2 (full).  A 5.7.X (relay denied, policy) or 5.3.X (the relay's own
# trouble) says something about us or the relay; counting it would let one
# misconfigured smarthost suppress every destination.
_RECIPIENT_STATUS_RE = re.compile(rb"5\.(?:1\.(?!7\b|8\b)[0-9]{1,3}|2\.[12])(?![0-9.])")
_ENHANCED_STATUS_RE = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9.])")
# Without an enhanced status code: RFC 5321's "mailbox unavailable", "user
# not local" and "mailbox name not allowed".
_RECIPIENT_CODES = frozenset({550, 551, 553})


class DeliveryOutcome(enum.Enum):
    SENT = "sent"
    # Retry later: 4xx, connection refused/reset/timeout, TLS required but not
    # offered or failed, a login refused, a local sendmail failure.
    TEMPFAIL = "tempfail"
    # Do not retry: a 5xx reply to the transaction, for this recipient or message.
    PERMFAIL = "permfail"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    outcome: DeliveryOutcome
    # One line: the server reply or the error, with where it came from, e.g.
    # "550 5.1.1 no such user (smtp.example:25)".
    detail: str
    # The relay refused this recipient for good (a 5xx to RCPT about the
    # mailbox): a hard bounce of the destination, not only a failed report.
    recipient_refused: bool = False


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    host: str = "localhost"
    port: int = 25
    starttls: str = "opportunistic"  # "opportunistic" | "required" | "off"
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0  # seconds, for the connection and for each reply
    helo_name: str | None = None  # None: socket.getfqdn()
    verify_tls: bool = True  # verify the relay's certificate (off for a self-signed local relay)
    ca_file: str | None = None  # trust anchors instead of the system's

    def __post_init__(self) -> None:
        if self.starttls not in STARTTLS_MODES:
            raise ConfigError(
                f"smtp starttls must be one of {', '.join(STARTTLS_MODES)}, not {self.starttls!r}"
            )
        if (self.username is None) != (self.password is None):
            raise ConfigError("smtp username and password must be given together")
        if self.username is not None and self.starttls == "off" and not is_loopback(self.host):
            # The password would cross the network in the clear.
            raise ConfigError(
                f"smtp AUTH needs STARTTLS: starttls = off is only allowed with a username "
                f"for a loopback relay, not {self.host!r}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"smtp port out of range: {self.port}")
        if self.timeout <= 0:
            raise ConfigError(f"smtp timeout must be positive: {self.timeout}")


class Transport(Protocol):
    def send(self, envelope_from: str, recipient: str, message: bytes) -> DeliveryResult: ...

    def close(self) -> None: ...


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP literals: AUTH there never leaves the host."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


def _envelope_addresses(envelope_from: str, recipient: str) -> tuple[str, str] | DeliveryResult:
    """Both addresses with A-label domains, or a PERMFAIL: an address this transport
    cannot put on the wire never will be, however often it is retried."""
    try:
        sender = normalize_address(envelope_from, "envelope sender") if envelope_from else ""
        return sender, normalize_address(recipient, "recipient")
    except ValueError as exc:
        return DeliveryResult(DeliveryOutcome.PERMFAIL, _one_line(str(exc)))


# -- SMTP --------------------------------------------------------------------------


class _SessionFailed(Exception):
    """Setting up the session failed; carries the result to return."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.detail)
        self.result = result


class _Closing:
    """``with transport:`` closes it, whatever happens inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SMTPTransport(_Closing):
    """SMTP to one relay, one connection for many messages.

    The connection is opened on the first send and kept; before each further
    transaction an RSET both clears the previous one and shows whether the relay
    is still there.  When it is not (an idle timeout, a restart) the transport
    reconnects once and goes on.  Not thread-safe: one transport per worker.
    """

    def __init__(self, settings: SMTPSettings) -> None:
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None
        self._where = f"{settings.host}:{settings.port}"
        self.tls_active = False  # whether the current connection runs TLS
        self._tls_context = _tls_context(settings) if settings.starttls != "off" else None

    def send(self, envelope_from: str, recipient: str, message: bytes) -> DeliveryResult:
        addresses = _envelope_addresses(envelope_from, recipient)
        if isinstance(addresses, DeliveryResult):
            return addresses
        sender, rcpt = addresses
        try:
            smtp = self._session()
        except _SessionFailed as failed:
            return failed.result
        try:
            return self._transaction(smtp, sender, rcpt, message)
        except smtplib.SMTPResponseException as exc:
            # smtplib raises instead of returning for a refused DATA command.
            result = self._reply(exc.smtp_code, exc.smtp_error)
        except smtplib.SMTPServerDisconnected as exc:
            result = self._tempfail(f"connection lost: {exc}")
        except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
            result = self._tempfail(f"{type(exc).__name__}: {exc}")
        if result.outcome is DeliveryOutcome.TEMPFAIL:
            # The session's state is unknown; start afresh next time.
            self._drop()
        return result

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        self.tls_active = False
        if smtp is None:
            return
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()

    # -- internals

    def _session(self) -> smtplib.SMTP:
        """An SMTP session ready for MAIL: the kept one if RSET still works,
        else a new one."""
        if self._smtp is not None:
            try:
                code, _ = self._smtp.rset()
            except (smtplib.SMTPException, OSError):
                code = -1
            if code == 250:
                return self._smtp
            self._drop()  # dropped by the relay, or 421: reconnect once
        self._smtp = self._connect()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        helo = s.helo_name or socket.getfqdn()
        try:
            # The host goes to the constructor: smtplib remembers it there, and
            # only there, as the name to check the STARTTLS certificate against.
            smtp = smtplib.SMTP(s.host, s.port, local_hostname=helo, timeout=s.timeout)
        except smtplib.SMTPConnectError as exc:  # a greeting other than 220
            raise self._session_failed(exc.smtp_code, exc.smtp_error) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise _SessionFailed(self._tempfail(f"connection closed: {exc}")) from None
        except OSError as exc:
            raise _SessionFailed(self._tempfail(f"cannot connect: {_os_error(exc)}")) from None
        try:
            self._hello(smtp)
            self.tls_active = False
            if s.starttls != "off":
                if smtp.has_extn("starttls"):
                    self._starttls(smtp)
                elif s.starttls == "required":
                    raise _SessionFailed(self._tempfail("STARTTLS required but not offered"))
            if s.username is not None and s.password is not None:
                self._login(smtp, s.username, s.password)
        except _SessionFailed:
            with contextlib.suppress(Exception):
                smtp.close()
            self.tls_active = False
            raise
        except (smtplib.SMTPException, OSError) as exc:
            with contextlib.suppress(Exception):
                smtp.close()
            self.tls_active = False
            raise _SessionFailed(
                self._tempfail(f"session setup failed: {type(exc).__name__}: {exc}")
            ) from None
        return smtp

    def _hello(self, smtp: smtplib.SMTP) -> None:
        code, reply = smtp.ehlo()
        if code == 250:
            return
        # A relay without ESMTP: HELO, and then no STARTTLS or AUTH is offered.
        code, reply = smtp.helo()
        if code != 250:
            raise self._session_failed(code, reply)

    def _starttls(self, smtp: smtplib.SMTP) -> None:
        assert self._tls_context is not None
        try:
            code, reply = smtp.starttls(context=self._tls_context)
        except smtplib.SMTPResponseException as exc:
            raise self._session_failed(exc.smtp_code, exc.smtp_error, "STARTTLS refused") from None
        except (ssl.SSLError, OSError) as exc:
            # No fallback to plaintext: a failed handshake may be an attacker
            # stripping TLS, and the next attempt may well succeed.
            raise _SessionFailed(self._tempfail(f"TLS handshake failed: {exc}")) from None
        if code != 220:
            raise self._session_failed(code, reply, "STARTTLS refused")
        self.tls_active = True
        self._hello(smtp)  # RFC 3207 §4.2: forget what was learnt before TLS

    def _login(self, smtp: smtplib.SMTP, username: str, password: str) -> None:
        if not self.tls_active and not is_loopback(self.settings.host):
            raise _SessionFailed(
                self._tempfail("not sending AUTH over an unencrypted connection (no STARTTLS)")
            )
        try:
            smtp.login(username, password)
        except smtplib.SMTPNotSupportedError:
            raise _SessionFailed(self._tempfail("AUTH not offered by the relay")) from None
        except smtplib.SMTPAuthenticationError as exc:
            # Wrong credentials are not this report's fault: keep it for a retry.
            raise self._session_failed(exc.smtp_code, exc.smtp_error, "AUTH failed") from None
        except smtplib.SMTPException as exc:
            raise _SessionFailed(self._tempfail(f"AUTH failed: {exc}")) from None

    def _transaction(
        self, smtp: smtplib.SMTP, sender: str, recipient: str, message: bytes
    ) -> DeliveryResult:
        # SIZE lets a relay refuse an oversized report before the data is sent.
        options = [f"SIZE={len(message)}"] if smtp.has_extn("size") else []
        code, reply = smtp.mail(sender, options)
        if 200 <= code < 300:
            code, reply = smtp.rcpt(recipient)
            if 200 <= code < 300:
                code, reply = smtp.data(message)
            elif _refuses_recipient(code, reply):
                return DeliveryResult(
                    DeliveryOutcome.PERMFAIL, self._detail(code, reply), recipient_refused=True
                )
        if code == 421:
            self._drop()  # the relay is closing the connection (RFC 5321 §3.8)
        return self._reply(code, reply)

    def _reply(self, code: int, reply: bytes | str) -> DeliveryResult:
        """A transaction reply as a result.  5xx is permanent, except 530: RFC 4954's
        "authentication required" (and RFC 3207's "must issue STARTTLS first") is
        about this session, not the message."""
        detail = self._detail(code, reply)
        if 200 <= code < 300:
            return DeliveryResult(DeliveryOutcome.SENT, detail)
        if 500 <= code < 600 and code != 530:
            return DeliveryResult(DeliveryOutcome.PERMFAIL, detail)
        return DeliveryResult(DeliveryOutcome.TEMPFAIL, detail)

    def _session_failed(
        self, code: int, reply: bytes | str, what: str | None = None
    ) -> _SessionFailed:
        """Any reply that ends the session setup (greeting, EHLO, STARTTLS, AUTH):
        always temporary, since it is about the relay, not the report."""
        detail = self._detail(code, reply)
        return _SessionFailed(
            DeliveryResult(DeliveryOutcome.TEMPFAIL, f"{what}: {detail}" if what else detail)
        )

    def _detail(self, code: int, reply: bytes | str) -> str:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
        return _one_line(f"{code} {text} ({self._where})")

    def _tempfail(self, text: str) -> DeliveryResult:
        return DeliveryResult(DeliveryOutcome.TEMPFAIL, _one_line(f"{text} ({self._where})"))

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        self.tls_active = False
        if smtp is not None:
            with contextlib.suppress(Exception):
                smtp.close()


def _refuses_recipient(code: int, reply: bytes | str) -> bool:
    """Whether a reply to RCPT says this mailbox is permanently unusable."""
    if not 500 <= code < 600 or code == 530:
        return False
    text = reply.encode("utf-8", "replace") if isinstance(reply, str) else reply
    enhanced = _ENHANCED_STATUS_RE.match(text.lstrip())
    if enhanced is not None:
        return _RECIPIENT_STATUS_RE.fullmatch(enhanced.group()) is not None
    return code in _RECIPIENT_CODES


def _tls_context(settings: SMTPSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load smtp ca_file {settings.ca_file}: {exc}") from None
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _os_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


# -- sendmail ----------------------------------------------------------------------

# sysexits.h codes and what they mean for a report, after Postfix's sys_exits.c.
# Only the ones about this message or recipient are permanent; the rest describe
# the local mail system, and the report waits until that is fixed.
_SYSEXITS: dict[int, tuple[str, DeliveryOutcome]] = {
    64: ("EX_USAGE: command line usage error", DeliveryOutcome.TEMPFAIL),
    65: ("EX_DATAERR: data format error", DeliveryOutcome.PERMFAIL),
    66: ("EX_NOINPUT: cannot open input", DeliveryOutcome.TEMPFAIL),
    67: ("EX_NOUSER: user unknown", DeliveryOutcome.PERMFAIL),
    68: ("EX_NOHOST: host name unknown", DeliveryOutcome.PERMFAIL),
    69: ("EX_UNAVAILABLE: service unavailable", DeliveryOutcome.TEMPFAIL),
    70: ("EX_SOFTWARE: internal software error", DeliveryOutcome.TEMPFAIL),
    71: ("EX_OSERR: system resource problem", DeliveryOutcome.TEMPFAIL),
    72: ("EX_OSFILE: critical OS file missing", DeliveryOutcome.TEMPFAIL),
    73: ("EX_CANTCREAT: cannot create output file", DeliveryOutcome.TEMPFAIL),
    74: ("EX_IOERR: input/output error", DeliveryOutcome.TEMPFAIL),
    75: ("EX_TEMPFAIL: temporary failure", DeliveryOutcome.TEMPFAIL),
    76: ("EX_PROTOCOL: remote error in protocol", DeliveryOutcome.TEMPFAIL),
    77: ("EX_NOPERM: permission denied", DeliveryOutcome.TEMPFAIL),
    78: ("EX_CONFIG: local configuration error", DeliveryOutcome.TEMPFAIL),
}


class SendmailTransport(_Closing):
    """Each message through ``PATH -i -f FROM -- RCPT``, the message on stdin.

    The message goes in with LF line ends, as local submission expects
    (Sendmail would keep a CR as part of each line).  ``-i`` keeps a line of a
    single dot from ending the input; ``--`` keeps a recipient from being read
    as an option.  The command runs in its own process group, so a timeout kills
    whatever it started too (Postfix's sendmail runs postdrop).
    """

    def __init__(self, path: str = "/usr/sbin/sendmail", timeout: float = 60.0) -> None:
        if timeout <= 0:
            raise ConfigError(f"sendmail timeout must be positive: {timeout}")
        self.path = path
        self.timeout = timeout

    def send(self, envelope_from: str, recipient: str, message: bytes) -> DeliveryResult:
        addresses = _envelope_addresses(envelope_from, recipient)
        if isinstance(addresses, DeliveryResult):
            return addresses
        sender, rcpt = addresses
        argv = [self.path, "-i", "-f", sender, "--", rcpt]
        data = message.replace(b"\r\n", b"\n")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            return self._tempfail(f"sendmail program not found: {self.path}")
        except OSError as exc:
            return self._tempfail(f"cannot run {self.path}: {_os_error(exc)}")
        with proc:
            try:
                stdout, stderr = proc.communicate(data, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    proc.communicate(timeout=5)
                return self._tempfail(f"{self.path} timed out after {self.timeout:g} s")
            except OSError as exc:
                proc.kill()
                return self._tempfail(f"writing to {self.path} failed: {_os_error(exc)}")
        output = (stderr or stdout).decode("utf-8", "replace").strip()
        status = proc.returncode
        if status == 0:
            return DeliveryResult(DeliveryOutcome.SENT, f"{self.path} accepted the message")
        if status < 0:
            meaning, outcome = f"killed by signal {-status}", DeliveryOutcome.TEMPFAIL
        else:
            meaning, outcome = _SYSEXITS.get(status, ("unknown status", DeliveryOutcome.TEMPFAIL))
        detail = f"{self.path} exited with {status} ({meaning})"
        return DeliveryResult(outcome, _one_line(f"{detail}: {output}" if output else detail))

    def close(self) -> None:
        """Nothing is kept between messages."""

    def _tempfail(self, text: str) -> DeliveryResult:
        return DeliveryResult(DeliveryOutcome.TEMPFAIL, _one_line(text))
