"""Late rows: messages that reached the history after their day's report
may have been made, each reported exactly once (RFC 9990 §2.1: a report
covers the messages of its period; digest §6.1).

The writer marks a message row written after the end of the UTC day it
arrived in with a ``late_messages`` row, in the same transaction.  Every
other row of a period is counted by the period's first report (sequence 0)
alone.  A late row is counted by the one report whose claim it carries:

* Before the first report of a domain's period is built, the run claims the
  late rows of that domain and period visible then; the report counts the
  other rows and those.  A late row committed after the claim is not
  counted, and waits for a supplementary report.  A domain with no late
  rows gets the plain query, read on the snapshot (:func:`snapshot`) on
  which it was found to have none.
* After the first reports, every run claims the unclaimed late rows of every period that has a
  stored first report, and makes a supplementary report (sequence n+1, its
  own report_id) that counts those rows alone.

A claim is written pending and becomes final in the transaction that
stores the report (:func:`dmarcmilter.report.aggregate.store_reports`), so
the rows of a run that died in between are claimed again by the next run,
and a final claim is never taken again: no message is counted twice, and
none is dropped.  Runs never overlap (the fleet lease), so a pending claim
is always a dead run's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from sqlalchemy import ColumnElement, Select, Table, exists, func, select, update
from sqlalchemy.engine import Connection, Engine

from ..history.models import LateMessageRow, MessageRow, ReportRow
from ..history.reader import arrival_window, claim_is_pending, claimable, pending_claim
from .period import Period
from .xml import ReportFormat

LATE = cast(Table, LateMessageRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)

# (policy domain, period) pairs given a supplementary report in one run;
# past it the rest wait, claimed by nothing, for the next run.
MAX_SUPPLEMENTS_PER_RUN = 1000


@dataclass(frozen=True, slots=True)
class Claim:
    """The late rows one report run takes: ``pending`` while it builds,
    ``final`` once its reports are stored."""

    final: str

    @property
    def pending(self) -> str:
        return pending_claim(self.final)

    @classmethod
    def for_reports(
        cls, submitter: str, policy_domain: str, period: Period, fmt: ReportFormat, sequence: int
    ) -> Claim:
        """One claim per domain, period, format and sequence: 32 hex
        digits, the width of ``late_messages.claim``."""
        key = repr((submitter, policy_domain, period.begin_ts, period.end_ts, fmt.value, sequence))
        return cls(
            hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        )


@dataclass(frozen=True, slots=True)
class Supplement:
    """A stored period of a domain with late rows no report has counted."""

    policy_domain: str
    period: Period
    sequence: int  # the supplementary report's: one more than the last stored


def _claimable_rows() -> Select[tuple[int]]:
    return select(LATE.c.message_pk).where(claimable(LATE.c.claim))


def _of(policy_domain: str, period: Period) -> tuple[ColumnElement[bool], ...]:
    return (
        MessageRow.id == LATE.c.message_pk,
        MessageRow.policy_domain == policy_domain,
        *arrival_window(period.begin, period.end),
    )


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose every query sees the database as it was at the
    first one, and writes nothing.

    The first reports of the domains with no late rows are built on it, with
    the plain query, after :func:`domains_with_late_rows` was asked on it:
    a late row committed meanwhile is then in neither, so that report cannot
    count it, and it waits, unclaimed, for a supplementary report.  Read on
    a fresh connection, it would be counted there and again later.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite starts no transaction for a SELECT; in WAL mode an
            # open read transaction is a snapshot, and writers go on.
            conn.exec_driver_sql("BEGIN")
        else:
            conn.execution_options(isolation_level="REPEATABLE READ")
        try:
            yield conn
        finally:
            conn.rollback()


def domains_with_late_rows(engine: Engine | Connection, period: Period) -> set[str]:
    """The policy domains with late rows in ``period`` that no stored report
    has claimed: one query per run, read from the claim index, so a domain
    without any pays nothing and its report query stays as it was."""
    query = (
        select(MessageRow.policy_domain)
        .where(
            # IN, not a join: SQLite (no statistics) would otherwise walk
            # the period's messages rather than the few late rows.
            MessageRow.id.in_(_claimable_rows()),
            MessageRow.policy_domain.is_not(None),
            *arrival_window(period.begin, period.end),
        )
        .distinct()
    )
    if isinstance(engine, Connection):
        return {str(name) for name in engine.execute(query).scalars()}
    with engine.connect() as conn:
        return {str(name) for name in conn.execute(query).scalars()}


def claim(engine: Engine, policy_domain: str, period: Period, taken: Claim) -> bool:
    """Claim (pending) the late rows of ``policy_domain`` in ``period`` that
    no stored report has claimed, and commit; whether there are any now."""
    with engine.begin() as conn:
        conn.execute(
            update(LATE)
            .where(claimable(LATE.c.claim), exists().where(*_of(policy_domain, period)))
            .values(claim=taken.pending)
        )
        found = conn.execute(
            select(LATE.c.message_pk).where(LATE.c.claim == taken.pending).limit(1)
        ).first()
    return found is not None


def finish(conn: Connection, taken: Claim) -> None:
    """Make a claim final, in the transaction that stores its reports."""
    conn.execute(update(LATE).where(LATE.c.claim == taken.pending).values(claim=taken.final))


def release(engine: Engine, taken: Claim) -> None:
    """Give the rows of a claim that made no report back, unclaimed."""
    with engine.begin() as conn:
        conn.execute(update(LATE).where(LATE.c.claim == taken.pending).values(claim=None))


def supplements(engine: Engine, domain: str | None = None) -> list[Supplement]:
    """Every stored period (first report made) of a domain that has late
    rows no report has claimed, oldest first, at most
    MAX_SUPPLEMENTS_PER_RUN.

    Late rows of periods never reported at all are not here: the first
    report of their period counts them, if a run is asked for it.
    """
    low = func.min(MessageRow.arrived_at, type_=MessageRow.arrived_at.type)
    high = func.max(MessageRow.arrived_at, type_=MessageRow.arrived_at.type)
    query = (
        select(MessageRow.policy_domain, low, high)
        .where(
            MessageRow.id.in_(_claimable_rows()),
            MessageRow.policy_domain.is_not(None),
            # Only rows a report can count: their record asked for reports.
            MessageRow.rua.is_not(None),
            MessageRow.rua != "",
        )
        .group_by(MessageRow.policy_domain)
        .order_by(MessageRow.policy_domain)
    )
    if domain is not None:
        query = query.where(MessageRow.policy_domain == domain)
    found: list[Supplement] = []
    with engine.connect() as conn:
        spans = conn.execute(query).all()
        for name, first, last in spans:
            stored = conn.execute(
                select(REPORTS.c.period_begin, REPORTS.c.period_end, func.max(REPORTS.c.sequence))
                .where(
                    REPORTS.c.kind == "aggregate",
                    REPORTS.c.policy_domain == name,
                    REPORTS.c.period_begin <= int(_aware(last).timestamp()),
                    REPORTS.c.period_end >= int(_aware(first).timestamp()),
                )
                .group_by(REPORTS.c.period_begin, REPORTS.c.period_end)
                .order_by(REPORTS.c.period_begin, REPORTS.c.period_end)
            ).all()
            for begin, end, sequence in stored:
                period = Period(_at(begin), _at(end + 1))
                found.append(Supplement(str(name), period, int(sequence) + 1))
                if len(found) >= MAX_SUPPLEMENTS_PER_RUN:
                    return found
    return found


def pending_claims(engine: Engine) -> int:
    """Late rows claimed by a run that stored nothing yet (a test's view)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(LATE).where(claim_is_pending(LATE.c.claim))
            ).scalar_one()
        )


def _at(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite and MySQL hand back the stored UTC wall-clock time, naive.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


__all__ = [
    "MAX_SUPPLEMENTS_PER_RUN",
    "Claim",
    "Supplement",
    "claim",
    "domains_with_late_rows",
    "finish",
    "pending_claims",
    "release",
    "snapshot",
    "supplements",
]
