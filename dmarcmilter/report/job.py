"""The ``dmarcmilter report`` run: history → aggregate reports → delivered
mail (RFC 9990 §2, §3; digest §6.1, §6.3, §6.4).

A run holds the fleet lease (:mod:`~dmarcmilter.report.lease`), then has two
steps.  **Generate**: the aggregate reports of the period are built and
stored with their deliveries (:mod:`~dmarcmilter.report.aggregate`).
**Deliver**: every delivery that is due is verified and sent, with retries
and the per-destination rate limit (:mod:`~dmarcmilter.report.outbox`).
A dry run writes the reports and messages into a directory and writes
nothing to the database.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..config import Config
from ..errors import DatabaseError, ReportError
from ..history.db import short_error
from ..resolver import Resolver
from .aggregate import (
    BuiltReport,
    ReportSettings,
    already_stored,
    build_reports,
    domains_to_report,
    report_message,
    store_reports,
)
from .delivery import Transport
from .lease import LEASE_NAME, Lease, host_identity
from .outbox import DeliveryStats, Outbox, make_transport
from .period import Period

log = logging.getLogger(__name__)


@dataclass
class RunStats(DeliveryStats):
    """What a run did, for the summary and the tests."""

    domains: int = 0
    reports_generated: int = 0
    domains_already_done: int = 0
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
        names = self.domains(period, domain)
        self.stats.domains = len(names)
        for done, name in enumerate(names):
            if self.progress:
                self.progress(done, len(names), name)
            if lease is not None:
                lease.renew()
            if already_stored(self.engine, name, period, self.settings.format):
                self.stats.domains_already_done += 1
                continue
            reports = list(build_reports(self.engine, self.settings, period, name))
            if reports and store_reports(self.engine, reports, self.clock(), self.host):
                self.stats.reports_generated += len(reports)
            elif reports:
                self.stats.domains_already_done += 1
        if self.progress:
            self.progress(len(names), len(names), "")

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
    message = report_message(settings, report.stored(), report.destinations[0].address, now)
    try:
        (directory / report.filename).write_bytes(report.content)
        (directory / f"{report.filename}.eml").write_bytes(message)
    except OSError as exc:
        raise ReportError(f"cannot write into {directory}: {exc.strerror or exc}") from None


__all__ = ["Progress", "ReportJob", "RunStats", "dry_run"]
