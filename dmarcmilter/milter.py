"""The milter: MTA callbacks in, the core's verdict out.

One :class:`DMARCMilter` per MTA connection (pymilter makes it at
negotiation).  The callbacks only collect the SMTP envelope and the message,
within bounds; at end-of-message the core runs (:func:`evaluate`, then
:func:`decide`, then :func:`plan`) and the milter carries the plan out.  Each
transaction on a connection (MAIL FROM to end-of-message, or RSET) is
evaluated on its own.

Failure handling (a security filter must fail closed):

* Forged Authentication-Results fields are removed first, in a step of
  their own, before anything else can fail.
* An exception anywhere after that is an internal error: the outcome is
  ``[milter] internal_error_action`` (tempfail by default, as Postfix's
  milter_default_action), the message line carries ``error_id`` and the
  traceback is logged under the same id.
* A header modification that the MTA refuses never cancels the verdict:
  the quarantine and the reply are still applied.
* A transaction the MTA aborted is not recorded for reports (the sender's
  retry would count it twice): one aborted before end-of-message is never
  evaluated; one whose MTA connection fails while we send the modifications
  at end-of-message (libmilter reports the write as failed) is logged with
  ``aborted=true`` and not recorded.  A reject or tempfail sends nothing
  before the final reply, so an MTA that gave up then cannot be told apart
  and the message is recorded.

Protocol negotiation (Sendmail milter protocol 6, as Postfix and Sendmail
8.14+ speak it): the DATA and unknown-command callbacks are not requested,
and no callback before end-of-message sends a reply (``@noreply``), so the
MTA streams the envelope, header fields and body without waiting for us.
Header values arrive with their leading whitespace (``header_leading_space``)
so the message is rebuilt byte for byte for DKIM.  The actions requested are
adding and changing header fields and quarantine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import Milter

from .actions import MilterActions, forged_fields, plan
from .config import Config
from .errors import InputError
from .evaluation import Envelope, Evaluation, evaluate
from .history.rows import MAX_BOUNCES_PER_MESSAGE, FailureMaterial, bounce_row
from .history.writer import HistoryWriter
from .message import Message, MessageBuffer
from .metrics import NO_METRICS, Sink
from .policy import (
    Action,
    Decision,
    LocalContext,
    QuarantineMethod,
    SMTPReply,
    decide,
    incomplete_header,
    recorded,
    safe_reply_text,
    skip_reason,
)
from .report.dsn import parse_dsn
from .report.guard import is_report_message_id
from .resolver import Resolver
from .upstream import AUTHENTICATION_RESULTS, UpstreamTrust, own_ids, upstream_results

log = logging.getLogger("dmarcmilter")
message_log = logging.getLogger("dmarcmilter.message")

# Bounds on what one transaction may make us keep.  Postfix's own limits
# (header_size_limit, message_size_limit) are far below these; they guard
# against an MTA configured without them.  Past either header bound the
# header is "cut": later fields are not kept, except From and
# Authentication-Results fields (see MAX_LATE_FIELDS), and the policy step
# never lets such a message through (policy.incomplete_header).
MAX_HEADER_FIELDS = 10_000
MAX_HEADER_BYTES = 16 * 1024 * 1024
# From and Authentication-Results fields kept past the cut, each cut to
# MAX_LATE_VALUE characters: enough for author extraction to see several
# From fields and for the stripping to find a forged field's authserv-id.
# Beyond MAX_LATE_FIELDS of them the message is refused all the same.
MAX_LATE_FIELDS = 10_000
MAX_LATE_VALUE = 1024
MAX_RECIPIENTS = 1000
_LATE_KEPT = frozenset({"from", AUTHENTICATION_RESULTS})

# The replies for an internal error ([milter] internal_error_action).
INTERNAL_TEMPFAIL = SMTPReply("451", "4.3.0", "Temporary local problem; try again later")
INTERNAL_REJECT = SMTPReply("550", "5.3.0", "Message could not be checked")

ACTION_FLAGS: int = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE
# pymilter has no type information: its reply codes, typed once here.
CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


_Callback = TypeVar("_Callback", bound=Callable[..., int])


def _noreply(func: _Callback) -> _Callback:
    """pymilter's @noreply (the MTA need not wait for this callback), typed."""
    return cast(_Callback, Milter.noreply(func))


@dataclass(frozen=True)
class Runtime:
    """What a connection works with; replaced as a whole on reload, so a
    message is always handled under one configuration."""

    config: Config
    resolver: Resolver
    authserv_id: str  # configured; empty: the MTA's j macro, else our name
    host_name: str  # this host's name, looked up once (it may take DNS)
    owned_ids: frozenset[str]
    upstream_trust: UpstreamTrust
    # report.from_address, lower-cased: mail to it may be a bounce of our
    # report mail ("" when unset).
    report_address: str = ""

    @classmethod
    def build(cls, config: Config, previous: Runtime | None = None) -> Runtime:
        # Keep the DNS cache across a reload unless DNS settings changed.
        if previous is not None and previous.config.dns == config.dns:
            resolver = previous.resolver
        else:
            from .evaluation import resolver_from_config

            resolver = resolver_from_config(config)
        host_name = config.effective_authserv_id()
        owned = own_ids(*config.headers.owned_authserv_ids, config.authserv_id, host_name)
        return cls(
            config,
            resolver,
            config.authserv_id,
            host_name,
            owned,
            UpstreamTrust.from_config(config.headers),
            config.report.from_address.lower(),
        )


class MilterState:
    """Shared by every connection: the current runtime, the history writer,
    and the transactions in progress (for a graceful stop)."""

    def __init__(self, runtime: Runtime, writer: HistoryWriter | None) -> None:
        self.runtime = runtime
        self.writer = writer
        # Prometheus metrics ([metrics] listen); NO_METRICS does nothing.
        self.metrics: Sink = NO_METRICS
        self.stopping = False
        # Set once stopping: transactions begun after it are not waited for,
        # and the history is closed before they end.
        self.last_admitted: int | None = None
        self._next = 0
        self._active: set[int] = set()
        self._cond = threading.Condition()

    def begin(self) -> int:
        """A transaction starts; its ticket, for :meth:`end`."""
        with self._cond:
            self._next += 1
            self._active.add(self._next)
            return self._next

    def end(self, ticket: int) -> None:
        with self._cond:
            self._active.discard(ticket)
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return len(self._active)

    def admit_no_more(self) -> int:
        """Stopping: the last transaction that will be waited for and
        recorded; a later one is answered with a tempfail."""
        with self._cond:
            self.last_admitted = self._next
            return self._next

    def wait_for(self, ticket: int, timeout: float) -> bool:
        """Wait until every transaction up to ``ticket`` has ended (later
        ones may still run); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(t <= ticket for t in self._active):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


@dataclass
class _Transaction:
    """One message: from MAIL FROM to end-of-message or abort."""

    ticket: int
    mail_from: str
    authenticated: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    header_bytes: int = 0
    headers_cut: bool = False
    late_fields: int = 0
    # The message from its first body chunk on (the header section is
    # complete by then), in one buffer: a large body is held once.
    buffer: MessageBuffer | None = None
    body_bytes: int = 0
    body_cut: bool = False


@Milter.header_leading_space
class DMARCMilter(Milter.Base):  # type: ignore[misc]
    """One MTA connection."""

    def __init__(self, state: MilterState) -> None:
        self.state = state
        self.runtime = state.runtime
        self.client_ip: str | None = None
        self._actions = ACTION_FLAGS
        # False when pymilter could not call connect() (it decodes the host
        # name strictly as UTF-8 before calling us): see _client_address.
        self.connected = False
        self.client_name = ""
        self.helo_name = ""
        self.authserv_id = ""
        self.txn: _Transaction | None = None

    # -- callbacks ---------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        # pymilter leaves every offered action enabled; ask only for ours.
        result: int = super().negotiate(opts)
        opts[0] = self._actions = opts[0] & ACTION_FLAGS
        return result

    @_noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        # A reload takes effect for new connections.
        self.runtime = self.state.runtime
        self.client_name = hostname or ""
        self.connected = True
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_ip = str(hostaddr[0])
        return CONTINUE

    @_noreply
    def hello(self, hostname: str) -> int:
        self.helo_name = hostname or ""
        return CONTINUE

    @_noreply
    def envfrom(self, mail_from: str, *params: str) -> int:
        self._end()
        self.txn = _Transaction(
            ticket=self.state.begin(),
            mail_from=mail_from,
            authenticated=self._macro("{auth_authen}"),
            recipients=[],
            headers=[],
        )
        return CONTINUE

    @_noreply
    def envrcpt(self, recipient: str, *params: str) -> int:
        txn = self.txn
        if txn is not None and len(txn.recipients) < MAX_RECIPIENTS:
            txn.recipients.append(recipient.strip("<>"))
        return CONTINUE

    @_noreply
    def header(self, name: str, value: str) -> int:
        txn = self.txn
        if txn is None:
            return CONTINUE
        if not txn.headers_cut:
            size = len(name) + len(value) + 3
            if len(txn.headers) < MAX_HEADER_FIELDS and txn.header_bytes + size <= MAX_HEADER_BYTES:
                txn.headers.append((name, value))
                txn.header_bytes += size
                return CONTINUE
            txn.headers_cut = True
        # Past the cut, what the verdict and the stripping need is still
        # kept: every From (so several are seen) and every
        # Authentication-Results field (its place among them and its
        # authserv-id, which comes first in the value).
        if name.lower() in _LATE_KEPT and txn.late_fields < MAX_LATE_FIELDS:
            txn.headers.append((name, value[:MAX_LATE_VALUE]))
            txn.late_fields += 1
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        txn = self.txn
        if txn is None or txn.body_cut:
            return CONTINUE
        txn.body_bytes += len(chunk)
        if txn.body_bytes > self.runtime.config.milter.max_body_bytes:
            # Past the limit nothing more is kept, and what was kept is let
            # go at once: memory stays bounded whatever the MTA sends.
            txn.body_cut = True
            txn.buffer = None
            return CONTINUE
        if txn.buffer is None:
            txn.buffer = MessageBuffer(txn.headers, leading_space=self._leading_space())
        txn.buffer.write(chunk)
        return CONTINUE

    def eom(self) -> int:
        txn = self.txn
        if txn is None:
            return CONTINUE
        started = time.perf_counter()
        last = self.state.last_admitted
        if last is not None and txn.ticket > last:
            # Begun after the daemon started to stop: its history row
            # could no longer be kept, so the MTA retries it after the
            # restart rather than deliver it unrecorded.
            self._log_line(txn, started, action="tempfail", stopping=True)
            self.state.metrics.skipped("stopping", "tempfail", time.perf_counter() - started)
            return self._refuse("tempfail")
        stripped = False
        removed = 0
        try:
            # First, on its own: forged fields must be gone whatever fails
            # later, even an internal error answered with "accept".
            try:
                owned = self._owned()
                headers = self._text_headers(txn)
                removed = self._strip_forged(headers, owned)
            except Milter.error:
                # The MTA connection failed: the transaction is abandoned.
                self._log_line(txn, started, aborted=True)
                self.state.metrics.aborted()
                return TEMPFAIL
            stripped = True
            return self._end_of_message(txn, started, removed, headers, owned)
        except Exception:
            return self._internal_error(txn, started, stripped, removed)
        finally:
            self._end()

    def abort(self) -> int:
        self._end()
        return CONTINUE

    def close(self) -> int:
        self._end()
        return CONTINUE

    # -- end of message ----------------------------------------------------------

    def _end(self) -> None:
        if self.txn is not None:
            self.state.end(self.txn.ticket)
            self.txn = None

    def _macro(self, name: str) -> str:
        """An MTA macro, "" when unset or not UTF-8: pymilter decodes macros
        strictly, and a client's reverse-DNS name is whatever its DNS says."""
        try:
            return self.getsymval(name) or ""
        except UnicodeError:
            return ""

    def _queue_id(self) -> str:
        return self._macro("i")

    def _authserv_id(self) -> str:
        """Ours: configured, else the MTA's j macro, else this host's name;
        derived here (not at connect, which may not have run)."""
        if not self.authserv_id:
            runtime = self.runtime
            self.authserv_id = runtime.authserv_id or self._macro("j") or runtime.host_name
        return self.authserv_id

    def _text_headers(self, txn: _Transaction) -> list[tuple[str, str]]:
        # With leading whitespace negotiated a value is " text": Message
        # keeps those exact bytes for DKIM, the rest of the core wants text.
        if self._leading_space():
            return [(n, v.lstrip(" \t")) for n, v in txn.headers]
        return txn.headers

    def _owned(self) -> frozenset[str]:
        """Every authserv-id that is ours for this message: configured, the
        one we write, and the MTA's j name (an attacker's field claiming any
        of them is forged, and none of them is ever trusted)."""
        return self.runtime.owned_ids | own_ids(self._authserv_id(), self._macro("j"))

    def _strip_forged(self, headers: list[tuple[str, str]], owned: frozenset[str]) -> int:
        remove = forged_fields(headers, owned)
        if remove and not self._actions & Milter.CHGHDRS:
            # They cannot be removed, so the message must not go through
            # as if they had been (an internal error: tempfail by default).
            raise RuntimeError("forged fields present, and the MTA does not allow removing them")
        # Highest index first, so each deletion leaves the numbering of the
        # ones still to come alone.
        for name, index in sorted(remove, key=lambda item: -item[1]):
            self.chgheader(name, index, None)
        return len(remove)

    def _log_line(self, txn: _Transaction, started: float, **fields: Any) -> None:
        message_log.info(
            "message",
            extra={
                "fields": {
                    "queue_id": self._queue_id(),
                    "client_ip": self.client_ip,
                    **{k: v for k, v in fields.items() if v},
                    "headers_cut": txn.headers_cut or None,
                    "elapsed_ms": (time.perf_counter() - started) * 1000,
                }
            },
        )

    def _internal_error(
        self, txn: _Transaction, started: float, stripped: bool, removed: int
    ) -> int:
        error_id = secrets.token_hex(6)
        log.error("internal error error_id=%s", error_id, exc_info=True)
        action = self.runtime.config.milter.internal_error_action
        if action == "accept" and not stripped:
            # Forged fields could not be removed: never deliver them.
            action = "tempfail"
        self._log_line(txn, started, action=action, error_id=error_id, removed_ar=removed or None)
        self.state.metrics.internal_error(action, time.perf_counter() - started)
        return self._refuse(action)

    def _refuse(self, action: str) -> int:
        if action == "accept":
            return CONTINUE
        reply = INTERNAL_REJECT if action == "reject" else INTERNAL_TEMPFAIL
        self._set_reply(reply)
        return REJECT if action == "reject" else TEMPFAIL

    def _set_reply(self, reply: SMTPReply) -> bool:
        """Set the reply text; False if libmilter refused it (the MTA then
        uses its own text with the same verdict)."""
        try:
            self.setreply(reply.code, reply.enhanced, safe_reply_text(reply.text))
        except (Milter.error, ValueError, UnicodeError):
            log.warning("reply text refused: %r", safe_reply_text(reply.text))
            return False
        return True

    def _end_of_message(
        self,
        txn: _Transaction,
        started: float,
        removed: int,
        headers: list[tuple[str, str]],
        owned: frozenset[str],
    ) -> int:
        runtime = self.runtime
        config = runtime.config
        queue_id = self._queue_id()
        lead = self._leading_space()
        if self.client_ip is None and not self.connected:
            self.client_ip = self._client_address()
        context = LocalContext(self.client_ip, txn.authenticated, not txn.headers_cut)
        skip = skip_reason(context, config)
        if skip == "local" and not self.connected:
            # An IP connection whose connect callback could not run (a host
            # name that is not UTF-8) and whose address no macro gives: not
            # a local submission.
            skip = "no_client_address"
        envelope = None
        if skip is None:
            try:
                envelope = Envelope.create(
                    (self.client_ip or "").partition("%")[0],  # no IPv6 zone
                    self.helo_name,
                    txn.mail_from,
                    txn.recipients,
                    queue_id,
                )
            except InputError:
                skip = "no_client_address"
        if skip == "no_client_address":
            # It cannot be evaluated, and must not pass unchecked: the
            # internal-error action (tempfail by default).
            action = config.milter.internal_error_action
            self._log_line(txn, started, skipped=skip, removed_ar=removed, action=action)
            self.state.metrics.skipped(skip, action, time.perf_counter() - started)
            return self._refuse(action)
        if skip is not None or envelope is None:
            # Not evaluated; forged fields are already gone.  A header
            # that was cut is refused all the same.
            refusal = None if context.header_complete else incomplete_header(config.policy)
            bounces = 0
            if refusal is not None:
                code = self._verdict_code(
                    MilterActions(verdict=refusal.action, reply=refusal.reply)
                )
            else:
                code = CONTINUE
                if self._to_report_address(txn):
                    # A bounce of our report mail, often relayed by a
                    # trusted smarthost: its facts are recorded all the same.
                    buffer = txn.buffer
                    txn.buffer = None
                    if buffer is not None:
                        bounces = self._record_bounces(buffer.message())
            self._log_line(
                txn,
                started,
                skipped=skip,
                removed_ar=removed,
                action=refusal.action.value if refusal else "accept",
                report_bounces=bounces,
            )
            self.state.metrics.skipped(
                skip or "no_client_address",
                refusal.action.value if refusal else "accept",
                time.perf_counter() - started,
            )
            return code
        # A body cut at the limit was let go: the message is its header.
        buffer = txn.buffer
        if buffer is None:
            buffer = MessageBuffer(txn.headers, leading_space=lead)
        txn.buffer = None  # the message holds it now
        message = buffer.message()
        del buffer
        upstream = upstream_results(headers, runtime.upstream_trust, envelope, owned)
        dns = runtime.resolver.session()
        evaluating = time.perf_counter()
        evaluation = evaluate(
            envelope,
            message,
            dns,
            config,
            upstream=upstream,
            body_cut_at=config.milter.max_body_bytes if txn.body_cut else None,
        )
        evaluated = time.perf_counter() - evaluating
        decision = decide(evaluation, config.policy, context)
        actions = plan(evaluation, decision, config, self.authserv_id)
        if decision.quarantine is QuarantineMethod.HEADER and not self._actions & Milter.ADDHDRS:
            actions = self._quarantine_without_header(actions)
        own_report = not recorded(headers, config)
        failed = self._apply(actions)
        code = self._verdict_code(actions)
        bounces = 0
        if self.state.writer is not None and not failed:
            if not own_report:
                material = None
                if config.failure_reports.enabled:
                    material = self._failure_material(txn, headers, actions, message)
                self.state.writer.enqueue(evaluation, decision, material)
            if code == CONTINUE and self._to_report_address(txn):
                bounces = self._record_bounces(message)
        message_log.info(
            "message",
            extra={
                "fields": message_fields(
                    evaluation,
                    decision,
                    removed,
                    (time.perf_counter() - started) * 1000,
                    upstream=upstream.authserv_id if upstream else None,
                    aborted=failed > 0,
                    body_cut=txn.body_cut,
                    headers_cut=txn.headers_cut,
                    own_report=own_report,
                    report_bounces=bounces,
                )
            },
        )
        self.state.metrics.evaluated(
            evaluation, decision, actions.verdict, dns, evaluated, time.perf_counter() - started
        )
        if failed:
            self.state.metrics.aborted()
        return code

    def _failure_material(
        self,
        txn: _Transaction,
        headers: list[tuple[str, str]],
        actions: MilterActions,
        message: Message,
    ) -> FailureMaterial:
        """What only the milter has for a failure report, by reference: the
        writer decides whether one is due and builds it (rows.failure_entry)."""
        settings = self.runtime.config.failure_reports
        ar = ""
        for name, value in actions.prepend:
            if name == "Authentication-Results":
                ar = value
        body = message.raw if settings.include_body and not txn.body_cut else None
        return FailureMaterial(
            settings, headers, ar, self.authserv_id, body, header_bytes=txn.header_bytes
        )

    def _to_report_address(self, txn: _Transaction) -> bool:
        """Whether a recipient is our report address (report.from_address),
        where bounces of our report mail come back; compared ignoring case."""
        address = self.runtime.report_address
        if not address:
            return False
        return any(r.lower() == address for r in txn.recipients)

    def _record_bounces(self, message: Message) -> int:
        """Hand the hard bounces a delivery status notification names to the
        writer; how many.  Only facts are recorded: the report job checks
        that the Message-ID is one of our report mails (its secret token)
        and that the address is where that mail went, so a forged DSN does
        nothing.  Never raises: a bounce must not change the verdict."""
        writer = self.state.writer
        if writer is None:
            return 0
        try:
            report = parse_dsn(message)
            message_id = report.original_message_id
            hard = report.hard_bounces
            if not report.is_dsn or message_id is None or not hard:
                return 0
            if not is_report_message_id(message_id, self.runtime.config):
                # Not one of our report mails (other mail to the address
                # bounced, or a guess): nothing to record.
                return 0
            # The message's own log line shows how many were taken: past
            # the bound the rest are ignored, with no line of their own.
            hard = hard[:MAX_BOUNCES_PER_MESSAGE]
            now = dt.datetime.now(dt.UTC)
            writer.enqueue_bounces(
                [
                    bounce_row(
                        now,
                        message_id,
                        r.address,
                        r.status,
                        r.diagnostic,
                        report.reporting_mta,
                    )
                    for r in hard
                ]
            )
            return len(hard)
        except Exception:
            log.exception("cannot record the bounces of a delivery status notification")
            return 0

    def _client_address(self) -> str | None:
        """The client address from the connect macros, for a connection whose
        connect callback could not run: Postfix's ``{client_addr}``, or the
        address in ``_`` ("name [address]").  A message must not escape
        evaluation because a host name was not UTF-8."""
        address = self._macro("{client_addr}")
        if not address:
            underscore = self._macro("_")
            if underscore.endswith("]") and "[" in underscore:
                address = underscore[underscore.rindex("[") + 1 : -1]
        address = address.removeprefix("IPv6:")
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            return None

    def _leading_space(self) -> bool:
        return bool(self._protocol & Milter.P_HDR_LEADSPC)

    def _apply(self, actions: MilterActions) -> int:
        """Carry out the header edits and the quarantine; the number of
        writes that failed.  A failed write is logged and the rest still
        done: a header the MTA would not take must not cancel the verdict."""
        lead = " " if self._leading_space() else ""
        failed = 0
        writes: list[tuple[str, Callable[[], object]]] = []
        if actions.prepend or actions.append:
            if self._actions & Milter.ADDHDRS:
                for name, value in reversed(actions.prepend):
                    writes.append((name, functools.partial(self._insert_top, name, lead + value)))
                for name, value in actions.append:
                    writes.append((name, functools.partial(self.addheader, name, lead + value)))
            else:
                # The MTA did not allow it: not a failed write (the
                # transaction goes on), but the verdict still stands.
                log.warning("the MTA does not allow adding header fields")
        if actions.hold_reason is not None:
            reason = actions.hold_reason
            writes.append(("quarantine", lambda: self.quarantine(reason)))
        for what, write in writes:
            try:
                write()
            except (Milter.error, ValueError, UnicodeError) as exc:
                failed += 1
                log.warning("could not write %s: %s", what, exc)
        return failed

    def _quarantine_without_header(self, actions: MilterActions) -> MilterActions:
        """The MTA does not let us add the quarantine header field: the
        message must not be delivered unmarked (fail closed), so it goes to
        the hold queue instead, or, when that is not allowed either, is
        tempfailed."""
        if self._actions & Milter.QUARANTINE:
            log.warning("the MTA does not allow adding header fields: holding the message")
            return dataclasses.replace(
                actions, hold_reason="DMARC quarantine (the MTA refused the quarantine header)"
            )
        log.warning("the MTA allows neither header fields nor quarantine: tempfail")
        return dataclasses.replace(actions, verdict=Action.TEMPFAIL, reply=INTERNAL_TEMPFAIL)

    def _verdict_code(self, actions: MilterActions) -> int:
        if actions.verdict in (Action.REJECT, Action.TEMPFAIL):
            if actions.reply is not None:
                self._set_reply(actions.reply)
            return REJECT if actions.verdict is Action.REJECT else TEMPFAIL
        return CONTINUE

    def _insert_top(self, name: str, value: str) -> None:
        try:
            self.addheader(name, value, 0)
        except Milter.error:
            # An MTA without smfi_insheader: at the end is still correct
            # for a receiver that reads every field.
            self.addheader(name, value)


# Signatures named in the log line; the others are counted.
LOG_SIGNATURES = 20
# Characters of one value in the log line.
MAX_LOG_VALUE = 512


def message_fields(
    evaluation: Evaluation,
    decision: Decision,
    removed: int,
    elapsed_ms: float,
    **extra: Any,
) -> dict[str, Any]:
    """The fields of the one log line per evaluated message."""
    env = evaluation.envelope
    dmarc = evaluation.dmarc
    signatures = evaluation.dkim.signatures
    dkim = ",".join(f"{s.result.value}:{s.domain or '-'}" for s in signatures[:LOG_SIGNATURES])
    if len(signatures) > LOG_SIGNATURES:
        dkim += f",+{len(signatures) - LOG_SIGNATURES}"
    action = decision.action.value
    if decision.quarantine is not None:
        action = f"{action}:{decision.quarantine.value}"
    fields: dict[str, Any] = {
        "queue_id": env.queue_id,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "mail_from": env.mail_from or "<>",
        "header_from": dmarc.author_domain,
        "policy_domain": dmarc.policy_domain,
        "spf": evaluation.spf.mfrom.result.value,
        "dkim": dkim or "none",
        "arc": evaluation.arc.result.value,
        "dmarc": dmarc.result.value,
        "policy": dmarc.policy.value if dmarc.policy else None,
        "disposition": decision.disposition.value,
        "action": action,
        "would": decision.monitored.value if decision.monitored else None,
        "reasons": ",".join(r.reason.value for r in decision.reasons) or None,
        "removed_ar": removed or None,
        "elapsed_ms": elapsed_ms,
    }
    for key, value in extra.items():
        if value:
            fields[key] = value
    # Values from the client and the message (HELO, MAIL FROM, domains)
    # are cut: one log line per message stays short.  The log formatter
    # escapes quotes and control characters.
    for key, value in fields.items():
        if isinstance(value, str) and len(value) > MAX_LOG_VALUE:
            fields[key] = value[: MAX_LOG_VALUE - 3] + "..."
    return fields


def register_callbacks(milter: Any) -> None:
    """Point libmilter's callbacks at the connection objects.

    pymilter's own glue passes envelope and header values through generic
    bytes-to-text wrappers, a few Python calls each; the MTA sends a dozen
    or more header fields per message, each a callback that must take the
    interpreter lock, so these go straight to the methods (the text
    conversion is the same: UTF-8, undecodable bytes kept as surrogates).
    """

    def text(value: bytes) -> str:
        return value.decode("utf-8", "surrogateescape")

    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, sender, *params: ctx.getpriv().envfrom(text(sender)))
    milter.set_envrcpt_callback(
        lambda ctx, recipient, *params: ctx.getpriv().envrcpt(text(recipient))
    )
    milter.set_header_callback(lambda ctx, name, value: ctx.getpriv().header(name, text(value)))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)


def milter_factory(state: MilterState) -> Callable[[], DMARCMilter]:
    def factory() -> DMARCMilter:
        return DMARCMilter(state)

    return factory
