"""Bounce-driven suppression, the checking side: a recorded bounce counts
only when it names one of our report mails by its whole Message-ID, token
included, and the address that mail went to; a forged one never does.

A real database and a real SMTP server (aiosmtpd); the report_bounces rows
are what the milter records from a delivery status notification.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from dmarcmilter.history.models import ReportBounceRow, ReportDeliveryRow, ReportRow
from dmarcmilter.report import bounces, suppression
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.test_report_generate import (
    DAY,
    NOON,
    RUN_AT,
    SQLITE_ONLY,
    SUBMITTER,
    Clock,
    ReportSink,
    cli,
    job,
    make_config,
    store,
    write_config,
)

ADDRESS = "dmarc@one.example"


@pytest.fixture(autouse=True)
def no_dns(dns_server: TestDNSServer) -> None:
    dns_server.set_zone({})


def day(n: int) -> tuple[Period, dt.datetime]:
    shift = dt.timedelta(days=n)
    return Period.day(DAY + shift), RUN_AT + shift


def report_day(
    migrated: str, engine: Engine, resolver: Resolver, sink: ReportSink, n: int, **report: Any
) -> Any:
    """Report day ``n`` of one.example to ADDRESS; the run's stats."""
    period, run_at = day(n)
    store(
        engine,
        [
            (
                1,
                {
                    "header_from_domain": "one.example",
                    "policy_domain": "one.example",
                    "rua": f"mailto:{ADDRESS}",
                },
            )
        ],
        NOON + dt.timedelta(days=n),
    )
    return job(make_config(migrated, sink, **report), engine, resolver, Clock(run_at)).run(period)


def delivery(engine: Engine, n: int = -1) -> tuple[str, str]:
    """(report id, token) of the n-th delivery."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(ReportRow.report_id, ReportDeliveryRow.message_token)
            .join(ReportRow, ReportDeliveryRow.report_pk == ReportRow.id)
            .order_by(ReportDeliveryRow.id)
        ).all()
    report_id, token = rows[n]
    return str(report_id), str(token)


def bounce(engine: Engine, message_id: str, address: str = ADDRESS) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(ReportBounceRow).values(
                received_at=RUN_AT,
                original_message_id=message_id,
                address=address,
                status="5.1.1",
                diagnostic="smtp; 550 5.1.1 user unknown",
                reporting_mta="dns; mx.one.example",
                processed_at=None,
                outcome=None,
            )
        )


def outcomes(engine: Engine) -> list[str | None]:
    with engine.connect() as conn:
        return [
            outcome
            for (outcome,) in conn.execute(
                select(ReportBounceRow.outcome).order_by(ReportBounceRow.id)
            ).all()
        ]


def test_only_a_bounce_naming_our_mail_and_its_address_counts_and_only_once(
    migrated: str,
    engine: Engine,
    resolver: Resolver,
    sink: ReportSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert report_day(migrated, engine, resolver, sink, 0).sent == 1
    report_id, token = delivery(engine)
    # Forgeries: the report id is public, the token is not.
    bounce(engine, f"<{report_id}@{SUBMITTER}>")
    bounce(engine, f"<{report_id}.{'0' * 32}@{SUBMITTER}>")
    bounce(engine, f"<{report_id}.{token[:-1]}@{SUBMITTER}>")
    bounce(engine, f"<{report_id}.{token}@other.example>")
    bounce(engine, "not a message id")
    # Our mail, but another address: the token proves nothing about it.
    bounce(engine, f"<{report_id}.{token}@{SUBMITTER}>", "victim@two.example")
    # The real one (an MTA may change the case), then the same again.
    bounce(engine, f" <{report_id}.{token}@{SUBMITTER.upper()}> ", "DMARC@One.Example")
    bounce(engine, f"<{report_id}.{token}@{SUBMITTER}>")
    caplog.set_level(logging.INFO, logger="dmarcmilter.report.bounces")
    stats = report_day(migrated, engine, resolver, sink, 1)

    assert outcomes(engine) == [
        *["unknown"] * 5,
        "mismatch",
        "counted",
        "duplicate",
    ]
    assert (
        stats.bounces_counted,
        stats.bounces_unknown,
        stats.bounces_mismatch,
        stats.bounces_duplicate,
    ) == (1, 5, 1, 1)
    [entry] = suppression.entries(engine)
    assert (entry.target, entry.bounces, entry.source) == (
        ADDRESS,
        1,
        suppression.SuppressionSource.BOUNCE,
    )
    assert suppression.is_suppressed(engine, "victim@two.example", now=RUN_AT) is None
    assert len([m for m in caplog.messages if m.startswith("bounce ")]) == 8
    # Processed once: a later run looks at none of them again.
    later = report_day(migrated, engine, resolver, sink, 2)
    assert later.bounces_counted + later.bounces_unknown + later.bounces_duplicate == 0
    assert suppression.entries(engine)[0].bounces == 1


def test_bounces_up_to_the_threshold_suppress_and_the_next_run_sends_nothing_there(
    migrated: str, engine: Engine, resolver: Resolver, sink: ReportSink
) -> None:
    settings = {"suppress_after_bounces": 2, "suppress_days": 30}
    report_day(migrated, engine, resolver, sink, 0, **settings)
    report_id, token = delivery(engine)
    bounce(engine, f"<{report_id}.{token}@{SUBMITTER}>")
    report_day(migrated, engine, resolver, sink, 1, **settings)
    assert suppression.is_suppressed(engine, ADDRESS, now=RUN_AT) is None
    report_id, token = delivery(engine)
    bounce(engine, f"<{report_id}.{token}@{SUBMITTER}>")
    # The bounce is checked before the deliveries of the same run.
    stats = report_day(migrated, engine, resolver, sink, 2, **settings)
    assert (stats.bounces_counted, stats.sent, stats.suppressed) == (1, 0, 1)
    entry = suppression.is_suppressed(engine, ADDRESS, now=RUN_AT + dt.timedelta(days=2))
    assert entry is not None and entry.source is suppression.SuppressionSource.BOUNCE
    assert len(sink.messages) == 2


@SQLITE_ONLY
def test_a_run_checks_at_most_its_bound_and_leaves_the_rest(
    migrated: str, engine: Engine, resolver: Resolver, sink: ReportSink
) -> None:
    for n in range(3):
        bounce(engine, f"<x{n}@{SUBMITTER}>")
    stats = bounces.BounceStats()
    config = make_config(migrated, sink)
    bounces.process(engine, config, SUBMITTER, Clock(RUN_AT), stats, limit=2)
    assert stats.bounces_left and stats.bounces_unknown == 2
    assert outcomes(engine) == ["unknown", "unknown", None]
    stats = bounces.BounceStats()
    bounces.process(engine, config, SUBMITTER, Clock(RUN_AT), stats, limit=2)
    assert not stats.bounces_left and outcomes(engine) == ["unknown"] * 3


@SQLITE_ONLY
def test_the_report_command_says_what_the_bounces_came_to(
    migrated: str, engine: Engine, sink: ReportSink, tmp_path: Path
) -> None:
    store(
        engine,
        [
            (
                1,
                {
                    "header_from_domain": "one.example",
                    "policy_domain": "one.example",
                    "rua": f"mailto:{ADDRESS}",
                },
            )
        ],
    )
    bounce(engine, f"<{'a' * 32}.{'b' * 32}@{SUBMITTER}>")
    config = write_config(tmp_path / "c.toml", migrated, sink, min_messages=2)
    proc = cli("--config", str(config), "--date", "2026-05-01", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert (
        "0 report(s) generated (0 domain(s) already done, 1 below report.min_messages)"
        in proc.stdout
    )
    assert "bounces: 0 counted, 1 unknown, 0 mismatched, 0 duplicate" in proc.stdout
    assert outcomes(engine) == ["unknown"]
