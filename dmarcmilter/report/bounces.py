"""Bounce-driven suppression, the checking side (RFC 3464 delivery status
notifications; digest §6.3, §6.4).

The milter records each hard bounce named in a delivery status notification
to the report address as a ``report_bounces`` row, and does nothing else
with it.  Each report run checks the rows not yet processed: a bounce counts
towards suppressing its address (:func:`dmarcmilter.report.suppression.
record_hard_bounce`) only when it names one of our report mails by its
whole Message-ID, ``<report-id.token@submitter>``, and the address that
mail was sent to.

Why a forged bounce cannot suppress anything: the report id alone is worked
out from public data (it is stable, digest §6.1), but the token is 128
random bits made for each delivery and written only into the mail to that
destination.  A bounce that names it was made by someone who saw that
mail: its destination, or a relay on the way there.  The address must be
that delivery's own, so the destination's side can only suppress itself.
A bounce naming a mail with no token (queued before tokens existed), a
wrong token or none, or another address, counts for nothing.  Each
delivery counts at most one bounce, so a duplicated notification, or a
notification replayed, counts once.

Outcomes (``report_bounces.outcome``): ``counted``; ``unknown`` (not our
mail: no such report, no token, wrong token, another submitter);
``mismatch`` (our mail, another address); ``duplicate`` (that delivery's
bounce was counted before).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.engine import Engine

from ..config import Config
from ..errors import DatabaseError, InputError
from ..history.models import ReportAttemptRow, ReportBounceRow, ReportDeliveryRow, ReportRow
from . import suppression

log = logging.getLogger(__name__)

BOUNCES = cast(Table, ReportBounceRow.__table__)
DELIVERIES = cast(Table, ReportDeliveryRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)
ATTEMPTS = cast(Table, ReportAttemptRow.__table__)

# Bounce rows checked in one run, oldest first; past it the rest wait for
# the next run (the shipped cron job runs hourly), and the run says so.
MAX_BOUNCES_PER_RUN = 10_000
# A delivery's attempt row for a bounce counted against it: the delivery's
# history shows it, and a second bounce of the same delivery finds it.
BOUNCED = "bounced"

COUNTED = "counted"
UNKNOWN = "unknown"
MISMATCH = "mismatch"
DUPLICATE = "duplicate"

# report_message_id's form with a token: report id and token alphanumeric.
_MESSAGE_ID = re.compile(r"\s*<([A-Za-z0-9]{1,64})\.([A-Za-z0-9]{1,64})@([^<>@\s]{1,255})>\s*")


@dataclass
class BounceStats:
    """What the bounce check of a run came to."""

    bounces_counted: int = 0
    bounces_unknown: int = 0
    bounces_mismatch: int = 0
    bounces_duplicate: int = 0
    bounces_left: bool = False  # MAX_BOUNCES_PER_RUN reached: more wait


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str
    detail: str
    delivery_id: int | None = None
    address: str | None = None  # the delivery's own, when counted


def process(
    engine: Engine,
    config: Config,
    submitter: str,
    clock: Callable[[], dt.datetime],
    stats: BounceStats,
    limit: int = MAX_BOUNCES_PER_RUN,
) -> None:
    """Check up to ``limit`` unprocessed bounces, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                BOUNCES.c.id,
                BOUNCES.c.original_message_id,
                BOUNCES.c.address,
                BOUNCES.c.status,
                BOUNCES.c.diagnostic,
                BOUNCES.c.reporting_mta,
            )
            .where(BOUNCES.c.processed_at.is_(None))
            .order_by(BOUNCES.c.id)
            .limit(limit + 1)
        ).all()
    if len(rows) > limit:
        rows = rows[:limit]
        stats.bounces_left = True
        log.warning("more than %d bounces to check: the rest wait for the next run", limit)
    if not rows:
        return
    rule = suppression.BounceRule.from_config(config)
    for row in rows:
        verdict = check(engine, submitter, row.original_message_id, row.address)
        if not _settle(engine, row.id, verdict, clock()):
            continue  # the other phase's run (its own lease) took it first
        log.info(
            "bounce %d of %s for %s: %s (%s)",
            row.id,
            _short(row.original_message_id),
            _short(row.address),
            verdict.outcome,
            verdict.detail,
        )
        if verdict.outcome == COUNTED:
            stats.bounces_counted += 1
            assert verdict.address is not None
            _count(engine, verdict.address, row, rule, clock())
        elif verdict.outcome == MISMATCH:
            stats.bounces_mismatch += 1
        elif verdict.outcome == DUPLICATE:
            stats.bounces_duplicate += 1
        else:
            stats.bounces_unknown += 1


def check(engine: Engine, submitter: str, message_id: str, address: str) -> Verdict:
    """What a bounce of ``message_id`` for ``address`` is (pure of writes)."""
    match = _MESSAGE_ID.fullmatch(message_id or "")
    if match is None:
        return Verdict(UNKNOWN, "not the Message-ID of a report mail with a token")
    report_id, token, host = match.groups()
    if host.lower().rstrip(".") != submitter.lower().rstrip("."):
        return Verdict(UNKNOWN, "another submitter")
    with engine.connect() as conn:
        deliveries = conn.execute(
            select(DELIVERIES.c.id, DELIVERIES.c.address, DELIVERIES.c.message_token)
            .join_from(DELIVERIES, REPORTS, DELIVERIES.c.report_pk == REPORTS.c.id)
            .where(REPORTS.c.report_id == report_id)
        ).all()
        # Compared here, in constant time, rather than in the WHERE clause.
        found = [
            d
            for d in deliveries
            if d.message_token is not None
            and hmac.compare_digest(str(d.message_token).encode(), token.encode())
        ]
        if not found:
            return Verdict(UNKNOWN, "no delivery of ours has that Message-ID")
        delivery = found[0]
        if str(delivery.address).lower() != (address or "").strip().lower():
            return Verdict(MISMATCH, "that report mail went to another address", delivery.id)
        counted = conn.execute(
            select(ATTEMPTS.c.id)
            .where(ATTEMPTS.c.delivery_id == delivery.id, ATTEMPTS.c.result == BOUNCED)
            .limit(1)
        ).first()
    if counted is not None:
        return Verdict(DUPLICATE, "a bounce of that report mail was counted before", delivery.id)
    return Verdict(COUNTED, "a hard bounce of our report mail", delivery.id, delivery.address)


def _settle(engine: Engine, bounce_id: int, verdict: Verdict, now: dt.datetime) -> bool:
    """Mark the bounce processed, and a counted one on its delivery, in one
    transaction, before it is counted: a run that dies in between loses
    that count rather than count it twice.  False when another run marked
    it first (the aggregate and failure phases check bounces under
    different leases, so two runs can meet here)."""
    with engine.begin() as conn:
        marked = conn.execute(
            update(BOUNCES)
            .where(BOUNCES.c.id == bounce_id, BOUNCES.c.processed_at.is_(None))
            .values(processed_at=now, outcome=verdict.outcome)
        )
        if marked.rowcount != 1:
            return False
        if verdict.outcome == COUNTED:
            conn.execute(
                insert(ATTEMPTS).values(
                    delivery_id=verdict.delivery_id,
                    attempted_at=now,
                    result=BOUNCED,
                    detail=f"hard bounce {bounce_id} counted",
                    host="",
                )
            )
    return True


def _count(
    engine: Engine, address: str, row: Any, rule: suppression.BounceRule, now: dt.datetime
) -> None:
    reason = f"bounced: {row.status} from {row.reporting_mta or 'an unnamed MTA'}"
    if row.diagnostic:
        reason += f": {row.diagnostic}"
    try:
        entry = suppression.record_hard_bounce(
            engine, address, reason, rule, source=suppression.SuppressionSource.BOUNCE, now=now
        )
    except (DatabaseError, InputError) as exc:
        log.warning("cannot count the bounce of %s: %s", address, exc)
        return
    if entry.active(now):
        log.info(
            "reports to %s suppressed after %d hard bounces, until %s",
            address,
            entry.bounces,
            entry.expires_at.isoformat() if entry.expires_at is not None else "never",
        )


def _short(value: str | None) -> str:
    text = repr(value or "")
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = [
    "BOUNCED",
    "COUNTED",
    "DUPLICATE",
    "MAX_BOUNCES_PER_RUN",
    "MISMATCH",
    "UNKNOWN",
    "BounceStats",
    "Verdict",
    "check",
    "process",
]
