"""The outbox never mails a suppressed destination, and a destination the
smarthost refuses for good suppresses itself (digest §6.3; issue item 6).

A real database, the loopback DNS server and a real SMTP server (aiosmtpd)
that can refuse recipients, as the report job meets them in production.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from dmarcmilter.history.models import ReportAttemptRow, ReportDeliveryRow
from dmarcmilter.report import suppression
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.test_report_generate import (
    DAY,
    NOON,
    RUN_AT,
    SQLITE_ONLY,
    Clock,
    ReportSink,
    job,
    make_config,
    store,
)

REFUSAL = "550 5.1.1 <dmarc@gone.example>: Recipient address rejected: User unknown"


class RefusingSink(ReportSink):
    """The test SMTP server; refuses the addresses in ``refuse`` at RCPT and
    remembers every RCPT it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: dict[str, str] = {}
        self.rcpts: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpts.append(address)
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


@pytest.fixture
def sink() -> Iterator[RefusingSink]:
    server = RefusingSink()
    server.start()
    yield server
    server.stop()


def reporting(*pairs: tuple[str, str]) -> list[tuple[int, dict[str, Any]]]:
    """One message per (policy domain, rua address)."""
    return [
        (1, {"header_from_domain": d, "policy_domain": d, "rua": f"mailto:{address}"})
        for d, address in pairs
    ]


def day(n: int) -> tuple[Period, dt.datetime, dt.datetime]:
    """The period of DAY + n, a time within it and the run after it."""
    shift = dt.timedelta(days=n)
    return Period.day(DAY + shift), NOON + shift, RUN_AT + shift


def statuses(engine: Engine) -> dict[str, list[str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(ReportDeliveryRow.address, ReportDeliveryRow.status).order_by(
                ReportDeliveryRow.id
            )
        ).all()
    out: dict[str, list[str]] = {}
    for address, status in rows:
        out.setdefault(address, []).append(status)
    return out


def test_suppressed_address_and_domain_get_nothing_others_do(
    migrated: str,
    engine: Engine,
    dns_server: TestDNSServer,
    resolver: Resolver,
    sink: RefusingSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns_server.set_zone({})
    suppression.add(engine, "dmarc@one.example", "asked us to stop", expires=None, now=RUN_AT)
    suppression.add(engine, "two.example", "spam domain", expires=None, now=RUN_AT)
    period, noon, run_at = day(0)
    store(
        engine,
        reporting(
            ("one.example", "dmarc@one.example"),
            ("two.example", "dmarc@two.example"),
            ("three.example", "dmarc@three.example"),
            # A second report to the suppressed address, from an external
            # policy domain: suppressed before any DNS query is made.
            ("five.example", "dmarc@one.example"),
        ),
        noon,
    )
    caplog.set_level(logging.INFO, logger="dmarcmilter.report.outbox")
    stats = job(make_config(migrated, sink), engine, resolver, Clock(run_at)).run(period)

    assert (stats.sent, stats.suppressed, stats.failed, stats.retry_later) == (1, 3, 0, 0)
    assert sink.rcpts == ["dmarc@three.example"]
    assert statuses(engine) == {
        "dmarc@one.example": ["suppressed", "suppressed"],
        "dmarc@two.example": ["suppressed"],
        "dmarc@three.example": ["sent"],
    }
    assert not [q for q in dns_server.queries if "._report._dmarc." in q[0]]
    with engine.connect() as conn:
        details = conn.execute(
            select(ReportAttemptRow.detail).where(ReportAttemptRow.result == "suppressed")
        ).scalars()
        assert sorted(d.split(" (")[0] for d in details) == [
            "suppressed by dmarc@one.example",
            "suppressed by dmarc@one.example",
            "suppressed by two.example",
        ]
    # Logged once per destination and run.
    logged = [r.getMessage() for r in caplog.records if "are suppressed" in r.getMessage()]
    assert len(logged) == 2
    assert sum("dmarc@one.example" in m for m in logged) == 1

    # Settled, not retried: a later run has nothing to do.
    later = job(
        make_config(migrated, sink), engine, resolver, Clock(run_at + dt.timedelta(hours=2))
    )
    again = later.run(period)
    assert (again.sent, again.suppressed) == (0, 0)


@SQLITE_ONLY
def test_expiry_lifts_a_suppression(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    dns_server.set_zone({})
    config = make_config(migrated, sink)
    suppression.add(engine, "one.example", "for a day", expires=dt.timedelta(days=1), now=RUN_AT)
    for n in (0, 1):
        store(engine, reporting(("one.example", "dmarc@one.example")), day(n)[1])
    first = job(config, engine, resolver, Clock(RUN_AT)).run(day(0)[0])
    assert (first.sent, first.suppressed) == (0, 1)
    second = job(config, engine, resolver, Clock(day(1)[2])).run(day(1)[0])
    assert (second.sent, second.suppressed) == (1, 0)
    assert sink.rcpts == ["dmarc@one.example"]


@SQLITE_ONLY
def test_smarthost_refusals_suppress_at_the_threshold_and_remove_lifts_it(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    dns_server.set_zone({})
    config = make_config(migrated, sink, suppress_after_bounces=2, suppress_days=30)
    address = "dmarc@gone.example"
    sink.refuse[address] = REFUSAL
    for n in range(4):
        store(
            engine,
            reporting(("gone.example", address), ("fine.example", "dmarc@fine.example")),
            day(n)[1],
        )

    def run(n: int) -> Any:
        period, _, run_at = day(n)
        return job(config, engine, resolver, Clock(run_at)).run(period)

    first = run(0)
    assert (first.sent, first.failed, first.hard_bounces, first.suppressed) == (1, 1, 1, 0)
    assert suppression.is_suppressed(engine, address, now=day(0)[2]) is None
    second = run(1)
    assert (second.sent, second.failed, second.hard_bounces) == (1, 1, 1)
    entry = suppression.is_suppressed(engine, address, now=day(1)[2])
    assert entry is not None
    assert entry.source is suppression.SuppressionSource.SMARTHOST
    assert "User unknown" in entry.reason
    assert entry.expires_at == day(1)[2] + dt.timedelta(days=30)

    # Suppressed: the relay is not even asked.
    asked = len(sink.rcpts)
    third = run(2)
    assert (third.sent, third.suppressed, third.failed, third.hard_bounces) == (1, 1, 0, 0)
    assert sink.rcpts[asked:] == ["dmarc@fine.example"]

    # `suppress remove` (the module behind it) lifts it at once.
    assert suppression.remove(engine, address)
    del sink.refuse[address]
    fourth = run(3)
    assert (fourth.sent, fourth.suppressed) == (2, 0)
    assert statuses(engine)[address] == ["failed", "failed", "suppressed", "sent"]


@SQLITE_ONLY
def test_reaching_the_threshold_suppresses_the_rest_of_the_run(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    dns_server.set_zone({})
    config = make_config(migrated, sink, suppress_after_bounces=1)
    address = "dmarc@gone.example"
    sink.refuse[address] = REFUSAL
    store(engine, reporting(("gone.example", address), ("six.example", address)), NOON)
    dns_server.set_zone({"*._report._dmarc.gone.example": [("TXT", "v=DMARC1")]})
    stats = job(config, engine, resolver, Clock(RUN_AT)).run(day(0)[0])
    assert (stats.failed, stats.hard_bounces, stats.suppressed) == (1, 1, 1)
    assert sink.rcpts == [address]


@SQLITE_ONLY
def test_a_refusal_about_us_suppresses_nothing(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    # A smarthost that denies relaying refuses every recipient; that must
    # not put every destination on the list.
    dns_server.set_zone({})
    config = make_config(migrated, sink, suppress_after_bounces=1)
    sink.refuse["dmarc@one.example"] = "554 5.7.1 <dmarc@one.example>: Relay access denied"
    store(engine, reporting(("one.example", "dmarc@one.example")), NOON)
    stats = job(config, engine, resolver, Clock(RUN_AT)).run(day(0)[0])
    assert (stats.failed, stats.hard_bounces) == (1, 0)
    assert suppression.entries(engine) == []


@SQLITE_ONLY
def test_a_suppression_list_that_cannot_be_read_sends_nothing(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    from sqlalchemy import text

    from dmarcmilter.errors import DatabaseError

    dns_server.set_zone({})
    store(engine, reporting(("one.example", "dmarc@one.example")), NOON)
    config = make_config(migrated, sink)
    report_job = job(config, engine, resolver, Clock(RUN_AT))
    report_job.generate(day(0)[0], None)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE suppressions"))
    with pytest.raises(DatabaseError, match="suppression list"):
        report_job.deliver()
    assert sink.rcpts == []
    assert statuses(engine) == {"dmarc@one.example": ["pending"]}


@SQLITE_ONLY
def test_a_suppressed_override_address_gets_nothing(
    migrated: str, engine: Engine, dns_server: TestDNSServer, resolver: Resolver, sink: RefusingSink
) -> None:
    # The destination authorizes the report but redirects it to another
    # address on its host; that address is on the list.
    dns_server.set_zone(
        {
            "_dmarc.bar.example.com": [("TXT", "v=DMARC1; p=none")],
            "_dmarc.reports.example.net": [("TXT", "v=DMARC1; p=none")],
            "bar.example.com._report._dmarc.reports.example.net": [
                ("TXT", "v=DMARC1; rua=mailto:other@reports.example.net")
            ],
        }
    )
    suppression.add(engine, "other@reports.example.net", "dead", expires=None, now=RUN_AT)
    store(engine, reporting(("bar.example.com", "agg@reports.example.net")), NOON)
    stats = job(make_config(migrated, sink), engine, resolver, Clock(RUN_AT)).run(day(0)[0])
    assert (stats.sent, stats.suppressed) == (0, 1)
    assert sink.rcpts == []
    assert statuses(engine) == {"other@reports.example.net": ["suppressed"]}
