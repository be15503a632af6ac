"""The report job's metrics file: real runs of the report job (a real
database, the loopback DNS server, a real SMTP server), the file they write
parsed back with prometheus_client's own parser, and the command writing it
at [metrics] report_file whatever the run's end.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import logging
import os
import threading
from collections.abc import Collection
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from dmarcmilter.config import Config, config_from_mapping
from dmarcmilter.history.models import LeaseRow
from dmarcmilter.report import run_metrics, suppression
from dmarcmilter.report.job import ReportJob, RunStats
from dmarcmilter.report.lease import LEASE_NAME, LEASE_TTL
from dmarcmilter.report.outbox import KINDS
from dmarcmilter.report.period import Period
from dmarcmilter.report.run_metrics import RunOutcome, record_run, report_metrics_path
from dmarcmilter.resolver import Resolver
from tests import test_report_failure_sender as failure
from tests.dnsserver import TestDNSServer
from tests.test_report_generate import (
    HISTORY,
    PERIOD,
    REPORT_ZONE,
    RUN_AT,
    SQLITE_ONLY,
    Clock,
    ReportSink,
    cli,
    make_config,
    store,
    write_config,
)

LAST_RUN = "dmarcmilter_report_last_run_timestamp_seconds"
LAST_SUCCESS = "dmarcmilter_report_last_success_timestamp_seconds"
SUCCESS = "dmarcmilter_report_last_run_success"
DURATION = "dmarcmilter_report_run_duration_seconds"
LEASE_HELD = "dmarcmilter_report_last_run_lease_held"
GENERATED = "dmarcmilter_report_reports_generated_total"
DELIVERIES = "dmarcmilter_report_deliveries_total"
RETRIES = "dmarcmilter_report_retries_pending"
SUPPRESSED = "dmarcmilter_report_suppressed_destinations"
DROPPED = "dmarcmilter_report_failure_reports_dropped_total"
INCIDENTS = "dmarcmilter_report_failure_incidents_total"
BOUNCES = "dmarcmilter_report_bounces_total"
DAY = dt.timedelta(days=1)
RESULTS = ("sent", "tempfail", "permfail", "refused", "suppressed", "rate_limited")

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.set_zone(
        {
            **REPORT_ZONE,
            f"_dmarc.{failure.AUTHOR}": [("TXT", f"v=DMARC1; p=reject; ruf={failure.RUF}")],
        }
    )
    return dns_server


def read(path: Path) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def deliveries(samples: Samples, kind: str = "aggregate") -> dict[str, float]:
    return {r: value(samples, DELIVERIES, kind=kind, result=r) for r in RESULTS}


def ts(at: dt.datetime) -> float:
    return at.timestamp()


def run(
    config: Config,
    engine: Engine,
    resolver: Resolver,
    at: dt.datetime,
    path: Path,
    kinds: Collection[str] = KINDS,
    period: Period = PERIOD,
) -> RunStats:
    """A report run recorded as the command records it."""
    job = ReportJob(config, engine, resolver=resolver, clock=Clock(at))
    success = False
    try:
        job.run(period, None, kinds)
        success = True
    finally:
        outcome = RunOutcome(tuple(kinds), job.stats, success, at, 2.5)
        assert record_run(path, outcome, engine)
    return job.stats


def test_a_run_that_sent(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    store(engine, HISTORY)
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "report.prom"
    stats = run(make_config(migrated, sink), engine, resolver, RUN_AT, path)
    assert (stats.reports_generated, stats.sent) == (2, 2)

    samples = read(path)
    for kind in KINDS:
        assert value(samples, LAST_RUN, kind=kind) == ts(RUN_AT)
        assert value(samples, LAST_SUCCESS, kind=kind) == ts(RUN_AT)
        assert value(samples, SUCCESS, kind=kind) == 1
        assert value(samples, DURATION, kind=kind) == 2.5
        assert value(samples, RETRIES, kind=kind) == 0
    assert value(samples, LEASE_HELD, kind="aggregate") == 1
    assert value(samples, LEASE_HELD, kind="failure") == 0  # failure reports are off
    assert value(samples, GENERATED, kind="aggregate") == 2
    assert value(samples, GENERATED, kind="failure") == 0
    assert deliveries(samples) == {r: (2 if r == "sent" else 0) for r in RESULTS}
    assert deliveries(samples, "failure") == dict.fromkeys(RESULTS, 0)
    assert value(samples, SUPPRESSED) == 0
    assert samples[BOUNCES] == {
        frozenset({("outcome", o)}): 0 for o in ("counted", "unknown", "mismatch", "duplicate")
    }
    assert (value(samples, DROPPED), value(samples, INCIDENTS)) == (0, 0)
    # Every family the daemon re-exports, and no domain or address in a label.
    assert all(name.startswith("dmarcmilter_report_") for name in samples)
    text = path.read_text()
    assert "example" not in text and "@" not in text
    # No _created samples: a counter's start is not this run's.
    assert not [name for name in samples if name.endswith("_created")]
    # node_exporter reads it whatever the umask (the shipped units set 0027).
    mask = os.umask(0o027)
    try:
        run(make_config(migrated, sink), engine, resolver, RUN_AT, path)
    finally:
        os.umask(mask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    # The temporary file is gone; the lock file stays (it is not *.prom).
    assert sorted(p.name for p in path.parent.iterdir()) == [".report.prom.lock", "report.prom"]


def test_a_run_whose_deliveries_fail_temporarily(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    """A tempfail is a delivery's, not the run's: the run succeeded."""
    store(engine, HISTORY)
    path = tmp_path / "report.prom"
    config = make_config(migrated, sink)
    sink.reply = "451 4.3.0 mailbox busy, try later"
    run(config, engine, resolver, RUN_AT, path)
    samples = read(path)
    assert deliveries(samples) == {r: (2 if r == "tempfail" else 0) for r in RESULTS}
    assert value(samples, RETRIES, kind="aggregate") == 2
    assert value(samples, RETRIES, kind="failure") == 0
    assert value(samples, SUCCESS, kind="aggregate") == 1
    assert value(samples, LAST_SUCCESS, kind="aggregate") == ts(RUN_AT)

    # The counters add up over runs; the retries go out and leave the gauge.
    sink.reply = None
    later = RUN_AT + dt.timedelta(minutes=20)
    run(config, engine, resolver, later, path)
    samples = read(path)
    assert deliveries(samples) == {r: {"tempfail": 2, "sent": 2}.get(r, 0) for r in RESULTS}
    assert value(samples, GENERATED, kind="aggregate") == 2
    assert value(samples, RETRIES, kind="aggregate") == 0
    assert value(samples, LAST_SUCCESS, kind="aggregate") == ts(later)


@SQLITE_ONLY
def test_queued_deliveries_are_not_retries(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    """Deliveries waiting in the send spread were never tried: not retries."""
    store(engine, HISTORY)
    path = tmp_path / "report.prom"
    run(make_config(migrated, sink, send_spread_minutes=600), engine, resolver, RUN_AT, path)
    samples = read(path)
    assert value(samples, GENERATED, kind="aggregate") == 2
    assert deliveries(samples) == dict.fromkeys(RESULTS, 0)
    assert value(samples, RETRIES, kind="aggregate") == 0


def test_a_run_with_suppressed_destinations(
    migrated: str,
    engine: Engine,
    dns_server: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    dns_server.set_zone({})
    suppression.add(engine, "dmarc@one.example", "asked us to stop", expires=None, now=RUN_AT)
    suppression.add(engine, "two.example", "spam domain", expires=None, now=RUN_AT)
    # Expired before the run: not counted, and not suppressing.
    suppression.add(
        engine, "three.example", "once", expires=dt.timedelta(hours=1), now=RUN_AT - DAY
    )
    store(
        engine,
        [
            (1, {"header_from_domain": d, "policy_domain": d, "rua": f"mailto:dmarc@{d}"})
            for d in ("one.example", "two.example", "three.example")
        ],
    )
    path = tmp_path / "report.prom"
    run(make_config(migrated, sink), engine, resolver, RUN_AT, path)
    samples = read(path)
    assert deliveries(samples) == {r: {"suppressed": 2, "sent": 1}.get(r, 0) for r in RESULTS}
    assert value(samples, SUPPRESSED) == 2
    assert value(samples, RETRIES, kind="aggregate") == 0


@SQLITE_ONLY
def test_failure_reports_and_their_rate_limit(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    """Three merge windows, a bucket of one: one report sent, two dropped;
    the aggregate kind's gauges stay as the last aggregate run left them."""
    path = tmp_path / "report.prom"
    config = failure.make_config(migrated, sink, destination_burst=1, destination_per_hour=1)
    config = dataclasses.replace(
        config, report=dataclasses.replace(config.report, send_spread_minutes=0)
    )
    store(engine, HISTORY[:1])
    run(config, engine, resolver, RUN_AT, path, kinds=("aggregate",))
    for n in range(3):
        failure.record(engine, failure.T0 + dt.timedelta(minutes=10 * n))
    later = RUN_AT + dt.timedelta(minutes=5)
    run(config, engine, resolver, later, path, kinds=("failure",))
    samples = read(path)
    assert value(samples, GENERATED, kind="failure") == 1
    assert value(samples, GENERATED, kind="aggregate") == 1
    assert deliveries(samples, "failure") == {r: (1 if r == "sent" else 0) for r in RESULTS}
    assert deliveries(samples, "aggregate") == {r: (1 if r == "sent" else 0) for r in RESULTS}
    assert (value(samples, DROPPED), value(samples, INCIDENTS)) == (2, 1)
    assert value(samples, LAST_RUN, kind="failure") == ts(later)
    assert value(samples, LAST_RUN, kind="aggregate") == ts(RUN_AT)
    assert value(samples, LEASE_HELD, kind="failure") == 1


def test_a_run_another_host_holds_the_lease_of_adds_nothing(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    store(engine, HISTORY)
    path = tmp_path / "report.prom"
    config = make_config(migrated, sink)
    sink.reply = "451 4.3.0 later"
    run(config, engine, resolver, RUN_AT, path, kinds=("aggregate",))
    later = RUN_AT + dt.timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(
            insert(LeaseRow).values(
                name=LEASE_NAME, holder="other-mx:1:x", expires_at=later + LEASE_TTL
            )
        )
    sink.reply = None
    stats = run(config, engine, resolver, later, path, kinds=("aggregate",))
    assert stats.lease_holder == "other-mx:1:x"
    samples = read(path)
    assert value(samples, LAST_RUN, kind="aggregate") == ts(later)
    assert value(samples, LAST_SUCCESS, kind="aggregate") == ts(later)
    assert value(samples, SUCCESS, kind="aggregate") == 1
    assert value(samples, LEASE_HELD, kind="aggregate") == 0
    assert deliveries(samples) == {r: (2 if r == "tempfail" else 0) for r in RESULTS}
    # The database's gauges are the fleet's: this host sees them too.
    assert value(samples, RETRIES, kind="aggregate") == 2


@SQLITE_ONLY
def test_a_failed_run_keeps_the_last_success_and_adds_what_it_did(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    store(engine, HISTORY)
    path = tmp_path / "report.prom"
    config = make_config(migrated, sink)
    run(config, engine, resolver, RUN_AT, path)
    later = RUN_AT + dt.timedelta(hours=1)
    stats = RunStats(sent=1, by_kind={"aggregate": {"sent": 1}}, leases_held=["aggregate"])
    record_run(path, RunOutcome(("aggregate",), stats, False, later, 0.5), engine)
    samples = read(path)
    assert value(samples, LAST_RUN, kind="aggregate") == ts(later)
    assert value(samples, SUCCESS, kind="aggregate") == 0
    assert value(samples, LAST_SUCCESS, kind="aggregate") == ts(RUN_AT)
    assert value(samples, SUCCESS, kind="failure") == 1  # not covered: as it was
    assert value(samples, DELIVERIES, kind="aggregate", result="sent") == 3
    # The first run of a kind failing: no success known, 0.
    other = tmp_path / "other.prom"
    record_run(other, RunOutcome(("failure",), RunStats(), False, later, 0.5), None)
    samples = read(other)
    assert value(samples, LAST_SUCCESS, kind="failure") == 0
    assert list(samples[LAST_SUCCESS]) == [frozenset({("kind", "failure")})]
    # Without the database its gauges are left out, not guessed.
    assert RETRIES not in samples and SUPPRESSED not in samples


GOOD = (
    "# TYPE dmarcmilter_report_deliveries_total counter\n"
    'dmarcmilter_report_deliveries_total{kind="aggregate",result="sent"} 7\n'
)


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("previous", "logged"),
    [
        ("this is { not metrics\n", "not Prometheus text format"),
        (GOOD + "#" * run_metrics.MAX_PREVIOUS_BYTES, "larger than 1048576 bytes"),
        (b"\xff\xfe" + GOOD.encode(), "invalid start byte"),
        (GOOD.replace(" 7", " -7"), "1 value(s) negative or not finite"),
        (GOOD.replace(" 7", " NaN"), "1 value(s) negative or not finite"),
        ("fifo", "not a regular file"),
    ],
    ids=["garbage", "oversize", "not-utf8", "negative", "nan", "fifo"],
)
def test_an_unusable_previous_file_starts_from_zero(
    migrated: str,
    engine: Engine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    previous: str | bytes,
    logged: str,
) -> None:
    path = tmp_path / "report.prom"
    if previous == "fifo":
        os.mkfifo(path)  # would block a plain open for ever
    elif isinstance(previous, bytes):
        path.write_bytes(previous)
    else:
        path.write_text(previous)
    stats = RunStats(sent=1, by_kind={"aggregate": {"sent": 1}})
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.run_metrics")
    assert record_run(path, RunOutcome(KINDS, stats, True, RUN_AT, 1.0), engine)
    assert value(read(path), DELIVERIES, kind="aggregate", result="sent") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert logged in messages[0] and "start again from 0" in messages[0]


@SQLITE_ONLY
def test_foreign_samples_in_the_previous_file_are_dropped(
    migrated: str, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only our own label values come back, so nothing unbounded grows."""
    path = tmp_path / "report.prom"
    path.write_text(
        GOOD
        + 'dmarcmilter_report_deliveries_total{kind="evil.example",result="sent"} 3\n'
        + 'dmarcmilter_report_deliveries_total{kind="aggregate",result="sent",x="y"} 3\n'
        + "# TYPE other_total counter\nother_total 5\n"
    )
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.run_metrics")
    assert record_run(path, RunOutcome(KINDS, RunStats(), True, RUN_AT, 1.0), engine)
    samples = read(path)
    assert value(samples, DELIVERIES, kind="aggregate", result="sent") == 7
    assert len(samples[DELIVERIES]) == 12
    assert "other_total" not in samples and "evil" not in path.read_text()
    assert caplog.records == []


@SQLITE_ONLY
def test_a_write_error_is_logged_and_returned(
    migrated: str, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing" / "report.prom"
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.run_metrics")
    assert not record_run(path, RunOutcome(KINDS, RunStats(), True, RUN_AT, 1.0), engine)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write the report metrics to {path}: No such file or directory"
    ]


@SQLITE_ONLY
def test_runs_on_one_host_take_turns(migrated: str, engine: Engine, tmp_path: Path) -> None:
    """The hourly and the 5-minute cron jobs overlap: no count is lost."""
    path = tmp_path / "report.prom"
    stats = RunStats(sent=1, by_kind={"failure": {"sent": 1}})
    # Another run holds the lock: this one waits for it.
    fd = os.open(tmp_path / ".report.prom.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def record() -> None:
        record_run(path, RunOutcome(("failure",), stats, True, RUN_AT, 1.0), None)
        done.set()

    thread = threading.Thread(target=record)
    thread.start()
    assert not done.wait(0.5)
    assert not path.exists()
    os.close(fd)
    thread.join(5)
    assert done.is_set()
    threads = [threading.Thread(target=record) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert value(read(path), DELIVERIES, kind="failure", result="sent") == 9


# -- the command --------------------------------------------------------------------------


def with_metrics(
    config: Path, report_file: Path | None = None, state_dir: Path | None = None
) -> Path:
    with config.open("a") as fh:
        if report_file is not None:
            fh.write(f'[metrics]\nreport_file = "{report_file}"\n')
        if state_dir is not None:
            fh.write(f'[paths]\nstate_dir = "{state_dir}"\n')
    return config


@SQLITE_ONLY
def test_cli_writes_report_file_and_dry_run_writes_nothing(
    migrated: str, engine: Engine, zone: TestDNSServer, sink: ReportSink, tmp_path: Path
) -> None:
    store(engine, HISTORY[:1])  # reports to itself: no DNS needed to verify it
    path = tmp_path / "prom" / "dmarcmilter-report.prom"
    path.parent.mkdir()
    config = with_metrics(write_config(tmp_path / "c.toml", migrated, sink), report_file=path)
    proc = cli("--config", str(config), "--date", "2026-05-01", "--dry-run", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    assert list(path.parent.iterdir()) == []

    proc = cli("--config", str(config), "--date", "2026-05-01")
    assert (proc.returncode, proc.stderr) == (0, "")
    samples = read(path)
    assert value(samples, SUCCESS, kind="aggregate") == 1
    assert value(samples, GENERATED, kind="aggregate") == 1
    assert deliveries(samples) == {r: (1 if r == "sent" else 0) for r in RESULTS}
    assert len(sink.messages) == 1


@SQLITE_ONLY
def test_cli_default_file_is_in_the_state_directory(
    migrated: str, engine: Engine, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    config = with_metrics(write_config(tmp_path / "c.toml", migrated, None), state_dir=state)
    assert report_metrics_path(config_from_mapping({"paths": {"state_dir": str(state)}})) == (
        state / "report-metrics.prom"
    )
    proc = cli("--config", str(config), "--kind", "failure")
    assert (proc.returncode, proc.stderr) == (0, "")
    samples = read(state / "report-metrics.prom")
    assert value(samples, SUCCESS, kind="failure") == 1
    # A run of one kind says nothing of the other.
    assert list(samples[LAST_RUN]) == [frozenset({("kind", "failure")})]


def test_cli_with_the_database_down_records_a_failed_run(tmp_path: Path) -> None:
    path = tmp_path / "report.prom"
    path.write_text(
        "# TYPE dmarcmilter_report_last_success_timestamp_seconds gauge\n"
        'dmarcmilter_report_last_success_timestamp_seconds{kind="aggregate"} 1.7e9\n'
        'dmarcmilter_report_last_success_timestamp_seconds{kind="failure"} 1.7e9\n'
        "# TYPE dmarcmilter_report_deliveries_total counter\n"
        'dmarcmilter_report_deliveries_total{kind="aggregate",result="sent"} 40\n'
    )
    config = with_metrics(
        write_config(
            tmp_path / "c.toml", "postgresql+psycopg://u@127.0.0.1:9/none?connect_timeout=2", None
        ),
        report_file=path,
    )
    proc = cli("--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.startswith("dmarcmilter report: error: ")
    assert proc.stderr.count("\n") == 1  # nothing more said about the metrics
    samples = read(path)
    for kind in KINDS:
        assert value(samples, SUCCESS, kind=kind) == 0
        assert value(samples, LAST_SUCCESS, kind=kind) == 1.7e9
        assert value(samples, LAST_RUN, kind=kind) > 1.7e9
    assert value(samples, DELIVERIES, kind="aggregate", result="sent") == 40
    assert RETRIES not in samples and SUPPRESSED not in samples


@SQLITE_ONLY
def test_cli_a_refused_transport_is_a_failed_run(
    migrated: str, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "report.prom"
    config = write_config(tmp_path / "c.toml", migrated, None)
    text = config.read_text().replace('smtp_host = "127.0.0.1"\n', "")
    config.write_text(
        text + 'smtp_host = "relay.example.net"\nsmtp_username = "u"\nsmtp_password = "p"\n'
    )
    with_metrics(config, report_file=path)
    proc = cli("--config", str(config), "--kind", "aggregate")
    assert proc.returncode == 1
    samples = read(path)
    assert value(samples, SUCCESS, kind="aggregate") == 0
    assert value(samples, LAST_SUCCESS, kind="aggregate") == 0
    # The database was there: its gauges are.
    assert value(samples, RETRIES, kind="aggregate") == 0


@SQLITE_ONLY
def test_cli_a_metrics_write_error_does_not_change_the_exit_status(
    migrated: str, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "missing" / "report.prom"
    config = with_metrics(write_config(tmp_path / "c.toml", migrated, None), report_file=path)
    proc = cli("--config", str(config), "--kind", "failure")
    assert proc.returncode == 0
    assert proc.stderr == f"cannot write the report metrics to {path}: No such file or directory\n"
