"""The outbox: delivering stored reports, with retries and a per-destination
rate limit (RFC 9990 §3 report delivery; digest §6.3, §6.4).

Each stored report has one delivery row per destination, in published
order (RFC 9990 asks that every usable URI be tried).  A run sends every
delivery that is due: new, or retried with backoff after a temporary
failure, across runs (RFC 9990 lets a receiver cache and retry a failed
delivery).  Right before sending, the destination is verified (RFC 9990
"Verifying External Destinations", digest §6.4), so a revoked authorization
stops reports queued before it was revoked.  Every attempt is recorded.

The per-destination rate limit keeps a reporter from becoming a source of
unwanted mail to one domain, whatever its records ask for.  The suppression
list (:mod:`~dmarcmilter.report.suppression`) is asked before anything else,
DNS included: a suppressed destination gets no mail and no query, and its
delivery is settled as SUPPRESSED, not retried.  A relay refusing a
recipient for good counts as a hard bounce of that address, so a dead
destination suppresses itself after ``report.suppress_after_bounces``.  Nothing here
knows what a report holds: the caller composes the mail, so aggregate and
failure reports share this code.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from ..config import Config, ReportConfig
from ..discovery import Discoverer, DiscoveryMethod, load_psl
from ..errors import ConfigError, DatabaseError, InputError
from ..history.models import ReportAttemptRow, ReportDeliveryRow, ReportRow
from ..resolver import Resolver
from . import suppression
from .delivery import (
    DeliveryOutcome,
    DeliveryResult,
    SendmailTransport,
    SMTPSettings,
    SMTPTransport,
    Transport,
)
from .destinations import (
    Destination,
    ReportTag,
    VerificationStatus,
    parse_rua,
    verify_destination,
)

log = logging.getLogger(__name__)

REPORTS = cast(Table, ReportRow.__table__)
DELIVERIES = cast(Table, ReportDeliveryRow.__table__)
ATTEMPTS = cast(Table, ReportAttemptRow.__table__)

# The first retry waits this long; each later one twice as long, up to
# MAX_RETRY_DELAY.  A daily timer meets them at its next run anyway; an
# hourly one (the shipped timer) retries within the hour.
FIRST_RETRY_DELAY = dt.timedelta(minutes=15)
MAX_RETRY_DELAY = dt.timedelta(hours=6)
RATE_WINDOW = dt.timedelta(hours=1)
# Deliveries whose addresses are checked against the suppression list in
# one query.  Each address brings its domain and parent domains into the
# query, so this keeps the bound parameters well under every database's
# limit (SQLite 32766, PostgreSQL 65535); a longer queue takes more queries.
SUPPRESSION_BATCH = 200
# The random part of a report mail's Message-ID (models.ReportDeliveryRow
# .message_token): 16 bytes, 128 bits, which no one guesses in a lifetime
# of forged bounces.
MESSAGE_TOKEN_BYTES = 16

# Delivery states (report_deliveries.status).
PENDING = "pending"
SENT = "sent"
REFUSED = "refused"
FAILED = "failed"
# On the suppression list when it was due: never sent, never retried.
SUPPRESSED = "suppressed"


@dataclass
class DeliveryStats:
    """What the deliveries of a run came to."""

    sent: int = 0
    retry_later: int = 0
    failed: int = 0
    refused: int = 0
    rate_limited: int = 0
    suppressed: int = 0
    hard_bounces: int = 0  # recipients the relay refused for good
    # The six results above per report kind (reports.kind), for the
    # report metrics: kind -> field name -> count.
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    def results(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in DELIVERY_RESULTS)

    def count_kind(self, kind: str, before: tuple[int, ...]) -> None:
        counts = self.by_kind.setdefault(kind, dict.fromkeys(DELIVERY_RESULTS, 0))
        for name, was, now in zip(DELIVERY_RESULTS, before, self.results(), strict=True):
            counts[name] += now - was


# The DeliveryStats fields that count what became of a due delivery, one each.
DELIVERY_RESULTS = ("sent", "retry_later", "failed", "refused", "rate_limited", "suppressed")


@dataclass(frozen=True, slots=True)
class StoredReport:
    """A stored report, as the mail to one destination needs it."""

    report_id: str
    policy_domain: str
    period_begin: int
    period_end: int
    filename: str
    content: bytes
    kind: str = "aggregate"  # reports.kind: "aggregate" (RFC 9990) or "failure" (RFC 9991)
    # The delivery's secret token, for the Message-ID ("" for deliveries
    # queued before tokens existed: the old Message-ID form).
    message_token: str = ""


# Report kinds (reports.kind), and the DMARC tag that authorizes each one's
# destinations (RFC 9990 rua, RFC 9991 ruf).
AGGREGATE = "aggregate"
FAILURE = "failure"
KINDS = (AGGREGATE, FAILURE)
_TAG: dict[str, ReportTag] = {AGGREGATE: "rua", FAILURE: "ruf"}


# Builds the mail carrying a stored report to one address, at a time.  It
# raises ValueError for what a mail cannot carry.
Compose = Callable[[StoredReport, str, dt.datetime], bytes]


def new_message_token() -> str:
    """A delivery's secret: 128 random bits, as 32 hex digits (alphanumeric,
    as a Message-ID's id-left needs, and the width of the column)."""
    return secrets.token_hex(MESSAGE_TOKEN_BYTES)


def queue_deliveries(
    conn: Connection,
    report_pk: int,
    destinations: Sequence[Destination],
    now: dt.datetime,
    due: dt.datetime | None = None,
) -> None:
    """One pending delivery per destination of a report being stored, due
    at ``due`` (at once when None), each with its own secret Message-ID
    token; in the caller's transaction, so a report is never stored without
    them."""
    rows = [
        {
            "report_pk": report_pk,
            "position": position,
            "uri": destination.uri,
            "address": destination.address,
            "destination_domain": destination.host,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now if due is None else due,
            "sent_at": None,
            "detail": "",
            "message_token": new_message_token(),
        }
        for position, destination in enumerate(destinations)
    ]
    if rows:
        conn.execute(insert(DELIVERIES), rows)


def make_transport(report: ReportConfig) -> Transport:
    if report.transport == "sendmail":
        return SendmailTransport(report.sendmail_path)
    password = report.smtp_password or None
    if report.smtp_password_file:
        try:
            password = Path(report.smtp_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"report.smtp_password_file: cannot read {report.smtp_password_file}: "
                f"{exc.strerror or exc}"
            ) from None
    try:
        return SMTPTransport(
            SMTPSettings(
                host=report.smtp_host,
                port=report.smtp_port,
                starttls=report.smtp_starttls,
                username=report.smtp_username or None,
                password=password,
                timeout=report.smtp_timeout,
                verify_tls=report.smtp_verify_tls,
            )
        )
    except ConfigError as exc:
        raise ConfigError(f"[report] smtp_* settings: {exc}") from None


def retry_delay(attempts: int) -> dt.timedelta:
    """How long to wait before the next attempt, after ``attempts`` have
    been made: doubling from FIRST_RETRY_DELAY, capped at MAX_RETRY_DELAY."""
    factor: int = 2 ** (attempts - 1)  # int ** int is typed Any: it may be a float
    return min(FIRST_RETRY_DELAY * factor, MAX_RETRY_DELAY)


class DestinationRateLimit:
    """At most ``per_hour`` reports sent to one destination domain within
    RATE_WINDOW.  Counted from the delivery rows, so the limit holds across
    runs and across the hosts of a fleet; each domain is counted once per
    run and kept current as the run sends."""

    def __init__(self, engine: Engine, per_hour: int, clock: Callable[[], dt.datetime]) -> None:
        self.engine = engine
        self.per_hour = per_hour
        self.clock = clock
        self._sent: dict[str, int] = {}

    def allows(self, destination_domain: str) -> bool:
        return self._sent_recently(destination_domain) < self.per_hour

    def record(self, destination_domain: str) -> None:
        self._sent[destination_domain] = self._sent_recently(destination_domain) + 1

    def _sent_recently(self, destination_domain: str) -> int:
        if destination_domain not in self._sent:
            deliveries = DELIVERIES
            since = self.clock() - RATE_WINDOW
            with self.engine.connect() as conn:
                self._sent[destination_domain] = int(
                    conn.execute(
                        select(func.count())
                        .select_from(deliveries)
                        .where(
                            deliveries.c.destination_domain == destination_domain,
                            deliveries.c.sent_at > since,
                        )
                    ).scalar_one()
                )
        return self._sent[destination_domain]


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite and MySQL hand back the stored UTC wall-clock time, naive.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(kw_only=True)
class Outbox:
    """The deliveries of one run.  The transport is asked for only when a
    mail is to be sent, and the caller closes it; the resolver is made on
    first use when none is given."""

    config: Config
    engine: Engine
    from_address: str
    rate_limit_per_hour: int
    retry_for: dt.timedelta
    compose: Compose
    transport: Callable[[], Transport]
    resolver: Resolver | None
    clock: Callable[[], dt.datetime]
    host: str  # recorded with each attempt
    stats: DeliveryStats
    # Addresses found suppressed in this run, each logged once, with the
    # entry that suppresses it (hard bounces of this run add to it).
    _suppressed: dict[str, suppression.Suppression] = field(default_factory=dict, init=False)

    def deliver(
        self, renew: Callable[[], None] | None = None, kinds: Collection[str] = KINDS
    ) -> None:
        """Send every delivery of a report of ``kinds`` that is due;
        ``renew`` keeps the run's lease.  The aggregate and the failure
        phases of a run each pass their own kind, so the two never take up
        the same delivery.

        The suppression list is read for SUPPRESSION_BATCH deliveries at a
        time, right before they are sent; a database error there stops the
        run (DatabaseError) rather than send to a destination that may be
        suppressed."""
        deliveries = DELIVERIES
        now = self.clock()
        with self.engine.connect() as conn:
            due = conn.execute(
                select(deliveries.c.id, deliveries.c.address, REPORTS.c.kind)
                .join_from(deliveries, REPORTS, deliveries.c.report_pk == REPORTS.c.id)
                .where(
                    deliveries.c.status == PENDING,
                    deliveries.c.next_attempt_at <= now,
                    REPORTS.c.kind.in_(list(kinds)),
                )
                .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            ).all()
        limit = DestinationRateLimit(self.engine, self.rate_limit_per_hour, self.clock)
        for start in range(0, len(due), SUPPRESSION_BATCH):
            batch = due[start : start + SUPPRESSION_BATCH]
            listed = suppression.suppressed_by(
                self.engine, sorted({str(address) for _, address, _ in batch}), now=self.clock()
            )
            for delivery_id, address, kind in batch:
                if renew is not None:
                    renew()
                entry = self._suppressed.get(str(address).lower()) or listed.get(str(address))
                before = self.stats.results()
                try:
                    self._deliver_one(delivery_id, limit, entry)
                finally:
                    self.stats.count_kind(str(kind), before)

    def _deliver_one(
        self,
        delivery_id: int,
        limit: DestinationRateLimit,
        entry: suppression.Suppression | None,
    ) -> None:
        deliveries = DELIVERIES
        reports = REPORTS
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    deliveries.c.uri,
                    deliveries.c.address,
                    deliveries.c.destination_domain,
                    deliveries.c.attempts,
                    deliveries.c.message_token,
                    reports.c.kind,
                    reports.c.report_id,
                    reports.c.policy_domain,
                    reports.c.period_begin,
                    reports.c.period_end,
                    reports.c.filename,
                    reports.c.content,
                    reports.c.created_at,
                )
                .join_from(deliveries, reports, deliveries.c.report_pk == reports.c.id)
                .where(deliveries.c.id == delivery_id, deliveries.c.status == PENDING)
            ).first()
        if row is None:
            return  # settled meanwhile
        if entry is not None:
            # Before the rate limit and before DNS: a suppressed destination
            # costs nothing, and is not left due for a later run.
            self._suppress(delivery_id, row, row.address, entry)
            return
        if not limit.allows(row.destination_domain):
            # Left due: the next run sends it, once the hour has room.
            self.stats.rate_limited += 1
            return
        parsed, _ = parse_rua(row.uri, 1, _TAG.get(row.kind, "rua"))
        if not parsed:
            self._settle(delivery_id, row.attempts, FAILED, "refused", "unusable URI", None)
            self.stats.refused += 1
            return
        verification = verify_destination(
            row.policy_domain, parsed[0], self._discoverer(), _TAG.get(row.kind, "rua")
        )
        if verification.status is VerificationStatus.DEFERRED:
            self._retry(delivery_id, row, "deferred", verification.detail)
            return
        if verification.status is VerificationStatus.REFUSED or verification.destination is None:
            self._settle(delivery_id, row.attempts, REFUSED, "refused", verification.detail, None)
            self.stats.refused += 1
            return
        address = verification.destination.address
        if address != row.address:
            # An override of the verified destination, on the same host: a
            # domain entry covered it already, an address entry may not have.
            override_entry = self._suppressed.get(address.lower()) or suppression.is_suppressed(
                self.engine, address, now=self.clock()
            )
            if override_entry is not None:
                self._suppress(delivery_id, row, address, override_entry)
                return
        report = StoredReport(
            report_id=row.report_id,
            policy_domain=row.policy_domain,
            period_begin=row.period_begin,
            period_end=row.period_end,
            filename=row.filename,
            content=row.content,
            kind=row.kind,
            message_token=row.message_token or "",
        )
        try:
            message = self.compose(report, address, self.clock())
        except ValueError as exc:
            # parse_rua lets through only what the mail can carry; if
            # something still slips by, fail this delivery, not the run.
            detail = f"cannot build the report mail: {exc}"
            self._settle(delivery_id, row.attempts, FAILED, "permfail", detail, address)
            self.stats.failed += 1
            return
        result = self.transport().send(self.from_address, address, message)
        if result.outcome is DeliveryOutcome.SENT:
            self._settle(delivery_id, row.attempts, SENT, "sent", result.detail, address)
            limit.record(row.destination_domain)
            self.stats.sent += 1
        elif result.outcome is DeliveryOutcome.PERMFAIL:
            self._settle(delivery_id, row.attempts, FAILED, "permfail", result.detail, address)
            self.stats.failed += 1
            log.warning("report %s to %s failed: %s", row.report_id, address, result.detail)
            if result.recipient_refused:
                self._hard_bounce(address, result)
        else:
            self._retry(delivery_id, row, "tempfail", result.detail)

    def _suppress(
        self, delivery_id: int, row: Any, address: str, entry: suppression.Suppression
    ) -> None:
        """Settle a delivery to a suppressed address: not sent, not retried."""
        expires = entry.expires_at.isoformat() if entry.expires_at is not None else "never"
        detail = f"suppressed by {entry.target} ({entry.source.value}, expires {expires})"
        if entry.reason:
            detail += f": {entry.reason}"
        self._settle(delivery_id, row.attempts, SUPPRESSED, "suppressed", detail, address)
        self.stats.suppressed += 1
        key = address.lower()
        if key not in self._suppressed:
            self._suppressed[key] = entry
            log.info("reports to %s are suppressed: %s", address, detail)

    def _hard_bounce(self, address: str, result: DeliveryResult) -> None:
        """Count a relay's permanent refusal of ``address``; once that
        suppresses it, the rest of this run skips it too."""
        self.stats.hard_bounces += 1
        try:
            entry = suppression.record_hard_bounce(
                self.engine,
                address,
                f"refused by the smarthost: {result.detail}",
                suppression.BounceRule.from_config(self.config),
                source=suppression.SuppressionSource.SMARTHOST,
                now=self.clock(),
            )
        except (DatabaseError, InputError) as exc:
            # The delivery is settled already; the next refusal counts again.
            log.warning("cannot count the hard bounce of %s: %s", address, exc)
            return
        if entry.active(self.clock()):
            self._suppressed.setdefault(address.lower(), entry)
            log.info(
                "reports to %s suppressed after %d hard bounces, until %s",
                address,
                entry.bounces,
                entry.expires_at.isoformat() if entry.expires_at is not None else "never",
            )

    def _discoverer(self) -> Discoverer:
        if self.resolver is None:
            from ..evaluation import resolver_from_config

            self.resolver = resolver_from_config(self.config)
        method = DiscoveryMethod(self.config.dmarc.discovery_method)
        psl = (
            load_psl(self.config.dmarc.psl_file or None) if method is DiscoveryMethod.PSL else None
        )
        return Discoverer(self.resolver.session(), method, psl)

    def _retry(self, delivery_id: int, row: Any, result: str, detail: str) -> None:
        now = self.clock()
        attempts = row.attempts + 1
        if now - _aware(row.created_at) >= self.retry_for:
            self._settle(delivery_id, row.attempts, FAILED, result, f"gave up: {detail}", None)
            self.stats.failed += 1
            log.warning(
                "report %s: giving up after %d attempts: %s", row.report_id, attempts, detail
            )
            return
        delay = retry_delay(attempts)
        deliveries = DELIVERIES
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(attempts=attempts, next_attempt_at=now + delay, detail=detail)
            )
            self._attempt(conn, delivery_id, now, result, detail)
        self.stats.retry_later += 1

    def _settle(
        self,
        delivery_id: int,
        attempts: int,
        status: str,
        result: str,
        detail: str,
        address: str | None,
    ) -> None:
        now = self.clock()
        values: dict[str, Any] = {"status": status, "attempts": attempts + 1, "detail": detail}
        if status == SENT:
            values["sent_at"] = now
        if address is not None:
            values["address"] = address
        deliveries = DELIVERIES
        with self.engine.begin() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(**values))
            self._attempt(conn, delivery_id, now, result, detail)

    def _attempt(
        self, conn: Connection, delivery_id: int, now: dt.datetime, result: str, detail: str
    ) -> None:
        conn.execute(
            insert(ATTEMPTS).values(
                delivery_id=delivery_id,
                attempted_at=now,
                result=result,
                detail=detail,
                host=self.host,
            )
        )


__all__ = [
    "AGGREGATE",
    "DELIVERY_RESULTS",
    "FAILURE",
    "FIRST_RETRY_DELAY",
    "KINDS",
    "MAX_RETRY_DELAY",
    "MESSAGE_TOKEN_BYTES",
    "RATE_WINDOW",
    "SUPPRESSED",
    "SUPPRESSION_BATCH",
    "Compose",
    "DeliveryStats",
    "DestinationRateLimit",
    "Outbox",
    "StoredReport",
    "make_transport",
    "new_message_token",
    "queue_deliveries",
    "retry_delay",
]
