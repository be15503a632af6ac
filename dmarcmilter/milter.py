"""The milter: MTA callbacks in, the core's verdict out.

One :class:`DMARCMilter` per MTA connection (pymilter makes it at
negotiation).  The callbacks only collect the SMTP envelope and the message,
within bounds; at end-of-message the core runs (:func:`evaluate`, then
:func:`decide`, then :func:`plan`) and the milter carries the plan out.  Each
transaction on a connection (MAIL FROM to end-of-message, or RSET) is
evaluated on its own.

Protocol negotiation (Sendmail milter protocol 6, as Postfix and Sendmail
8.14+ speak it): the DATA and unknown-command callbacks are not requested,
and no callback before end-of-message sends a reply (``@noreply``), so the
MTA streams the envelope, header fields and body without waiting for us.
Header values arrive with their leading whitespace (``header_leading_space``)
so the message is rebuilt byte for byte for DKIM.  The actions requested are
adding and changing header fields and quarantine.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import Milter

from .actions import MilterActions, plan, plan_unevaluated
from .config import Config
from .errors import InputError
from .evaluation import Envelope, Evaluation, evaluate
from .history.writer import HistoryWriter
from .message import Message
from .policy import Action, Decision, decide
from .report.guard import is_own_report
from .resolver import Resolver
from .upstream import UpstreamTrust, own_ids, upstream_results

log = logging.getLogger("dmarcmilter")
message_log = logging.getLogger("dmarcmilter.message")

# Bounds on what one transaction may make us keep.  Postfix's own limits
# (header_size_limit, message_size_limit) are far below these; they guard
# against an MTA configured without them.
MAX_HEADER_FIELDS = 10_000
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_RECIPIENTS = 1000

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
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

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
            tuple(ipaddress.ip_network(n, strict=False) for n in config.clients.trusted_networks),
        )


class MilterState:
    """Shared by every connection: the current runtime, the history writer,
    and the transactions in progress (for a graceful stop)."""

    def __init__(self, runtime: Runtime, writer: HistoryWriter | None) -> None:
        self.runtime = runtime
        self.writer = writer
        self.stopping = False
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

    @property
    def last_ticket(self) -> int:
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
    body: list[bytes] | None = None
    body_bytes: int = 0
    body_cut: bool = False


@Milter.header_leading_space
class DMARCMilter(Milter.Base):  # type: ignore[misc]
    """One MTA connection."""

    def __init__(self, state: MilterState) -> None:
        self.state = state
        self.runtime = state.runtime
        self.client_ip: str | None = None
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
        self.authserv_id = self.runtime.authserv_id or self.getsymval("j") or self.runtime.host_name
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
            authenticated=self.getsymval("{auth_authen}") or "",
            recipients=[],
            headers=[],
            body=[],
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
        if txn is None or txn.headers_cut:
            return CONTINUE
        size = len(name) + len(value) + 3
        if len(txn.headers) >= MAX_HEADER_FIELDS or txn.header_bytes + size > MAX_HEADER_BYTES:
            txn.headers_cut = True
            return CONTINUE
        txn.headers.append((name, value))
        txn.header_bytes += size
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        txn = self.txn
        if txn is None or txn.body is None:
            return CONTINUE
        txn.body_bytes += len(chunk)
        if txn.body_bytes > self.runtime.config.milter.max_body_bytes:
            # Past the limit nothing more is kept, and what was kept is let
            # go at once: memory stays bounded whatever the MTA sends.
            txn.body_cut = True
            txn.body = None
            return CONTINUE
        txn.body.append(chunk)
        return CONTINUE

    def eom(self) -> int:
        txn = self.txn
        if txn is None:
            return CONTINUE
        try:
            return self._end_of_message(txn)
        except Exception:
            # A bug must not stop mail: the message goes through unchanged
            # (the MTA's own checks still apply) and the log says why.
            log.exception("internal error on message %s; accepted unchanged", self._queue_id())
            return CONTINUE
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

    def _queue_id(self) -> str:
        return self.getsymval("i") or ""

    def _end_of_message(self, txn: _Transaction) -> int:
        started = time.perf_counter()
        runtime = self.runtime
        config = runtime.config
        queue_id = self._queue_id()
        # Ours at run time too: the name we write and the MTA's j name.
        owned = runtime.owned_ids | own_ids(self.authserv_id, self.getsymval("j"))
        lead = self._leading_space()
        # With leading whitespace negotiated a value is " text": Message
        # keeps those exact bytes for DKIM, the rest of the core wants text.
        headers = [(n, v.lstrip(" \t")) for n, v in txn.headers] if lead else txn.headers
        skip = self._skip_reason(txn)
        envelope = None
        if skip is None:
            try:
                envelope = Envelope.create(
                    self.client_ip or "", self.helo_name, txn.mail_from, txn.recipients, queue_id
                )
            except InputError:
                skip = "no_client_address"
        if skip is not None or envelope is None:
            actions = plan_unevaluated(headers, owned)
            code = self._apply(actions)
            message_log.info(
                "message",
                extra={
                    "fields": {
                        "queue_id": queue_id,
                        "client_ip": self.client_ip,
                        "skipped": skip,
                        "removed_ar": len(actions.remove) or None,
                        "action": "accept",
                        "elapsed_ms": (time.perf_counter() - started) * 1000,
                    }
                },
            )
            return code
        body = b"".join(txn.body or ())
        message = Message.from_parts(txn.headers, body, leading_space=lead)
        upstream = upstream_results(headers, runtime.upstream_trust, envelope, owned)
        evaluation = evaluate(
            envelope,
            message,
            runtime.resolver.session(),
            config,
            upstream=upstream,
            body_cut_at=config.milter.max_body_bytes if txn.body_cut else None,
        )
        decision = decide(evaluation, config.policy)
        actions = plan(evaluation, decision, headers, config, self.authserv_id, owned)
        own_report = is_own_report(headers, config)
        if self.state.writer is not None and not own_report:
            self.state.writer.enqueue(evaluation, decision)
        code = self._apply(actions)
        message_log.info(
            "message",
            extra={
                "fields": message_fields(
                    evaluation,
                    decision,
                    actions,
                    (time.perf_counter() - started) * 1000,
                    upstream=upstream.authserv_id if upstream else None,
                    body_cut=txn.body_cut,
                    headers_cut=txn.headers_cut,
                    own_report=own_report,
                )
            },
        )
        return code

    def _skip_reason(self, txn: _Transaction) -> str | None:
        clients = self.runtime.config.clients
        if clients.skip_authenticated and txn.authenticated:
            return "authenticated"
        if self.client_ip is None and not self.connected:
            self.client_ip = self._client_address()
        if self.client_ip is None:
            # Not an IP connection: local submission (Postfix's sendmail
            # command through non_smtpd_milters).
            return "local"
        try:
            address = ipaddress.ip_address(self.client_ip.partition("%")[0])
        except ValueError:
            return "no_client_address"
        if any(address in network for network in self.runtime.trusted_networks):
            return "trusted_network"
        return None

    def _client_address(self) -> str | None:
        """The client address from the connect macros, for a connection whose
        connect callback could not run: Postfix's ``{client_addr}``, or the
        address in ``_`` ("name [address]").  A message must not escape
        evaluation because a host name was not UTF-8."""
        address = self.getsymval("{client_addr}") or ""
        if not address:
            underscore = self.getsymval("_") or ""
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
        lead = " " if self._leading_space() else ""
        # Highest index first, so each deletion leaves the numbering of the
        # ones still to come alone.
        for name, index in sorted(actions.remove, key=lambda item: -item[1]):
            self.chgheader(name, index, None)
        for name, value in reversed(actions.prepend):
            self._insert_top(name, lead + value)
        for name, value in actions.append:
            self.addheader(name, lead + value)
        if actions.hold_reason is not None:
            self.quarantine(actions.hold_reason)
        if actions.verdict in (Action.REJECT, Action.TEMPFAIL) and actions.reply is not None:
            reply = actions.reply
            self.setreply(reply.code, reply.enhanced, reply.text)
            return REJECT if actions.verdict is Action.REJECT else TEMPFAIL
        return CONTINUE

    def _insert_top(self, name: str, value: str) -> None:
        try:
            self.addheader(name, value, 0)
        except Milter.error:
            # An MTA without smfi_insheader: at the end is still correct
            # for a receiver that reads every field.
            self.addheader(name, value)


def message_fields(
    evaluation: Evaluation,
    decision: Decision,
    actions: MilterActions,
    elapsed_ms: float,
    **extra: Any,
) -> dict[str, Any]:
    """The fields of the one log line per evaluated message."""
    env = evaluation.envelope
    dmarc = evaluation.dmarc
    dkim = ",".join(f"{s.result.value}:{s.domain or '-'}" for s in evaluation.dkim.signatures)
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
        "removed_ar": len(actions.remove) or None,
        "elapsed_ms": elapsed_ms,
    }
    for key, value in extra.items():
        if value:
            fields[key] = value
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
