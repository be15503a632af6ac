"""The ``dmarcmilter report`` run: history → aggregate reports → delivered
mail (RFC 9990 §2, §3; digest §6.1, §6.3, §6.4).

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
not leave in one burst.  A dry run writes the reports and messages into a
directory and writes nothing to the database.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from .lease import LEASE_NAME, Lease, host_identity
from .outbox import DeliveryStats, Outbox, make_transport
from .period import Period

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
class RunStats(DeliveryStats, bounces.BounceStats):
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
            self.supplement(domain, lease)
            bounces.process(
                self.engine, self.config, self.settings.submitter, self.clock, self.stats
            )
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

    def deliver(self, lease: Lease | None = None) -> None:
        outbox = Outbox(
            config=self.config,
            engine=self.engine,
            from_address=self.settings.from_address,
            rate_limit_per_hour=self.settings.rate_limit_per_hour,
            retry_for=self.settings.retry_for,
            compose=functools.partial(report_message, self.settings),
            transport=self.transport,
            resolver=self.resolver,
            clock=self.clock,
            host=self.host,
            stats=self.stats,
        )
        outbox.deliver(lease.renew if lease is not None else None)
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
