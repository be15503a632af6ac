"""The report job: history → aggregate reports → delivered mail (RFC 9990
§2-3; digest §6.1, §6.3, §6.4).

A run has two steps.  **Generate**: for every policy domain with a ``rua``
seen in the period, the grouped records (the history reader's SQL GROUP BY,
streamed) are written as XML straight into a gzip stream, one report per
published-policy configuration, and stored with one delivery row per rua
destination, all of one domain in one transaction.  A report already stored
for that domain and period is never generated again, so re-running a period
sends nothing twice.  **Deliver**: every delivery that is due (new, or
retried with backoff after a temporary failure, across runs) has its
destination verified (digest §6.4) and is sent, each attempt recorded.

A fleet sharing one database runs the job on one host at a time: the run
holds a lease row, renewed while it works; a second host finds it held and
leaves.  A dry run writes the reports and messages into a directory and
writes nothing to the database.
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
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .. import __version__
from ..config import Config
from ..errors import ConfigError, DatabaseError, ReportError
from ..history.db import short_error
from ..history.models import ReportRow
from ..history.reader import PublishedPolicy, policy_domains, record_errors, report_records
from ..resolver import Resolver
from .delivery import Transport
from .destinations import Destination, parse_rua
from .lease import LEASE_NAME, Lease, host_identity
from .mail import build_report_message, report_filename
from .model import ReportMetadata
from .outbox import DeliveryStats, Outbox, StoredReport, make_transport, queue_deliveries
from .period import Period
from .xml import ReportFormat, write_report

log = logging.getLogger(__name__)

REPORTS = cast(Table, ReportRow.__table__)
GENERATOR = f"dmarcmilter/{__version__}"


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
        )
        # The mail code has the last word on what a report mail can carry:
        # try it once now, rather than fail on every report later.
        try:
            report_message(
                settings,
                settings.email,
                "example.com",
                0,
                86399,
                "0",
                b"",
                report_filename(settings.submitter, "example.com", 0, 86399, "0"),
                dt.datetime(1970, 1, 2, tzinfo=dt.UTC),
            )
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


@dataclass
class RunStats(DeliveryStats):
    """What a run did, for the summary and the tests."""

    domains: int = 0
    reports_generated: int = 0
    domains_already_done: int = 0
    lease_holder: str | None = None  # another host running: this run did nothing


Progress = Callable[[int, int, str], None]


def report_id_for(
    submitter: str, policy: PublishedPolicy, period: Period, fmt: ReportFormat
) -> str:
    """Alphanumeric (the filename's unique-id must be) and stable: the same
    domain, period, policy configuration and format give the same id, on
    every host of a fleet, so a re-sent report keeps its name (digest §6.1)."""
    key = repr((submitter, period.begin_ts, period.end_ts, fmt.value, dataclasses.astuple(policy)))
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def build_reports(
    engine: Engine, settings: ReportSettings, period: Period, policy_domain: str
) -> Iterator[BuiltReport]:
    """The reports of one policy domain for ``period``: one per published
    policy configuration.

    [impl choice] RFC 9990 lets a receiver whose policy changed within the
    period either send one report per configuration or report only the
    final one; each row here is reported under the policy that was in force
    when it was evaluated, which only separate reports can say.
    """
    errors = tuple(record_errors(engine, policy_domain, period.begin, period.end))
    records = report_records(
        engine,
        policy_domain,
        period.begin,
        period.end,
        include_envelope_to=settings.envelope_to,
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
        )


def _policy_of(record: Any) -> PublishedPolicy:
    policy: PublishedPolicy = record.policy
    return policy


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class ReportJob:
    """One ``dmarcmilter report`` run."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        resolver: Resolver | None = None,
        transport: Transport | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        progress: Progress | None = None,
        host: str | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.settings = ReportSettings.from_config(config)
        self.resolver = resolver
        self._transport = transport
        self.clock = clock
        self.progress = progress
        self.host = host or host_identity()
        self.stats = RunStats()

    # -- the whole run -------------------------------------------------------

    def run(self, period: Period, domain: str | None = None) -> RunStats:
        lease = Lease(self.engine, LEASE_NAME, self.host, self.clock)
        try:
            holder = lease.acquire()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot take the report lease: {short_error(exc)}") from None
        if holder is not None:
            self.stats.lease_holder = holder
            log.info("report run skipped: %s holds the %s lease", holder, LEASE_NAME)
            return self.stats
        try:
            # Settings the transport refuses stop the run before anything is
            # generated, rather than after.
            self.transport()
            self.generate(period, domain, lease)
            self.deliver(lease)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"report run failed: {short_error(exc)}") from None
        finally:
            if self._transport is not None:
                self._transport.close()
            try:
                lease.release()
            except SQLAlchemyError as exc:
                # It expires by itself; the next run takes it over then.
                log.warning("cannot release the report lease: %s", short_error(exc))
        return self.stats

    # -- generation ------------------------------------------------------------

    def domains(self, period: Period, domain: str | None) -> list[str]:
        # Names only: a few hundred bytes per domain, never the messages.
        names = list(policy_domains(self.engine, period.begin, period.end))
        if domain is not None:
            names = [name for name in names if name == domain]
        return names

    def generate(self, period: Period, domain: str | None, lease: Lease | None = None) -> None:
        names = self.domains(period, domain)
        self.stats.domains = len(names)
        for done, name in enumerate(names):
            if self.progress:
                self.progress(done, len(names), name)
            if lease is not None:
                lease.renew()
            if self._already_done(name, period):
                self.stats.domains_already_done += 1
                continue
            reports = list(build_reports(self.engine, self.settings, period, name))
            if reports and self._store(reports):
                self.stats.reports_generated += len(reports)
            elif reports:
                self.stats.domains_already_done += 1
        if self.progress:
            self.progress(len(names), len(names), "")

    def _already_done(self, policy_domain: str, period: Period) -> bool:
        table = REPORTS
        with self.engine.connect() as conn:
            found = conn.execute(
                select(table.c.id)
                .where(
                    table.c.policy_domain == policy_domain,
                    table.c.period_begin == period.begin_ts,
                    table.c.period_end == period.end_ts,
                    table.c.format == self.settings.format.value,
                )
                .limit(1)
            ).first()
        return found is not None

    def _store(self, reports: list[BuiltReport]) -> bool:
        """Store one domain's reports and their deliveries atomically;
        False when another run stored them first."""
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                for report in reports:
                    self._store_one(conn, report, now)
        except IntegrityError:
            return False
        return True

    def _store_one(self, conn: Connection, report: BuiltReport, now: dt.datetime) -> None:
        result = conn.execute(
            insert(REPORTS).values(
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
                created_by=self.host,
            )
        )
        inserted = result.inserted_primary_key
        assert inserted is not None  # a single-row INSERT always has one
        queue_deliveries(conn, inserted[0], report.destinations, now)
        for problem in report.ignored_uris:
            log.info("report %s for %s: %s", report.report_id, report.policy_domain, problem)

    # -- delivery --------------------------------------------------------------

    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self.config.report)
        return self._transport

    def deliver(self, lease: Lease | None = None) -> None:
        outbox = Outbox(
            self.config,
            self.engine,
            from_address=self.settings.from_address,
            rate_limit_per_hour=self.settings.rate_limit_per_hour,
            retry_for=self.settings.retry_for,
            compose=self._compose,
            transport=self.transport,
            resolver=self.resolver,
            clock=self.clock,
            host=self.host,
            stats=self.stats,
        )
        outbox.deliver(lease.renew if lease is not None else None)
        # The outbox makes the resolver on first use; later runs reuse it.
        self.resolver = outbox.resolver

    def _compose(self, report: StoredReport, address: str, now: dt.datetime) -> bytes:
        return report_message(
            self.settings,
            address,
            report.policy_domain,
            report.period_begin,
            report.period_end,
            report.report_id,
            report.content,
            report.filename,
            now,
        )


def report_message(
    settings: ReportSettings,
    to_address: str,
    policy_domain: str,
    begin: int,
    end: int,
    report_id: str,
    content: bytes,
    filename: str,
    now: dt.datetime,
) -> bytes:
    """The mail carrying one stored or dry-run report to one destination."""
    return build_report_message(
        from_address=settings.from_address,
        to_address=to_address,
        receiver=settings.submitter,
        submitter=settings.submitter,
        org_name=settings.org_name,
        policy_domain=policy_domain,
        begin=begin,
        end=end,
        report_id=report_id,
        attachment=content,
        filename=filename,
        date=now,
    )


def dry_run(
    config: Config,
    engine: Engine,
    period: Period,
    directory: Path,
    *,
    domain: str | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    progress: Progress | None = None,
) -> RunStats:
    """Write every report of ``period`` into ``directory`` as ``<filename>``
    (.xml.gz) and ``<filename>.eml`` (the message to its first destination),
    with no DNS query, no mail and no database write."""
    job = ReportJob(config, engine, clock=clock, progress=progress, host="dry-run")
    settings, stats = job.settings, job.stats
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        names = job.domains(period, domain)
        stats.domains = len(names)
        for done, name in enumerate(names):
            if progress:
                progress(done, len(names), name)
            for report in build_reports(engine, settings, period, name):
                _write_dry_run(directory, report, settings, clock())
                stats.reports_generated += 1
        if progress:
            progress(len(names), len(names), "")
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the history: {short_error(exc)}") from None
    return stats


def _write_dry_run(
    directory: Path, report: BuiltReport, settings: ReportSettings, now: dt.datetime
) -> None:
    message = report_message(
        settings,
        report.destinations[0].address,
        report.policy_domain,
        report.period.begin_ts,
        report.period.end_ts,
        report.report_id,
        report.content,
        report.filename,
        now,
    )
    try:
        (directory / report.filename).write_bytes(report.content)
        (directory / f"{report.filename}.eml").write_bytes(message)
    except OSError as exc:
        raise ReportError(f"cannot write into {directory}: {exc.strerror or exc}") from None


__all__ = [
    "BuiltReport",
    "ReportJob",
    "ReportSettings",
    "RunStats",
    "build_reports",
    "dry_run",
    "report_id_for",
]
