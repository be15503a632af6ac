"""The report job's metrics: a Prometheus text-format file written after
each run.

``dmarcmilter report`` exits after each run, so nothing is left to scrape.
After every run (not a dry run) it writes its metrics to ``[metrics]
report_file`` (default ``report-metrics.prom`` in the state directory):
node_exporter's textfile collector reads it, and the milter daemon's
``/metrics`` re-exports the families whose names start with
``dmarcmilter_report_``.  Why a file and not the database: the job exits; a
file costs no database query at scrape time and still shows the last run
while the database is down, which is when it matters.

Counters are cumulative across runs: each run reads the previous file and
adds its own counts.  A missing or unreadable previous file (corrupt, not
a regular file, over MAX_PREVIOUS_BYTES) starts them from 0 again, with one
logged line; Prometheus' ``rate()`` and ``increase()`` treat that as a
counter reset.  The per-kind gauges of the run times are kept from the
previous file for the kinds this run did not cover (the shipped cron job
runs ``--kind failure`` every 5 minutes and both kinds hourly), so a
failing aggregate run is not hidden by succeeding failure runs.

Two runs on one host (those two cron lines overlap) take turns through a
lock file beside it, so neither loses the other's counts; past
LOCK_WAIT_SECONDS a run writes without it.  Writing never fails a run: an
error is logged in one line and the exit status stays what the run made it.
Labels take only fixed values (report kind, delivery result, bounce
outcome), never a domain or an address.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import math
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import Table, and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..config import Config
from ..history.db import short_error
from ..history.models import ReportDeliveryRow, ReportRow, SuppressionRow
from . import bounces
from .job import RunStats
from .outbox import AGGREGATE, FAILURE, KINDS, PENDING

log = logging.getLogger(__name__)

DEFAULT_FILE = "report-metrics.prom"
# The previous file is read only up to this size; a larger one is not ours
# (ours is about 4 KB) and is ignored: the counters start from 0.
MAX_PREVIOUS_BYTES = 1024 * 1024
# How long a run waits for another run on this host to finish writing the
# file (which takes milliseconds); past it, it writes without the lock.
LOCK_WAIT_SECONDS = 10.0

PREFIX = "dmarcmilter_report_"

# Delivery results (label ``result``), from the outbox's counters:
# DeliveryStats field -> label value.
RESULTS = {
    "sent": "sent",
    "retry_later": "tempfail",
    "failed": "permfail",
    "refused": "refused",
    "suppressed": "suppressed",
    "rate_limited": "rate_limited",
}
BOUNCE_OUTCOMES = (bounces.COUNTED, bounces.UNKNOWN, bounces.MISMATCH, bounces.DUPLICATE)

# Per-kind gauges of the last run that covered the kind; kept from the
# previous file for the kinds a run does not cover.
LAST_RUN = PREFIX + "last_run_timestamp_seconds"
LAST_SUCCESS = PREFIX + "last_success_timestamp_seconds"
LAST_RUN_SUCCESS = PREFIX + "last_run_success"
RUN_DURATION = PREFIX + "run_duration_seconds"
LEASE_HELD = PREFIX + "last_run_lease_held"
RUN_GAUGES = {
    LAST_RUN: "End of the last report run that covered this kind (Unix time).",
    LAST_SUCCESS: (
        "End of the last report run of this kind that finished without error "
        "(Unix time; 0: none known)."
    ),
    LAST_RUN_SUCCESS: "1 if the last report run of this kind finished without error, else 0.",
    RUN_DURATION: "How long the last report run of this kind took, in seconds.",
    LEASE_HELD: (
        "1 if the last report run of this kind on this host held the fleet lease "
        "and so did the work; 0 if another host held it, or it never got it."
    ),
}

# Counters: family name (without _total) -> (help, label names, label values).
REPORTS_GENERATED = PREFIX + "reports_generated"
DELIVERIES = PREFIX + "deliveries"
FAILURE_DROPPED = PREFIX + "failure_reports_dropped"
FAILURE_INCIDENTS = PREFIX + "failure_incidents"
BOUNCES = PREFIX + "bounces"
COUNTERS: dict[str, tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = {
    REPORTS_GENERATED: (
        "Reports made and queued (aggregate: first and supplementary).",
        ("kind",),
        [(k,) for k in KINDS],
    ),
    DELIVERIES: (
        "Delivery attempts of report mail by result.",
        ("kind", "result"),
        [(k, r) for k in KINDS for r in RESULTS.values()],
    ),
    FAILURE_DROPPED: ("Failure reports dropped by the rate limits.", (), [()]),
    FAILURE_INCIDENTS: ("Failure incidents merged into failure reports made.", (), [()]),
    BOUNCES: (
        "Recorded bounces of report mail checked, by outcome.",
        ("outcome",),
        [(o,) for o in BOUNCE_OUTCOMES],
    ),
}
RETRIES_PENDING = PREFIX + "retries_pending"
SUPPRESSED_DESTINATIONS = PREFIX + "suppressed_destinations"

DELIVERY_ROWS = cast(Table, ReportDeliveryRow.__table__)
REPORT_ROWS = cast(Table, ReportRow.__table__)
SUPPRESSION_ROWS = cast(Table, SuppressionRow.__table__)


def report_metrics_path(config: Config) -> Path:
    """``[metrics] report_file``, or report-metrics.prom in the state directory."""
    if config.metrics.report_file:
        return Path(config.metrics.report_file)
    return config.effective_state_dir() / DEFAULT_FILE


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """One report run, as its metrics see it."""

    kinds: tuple[str, ...]  # the report kinds the run covered
    stats: RunStats  # what it did, up to where it stopped if it failed
    success: bool  # it finished without error (a delivery's tempfail is not an error)
    finished: dt.datetime
    duration: float  # seconds


Key = tuple[str, tuple[str, ...]]  # sample name, label values in order


@dataclass
class _State:
    counters: dict[Key, float]
    gauges: dict[Key, float]  # RUN_GAUGES, by kind


def record_run(path: Path, outcome: RunOutcome, engine: Engine | None) -> bool:
    """Write the metrics of ``outcome`` to ``path``, adding its counts to
    the previous file's; the database gauges are read from ``engine`` (None:
    the run could not reach the database, so they are left out).  Whether
    the file was written; a failure is logged, never raised."""
    try:
        database = _database_gauges(engine, outcome.finished) if engine is not None else None
        with _locked(path):
            state = _previous(path)
            _add_run(state, outcome)
            _write(path, _Families(state, database))
    except OSError as exc:
        log.warning("cannot write the report metrics to %s: %s", path, exc.strerror or exc)
        return False
    except Exception as exc:  # the metrics must never fail the run
        log.warning("cannot write the report metrics to %s: %r", path, exc)
        return False
    return True


# -- the previous file ------------------------------------------------------------


def _previous(path: Path) -> _State:
    state = _State(counters={}, gauges={})
    try:
        text = _read_bounded(path)
    except FileNotFoundError:
        return state
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _ignored(path, reason)
        return state
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except Exception as exc:  # the parser raises many kinds on bad input
        _ignored(path, f"not Prometheus text format ({type(exc).__name__})")
        return state
    allowed = _allowed_keys()
    bad = 0
    for sample in samples:
        key = (sample.name, tuple(sample.labels.get(n, "") for n in _label_names(sample.name)))
        if key not in allowed or len(sample.labels) != len(key[1]):
            continue  # not ours (another version's, or added by hand): dropped
        value = float(sample.value)
        if not math.isfinite(value) or value < 0:
            bad += 1
            continue
        if key[0] in RUN_GAUGES:
            state.gauges[key] = value
        else:
            state.counters[key] = value
    if bad:
        _ignored(path, f"{bad} value(s) negative or not finite", whole=False)
    return state


def _read_bounded(path: Path) -> str:
    # O_NONBLOCK: a FIFO put in its place must not hang the run.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = fh.read(MAX_PREVIOUS_BYTES + 1)
    if len(data) > MAX_PREVIOUS_BYTES:
        raise ValueError(f"larger than {MAX_PREVIOUS_BYTES} bytes")
    return data.decode("utf-8")


def _ignored(path: Path, reason: str, *, whole: bool = True) -> None:
    what = "counters start again from 0" if whole else "those start again from 0"
    log.warning("report metrics: ignoring the previous %s: %s; %s", path, reason, what)


def _label_names(sample: str) -> tuple[str, ...]:
    if sample in RUN_GAUGES:
        return ("kind",)
    family = sample.removesuffix("_total")
    if family in COUNTERS and sample == family + "_total":
        return COUNTERS[family][1]
    return ()


def _allowed_keys() -> set[Key]:
    keys: set[Key] = {(name, (kind,)) for name in RUN_GAUGES for kind in KINDS}
    for family, (_, _, values) in COUNTERS.items():
        keys.update((family + "_total", v) for v in values)
    return keys


# -- this run ---------------------------------------------------------------------


def _add_run(state: _State, outcome: RunOutcome) -> None:
    stats = outcome.stats
    finished = outcome.finished.timestamp()

    def add(family: str, labels: tuple[str, ...], n: int) -> None:
        key = (family + "_total", labels)
        state.counters[key] = state.counters.get(key, 0.0) + n

    add(REPORTS_GENERATED, (AGGREGATE,), stats.reports_generated + stats.supplementary_reports)
    add(REPORTS_GENERATED, (FAILURE,), stats.failure_reports)
    for kind, counts in stats.by_kind.items():
        if kind in KINDS:
            for field, result in RESULTS.items():
                add(DELIVERIES, (kind, result), counts.get(field, 0))
    add(FAILURE_DROPPED, (), stats.failure_dropped_reports)
    add(FAILURE_INCIDENTS, (), stats.failure_incidents)
    for outcome_name, n in (
        (bounces.COUNTED, stats.bounces_counted),
        (bounces.UNKNOWN, stats.bounces_unknown),
        (bounces.MISMATCH, stats.bounces_mismatch),
        (bounces.DUPLICATE, stats.bounces_duplicate),
    ):
        add(BOUNCES, (outcome_name,), n)
    for kind in outcome.kinds:
        if kind not in KINDS:
            continue
        labels = (kind,)
        state.gauges[(LAST_RUN, labels)] = finished
        state.gauges[(LAST_RUN_SUCCESS, labels)] = 1.0 if outcome.success else 0.0
        state.gauges[(RUN_DURATION, labels)] = max(outcome.duration, 0.0)
        state.gauges[(LEASE_HELD, labels)] = 1.0 if kind in stats.leases_held else 0.0
        if outcome.success:
            state.gauges[(LAST_SUCCESS, labels)] = finished
        else:
            state.gauges.setdefault((LAST_SUCCESS, labels), 0.0)


@dataclass(frozen=True, slots=True)
class _Database:
    retries_pending: dict[str, int]
    suppressed_destinations: int


def _database_gauges(engine: Engine, now: dt.datetime) -> _Database | None:
    """What the database holds at the end of the run; None (logged) when
    it cannot be read: the gauges are then left out, not guessed."""
    deliveries, reports, entries = DELIVERY_ROWS, REPORT_ROWS, SUPPRESSION_ROWS
    try:
        with engine.connect() as conn:
            # Tried at least once and due again: deliveries merely queued
            # (the send spread, the rate limit) are not retries.
            pending = conn.execute(
                select(reports.c.kind, func.count())
                .select_from(deliveries.join(reports, deliveries.c.report_pk == reports.c.id))
                .where(deliveries.c.status == PENDING, deliveries.c.attempts > 0)
                .group_by(reports.c.kind)
            ).all()
            suppressed = conn.execute(
                select(func.count())
                .select_from(entries)
                .where(
                    and_(
                        entries.c.suppressed_at.is_not(None),
                        or_(entries.c.expires_at.is_(None), entries.c.expires_at > now),
                    )
                )
            ).scalar_one()
    except SQLAlchemyError as exc:
        log.warning(
            "report metrics: cannot count pending retries and suppressions: %s", short_error(exc)
        )
        return None
    counts = dict.fromkeys(KINDS, 0)
    for kind, n in pending:
        if kind in counts:
            counts[kind] = int(n)
    return _Database(retries_pending=counts, suppressed_destinations=int(suppressed))


# -- writing ----------------------------------------------------------------------


class _Families(Collector):
    def __init__(self, state: _State, database: _Database | None) -> None:
        self.state = state
        self.database = database

    def collect(self) -> Iterable[Metric]:
        for name, text in RUN_GAUGES.items():
            gauge = GaugeMetricFamily(name, text, labels=["kind"])
            for kind in KINDS:
                value = self.state.gauges.get((name, (kind,)))
                if value is not None:
                    gauge.add_metric([kind], value)
            yield gauge
        for family, (text, labels, values) in COUNTERS.items():
            counter = CounterMetricFamily(family, text, labels=list(labels))
            for v in values:
                counter.add_metric(list(v), self.state.counters.get((family + "_total", v), 0.0))
            yield counter
        if self.database is not None:
            gauge = GaugeMetricFamily(
                RETRIES_PENDING,
                "Report deliveries that failed temporarily and wait for a retry.",
                labels=["kind"],
            )
            for kind in KINDS:
                gauge.add_metric([kind], self.database.retries_pending[kind])
            yield gauge
            yield GaugeMetricFamily(
                SUPPRESSED_DESTINATIONS,
                "Addresses and domains on the suppression list now.",
                value=self.database.suppressed_destinations,
            )


def _write(path: Path, families: Collector) -> None:
    """Atomically: a temporary file beside ``path`` (whose name does not end
    in .prom, so the textfile collector never reads it half written),
    synced, then renamed over it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(families)
    data = generate_latest(registry)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            # Readable by node_exporter whatever the umask (the units set
            # 0027): it holds counts and times, no domain or address.
            os.fchmod(fh.fileno(), 0o644)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock file beside ``path`` (shared by the runs of this host)
    for up to LOCK_WAIT_SECONDS; past that, or when it cannot be made, go
    on without it: the metrics are not worth a stuck or failed run."""
    try:
        fd = os.open(
            path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
    except OSError:
        yield  # the directory is not writable: the write says so
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    break
                if time.monotonic() >= deadline:
                    log.warning(
                        "report metrics: %s is still locked after %.0f s; writing anyway",
                        path,
                        LOCK_WAIT_SECONDS,
                    )
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


__all__ = [
    "DEFAULT_FILE",
    "LOCK_WAIT_SECONDS",
    "MAX_PREVIOUS_BYTES",
    "RunOutcome",
    "record_run",
    "report_metrics_path",
]
