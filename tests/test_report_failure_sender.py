"""The failure-report sender end to end (RFC 9991; digest §7): incidents
recorded as the milter records them (a message row and a failure_incidents
row holding ``rows.failure_sample`` of a real FailureIncident), a real
database, the loopback DNS server for ruf verification and a real SMTP
server receiving the reports, which parsedmarc then reads.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dmarcmilter.cli import main
from dmarcmilter.config import Config, config_from_mapping
from dmarcmilter.history import db
from dmarcmilter.history.models import (
    FailureIncidentRow,
    MessageRow,
    ReportDeliveryRow,
    ReportRow,
)
from dmarcmilter.history.rows import failure_sample, new_idempotency_key, record_key
from dmarcmilter.report import suppression
from dmarcmilter.report.failure import FailureKind
from dmarcmilter.report.failure_mail import DeliveryResult, FailedSignature, FailureIncident
from dmarcmilter.report.failure_sender import (
    FailureSender,
    FailureStats,
    Incident,
    incident_of_report,
)
from dmarcmilter.report.job import ReportJob, dry_run
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.test_report_generate import BASE, SQLITE_ONLY, SUBMITTER, Clock, ReportSink

AUTHOR = "bank.example"
RUF = "mailto:ruf@bank.example"
IP = "198.51.100.7"
# 12:00:00 is the start of a 10-minute window; runs happen after it closed.
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
AFTER = T0 + dt.timedelta(hours=1)
PERIOD = Period.day(dt.date(2026, 5, 1))
LOCAL_PART = "jane.doe"
MAIL_FROM_LOCAL = "ceo.office"


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.set_zone(
        {
            f"_dmarc.{AUTHOR}": [("TXT", f"v=DMARC1; p=reject; ruf={RUF}")],
            # An external ruf destination that authorizes bank.example.
            f"{AUTHOR}._report._dmarc.reports.example.net": [("TXT", "v=DMARC1;")],
        }
    )
    return dns_server


def make_config(url: str, sink: ReportSink | None = None, **failure: Any) -> Config:
    return config_from_mapping(
        {
            "database": {"url": url},
            "report": {
                "org_name": "Receiver Example",
                "from_address": "dmarc-reports@receiver.example",
                "submitter": SUBMITTER,
                "smtp_host": "127.0.0.1",
                "smtp_port": sink.port if sink else 25,
                "smtp_starttls": "off",
                "smtp_timeout": 5,
            },
            "failure_reports": {"enabled": True, **failure},
        }
    )


def incident(
    at: dt.datetime, reported: str = AUTHOR, ip: str = IP, kind: FailureKind = FailureKind.DMARC
) -> FailureIncident:
    return FailureIncident(
        kind=kind,
        reported_domain=reported,
        source_ip=ip,
        arrival_date=at,
        mail_from=f"{MAIL_FROM_LOCAL}@{reported}",
        rcpt_to=(f"{LOCAL_PART}@receiver.example",),
        authentication_results=(
            f"mx.receiver.example; spf=fail smtp.mailfrom={reported}; "
            f"dkim=fail header.d={reported} header.s=s1; dmarc=fail header.from={reported}"
        ),
        delivery_result=DeliveryResult.REJECT,
        headers=(
            ("From", f"Chief Executive <{MAIL_FROM_LOCAL}@{reported}>"),
            ("To", f"Jane Doe <{LOCAL_PART}@receiver.example>"),
            ("Subject", "Invoice: see https://pay.attacker.example/x"),
            ("Message-ID", f"<m{at.timestamp():.0f}@{reported}>"),
        ),
        dkim_failed=(FailedSignature(reported, "s1", "fail", "", True, "body hash mismatch"),),
        spf_domain=reported,
        spf_result="fail",
        spf_aligned=True,
        spf_record="v=spf1 -all",
    )


def record(
    engine: Engine,
    at: dt.datetime,
    *,
    reported: str = AUTHOR,
    ip: str = IP,
    kinds: str = "dmarc",
    ruf: str = RUF,
    sample: str | None = None,
) -> int:
    """One message and its failure incident, as the milter stores them."""
    row = {
        **BASE,
        "header_from_domain": reported,
        "policy_domain": reported,
        "client_ip": ip,
        "arrived_at": at,
        "rua": "",
        "ruf": ruf,
        "idempotency_key": new_idempotency_key(),
    }
    row["record_key"] = record_key(row)
    with engine.begin() as conn:
        inserted = conn.execute(insert(MessageRow).values(row)).inserted_primary_key
        assert inserted is not None
        done = conn.execute(
            insert(FailureIncidentRow).values(
                message_pk=inserted[0],
                arrived_at=at,
                policy_domain=reported,
                reported_domain=reported,
                source_ip=ip,
                kinds=kinds,
                ruf=ruf,
                sample=sample
                if sample is not None
                else json.dumps(failure_sample(incident(at, reported, ip))),
                status="pending",
                handled_at=None,
            )
        ).inserted_primary_key
    assert done is not None
    return int(done[0])


def sender(config: Config, engine: Engine, now: dt.datetime) -> FailureSender:
    return FailureSender(
        config=config, engine=engine, clock=Clock(now), host="test", stats=FailureStats()
    )


def run_job(
    config: Config, engine: Engine, resolver: Resolver, now: dt.datetime, kinds: Any = ("failure",)
) -> Any:
    return ReportJob(config, engine, resolver=resolver, clock=Clock(now)).run(PERIOD, None, kinds)


def stored(engine: Engine) -> list[Any]:
    """(ReportRow, delivery address) of every failure report, in order."""
    with Session(engine) as session:
        return list(
            session.execute(
                select(ReportRow, ReportDeliveryRow.address)
                .join(ReportDeliveryRow, ReportDeliveryRow.report_pk == ReportRow.id)
                .where(ReportRow.kind == "failure")
                .order_by(ReportRow.id)
            ).all()
        )


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(FailureIncidentRow.status, func.count()).group_by(FailureIncidentRow.status)
        ).all()
    return {status: int(n) for status, n in rows}


def parsed(data: bytes) -> dict[str, Any]:
    result = parsedmarc.parse_report_email(data, offline=True)
    assert result["report_type"] == "failure"
    report: dict[str, Any] = dict(result["report"])
    return report


# -- merging ---------------------------------------------------------------------------


@SQLITE_ONLY
def test_one_source_in_one_window_makes_one_report(engine: Engine, migrated: str) -> None:
    for n in range(7):
        record(engine, T0 + dt.timedelta(seconds=30 * n))
    stats = FailureStats()
    s = sender(make_config(migrated), engine, AFTER)
    s.stats = stats
    s.run()
    (row,) = stored(engine)
    report = row[0]
    assert (stats.failure_reports, stats.failure_incidents) == (1, 7)
    assert report.message_count == 7
    assert report.period_begin == int(T0.timestamp())
    assert report.period_end == int(T0.timestamp()) + 599
    inc = incident_of_report(report.content)
    assert (inc.incidents, inc.kind, inc.source_ip) == (7, FailureKind.DMARC, IP)
    assert inc.arrival_date == T0  # the sample is the earliest incident
    assert statuses(engine) == {"reported": 7}


@SQLITE_ONLY
def test_kind_ip_destination_and_window_each_make_their_own_report(
    engine: Engine, migrated: str
) -> None:
    record(engine, T0)
    record(engine, T0 + dt.timedelta(seconds=5))  # merged with the first
    record(engine, T0, ip="203.0.113.9")  # another source
    record(engine, T0 + dt.timedelta(minutes=10))  # the next window
    record(engine, T0, kinds="dmarc,spf")  # two kinds: dmarc merges, spf alone
    record(engine, T0, ruf=f"{RUF},mailto:ruf@reports.example.net")  # two destinations
    record(engine, T0, reported="other.example", ruf="mailto:ruf@other.example")
    sender(make_config(migrated), engine, AFTER).run()
    groups = sorted(
        (
            incident_of_report(r[0].content).source_ip,
            incident_of_report(r[0].content).kind.value,
            r[1],
            r[0].period_begin - int(T0.timestamp()),
            r[0].message_count,
            r[0].policy_domain,
        )
        for r in stored(engine)
    )
    assert groups == [
        ("198.51.100.7", "dmarc", "ruf@bank.example", 0, 4, AUTHOR),
        ("198.51.100.7", "dmarc", "ruf@bank.example", 600, 1, AUTHOR),
        ("198.51.100.7", "dmarc", "ruf@other.example", 0, 1, "other.example"),
        ("198.51.100.7", "dmarc", "ruf@reports.example.net", 0, 1, AUTHOR),
        ("198.51.100.7", "spf", "ruf@bank.example", 0, 1, AUTHOR),
        ("203.0.113.9", "dmarc", "ruf@bank.example", 0, 1, AUTHOR),
    ]
    ids = [r[0].report_id for r in stored(engine)]
    assert len(set(ids)) == len(ids) and all(i.isalnum() for i in ids)
    assert statuses(engine) == {"reported": 7}


@SQLITE_ONLY
def test_an_open_window_waits(engine: Engine, migrated: str) -> None:
    record(engine, T0 + dt.timedelta(minutes=9))
    sender(make_config(migrated), engine, T0 + dt.timedelta(minutes=9, seconds=30)).run()
    assert stored(engine) == [] and statuses(engine) == {"pending": 1}
    sender(make_config(migrated), engine, T0 + dt.timedelta(minutes=10)).run()
    assert len(stored(engine)) == 1 and statuses(engine) == {"reported": 1}


@SQLITE_ONLY
def test_past_the_per_run_bound_the_rest_waits_whole(engine: Engine, migrated: str) -> None:
    for n in range(3):
        record(engine, T0 + dt.timedelta(seconds=n))
    for n in range(3):
        record(engine, T0 + dt.timedelta(minutes=10, seconds=n))
    s = sender(make_config(migrated), engine, AFTER)
    s.max_incidents = 4  # cuts the second window: it is left whole
    s.run()
    assert [r[0].message_count for r in stored(engine)] == [3]
    assert s.stats.failure_left == 3
    s2 = sender(make_config(migrated), engine, AFTER)
    s2.max_incidents = 4
    s2.run()
    assert [r[0].message_count for r in stored(engine)] == [3, 3]


# -- rate limits -------------------------------------------------------------------------


@SQLITE_ONLY
def test_rate_limit_reports_add_up_and_the_dropped_are_logged(
    engine: Engine, migrated: str, caplog: pytest.LogCaptureFixture
) -> None:
    """N failures from one source over 12 windows: M <= the bucket's
    reports, their Incidents and the dropped ones add up to N, and the drop
    is logged once with its counts."""
    n = 0
    for window in range(12):
        for k in range(window % 3 + 1):
            record(engine, T0 + dt.timedelta(minutes=10 * window, seconds=k))
            n += 1
    config = make_config(migrated, destination_burst=3, destination_per_hour=1)
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.failure_sender")
    s = sender(config, engine, T0 + dt.timedelta(hours=3))
    s.run()
    reports = stored(engine)
    # 3 in the burst; the 2 hours 50 minutes over which they arrive give no
    # refill, because the bucket is only made when the run first sees it.
    assert len(reports) == 3
    made = sum(incident_of_report(r[0].content).incidents for r in reports)
    assert made == s.stats.failure_incidents
    assert made + s.stats.failure_dropped_incidents == n
    assert s.stats.failure_dropped_reports == 12 - 3
    assert statuses(engine) == {"reported": made, "dropped": n - made}
    logged = [r.getMessage() for r in caplog.records if "per-destination" in r.getMessage()]
    assert logged == [
        "failure reports dropped by the per-destination rate limit: "
        f"bank.example 9 reports ({n - made} incidents)"
    ]
    # The bucket refills at destination_per_hour: one more token an hour later.
    for window in range(18, 21):
        record(engine, T0 + dt.timedelta(minutes=10 * window))
    s2 = sender(config, engine, T0 + dt.timedelta(hours=4))
    s2.run()
    assert (s2.stats.failure_reports, s2.stats.failure_dropped_reports) == (1, 2)


@SQLITE_ONLY
def test_each_destination_domain_has_its_own_bucket(engine: Engine, migrated: str) -> None:
    for window in range(4):
        record(engine, T0 + dt.timedelta(minutes=10 * window))
        record(
            engine,
            T0 + dt.timedelta(minutes=10 * window),
            reported="other.example",
            ruf="mailto:ruf@other.example",
        )
    s = sender(make_config(migrated, destination_burst=2), engine, AFTER)
    s.run()
    assert (
        sorted(r[1] for r in stored(engine)) == ["ruf@bank.example"] * 2 + ["ruf@other.example"] * 2
    )


@SQLITE_ONLY
def test_global_cap(engine: Engine, migrated: str, caplog: pytest.LogCaptureFixture) -> None:
    for d in range(6):
        record(engine, T0, reported=f"d{d}.example", ruf=f"mailto:ruf@d{d}.example")
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.failure_sender")
    s = sender(make_config(migrated, max_per_hour=4), engine, AFTER)
    s.run()
    assert len(stored(engine)) == 4
    assert (s.stats.failure_dropped_reports, s.stats.failure_dropped_incidents) == (2, 2)
    assert any(
        "global cap of 4 an hour: 2 reports (2 incidents)" in r.getMessage() for r in caplog.records
    )
    # The cap counts the last hour across runs.
    record(engine, T0 + dt.timedelta(minutes=20), reported="d9.example", ruf="mailto:r@d9.example")
    later = sender(make_config(migrated, max_per_hour=4), engine, AFTER + dt.timedelta(minutes=30))
    later.run()
    assert later.stats.failure_dropped_reports == 1
    again = sender(make_config(migrated, max_per_hour=4), engine, AFTER + dt.timedelta(hours=2))
    record(engine, T0 + dt.timedelta(hours=2), reported="d8.example", ruf="mailto:r@d8.example")
    again.run()
    assert again.stats.failure_reports == 1


class OneSource(FailureSender):
    """A sender that takes only one source's incidents: two of them see
    disjoint incidents, as two hosts do that read the queue at different
    moments, and meet only at the destination's bucket."""

    source: str = ""

    def closed_incidents(self) -> list[Incident]:
        return [i for i in super().closed_incidents() if i.source_ip == self.source]


@pytest.mark.parametrize("migrated", ["postgresql", "mysql"], indirect=True)
def test_two_concurrent_senders_never_exceed_the_bucket(engine: Engine, migrated: str) -> None:
    """Two senders (two hosts without the lease) on one database, started
    together, each with its own incidents for one destination: between
    them no more reports than its bucket holds, every incident handled."""
    sources = ("198.51.100.1", "198.51.100.2")
    for window in range(30):
        for ip in sources:
            record(engine, T0 + dt.timedelta(minutes=10 * window), ip=ip)
    config = make_config(migrated, destination_burst=5, max_per_hour=1000)
    now = T0 + dt.timedelta(hours=8)
    engines = [db.make_engine(migrated) for _ in sources]
    senders = []
    for e, ip in zip(engines, sources, strict=True):
        s = OneSource(config=config, engine=e, clock=Clock(now), host=ip, stats=FailureStats())
        s.source = ip
        s.batch_incidents = 1  # one transaction per report: many chances to interleave
        senders.append(s)
    start = threading.Barrier(len(senders))
    errors: list[BaseException] = []

    def go(s: FailureSender) -> None:
        start.wait()
        try:
            s.run()
        except BaseException as exc:  # shown by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in engines:
        e.dispose()
    assert errors == []
    assert len(stored(engine)) == 5
    assert sum(s.stats.failure_reports for s in senders) == 5
    assert statuses(engine) == {"reported": 5, "dropped": 55}


# -- delivery: ruf verification, suppression, parsedmarc -----------------------------------


def test_reports_are_delivered_and_parsedmarc_reads_them(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    for n in range(3):
        record(engine, T0 + dt.timedelta(seconds=n), kinds="dmarc,dkim,spf")
    record(engine, T0, ip="2001:db8::25")
    stats = run_job(make_config(migrated, sink), engine, resolver, AFTER)
    assert (stats.failure_reports, stats.failure_incidents, stats.sent) == (4, 10, 4)
    by_key = {}
    for delivered in sink.messages:
        assert delivered.mail_from == "dmarc-reports@receiver.example"
        assert delivered.rcpt_tos == ("ruf@bank.example",)
        text = delivered.content.decode("ascii")
        assert LOCAL_PART not in text and MAIL_FROM_LOCAL not in text  # redacted by default
        assert "https://pay.attacker.example" not in text  # defanged
        report = parsed(delivered.content)
        by_key[(report["source"]["ip_address"], report["auth_failure"][0])] = report
    assert set(by_key) == {
        (IP, "dmarc"),
        (IP, "bodyhash"),
        (IP, "spf"),
        ("2001:db8::25", "dmarc"),
    }
    for (ip, _), report in by_key.items():
        assert report["reported_domain"] == AUTHOR
        assert report["authentication_mechanisms"] == ["dkim", "spf"]  # Identity-Alignment
        assert report["incidents"] == ("3" if ip == IP else "1")
        assert report["original_mail_from"].startswith("<redacted-")
        assert report["original_mail_from"].endswith(f"@{AUTHOR}>")
        assert report["arrival_date_utc"] == "2026-05-01 12:00:00"
        assert report["delivery_result"] == "reject"
    # A second run sends nothing again.
    again = run_job(make_config(migrated, sink), engine, resolver, AFTER + dt.timedelta(hours=1))
    assert (again.failure_reports, again.sent) == (0, 0)
    assert len(sink.messages) == 4


@SQLITE_ONLY
def test_the_message_id_carries_the_delivery_token(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    record(engine, T0)
    sender(make_config(migrated, sink), engine, AFTER).run()
    with engine.begin() as conn:
        conn.execute(update(ReportDeliveryRow).values(message_token="tok3n"))
    run_job(make_config(migrated, sink), engine, resolver, AFTER)
    (delivered,) = sink.messages
    (report_id,) = (r[0].report_id for r in stored(engine))
    assert f"Message-ID: <{report_id}.tok3n@{SUBMITTER}>" in delivered.content.decode()


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ({f"{AUTHOR}._report._dmarc.reports.example.net": [("TXT", "v=DMARC1;")]}, "sent"),
        ({}, "refused"),
        ({f"{AUTHOR}._report._dmarc.reports.example.net": "SERVFAIL"}, "pending"),
    ],
    ids=["authorized", "not-authorized", "deferred"],
)
def test_external_ruf_destinations_are_verified(
    engine: Engine,
    migrated: str,
    dns_server: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    records: dict[str, Any],
    expected: str,
) -> None:
    dns_server.set_zone(records)
    record(engine, T0, ruf="mailto:ruf@reports.example.net")
    stats = run_job(make_config(migrated, sink), engine, resolver, AFTER)
    with engine.connect() as conn:
        (status,) = conn.execute(select(ReportDeliveryRow.status)).scalars()
    assert status == expected
    assert len(sink.messages) == (1 if expected == "sent" else 0)
    assert stats.retry_later == (1 if expected == "pending" else 0)
    # The ruf tag is asked for, not only the record's existence: a record
    # authorizing by its rua override alone is not consulted for ruf.
    assert any("._report._dmarc.reports.example.net" in q[0] for q in dns_server.queries)


@SQLITE_ONLY
def test_a_rua_override_does_not_redirect_failure_reports(
    engine: Engine, migrated: str, dns_server: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    dns_server.set_zone(
        {
            f"{AUTHOR}._report._dmarc.reports.example.net": [
                ("TXT", "v=DMARC1; rua=mailto:agg@reports.example.net")
            ]
        }
    )
    record(engine, T0, ruf="mailto:ruf@reports.example.net")
    run_job(make_config(migrated, sink), engine, resolver, AFTER)
    assert [m.rcpt_tos for m in sink.messages] == [("ruf@reports.example.net",)]


@SQLITE_ONLY
def test_suppressed_destinations_get_no_failure_report(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    suppression.add(engine, "bank.example", "asked us to stop", expires=None, now=AFTER)
    record(engine, T0)
    record(engine, T0, reported="other.example", ruf="mailto:ruf@other.example")
    stats = run_job(make_config(migrated, sink), engine, resolver, AFTER)
    assert (stats.sent, stats.suppressed) == (1, 1)
    assert [m.rcpt_tos for m in sink.messages] == [("ruf@other.example",)]


@SQLITE_ONLY
def test_each_phase_delivers_only_its_own_kind(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    from tests.test_report_generate import store

    store(engine, [(2, {})], T0)  # example.com reports to itself (rua)
    record(engine, T0)
    config = make_config(migrated, sink)
    agg = run_job(config, engine, resolver, AFTER + dt.timedelta(days=1), ("aggregate",))
    assert (agg.reports_generated, agg.sent, agg.failure_reports) == (1, 1, 0)
    assert [m.rcpt_tos for m in sink.messages] == [("dmarc@example.com",)]
    fail = run_job(config, engine, resolver, AFTER + dt.timedelta(days=1), ("failure",))
    # retry_hours (72) has not passed: the incident is still reported.
    assert (fail.reports_generated, fail.sent, fail.failure_reports) == (0, 1, 1)
    assert [m.rcpt_tos for m in sink.messages][1:] == [("ruf@bank.example",)]


@SQLITE_ONLY
def test_disabled_makes_and_sends_nothing(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    record(engine, T0)
    stats = run_job(make_config(migrated, sink, enabled=False), engine, resolver, AFTER)
    assert stats.failure_disabled and stats.failure_reports == 0
    assert statuses(engine) == {"pending": 1}
    assert sink.messages == []


@SQLITE_ONLY
def test_stale_incidents_are_dropped_and_counted(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    record(engine, T0)
    stats = run_job(make_config(migrated, sink), engine, resolver, T0 + dt.timedelta(days=4))
    assert (stats.failure_stale, stats.failure_reports) == (1, 0)
    assert statuses(engine) == {"dropped": 1}


@SQLITE_ONLY
def test_sink_down_nothing_is_lost_and_all_goes_out_when_it_is_back(
    engine: Engine, migrated: str, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    for n in range(3):
        record(engine, T0 + dt.timedelta(minutes=10 * n))
    port = sink.port
    sink.stop()
    first = run_job(make_config(migrated, sink), engine, resolver, AFTER)
    assert (first.failure_reports, first.sent, first.retry_later) == (3, 0, 3)
    with engine.connect() as conn:
        assert set(conn.execute(select(ReportDeliveryRow.status)).scalars()) == {"pending"}
    sink.port = port
    sink.start()
    later = run_job(make_config(migrated, sink), engine, resolver, AFTER + dt.timedelta(hours=1))
    assert (later.failure_reports, later.sent) == (0, 3)
    assert sorted(parsed(m.content)["incidents"] for m in sink.messages) == ["1", "1", "1"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    "bad",
    ["not json", json.dumps({"reported_domain": AUTHOR}), json.dumps([1, 2])],
    ids=["not-json", "missing-keys", "not-an-object"],
)
def test_a_bad_sample_is_dropped_and_logged(
    engine: Engine, migrated: str, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    broken = record(engine, T0, sample=bad)  # the earliest: it would give the sample
    record(engine, T0 + dt.timedelta(seconds=1))
    caplog.set_level(logging.WARNING, logger="dmarcmilter.report.failure_sender")
    s = sender(make_config(migrated), engine, AFTER)
    s.run()
    (row,) = stored(engine)
    assert row[0].message_count == 1
    assert s.stats.failure_bad_samples == 1
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(FailureIncidentRow.status).where(FailureIncidentRow.id == broken)
            ).scalar_one()
            == "dropped"
        )
    assert any(f"failure incident {broken}: unreadable" in r.getMessage() for r in caplog.records)


# -- dry run and the command line ----------------------------------------------------------


@SQLITE_ONLY
def test_dry_run_writes_failure_reports_parsedmarc_reads(
    engine: Engine, migrated: str, tmp_path: Path
) -> None:
    for n in range(2):
        record(engine, T0 + dt.timedelta(seconds=n))
    record(engine, T0, ip="203.0.113.9", kinds="spf")
    stats = dry_run(
        make_config(migrated),
        engine,
        PERIOD,
        tmp_path,
        clock=Clock(AFTER),
        kinds=("failure",),
    )
    files = sorted(tmp_path.glob("failure-*.eml"))
    assert len(files) == stats.failure_reports == 2
    reports = sorted(
        (parsed(f.read_bytes()) for f in files), key=lambda r: r["source"]["ip_address"]
    )
    assert [(r["source"]["ip_address"], r["auth_failure"], r["incidents"]) for r in reports] == [
        (IP, ["dmarc"], "2"),
        ("203.0.113.9", ["spf"], "1"),
    ]
    assert all(LOCAL_PART not in f.read_text() for f in files)
    # Nothing written to the database.
    assert statuses(engine) == {"pending": 3}
    assert stored(engine) == []


@SQLITE_ONLY
def test_cli_kind_failure(
    engine: Engine, migrated: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(engine, T0)
    config = tmp_path / "dmarcmilter.toml"
    config.write_text(
        f'[database]\nurl = "{migrated}"\n'
        '[report]\norg_name = "Receiver Example"\n'
        'from_address = "dmarc-reports@receiver.example"\n'
        f'submitter = "{SUBMITTER}"\n'
        "[failure_reports]\nenabled = true\n"
    )
    out = tmp_path / "out"
    code = main(
        ["report", "--config", str(config), "--kind", "failure", "--dry-run", str(out), "--verbose"]
    )
    assert code == 0
    assert len(list(out.glob("failure-*.eml"))) == 1
    assert list(out.glob("*.xml.gz")) == []
    printed = capsys.readouterr().out
    assert "1 failure report(s) (1 incident(s)) written to" in printed


@SQLITE_ONLY
def test_cli_summary_says_failure_reports_are_off(
    engine: Engine, migrated: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(engine, T0)
    config = tmp_path / "dmarcmilter.toml"
    config.write_text(
        f'[database]\nurl = "{migrated}"\n'
        '[report]\norg_name = "Receiver Example"\n'
        'from_address = "dmarc-reports@receiver.example"\n'
        f'submitter = "{SUBMITTER}"\n'
    )
    assert main(["report", "--config", str(config), "--kind", "failure", "--verbose"]) == 0
    assert "failure reports off (failure_reports.enabled = false)" in capsys.readouterr().out
    assert statuses(engine) == {"pending": 1}
