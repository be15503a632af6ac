"""The ``dmarcmilter report`` run: history → aggregate reports → delivered
mail (RFC 9990 §2, §3; digest §6.1, §6.3, §6.4), and recorded failure
incidents → failure reports → delivered mail (RFC 9991; digest §7).

A run holds the fleet lease (:mod:`~dmarcmilter.report.lease`), then has
these steps.  **Generate**: the aggregate reports of the period are built
and stored with their deliveries (:mod:`~dmarcmilter.report.aggregate`),
once the period has been over for REPORT_GRACE; a domain with fewer than
``report.min_messages`` messages gets none.  **Supplement**: late rows of
periods already reported get supplementary reports
(:mod:`~dmarcmilter.report.late`).  **Bounces**: recorded bounces of our
report mail are checked and counted (:mod:`~dmarcmilter.report.bounces`).
**Deliver**: every delivery that is due is verified and sent, with retries
and the per-destination rate limit (:mod:`~dmarcmilter.report.outbox`).
A period's deliveries are due spread over ``report.send_spread_minutes``
after it ends, each report at a fixed offset, so that a fleet's reports do
not leave in one burst.

The **failure phase** runs under its own lease (FAILURE_LEASE_NAME), so a
long aggregate run never holds failure reports back: the failure sender
(:mod:`~dmarcmilter.report.failure_sender`) merges and rate-limits the
recorded incidents into stored reports, then the outbox delivers the due
failure deliveries.  Each phase delivers only its own kind of report.
With ``failure_reports.enabled`` false the failure phase does nothing:
incidents already recorded stay pending (and are dropped as stale after
``report.retry_hours`` once it is on again), and queued failure reports
are not sent, so turning the option off stops all failure-report mail at
once.  Recorded bounces are checked in both phases.

A dry run writes the reports and messages into a directory and writes
nothing to the database.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ..config import Config
from ..errors import DatabaseError, ReportError
from ..history.db import short_error
from ..history.reader import LateRows
from ..resolver import Resolver
from . import bounces
from . import late as late_rows
from .aggregate import (
    BuiltReport,
    ReportSettings,
    already_stored,
    build_reports,
    domains_to_report,
    report_message,
    spread_offset,
    store_reports,
)
from .delivery import Transport
from .failure_mail import FailureReportSettings
from .failure_sender import (
    FailureSender,
    FailureStats,
    failure_message,
    failure_settings,
    group_incidents,
    report_content,
)
from .lease import LEASE_NAME, Lease, host_identity
from .outbox import AGGREGATE, FAILURE, KINDS, DeliveryStats, Outbox, StoredReport, make_transport
from .period import Period

# The failure phase's lease: apart from the aggregate one, so that a long
# aggregate run does not hold failure reports back.
FAILURE_LEASE_NAME = "failure-reports"

log = logging.getLogger(__name__)

# A period's first reports are made once it has been over this long, so
# that the rows of messages still being written at its end (the writer
# batches for a second or two) are in them rather than in a supplementary
# report.  The shipped cron job runs at 7 past the hour.
REPORT_GRACE = dt.timedelta(minutes=5)
# Domains whose first reports are built on one read snapshot (see
# late.snapshot) before the next is taken.  SQLite cannot reset its
# write-ahead log while a snapshot is open, so the reports a run stores
# meanwhile make it grow and every commit slower; a fresh snapshot per this
# many domains keeps it short, for one more (indexed) query each.
SNAPSHOT_DOMAINS = 100


@dataclass
class RunStats(FailureStats, DeliveryStats, bounces.BounceStats):
    """What a run did, for the summary and the tests."""

    domains: int = 0
    reports_generated: int = 0
    domains_already_done: int = 0
    # Fewer messages than report.min_messages: no report, not an error.
    domains_below_minimum: int = 0
    # The period ended less than REPORT_GRACE ago: its reports wait.
    period_not_over: bool = False
    supplementary_reports: int = 0
    lease_holder: str | None = None  # another host running: this run did nothing
    failure_lease_holder: str | None = None  # the same, for the failure phase
    failure_disabled: bool = False  # failure_reports.enabled is false: phase skipped
    # The report kinds whose lease this run took, and so whose work it did.
    leases_held: list[str] = field(default_factory=list)


Progress = Callable[[int, int, str], None]


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

    def run(
        self, period: Period, domain: str | None = None, kinds: Collection[str] = KINDS
    ) -> RunStats:
        """The aggregate phase, then the failure phase, of ``kinds``."""
        try:
            if AGGREGATE in kinds:
                self._leased(LEASE_NAME, lambda lease: self._aggregate(period, domain, lease))
            if FAILURE in kinds:
                if not self.config.failure_reports.enabled:
                    self.stats.failure_disabled = True
                    log.info("failure reports: failure_reports.enabled is false; none made or sent")
                else:
                    self._leased(FAILURE_LEASE_NAME, self._failure)
        finally:
            if self._transport is not None:
                self._transport.close()
                self._transport = None
        return self.stats

    def _leased(self, name: str, work: Callable[[Lease], None]) -> None:
        lease = Lease(self.engine, name, self.host, self.clock)
        try:
            holder = lease.acquire()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot take the {name} lease: {short_error(exc)}") from None
        if holder is not None:
            if name == LEASE_NAME:
                self.stats.lease_holder = holder
            else:
                self.stats.failure_lease_holder = holder
            log.info("report run skipped: %s holds the %s lease", holder, name)
            return
        self.stats.leases_held.append(AGGREGATE if name == LEASE_NAME else FAILURE)
        try:
            # Settings the transport refuses stop the run before anything is
            # generated, rather than after.
            self.transport()
            work(lease)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"report run failed: {short_error(exc)}") from None
        finally:
            try:
                lease.release()
            except SQLAlchemyError as exc:
                # It expires by itself; the next run takes it over then.
                log.warning("cannot release the %s lease: %s", name, short_error(exc))

    def _aggregate(self, period: Period, domain: str | None, lease: Lease) -> None:
        self.generate(period, domain, lease)
        self.supplement(domain, lease)
        self._bounces()
        self.deliver(lease, (AGGREGATE,))

    def _bounces(self) -> None:
        bounces.process(self.engine, self.config, self.settings.submitter, self.clock, self.stats)

    def _failure(self, lease: Lease) -> None:
        self._bounces()
        FailureSender(
            config=self.config,
            engine=self.engine,
            clock=self.clock,
            host=self.host,
            stats=self.stats,
            renew=lease.renew,
        ).run()
        self.deliver(lease, (FAILURE,))

    # -- generation ------------------------------------------------------------

    def domains(self, period: Period, domain: str | None) -> list[str]:
        return domains_to_report(self.engine, period, domain)

    def generate(self, period: Period, domain: str | None, lease: Lease | None = None) -> None:
        if self.clock() < period.end + REPORT_GRACE:
            self.stats.period_not_over = True
            log.info(
                "the reports of %s wait until %s: the period has not been over for %s",
                period.begin.date().isoformat(),
                (period.end + REPORT_GRACE).isoformat(),
                REPORT_GRACE,
            )
            return
        names = self.domains(period, domain)
        self.stats.domains = len(names)
        for start in range(0, len(names), SNAPSHOT_DOMAINS):
            with late_rows.snapshot(self.engine) as view:
                # Asked on the snapshot the plain queries of these domains read.
                late = late_rows.domains_with_late_rows(view, period)
                for done, name in enumerate(names[start : start + SNAPSHOT_DOMAINS], start):
                    if self.progress:
                        self.progress(done, len(names), name)
                    if lease is not None:
                        lease.renew()
                    if already_stored(self.engine, name, period, self.settings.format):
                        self.stats.domains_already_done += 1
                        continue
                    self._first_reports(period, name, view if name not in late else None)
        if self.progress:
            self.progress(len(names), len(names), "")

    def _first_reports(self, period: Period, name: str, view: Connection | None) -> None:
        """The first reports of a domain: on ``view``, the run's snapshot,
        when it has no late rows there; otherwise after claiming them."""
        settings = self.settings
        claim = None
        selection = None
        source: Engine | Connection = self.engine if view is None else view
        if view is None:
            # This domain has late rows: claim the ones there are now, and
            # count those alone among them (a fresh read, after the claim).
            claim = late_rows.Claim.for_reports(
                settings.submitter, name, period, settings.format, 0
            )
            late_rows.claim(self.engine, name, period, claim)
            selection = LateRows(claim.pending)
        reports = list(build_reports(source, settings, period, name, late=selection))
        messages = sum(report.message_count for report in reports)
        if reports and messages < settings.min_messages:
            self.stats.domains_below_minimum += 1
            log.info(
                "no report for %s on %s: %d message(s), fewer than report.min_messages (%d)",
                name,
                period.begin.date().isoformat(),
                messages,
                settings.min_messages,
            )
            reports = []
        if reports and store_reports(
            self.engine,
            reports,
            self.clock(),
            self.host,
            due=functools.partial(self._due, start=period.end),
            claim=claim,
        ):
            self.stats.reports_generated += len(reports)
            return
        if reports:
            self.stats.domains_already_done += 1
        if claim is not None:
            # Nothing stored: the rows go back, for the next first report.
            late_rows.release(self.engine, claim)

    def supplement(self, domain: str | None, lease: Lease | None = None) -> None:
        """Supplementary reports: for every period already reported, the
        late rows no report has counted yet (at most
        late.MAX_SUPPLEMENTS_PER_RUN periods a run; the rest wait)."""
        settings = self.settings
        for item in late_rows.supplements(self.engine, domain):
            if lease is not None:
                lease.renew()
            claim = late_rows.Claim.for_reports(
                settings.submitter, item.policy_domain, item.period, settings.format, item.sequence
            )
            if not late_rows.claim(self.engine, item.policy_domain, item.period, claim):
                continue  # its late rows are in another period
            reports = list(
                build_reports(
                    self.engine,
                    settings,
                    item.period,
                    item.policy_domain,
                    late=LateRows(claim.pending, only=True),
                    sequence=item.sequence,
                )
            )
            now = self.clock()
            # Made at any hour, after a replay: spread from now.  With no
            # report (no usable destination), the claim is still made final,
            # so those rows are not claimed again on every run.
            if store_reports(
                self.engine,
                reports,
                now,
                self.host,
                due=functools.partial(self._due, start=now),
                claim=claim,
            ):
                self.stats.supplementary_reports += len(reports)
                for report in reports:
                    log.info(
                        "supplementary report %s for %s on %s: %d late message(s)",
                        report.report_id,
                        report.policy_domain,
                        item.period.begin.date().isoformat(),
                        report.message_count,
                    )
            else:
                late_rows.release(self.engine, claim)

    def _due(self, report: BuiltReport, start: dt.datetime) -> dt.datetime | None:
        """When a report's deliveries are first due: ``start`` plus its
        fixed place in the sending window; at once without a window."""
        if not self.settings.send_spread:
            return None
        return start + spread_offset(report.report_id, self.settings.send_spread)

    # -- delivery --------------------------------------------------------------

    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self.config.report)
        return self._transport

    def compose(self, report: StoredReport, address: str, now: dt.datetime) -> bytes:
        """The mail of a stored report of either kind to ``address``."""
        if report.kind == FAILURE:
            return failure_message(self.failure_settings, report, address, now)
        return report_message(self.settings, report, address, now)

    @property
    def failure_settings(self) -> FailureReportSettings:
        return failure_settings(self.config, self.settings.submitter)

    def deliver(self, lease: Lease | None = None, kinds: Collection[str] = KINDS) -> None:
        outbox = Outbox(
            config=self.config,
            engine=self.engine,
            from_address=self.settings.from_address,
            rate_limit_per_hour=self.settings.rate_limit_per_hour,
            retry_for=self.settings.retry_for,
            compose=self.compose,
            transport=self.transport,
            resolver=self.resolver,
            clock=self.clock,
            host=self.host,
            stats=self.stats,
        )
        outbox.deliver(lease.renew if lease is not None else None, kinds)
        # The outbox makes the resolver on first use; keep it for the
        # next deliver() of this job rather than build another.
        self.resolver = outbox.resolver


def dry_run(
    config: Config,
    engine: Engine,
    period: Period,
    directory: Path,
    *,
    domain: str | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    progress: Progress | None = None,
    kinds: Collection[str] = KINDS,
) -> RunStats:
    """Write every report of ``period`` into ``directory`` as ``<filename>``
    (.xml.gz) and ``<filename>.eml`` (the message to its first destination),
    and every failure report the pending incidents would make now as
    ``failure-<n>-<domain>.eml``, with no DNS query, no mail and no database
    write.  Failure reports are shown merged but before the rate limits
    (which would spend tokens), whether or not failure_reports.enabled."""
    job = ReportJob(config, engine, clock=clock, progress=progress, host="dry-run")
    settings, stats = job.settings, job.stats
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        if FAILURE in kinds:
            _dry_run_failure(job, directory)
        if AGGREGATE not in kinds:
            return stats
        names = job.domains(period, domain)
        stats.domains = len(names)
        late = late_rows.domains_with_late_rows(engine, period) if names else set()
        for done, name in enumerate(names):
            if progress:
                progress(done, len(names), name)
            # What a first report made now would count: the late rows no
            # stored report has claimed too.  Nothing is claimed or spread.
            selection = LateRows(None) if name in late else None
            reports = list(build_reports(engine, settings, period, name, late=selection))
            if reports and sum(r.message_count for r in reports) < settings.min_messages:
                stats.domains_below_minimum += 1
                continue
            for report in reports:
                _write_dry_run(directory, report, settings, clock())
                stats.reports_generated += 1
        if progress:
            progress(len(names), len(names), "")
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the history: {short_error(exc)}") from None
    return stats


def _dry_run_failure(job: ReportJob, directory: Path) -> None:
    sender = FailureSender(
        config=job.config, engine=job.engine, clock=job.clock, host="dry-run", stats=job.stats
    )
    incidents = sender.closed_incidents()
    groups = group_incidents(incidents, sender.merge_seconds)
    samples = sender.samples(sorted({g.incidents[0].pk for g in groups}))
    for n, group in enumerate(groups, 1):
        sample = samples.get(group.incidents[0].pk)
        if sample is None:
            job.stats.failure_bad_samples += 1
            continue
        report = StoredReport(
            report_id=f"dryrun{n}",
            policy_domain=group.key[0],
            period_begin=group.window * sender.merge_seconds,
            period_end=(group.window + 1) * sender.merge_seconds - 1,
            filename="",
            content=report_content(group.key[3], len(group.incidents), sample),
            kind=FAILURE,
        )
        try:
            message = job.compose(report, group.destination.address, job.clock())
        except ValueError as exc:
            log.warning("dry run: failure report %d cannot be built: %s", n, exc)
            continue
        # The reported domain is a checked domain name; keep the file name
        # plain whatever it holds.
        shown = "".join(
            c if c.isascii() and (c.isalnum() or c in ".-_") else "_" for c in group.key[1]
        )
        name = f"failure-{n:06d}-{shown[:100]}.eml"
        try:
            (directory / name).write_bytes(message)
        except OSError as exc:
            raise ReportError(f"cannot write into {directory}: {exc.strerror or exc}") from None
        job.stats.failure_reports += 1
        job.stats.failure_incidents += len(group.incidents)


def _write_dry_run(
    directory: Path, report: BuiltReport, settings: ReportSettings, now: dt.datetime
) -> None:
    message = report_message(settings, report.stored(), report.destinations[0].address, now)
    try:
        (directory / report.filename).write_bytes(report.content)
        (directory / f"{report.filename}.eml").write_bytes(message)
    except OSError as exc:
        raise ReportError(f"cannot write into {directory}: {exc.strerror or exc}") from None


__all__ = ["REPORT_GRACE", "Progress", "ReportJob", "RunStats", "dry_run"]
