"""Aggregate reports, built and stored (RFC 9990 §2, §3; digest §6.1, §6.3).

For every policy domain with a ``rua`` seen in the period, the grouped
records (the history reader's SQL GROUP BY, streamed) are written as XML
straight into a gzip stream, one report per published-policy configuration,
and stored with one delivery per rua destination, all of one domain in one
transaction.  A report already stored for that domain and period is never
generated again, so re-running a period sends nothing twice.  Sending is the
outbox's (:mod:`dmarcmilter.report.outbox`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from .. import __version__
from ..config import Config
from ..errors import ConfigError
from ..history.models import ReportRow
from ..history.reader import (
    LateRows,
    PublishedPolicy,
    policy_domains,
    record_errors,
    report_records,
)
from . import late as late_rows
from .destinations import Destination, parse_rua
from .mail import build_report_message, report_filename
from .model import ReportMetadata
from .outbox import StoredReport, queue_deliveries
from .period import Period
from .xml import ReportFormat, write_report

log = logging.getLogger(__name__)

REPORTS = cast(Table, ReportRow.__table__)

GENERATOR = f"dmarcmilter/{__version__}"
# reports.kind of an aggregate report.
AGGREGATE = "aggregate"


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """What a run needs from ``[report]``, checked: a missing required
    key is a configuration error that names it."""

    org_name: str
    email: str
    from_address: str
    submitter: str
    extra_contact_info: str | None
    format: ReportFormat
    envelope_to: bool
    max_uris: int
    rate_limit_per_hour: int
    retry_for: dt.timedelta
    min_messages: int = 1
    send_spread: dt.timedelta = dt.timedelta(0)

    @classmethod
    def from_config(cls, config: Config, source: str = "the configuration") -> ReportSettings:
        report = config.report
        for key in ("org_name", "from_address"):
            if not getattr(report, key):
                raise ConfigError(
                    f"{source}: report.{key} is not set; aggregate reports need it "
                    "(see [report] in etc/dmarcmilter.toml)"
                )
        settings = cls(
            org_name=report.org_name,
            email=report.email or report.from_address,
            from_address=report.from_address,
            submitter=(report.submitter or config.effective_authserv_id()).lower().rstrip("."),
            extra_contact_info=report.extra_contact_info or None,
            format=ReportFormat(report.format),
            envelope_to=report.envelope_to,
            max_uris=report.max_uris,
            rate_limit_per_hour=report.rate_limit_per_hour,
            retry_for=dt.timedelta(hours=report.retry_hours),
            min_messages=report.min_messages,
            send_spread=dt.timedelta(minutes=report.send_spread_minutes),
        )
        # The mail code has the last word on what a report mail can carry:
        # try it once now, rather than fail on every report later.
        try:
            sample = StoredReport(
                report_id="0",
                policy_domain="example.com",
                period_begin=0,
                period_end=86399,
                filename=report_filename(settings.submitter, "example.com", 0, 86399, "0"),
                content=b"",
            )
            report_message(settings, sample, settings.email, dt.datetime(1970, 1, 2, tzinfo=dt.UTC))
        except ValueError as exc:
            hint = ""
            if not report.submitter:
                hint = (
                    f" (report.submitter is unset, so the authserv-id {settings.submitter!r} "
                    "is used: set report.submitter to this host's fully qualified name)"
                )
            raise ConfigError(f"{source}: [report]: {exc}{hint}") from None
        return settings


@dataclass(frozen=True, slots=True)
class BuiltReport:
    """One generated report: the attachment and where it should go."""

    report_id: str
    policy_domain: str
    period: Period
    format: ReportFormat
    filename: str
    content: bytes  # gzip-compressed XML
    message_count: int
    record_count: int
    destinations: tuple[Destination, ...]
    ignored_uris: tuple[str, ...]
    sequence: int = 0  # 0: the period's first report; n: the n-th supplementary

    def stored(self) -> StoredReport:
        """The report as the outbox keeps it, for composing its mail."""
        return StoredReport(
            report_id=self.report_id,
            policy_domain=self.policy_domain,
            period_begin=self.period.begin_ts,
            period_end=self.period.end_ts,
            filename=self.filename,
            content=self.content,
        )


def report_id_for(
    submitter: str, policy: PublishedPolicy, period: Period, fmt: ReportFormat
) -> str:
    """Alphanumeric (the filename's unique-id must be) and stable: the same
    domain, period, policy configuration and format give the same id, on
    every host of a fleet, so a re-sent report keeps its name (digest §6.1)."""
    key = repr((submitter, period.begin_ts, period.end_ts, fmt.value, dataclasses.astuple(policy)))
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def supplementary_report_id(report_id: str, sequence: int) -> str:
    """The id of the ``sequence``-th supplementary report of the report
    ``report_id`` would be.  The first report's id is 32 hex digits, so
    "s" and the sequence make an id no first report has and no other
    supplementary report either: a report_id is never used twice."""
    if sequence < 1:
        raise ValueError(f"a supplementary report's sequence starts at 1, not {sequence}")
    return f"{report_id}s{sequence}"


def spread_offset(report_id: str, window: dt.timedelta) -> dt.timedelta:
    """A report's fixed place in the sending window: from its id, so it is
    the same on every run and every host, and the reports of a period fall
    evenly over ``[0, window)`` (whole seconds)."""
    seconds = int(window.total_seconds())
    if seconds <= 0:
        return dt.timedelta(0)
    digest = hashlib.blake2b(report_id.encode("ascii"), digest_size=8).digest()
    return dt.timedelta(seconds=int.from_bytes(digest, "big") % seconds)


def build_reports(
    engine: Engine | Connection,
    settings: ReportSettings,
    period: Period,
    policy_domain: str,
    *,
    late: LateRows | None = None,
    sequence: int = 0,
) -> Iterator[BuiltReport]:
    """The reports of one policy domain for ``period``: one per published
    policy configuration.  ``late`` says which late rows count (None: every
    row of the period, the plain query); ``sequence`` > 0 makes
    supplementary reports, each id derived from the first report's.

    [impl choice] RFC 9990 lets a receiver whose policy changed within the
    period either send one report per configuration or report only the
    final one; each row here is reported under the policy that was in force
    when it was evaluated, which only separate reports can say.
    """
    errors = tuple(record_errors(engine, policy_domain, period.begin, period.end, late))
    records = report_records(
        engine,
        policy_domain,
        period.begin,
        period.end,
        include_envelope_to=settings.envelope_to,
        late=late,
    )
    # The reader sorts by the policy columns first, so each configuration
    # is one run of records, streamed into its report.
    for policy, group in itertools.groupby(records, key=_policy_of):
        destinations, ignored = parse_rua(policy.rua, settings.max_uris)
        if not destinations:
            # This configuration asked for no reports, or only where we
            # cannot send them (no mailto: URI): its rows are skipped.
            for _ in group:
                pass
            continue
        report_id = report_id_for(settings.submitter, policy, period, settings.format)
        if sequence:
            report_id = supplementary_report_id(report_id, sequence)
        metadata = ReportMetadata(
            org_name=settings.org_name,
            email=settings.email,
            report_id=report_id,
            begin=period.begin_ts,
            end=period.end_ts,
            generator=GENERATOR,
            extra_contact_info=settings.extra_contact_info,
            errors=errors,
        )
        buffer = io.BytesIO()
        # No name and mtime 0 in the gzip header: the same report is the
        # same bytes wherever and whenever it is generated.
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as gz:
            written = write_report(gz, metadata, policy, group, settings.format)
        yield BuiltReport(
            report_id=report_id,
            policy_domain=policy_domain,
            period=period,
            format=settings.format,
            filename=report_filename(
                settings.submitter, policy_domain, period.begin_ts, period.end_ts, report_id
            ),
            content=buffer.getvalue(),
            message_count=written.message_count,
            record_count=written.record_count,
            destinations=destinations,
            ignored_uris=ignored,
            sequence=sequence,
        )


def _policy_of(record: Any) -> PublishedPolicy:
    policy: PublishedPolicy = record.policy
    return policy


def domains_to_report(engine: Engine, period: Period, domain: str | None) -> list[str]:
    """The policy domains seen in ``period`` (or only ``domain``)."""
    # Names only: a few hundred bytes per domain, never the messages.
    names = list(policy_domains(engine, period.begin, period.end))
    if domain is not None:
        names = [name for name in names if name == domain]
    return names


def already_stored(engine: Engine, policy_domain: str, period: Period, fmt: ReportFormat) -> bool:
    """Whether a run has stored this domain's reports for ``period``."""
    table = REPORTS
    with engine.connect() as conn:
        found = conn.execute(
            select(table.c.id)
            .where(
                table.c.kind == AGGREGATE,
                table.c.policy_domain == policy_domain,
                table.c.period_begin == period.begin_ts,
                table.c.period_end == period.end_ts,
                table.c.format == fmt.value,
            )
            .limit(1)
        ).first()
    return found is not None


def store_reports(
    engine: Engine,
    reports: list[BuiltReport],
    now: dt.datetime,
    host: str,
    *,
    due: Callable[[BuiltReport], dt.datetime | None] | None = None,
    claim: late_rows.Claim | None = None,
) -> bool:
    """Store one domain's reports and their deliveries atomically, each
    delivery due at ``due(report)`` (at once by default), and make the late
    rows' ``claim`` final in the same transaction; False when another run
    stored them first."""
    try:
        with engine.begin() as conn:
            for report in reports:
                _store_one(conn, report, now, host, due(report) if due is not None else None)
            if claim is not None:
                late_rows.finish(conn, claim)
    except IntegrityError:
        return False
    return True


def _store_one(
    conn: Connection, report: BuiltReport, now: dt.datetime, host: str, due: dt.datetime | None
) -> None:
    result = conn.execute(
        insert(REPORTS).values(
            kind=AGGREGATE,
            sequence=report.sequence,
            report_id=report.report_id,
            policy_domain=report.policy_domain,
            period_begin=report.period.begin_ts,
            period_end=report.period.end_ts,
            format=report.format.value,
            filename=report.filename,
            message_count=report.message_count,
            record_count=report.record_count,
            content=report.content,
            created_at=now,
            created_by=host,
        )
    )
    inserted = result.inserted_primary_key
    assert inserted is not None  # a single-row INSERT always has one
    queue_deliveries(conn, inserted[0], report.destinations, now, due)
    for problem in report.ignored_uris:
        log.info("report %s for %s: %s", report.report_id, report.policy_domain, problem)


def report_message(
    settings: ReportSettings, report: StoredReport, to_address: str, now: dt.datetime
) -> bytes:
    """The mail carrying one stored or dry-run report to one destination;
    with the settings bound, the outbox's ``Compose`` for aggregate reports."""
    return build_report_message(
        from_address=settings.from_address,
        to_address=to_address,
        receiver=settings.submitter,
        submitter=settings.submitter,
        org_name=settings.org_name,
        policy_domain=report.policy_domain,
        begin=report.period_begin,
        end=report.period_end,
        report_id=report.report_id,
        attachment=report.content,
        filename=report.filename,
        date=now,
        message_token=report.message_token,
    )


__all__ = [
    "AGGREGATE",
    "GENERATOR",
    "BuiltReport",
    "ReportSettings",
    "already_stored",
    "build_reports",
    "domains_to_report",
    "report_id_for",
    "report_message",
    "spread_offset",
    "store_reports",
    "supplementary_report_id",
]
