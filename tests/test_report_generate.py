"""The report job end to end: a hand-made history in a real database, the
loopback DNS server for destination verification, and a real SMTP server
(aiosmtpd) receiving the report mail.  What arrives is taken apart again:
the attachment must validate against the RFC 9990 schema and hold what the
history held.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from dmarcmilter.config import Config, config_from_mapping
from dmarcmilter.errors import ConfigError
from dmarcmilter.history import db
from dmarcmilter.history.models import (
    LeaseRow,
    MessageRow,
    ReportAttemptRow,
    ReportDeliveryRow,
    ReportRow,
)
from dmarcmilter.history.rows import new_idempotency_key, record_key
from dmarcmilter.report.job import ReportJob, dry_run
from dmarcmilter.report.lease import LEASE_NAME, LEASE_TTL
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.conftest import ROOT, shared_path
from tests.dnsserver import TestDNSServer
from tests.history_worker import BASE_MESSAGE
from tests.postfixserver import ReportSink

# What does not depend on the database runs on SQLite alone; storing,
# retrying, leasing and the lease race run on every database.
SQLITE_ONLY = pytest.mark.parametrize("migrated", ["sqlite"], indirect=True)

DAY = dt.date(2026, 5, 1)
PERIOD = Period.day(DAY)
NOON = dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)
RUN_AT = dt.datetime(2026, 5, 2, 0, 30, tzinfo=dt.UTC)
SUBMITTER = "mx.receiver.example"

# The reader tests' message, with SPF on the author domain itself.
BASE: dict[str, Any] = {
    **BASE_MESSAGE,
    "sp": None,
    "envelope_from_domain": "example.com",
    "spf_domain": "example.com",
}

# example.com reports to itself; foo.example.com has no record of its own
# and is covered by example.com's; bar.example.com has its own record and
# reports to a third party that must authorize it in DNS.
HISTORY: list[tuple[int, dict[str, Any]]] = [
    (3, {}),
    (
        2,
        {
            "client_ip": "198.51.100.7",
            "header_from_domain": "foo.example.com",
            "envelope_from_domain": "",
            "disposition": "quarantine",
            "dmarc_result": "fail",
            "dkim_aligned": False,
            "spf_aligned": False,
            "spf_domain": "mx.attacker.example",
            "spf_scope": "helo",
            "spf_result": "fail",
            "dkim_summary": "[]",
            "reasons_summary": '[["local_policy","p=reject failure quarantined"]]',
        },
    ),
    (
        4,
        {
            "client_ip": "2001:db8::25",
            "header_from_domain": "bar.example.com",
            "policy_domain": "bar.example.com",
            "envelope_from_domain": "bar.example.com",
            "p": "quarantine",
            "rua": "mailto:agg@reports.example.net",
            "dkim_summary": '[["bar.example.com","k1","pass"],["esp.example","x","fail"]]',
        },
    ),
    # A domain without rua, and one with no URI we can send to: no report.
    (5, {"header_from_domain": "quiet.example", "policy_domain": "quiet.example", "rua": ""}),
    (
        1,
        {
            "header_from_domain": "web.example",
            "policy_domain": "web.example",
            "rua": "https://reports.web.example/dmarc",
        },
    ),
]


def store(engine: Engine, history: list[tuple[int, dict[str, Any]]], at: dt.datetime = NOON) -> int:
    rows = []
    for count, changes in history:
        for _ in range(count):
            row = {**BASE, **changes, "arrived_at": at, "idempotency_key": new_idempotency_key()}
            row["record_key"] = record_key(row)
            rows.append(row)
    with engine.begin() as conn:
        conn.execute(insert(MessageRow), rows)
    return len(rows)


# Two policy domains: example.com reports to itself, bar.example.com to an
# external destination that authorizes it.
REPORT_ZONE: dict[str, Any] = {
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com")],
    "_dmarc.bar.example.com": [
        ("TXT", "v=DMARC1; p=quarantine; rua=mailto:agg@reports.example.net")
    ],
    "_dmarc.reports.example.net": [("TXT", "v=DMARC1; p=none")],
    "bar.example.com._report._dmarc.reports.example.net": [("TXT", "v=DMARC1;")],
}


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.set_zone(REPORT_ZONE)
    return dns_server


def make_config(url: str, sink: ReportSink | None = None, **report: Any) -> Config:
    settings: dict[str, Any] = {
        "org_name": "Receiver Example",
        "from_address": "dmarc-reports@receiver.example",
        "submitter": SUBMITTER,
        "smtp_host": "127.0.0.1",
        "smtp_port": sink.port if sink else 25,
        "smtp_starttls": "off",
        "smtp_timeout": 5,
        # Sent by the first run: the tests of spreading set their own.
        "send_spread_minutes": 0,
    }
    settings.update(report)
    return config_from_mapping({"database": {"url": url}, "report": settings})


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def job(config: Config, engine: Engine, resolver: Resolver, clock: Clock) -> ReportJob:
    return ReportJob(config, engine, resolver=resolver, clock=clock)


def xml_of(content: bytes) -> str:
    return gzip.decompress(content).decode("utf-8")


@pytest.fixture(scope="module")
def schema() -> Any:
    import xmlschema

    return xmlschema.XMLSchema(shared_path("specs", "dmarc-aggregate-report.xsd"))


def test_reports_are_generated_stored_and_delivered(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    schema: Any,
) -> None:
    store(engine, HISTORY)
    config = make_config(migrated, sink)
    stats = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)

    assert (stats.domains, stats.reports_generated, stats.sent) == (3, 2, 2)
    received = sink.attachments()
    assert sorted(received) == ["agg@reports.example.net", "dmarc@example.com"]
    by_domain: dict[str, Any] = {}
    for rcpt, [(filename, content)] in received.items():
        receiver, domain, begin, end, rest = filename.split("!")
        assert (receiver, begin, end) == (SUBMITTER, str(PERIOD.begin_ts), str(PERIOD.end_ts))
        assert rest.endswith(".xml.gz")
        schema.validate(xml_of(content))
        by_domain[domain] = schema.to_dict(xml_of(content))
        assert rcpt == {"example.com": "dmarc@example.com"}.get(domain, rcpt)
    assert sorted(by_domain) == ["bar.example.com", "example.com"]

    # foo.example.com's messages are records in example.com's report.
    main = by_domain["example.com"]
    assert main["report_metadata"]["date_range"] == {"begin": 1777593600, "end": 1777679999}
    assert main["policy_published"]["domain"] == "example.com"
    counts = {
        (r["row"]["source_ip"], r["identifiers"]["header_from"]): r["row"]["count"]
        for r in main["record"]
    }
    assert counts == {("192.0.2.1", "example.com"): 3, ("198.51.100.7", "foo.example.com"): 2}
    spoof = next(r for r in main["record"] if r["row"]["source_ip"] == "198.51.100.7")
    assert spoof["row"]["policy_evaluated"]["disposition"] == "quarantine"
    assert spoof["row"]["policy_evaluated"]["reason"][0]["type"] == "local_policy"
    bar = by_domain["bar.example.com"]
    assert [r["row"]["count"] for r in bar["record"]] == [4]
    assert [d["selector"] for d in bar["record"][0]["auth_results"]["dkim"]] == ["k1", "x"]

    # A real consumer reads the mail as it arrived, and finds the history.
    import parsedmarc

    consumed = {}
    for delivered in sink.messages:
        parsed = parsedmarc.parse_report_email(delivered.content, offline=True)
        assert parsed["report_type"] == "aggregate"
        report = parsed["report"]
        consumed[report["policy_published"]["domain"]] = sorted(
            (
                r["source"]["ip_address"],
                r["count"],
                r["identifiers"]["header_from"],
                r["policy_evaluated"]["disposition"],
                r["policy_evaluated"]["dkim"],
                r["policy_evaluated"]["spf"],
            )
            for r in report["records"]
        )
    assert consumed == {
        "example.com": [
            ("192.0.2.1", 3, "example.com", "pass", "pass", "pass"),
            ("198.51.100.7", 2, "foo.example.com", "quarantine", "fail", "fail"),
        ],
        "bar.example.com": [("2001:db8::25", 4, "bar.example.com", "pass", "pass", "pass")],
    }

    with engine.connect() as conn:
        deliveries = conn.execute(
            select(ReportDeliveryRow.status, ReportDeliveryRow.attempts)
        ).all()
        attempts = conn.execute(select(ReportAttemptRow.result)).scalars().all()
    assert sorted(deliveries) == [("sent", 1), ("sent", 1)]
    assert attempts == ["sent", "sent"]


def test_running_twice_sends_each_report_once(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY)
    config = make_config(migrated, sink)
    job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    again = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=1))).run(PERIOD)
    assert (again.reports_generated, again.domains_already_done, again.sent) == (0, 2, 0)
    assert len(sink.messages) == 2
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ReportRow)).scalar() == 2


@SQLITE_ONLY
def test_report_id_and_bytes_are_stable(
    migrated: str,
    engine: Engine,
    zone: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    tmp_path: Path,
) -> None:
    """The same history gives the same report: the dry run's files equal
    the stored attachment byte for byte."""
    store(engine, HISTORY)
    config = make_config(migrated, sink)
    dry_run(config, engine, PERIOD, tmp_path / "dry")
    job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(ReportRow.filename, ReportRow.content)).all())
    written = {
        p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir() if p.name.endswith(".xml.gz")
    }
    assert written == stored


def test_failed_delivery_is_retried_on_a_later_run(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY[:1])
    config = make_config(migrated, sink)
    sink.reply = "451 4.3.0 mailbox busy, try later"
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.sent, first.retry_later) == (0, 1)
    assert sink.messages == []
    with engine.connect() as conn:
        status, attempts, detail = conn.execute(
            select(
                ReportDeliveryRow.status,
                ReportDeliveryRow.attempts,
                ReportDeliveryRow.detail,
            )
        ).one()
    assert (status, attempts) == ("pending", 1)
    assert "451 4.3.0" in detail
    sink.reply = None
    # Not due yet: the backoff holds it back.
    early = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(minutes=5))).run(PERIOD)
    assert (early.sent, early.retry_later) == (0, 0)
    later = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(minutes=20))).run(PERIOD)
    assert later.sent == 1
    assert len(sink.messages) == 1
    with engine.connect() as conn:
        results = (
            conn.execute(select(ReportAttemptRow.result).order_by(ReportAttemptRow.id))
            .scalars()
            .all()
        )
    assert results == ["tempfail", "sent"]


@SQLITE_ONLY
def test_a_server_that_is_down_is_retried(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY[:1])
    port = sink.port
    sink.stop()
    config = make_config(migrated, sink)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert first.retry_later == 1
    sink.port = port
    sink.start()
    config = make_config(migrated, sink)
    later = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=1))).run(PERIOD)
    assert later.sent == 1
    assert len(sink.messages) == 1


@SQLITE_ONLY
def test_a_permanent_failure_is_not_retried(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY[:1])
    config = make_config(migrated, sink)
    sink.reply = "554 5.6.0 we do not take reports"
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert first.failed == 1
    sink.reply = None
    later = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=1))).run(PERIOD)
    assert later.sent == 0
    assert sink.messages == []


@SQLITE_ONLY
def test_retries_give_up_after_retry_hours(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY[:1])
    config = make_config(migrated, sink, retry_hours=2)
    sink.reply = "451 4.3.0 later"
    job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    last = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=3))).run(PERIOD)
    assert last.failed == 1
    with engine.connect() as conn:
        assert conn.execute(select(ReportDeliveryRow.status)).scalar() == "failed"


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("records", "status", "recipients"),
    [
        ({}, "refused", []),
        (
            {"bar.example.com._report._dmarc.reports.example.net": [("TXT", "v=spf1 -all")]},
            "refused",
            [],
        ),
        (
            {
                "bar.example.com._report._dmarc.reports.example.net": [
                    ("TXT", "v=DMARC1; rua=mailto:other@reports.example.net")
                ]
            },
            "sent",
            ["other@reports.example.net"],
        ),
        (
            {
                "bar.example.com._report._dmarc.reports.example.net": [
                    ("TXT", "v=DMARC1; rua=mailto:agg@elsewhere.example")
                ]
            },
            "refused",
            [],
        ),
    ],
    ids=["no-authorization", "not-dmarc", "override-same-host", "override-other-host"],
)
def test_external_destinations_are_verified(
    migrated: str,
    engine: Engine,
    dns_server: TestDNSServer,
    resolver: Resolver,
    sink: ReportSink,
    records: dict[str, Any],
    status: str,
    recipients: list[str],
) -> None:
    dns_server.set_zone(
        {
            "_dmarc.bar.example.com": [("TXT", "v=DMARC1; p=quarantine")],
            "_dmarc.reports.example.net": [("TXT", "v=DMARC1; p=none")],
            **records,
        }
    )
    store(engine, HISTORY[2:3])
    job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert [m.rcpt_tos[0] for m in sink.messages] == recipients
    with engine.connect() as conn:
        assert conn.execute(select(ReportDeliveryRow.status)).scalar() == status


@SQLITE_ONLY
def test_a_dns_temperror_defers_the_destination(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    zone.set_special("bar.example.com._report._dmarc.reports.example.net", "servfail")
    store(engine, HISTORY[2:3])
    config = make_config(migrated, sink)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.sent, first.retry_later) == (0, 1)
    with engine.connect() as conn:
        assert conn.execute(select(ReportAttemptRow.result)).scalar() == "deferred"
    zone.set_zone(
        {
            "_dmarc.bar.example.com": [("TXT", "v=DMARC1; p=quarantine")],
            "bar.example.com._report._dmarc.reports.example.net": [("TXT", "v=DMARC1")],
        }
    )
    resolver.clear_cache()
    later = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=1))).run(PERIOD)
    assert later.sent == 1
    assert [m.rcpt_tos for m in sink.messages] == [("agg@reports.example.net",)]


@SQLITE_ONLY
def test_rate_limit_per_destination(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    # Three policy domains reporting to the same destination domain.
    zone.add("_dmarc.one.example", "TXT", "v=DMARC1; p=none")
    history = [
        (1, {"header_from_domain": d, "policy_domain": d, "rua": "mailto:r@example.com"})
        for d in ("one.example", "two.example", "three.example")
    ]
    zone.add("*._report._dmarc.example.com", "TXT", "v=DMARC1")
    store(engine, history)
    config = make_config(migrated, sink, rate_limit_per_hour=2)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.sent, first.rate_limited) == (2, 1)
    same_hour = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(minutes=30))).run(PERIOD)
    assert (same_hour.sent, same_hour.rate_limited) == (0, 1)
    next_hour = job(config, engine, resolver, Clock(RUN_AT + dt.timedelta(hours=1))).run(PERIOD)
    assert next_hour.sent == 1
    assert len(sink.messages) == 3


def test_a_policy_change_within_the_period_makes_one_report_per_configuration(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, [(2, {"p": "none"})], at=NOON - dt.timedelta(hours=6))
    store(engine, [(3, {"p": "reject"})], at=NOON + dt.timedelta(hours=6))
    stats = job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (stats.reports_generated, stats.sent) == (2, 2)
    seen = {}
    for filename, content in sink.attachments()["dmarc@example.com"]:
        text = xml_of(content)
        policy = "none" if "<p>none</p>" in text else "reject"
        seen[policy] = text.count("<count>"), filename
    assert sorted(seen) == ["none", "reject"]
    assert seen["none"][1] != seen["reject"][1]


@SQLITE_ONLY
def test_domain_option_limits_the_run(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY)
    stats = job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(
        PERIOD, "bar.example.com"
    )
    assert (stats.domains, stats.sent) == (1, 1)
    assert [m.rcpt_tos for m in sink.messages] == [("agg@reports.example.net",)]


def test_messages_outside_the_period_are_not_reported(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, [(1, {})], at=PERIOD.begin - dt.timedelta(microseconds=1))
    store(engine, [(2, {})], at=PERIOD.end)
    store(engine, [(4, {})], at=PERIOD.begin)
    job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(PERIOD)
    [(_, content)] = sink.attachments()["dmarc@example.com"]
    assert "<count>4</count>" in xml_of(content)


def test_a_held_lease_keeps_a_second_run_out(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY)
    with engine.begin() as conn:
        conn.execute(
            insert(LeaseRow).values(
                name=LEASE_NAME, holder="other-mx:1:x", expires_at=RUN_AT + LEASE_TTL
            )
        )
    config = make_config(migrated, sink)
    stats = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert stats.lease_holder == "other-mx:1:x"
    assert (stats.reports_generated, len(sink.messages)) == (0, 0)
    # A lease left by a run that died is taken over once it expires.
    later = job(config, engine, resolver, Clock(RUN_AT + LEASE_TTL * 2)).run(PERIOD)
    assert later.lease_holder is None
    assert later.sent == 2
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(LeaseRow)).scalar() == 0


@SQLITE_ONLY
def test_dry_run_writes_files_and_nothing_else(
    migrated: str, engine: Engine, sink: ReportSink, tmp_path: Path, schema: Any
) -> None:
    store(engine, HISTORY)
    out = tmp_path / "out"
    stats = dry_run(make_config(migrated, sink), engine, PERIOD, out)
    assert stats.reports_generated == 2
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4
    for name in names:
        if name.endswith(".xml.gz"):
            schema.validate(xml_of((out / name).read_bytes()))
            assert f"{name}.eml" in names
        else:
            msg = email.message_from_bytes((out / name).read_bytes(), policy=email.policy.default)
            assert msg["Subject"].startswith("Report Domain: ")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ReportRow)).scalar() == 0
    assert sink.messages == []


def test_missing_settings_name_the_key(migrated: str) -> None:
    config = config_from_mapping({"database": {"url": migrated}, "report": {"org_name": "X"}})
    engine = db.make_engine(migrated)
    try:
        with pytest.raises(ConfigError, match=r"report\.from_address is not set"):
            ReportJob(config, engine)
    finally:
        engine.dispose()


# -- the command -----------------------------------------------------------------------


def write_config(path: Path, url: str, sink: ReportSink | None, **extra: Any) -> Path:
    port = sink.port if sink else 25
    lines = [
        "[database]",
        f'url = "{url}"',
        "[report]",
        'org_name = "Receiver Example"',
        'from_address = "dmarc-reports@receiver.example"',
        f'submitter = "{SUBMITTER}"',
        'smtp_host = "127.0.0.1"',
        f"smtp_port = {port}",
        'smtp_starttls = "off"',
    ]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@SQLITE_ONLY
def test_cli_shows_progress_on_a_terminal(migrated: str, engine: Engine, tmp_path: Path) -> None:
    import pty

    store(engine, HISTORY)
    config = write_config(tmp_path / "c.toml", migrated, None)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dmarcmilter",
                "report",
                "--config",
                str(config),
                "--date",
                "2026-05-01",
                "--dry-run",
                str(tmp_path / "d"),
            ],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0
    assert b"0/3 bar.example.com" in shown
    assert b"[##############################] 3/3" in shown
    assert "2 report(s) for 3 domain(s)" in proc.stdout


@SQLITE_ONLY
def test_cli_dry_run_is_quiet_off_a_terminal(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine, HISTORY)
    config = write_config(tmp_path / "c.toml", migrated, None)
    proc = cli("--config", str(config), "--date", "2026-05-01", "--dry-run", str(tmp_path / "d"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert len(list((tmp_path / "d").glob("*.xml.gz"))) == 2
    proc = cli(
        "--config",
        str(config),
        "--date",
        "2026-05-01",
        "--dry-run",
        str(tmp_path / "v"),
        "--verbose",
        "--format",
        "rfc7489",
    )
    assert proc.returncode == 0
    assert "2 report(s) for 3 domain(s)" in proc.stdout
    text = xml_of(next((tmp_path / "v").glob("*.xml.gz")).read_bytes())
    assert "urn:ietf:params:xml:ns:dmarc-2.0" not in text
    assert "<pct>" in text


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--date", "2026-13-01"), "--date: expected YYYY-MM-DD, got '2026-13-01'"),
        (("--date", "2999-01-01"), "--date 2999-01-01: the day is not over yet (UTC)"),
        (("--until", "2026-05-01"), "--until needs --since"),
        (("--since", "yesterday"), "--since: expected an ISO 8601 time"),
        (("--since", "2026-05-02", "--until", "2026-05-01"), "is not after --since"),
        (("--domain", "bad..name"), "--domain:"),
    ],
)
def test_cli_bad_input(migrated: str, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    config = write_config(tmp_path / "c.toml", migrated, None)
    proc = cli("--config", str(config), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_cli_without_report_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/h.sqlite3"\n')
    proc = cli("--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"dmarcmilter report: error: {config}: report.org_name is not set; aggregate "
        "reports need it (see [report] in etc/dmarcmilter.toml)\n"
    )


@SQLITE_ONLY
def test_cli_refuses_auth_in_the_clear_before_generating(
    migrated: str, engine: Engine, tmp_path: Path
) -> None:
    store(engine, HISTORY)
    config = write_config(tmp_path / "c.toml", migrated, None)
    with config.open("a") as fh:
        fh.write('smtp_host = "relay.example.net"\nsmtp_username = "u"\nsmtp_password = "p"\n')
    config.write_text(config.read_text().replace('smtp_host = "127.0.0.1"\n', ""))
    proc = cli("--config", str(config), "--date", "2026-05-01")
    assert proc.returncode == 1
    assert proc.stderr.startswith("dmarcmilter report: error: [report] smtp_* settings: smtp AUTH")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ReportRow)).scalar() == 0


def test_cli_with_the_database_down(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", "postgresql+psycopg://u@127.0.0.1:9/none?connect_timeout=2", None
    )
    proc = cli("--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.startswith("dmarcmilter report: error: ")
    assert "Traceback" not in proc.stderr


def test_two_concurrent_runs_on_postgresql_send_each_report_once(
    pg_db: str, dns_server: TestDNSServer, sink: ReportSink, tmp_path: Path
) -> None:
    """A fleet: two hosts start the report job at the same moment."""
    db.upgrade(pg_db)
    engine = db.make_engine(pg_db)
    try:
        # Enough domains that the first run is still going when the second
        # starts.
        domains = [f"d{i}.example" for i in range(150)]
        store(
            engine,
            [
                (2, {"header_from_domain": d, "policy_domain": d, "rua": f"mailto:r@{d}"})
                for d in domains
            ],
        )
        config = write_config(tmp_path / "c.toml", pg_db, sink)
        procs: list[subprocess.CompletedProcess[str]] = []
        barrier = threading.Barrier(2)

        def one() -> None:
            barrier.wait()
            procs.append(cli("--config", str(config), "--date", "2026-05-01", "--verbose"))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
        # They overlapped: one ran, the other found the lease held.
        outputs = sorted(p.stdout for p in procs)
        outputs.sort(key=lambda out: "nothing done here" in out)
        assert "is running the reports; nothing done here" in outputs[1], outputs
        assert f"{len(domains)} report(s) generated" in outputs[0], outputs
        # Each report arrived once.
        rcpts = sorted(r for m in sink.messages for r in m.rcpt_tos)
        assert rcpts == sorted(f"r@{d}" for d in domains)
        with engine.connect() as conn:
            sent = conn.execute(
                select(func.count())
                .select_from(ReportDeliveryRow)
                .where(ReportDeliveryRow.status == "sent")
            ).scalar()
            assert sent == len(domains)
        # And a third run later sends nothing more.
        proc = cli("--config", str(config), "--date", "2026-05-01")
        assert proc.returncode == 0
        assert len(sink.messages) == len(domains)
    finally:
        engine.dispose()


def test_lease_is_renewed_and_lost_lease_stops_the_run(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    from dmarcmilter.errors import ReportError
    from dmarcmilter.report.lease import Lease

    clock = Clock(RUN_AT)
    lease = Lease(engine, LEASE_NAME, "me", clock)
    assert lease.acquire() is None
    assert Lease(engine, LEASE_NAME, "you", clock).acquire() == "me"
    clock.now += LEASE_TTL / 2
    lease.renew()
    clock.now += LEASE_TTL / 2 + dt.timedelta(seconds=1)
    # Still ours: the renewal pushed the expiry on.
    assert Lease(engine, LEASE_NAME, "you", clock).acquire() == "me"
    with engine.begin() as conn:
        conn.execute(update(LeaseRow).values(holder="thief"))
    with pytest.raises(ReportError, match="lost the report-run lease"):
        lease.renew(force=True)


def test_prune_deletes_old_reports_with_their_deliveries(
    migrated: str, engine: Engine, zone: TestDNSServer, resolver: Resolver, sink: ReportSink
) -> None:
    store(engine, HISTORY)
    job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(PERIOD)
    # The period ended at 2026-05-02T00:00Z: 29 days later it is kept, 31 days later not.
    assert (
        db.prune_reports(migrated, dt.timedelta(days=30), now=RUN_AT + dt.timedelta(days=29)) == 0
    )
    assert (
        db.prune_reports(migrated, dt.timedelta(days=30), now=RUN_AT + dt.timedelta(days=31)) == 2
    )
    with engine.connect() as conn:
        for table in (ReportRow, ReportDeliveryRow, ReportAttemptRow):
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"authserv_id": "mx"},
            "report.submitter is unset, so the authserv-id 'mx' is used: set report.submitter",
        ),
        (
            {"report": {"org_name": "O" * 300, "submitter": SUBMITTER}},
            "org name longer than 256 characters",
        ),
    ],
)
def test_settings_report_mail_cannot_carry_are_refused(
    config: dict[str, Any], message: str
) -> None:
    from dmarcmilter.report.aggregate import ReportSettings

    report = {
        "org_name": "Receiver",
        "from_address": "r@receiver.example",
        **config.pop("report", {}),
    }
    with pytest.raises(ConfigError, match=r"\[report\]: ") as raised:
        ReportSettings.from_config(config_from_mapping({**config, "report": report}))
    assert message in str(raised.value)
