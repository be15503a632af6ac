"""Reading the history store for aggregate reports (RFC 9990 §2.1).

:func:`report_records` returns one :class:`ReportRecord` per RFC 9990
``record`` element: messages for one policy domain in one period, grouped by
the published policy, the source IP, the evaluated policy, the identifiers
and the authentication results, with their count.  The grouping happens in
the database, over the ``messages`` table alone (its ``dkim_summary`` and
``reasons_summary`` columns exist for this query), and the groups are
streamed, so a day of messages is never loaded into Python.
:func:`policy_domains` lists the domains to report on and
:func:`record_errors` the problems found in their DMARC records (the
report's ``error`` elements).

Periods are half-open, ``[begin, end)``, in UTC, so consecutive daily
periods never count a message twice.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, UnaryExpression, and_, exists, func, or_, select
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute

from ..errors import DatabaseError
from .db import short_error
from .models import LateMessageRow, MessageRow

T = TypeVar("T")

# Rows fetched per round trip; the grouped rows are few compared with the
# messages, so this bounds memory, not the work the database does.
BATCH_SIZE = 1000


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    """RFC 9990 ``policy_published``: the DMARC record as evaluated."""

    domain: str  # the DMARC Policy Domain
    discovery_method: str | None
    p: str | None
    sp: str | None
    np: str | None
    adkim: str | None
    aspf: str | None
    testing: str | None
    fo: str | None
    psd: str | None
    pct: int | None  # RFC 7489's pct, kept for reports in the old format
    rua: str  # the aggregate report URIs, comma-joined ("" for none)


@dataclass(frozen=True, slots=True)
class DKIMAuthResult:
    """RFC 9990 ``auth_results/dkim``."""

    domain: str
    selector: str
    result: str


@dataclass(frozen=True, slots=True)
class SPFAuthResult:
    """RFC 9990 ``auth_results/spf``."""

    domain: str
    scope: str
    result: str


@dataclass(frozen=True, slots=True)
class PolicyOverrideReason:
    """RFC 9990 ``policy_evaluated/reason``."""

    type: str
    comment: str


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """One RFC 9990 ``record``: ``row``, ``identifiers`` and ``auth_results``
    for ``count`` messages, and the published policy they were evaluated
    under (a report holds one policy configuration)."""

    source_ip: str
    count: int
    disposition: str
    dkim: str  # "pass" or "fail": the DMARC-aligned DKIM outcome
    spf: str  # "pass" or "fail": the DMARC-aligned SPF outcome
    reasons: tuple[PolicyOverrideReason, ...]
    header_from: str
    envelope_from: str | None  # "" for the null reverse-path, None when unknown
    envelope_to: str | None
    dkim_results: tuple[DKIMAuthResult, ...]  # in report order
    spf_result: SPFAuthResult
    policy: PublishedPolicy


# A report run claims late rows before it builds the report that counts
# them, and the claim becomes final in the transaction that stores it.  Until
# then the claim is "pending": the final claim with its first character
# replaced by PENDING_CLAIM_PREFIX, which no final claim (hex digits) starts
# with, so the rows of a run that died in between are found and claimed again.
PENDING_CLAIM_PREFIX = "p"


def pending_claim(final: str) -> str:
    return PENDING_CLAIM_PREFIX + final[1:]


def claim_is_pending(column: Any) -> ColumnElement[bool]:
    """A range rather than LIKE: every database reads it from the index."""
    return and_(column >= PENDING_CLAIM_PREFIX, column < chr(ord(PENDING_CLAIM_PREFIX) + 1))


def claimable(column: Any) -> ColumnElement[bool]:
    """A late row that no stored report has claimed."""
    return or_(column.is_(None), claim_is_pending(column))


@dataclass(frozen=True, slots=True)
class LateRows:
    """Which late rows (``late_messages``: written after their day ended) a
    report counts.  Every other row of the period is counted by the first
    report alone, and a late row by the one report whose claim it carries,
    so across all reports of a period each message is counted once.

    ``claim`` None counts the late rows no stored report has claimed (a dry
    run's view, which claims nothing); ``only`` counts the claimed late rows alone (a supplementary
    report) instead of adding them to the rest.
    """

    claim: str | None
    only: bool = False


# Policy columns lead the sort so that each published-policy configuration
# comes out as one run of records: one report per configuration.
_POLICY_COLUMNS = (
    MessageRow.discovery_method,
    MessageRow.p,
    MessageRow.sp,
    MessageRow.np,
    MessageRow.adkim,
    MessageRow.aspf,
    MessageRow.testing,
    MessageRow.fo,
    MessageRow.psd,
    MessageRow.pct,
    MessageRow.rua,
)


def report_records(
    engine: Engine | Connection,
    policy_domain: str,
    begin: dt.datetime,
    end: dt.datetime,
    *,
    include_envelope_to: bool = False,
    batch_size: int = BATCH_SIZE,
    late: LateRows | None = None,
) -> Iterator[ReportRecord]:
    """The report records of ``policy_domain`` for messages that arrived in
    ``[begin, end)``, grouped by published policy first.

    ``begin`` and ``end`` must be aware datetimes.  The arguments are checked
    at once (ValueError); the query runs when iteration starts, so
    :class:`DatabaseError` comes from the iterator.  With
    ``include_envelope_to``, messages to different recipient domains make
    different records.  With ``late`` None every message of the period
    counts (the query as it is when the period has no late rows); otherwise
    late rows count as :class:`LateRows` says.
    """
    query = _report_query(engine, policy_domain, begin, end, include_envelope_to, late)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    record = functools.partial(_record, policy_domain, include_envelope_to)
    return _stream(engine, query, batch_size, record, f"the report records of {policy_domain}")


def policy_domains(engine: Engine, begin: dt.datetime, end: dt.datetime) -> Iterator[str]:
    """The policy domains, sorted, of messages that arrived in ``[begin, end)``
    under a DMARC record asking for aggregate reports (a non-empty ``rua``)."""
    query = (
        select(MessageRow.policy_domain)
        .where(
            *_window(begin, end),
            MessageRow.policy_domain.is_not(None),
            MessageRow.rua.is_not(None),
            MessageRow.rua != "",
        )
        .distinct()
        .order_by(MessageRow.policy_domain)
    )
    return _stream(engine, query, BATCH_SIZE, _first, "the policy domains")


def record_errors(
    engine: Engine | Connection,
    policy_domain: str,
    begin: dt.datetime,
    end: dt.datetime,
    late: LateRows | None = None,
) -> list[str]:
    """The distinct problems, sorted, found in the DMARC records of
    ``policy_domain`` evaluated for messages that arrived in ``[begin, end)``."""
    query = (
        select(MessageRow.record_errors)
        .where(
            MessageRow.policy_domain == policy_domain,
            *_window(begin, end),
            *_late_filter(late),
            MessageRow.record_errors.is_not(None),
            MessageRow.record_errors != "",
        )
        .distinct()
    )
    stored = _stream(engine, query, BATCH_SIZE, _first, f"the record errors of {policy_domain}")
    # The column joins a record's problems with newlines; records with some
    # problems in common are distinct rows, so deduplicate line by line.
    return sorted({line for text in stored for line in text.splitlines() if line.strip()})


def arrival_window(begin: dt.datetime, end: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    """Messages that arrived in ``[begin, end)``, as WHERE conditions."""
    return _window(begin, end)


def _window(begin: dt.datetime, end: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    for name, value in (("begin", begin), ("end", end)):
        if value.utcoffset() is None:
            # A naive time is ambiguous, and SQLite would compare it as
            # written against times stored in UTC.
            raise ValueError(f"{name} must be an aware datetime, not {value.isoformat()}")
    # SQLite keeps the wall-clock text and drops the offset, and the writer
    # stores UTC: compare in UTC.
    begin, end = begin.astimezone(dt.UTC), end.astimezone(dt.UTC)
    if end <= begin:
        raise ValueError(f"empty period: end {end.isoformat()} is not after {begin.isoformat()}")
    return MessageRow.arrived_at >= begin, MessageRow.arrived_at < end


def _late_filter(late: LateRows | None) -> tuple[ColumnElement[bool], ...]:
    if late is None:
        return ()
    claimed = LateMessageRow.message_pk == MessageRow.id
    if late.only:
        return (exists().where(claimed, LateMessageRow.claim == late.claim),)
    if late.claim is None:
        not_counted = ~claimable(LateMessageRow.claim)
    else:
        not_counted = or_(LateMessageRow.claim.is_(None), LateMessageRow.claim != late.claim)
    return (~exists().where(claimed, not_counted),)


def _report_query(
    engine: Engine | Connection,
    policy_domain: str,
    begin: dt.datetime,
    end: dt.datetime,
    include_envelope_to: bool,
    late: LateRows | None = None,
) -> Select[Any]:
    # Group by the one-column digest of everything that makes a record
    # (rows.record_key): the database sorts a million short keys read from
    # the index instead of a million 22-column rows.  One message of each
    # group, the first stored, supplies the columns.
    keys: list[InstrumentedAttribute[Any]] = [MessageRow.record_key]
    envelope_to: list[InstrumentedAttribute[Any]] = []
    if include_envelope_to:
        envelope_to = [MessageRow.envelope_to_domain]
    groups = (
        select(func.min(MessageRow.id).label("id"), func.count().label("message_count"))
        .where(MessageRow.policy_domain == policy_domain, *_window(begin, end), *_late_filter(late))
        .group_by(*keys, *envelope_to)
        .subquery("groups")
    )
    columns: list[InstrumentedAttribute[Any]] = [
        *_POLICY_COLUMNS,
        MessageRow.client_ip,
        MessageRow.disposition,
        MessageRow.dkim_aligned,
        MessageRow.spf_aligned,
        MessageRow.reasons_summary,
        MessageRow.header_from_domain,
        MessageRow.envelope_from_domain,
        *envelope_to,
        MessageRow.dkim_summary,
        MessageRow.spf_domain,
        MessageRow.spf_scope,
        MessageRow.spf_result,
    ]
    return (
        select(*columns, groups.c.message_count)
        .join_from(MessageRow, groups, MessageRow.id == groups.c.id)
        .order_by(*(_ascending(engine, key) for key in columns))
    )


def _ascending(
    engine: Engine | Connection, key: InstrumentedAttribute[Any]
) -> UnaryExpression[Any]:
    # The same history must give the records in the same order everywhere.
    # PostgreSQL alone puts NULLs last in ascending order, and MySQL has no
    # NULLS FIRST syntax, so ask for it only where it changes something.
    if engine.dialect.name == "postgresql":
        return key.asc().nulls_first()
    return key.asc()


def _stream(
    engine: Engine | Connection,
    query: Select[Any],
    batch_size: int,
    convert: Callable[[Row[Any]], T],
    what: str,
) -> Iterator[T]:
    """The rows of ``query``; on a connection given (a caller's snapshot,
    left open), or on one of the engine's."""
    try:
        if isinstance(engine, Connection):
            yield from _rows(engine, query, batch_size, convert)
        else:
            with engine.connect() as conn:
                yield from _rows(conn, query, batch_size, convert)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read {what}: {short_error(exc)}") from None


def _rows(
    conn: Connection, query: Select[Any], batch_size: int, convert: Callable[[Row[Any]], T]
) -> Iterator[T]:
    # A server-side cursor on PostgreSQL; pysqlite steps through the
    # result as it is fetched anyway.
    streaming = conn.execution_options(stream_results=True, yield_per=batch_size)
    # Closed explicitly, so a caller that stops early (or an error) does
    # not leave the server-side cursor to the garbage collector.
    with streaming.execute(query) as result:
        for row in result:
            yield convert(row)


def _first(row: Row[Any]) -> Any:
    return row[0]


def _record(policy_domain: str, include_envelope_to: bool, row: Row[Any]) -> ReportRecord:
    return ReportRecord(
        source_ip=row.client_ip,
        count=row.message_count,
        disposition=row.disposition,
        dkim="pass" if row.dkim_aligned else "fail",
        spf="pass" if row.spf_aligned else "fail",
        reasons=_reasons(row.reasons_summary),
        # Never NULL here: a policy domain is only found from an author
        # domain.  "" would stand for one in the (required) element.
        header_from=row.header_from_domain or "",
        envelope_from=row.envelope_from_domain,
        envelope_to=row.envelope_to_domain if include_envelope_to else None,
        dkim_results=_dkim_results(row.dkim_summary),
        spf_result=SPFAuthResult(row.spf_domain, row.spf_scope, row.spf_result),
        policy=_policy(
            policy_domain,
            row.discovery_method,
            row.p,
            row.sp,
            row.np,
            row.adkim,
            row.aspf,
            row.testing,
            row.fo,
            row.psd,
            row.pct,
            row.rua or "",
        ),
    )


# The same few summaries and configurations recur across thousands of
# records: decode each once, and share the (immutable) results.
@functools.lru_cache(maxsize=1024)
def _policy(domain: str, *values: Any) -> PublishedPolicy:
    return PublishedPolicy(domain, *values)


@functools.lru_cache(maxsize=4096)
def _dkim_results(summary: str) -> tuple[DKIMAuthResult, ...]:
    return tuple(DKIMAuthResult(*item) for item in _decode(summary, 3, "dkim_summary"))


@functools.lru_cache(maxsize=1024)
def _reasons(summary: str) -> tuple[PolicyOverrideReason, ...]:
    return tuple(PolicyOverrideReason(*item) for item in _decode(summary, 2, "reasons_summary"))


def _decode(summary: str, width: int, column: str) -> list[list[str]]:
    try:
        items = json.loads(summary)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(
        isinstance(item, list)
        and len(item) == width
        and all(isinstance(part, str) for part in item)
        for item in items
    ):
        # Only the writer stores summaries; a report built from a damaged
        # one would be wrong, so refuse it like an unreadable database.
        raise DatabaseError(f"malformed {column} in the history: {summary[:80]!r}")
    return items
