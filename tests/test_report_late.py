"""Aggregate reports as the issue's safe-sending items ask: a secret token
in each report mail's Message-ID, sending spread over a window after the
period, no report below report.min_messages, and late rows (written after
their day's report was made) reported by supplementary reports, each
message exactly once (digest §6.1, §6.3).

A real database, the loopback DNS server and a real SMTP server (aiosmtpd).
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from dmarcmilter.history.models import (
    LateMessageRow,
    MessageRow,
    ReportDeliveryRow,
    ReportRow,
)
from dmarcmilter.history.rows import new_idempotency_key, record_key
from dmarcmilter.report import job as report_job
from dmarcmilter.report import late as late_rows
from dmarcmilter.report.aggregate import spread_offset
from dmarcmilter.report.job import REPORT_GRACE
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.test_report_generate import (
    BASE,
    DAY,
    NOON,
    PERIOD,
    RUN_AT,
    SQLITE_ONLY,
    SUBMITTER,
    Clock,
    ReportSink,
    job,
    make_config,
    store,
)

HOUR = dt.timedelta(hours=1)


class RecordingSink(ReportSink):
    """The test SMTP server; keeps every message offered, also those it
    refuses with ``reply``."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.offered.append(envelope.content)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    server = RecordingSink()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_dns(dns_server: TestDNSServer) -> None:
    # Every destination here is its own policy domain's: no DNS needed.
    dns_server.set_zone({})


def domain(name: str, count: int, rua: str | None = None) -> tuple[int, dict[str, Any]]:
    return (
        count,
        {
            "header_from_domain": name,
            "policy_domain": name,
            "rua": rua if rua is not None else f"mailto:dmarc@{name}",
        },
    )


def store_late(
    engine: Engine, history: list[tuple[int, dict[str, Any]]], at: dt.datetime = NOON
) -> list[int]:
    """Message rows written after their day ended, each with its
    late_messages row in the same transaction, as the writer stores them."""
    ids = []
    with engine.begin() as conn:
        for count, changes in history:
            for _ in range(count):
                row = {
                    **BASE,
                    **changes,
                    "arrived_at": at,
                    "idempotency_key": new_idempotency_key(),
                }
                row["record_key"] = record_key(row)
                inserted = conn.execute(insert(MessageRow).values(**row)).inserted_primary_key
                assert inserted is not None
                ids.append(int(inserted[0]))
                conn.execute(insert(LateMessageRow).values(message_pk=ids[-1], claim=None))
    return ids


def reports(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    ReportRow.report_id,
                    ReportRow.policy_domain,
                    ReportRow.sequence,
                    ReportRow.message_count,
                    ReportRow.period_begin,
                ).order_by(ReportRow.id)
            ).all()
        )


def claims(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(select(LateMessageRow.message_pk, LateMessageRow.claim)).all()
    return {int(pk): claim for pk, claim in rows}


def received(sink: ReportSink) -> list[tuple[str, int, str]]:
    """(report id, messages counted, Message-ID) of each report received."""
    out = []
    for delivered in sink.messages:
        msg = email.message_from_bytes(delivered.content, policy=email.policy.default)
        for part in msg.walk():
            if part.get_content_type() == "application/gzip":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                feedback = ET.fromstring(gzip.decompress(payload))
                ns = {"d": feedback.tag[1:].split("}")[0]} if feedback.tag.startswith("{") else {}
                prefix = "d:" if ns else ""
                report_id = feedback.findtext(f"{prefix}report_metadata/{prefix}report_id", "", ns)
                count = sum(
                    int(c.text or "0")
                    for c in feedback.findall(f"{prefix}record/{prefix}row/{prefix}count", ns)
                )
                out.append((report_id, count, str(msg["Message-ID"]).strip()))
    return out


# -- the secret Message-ID token -----------------------------------------------------


def test_every_delivery_has_its_own_token_in_the_message_id_and_a_retry_keeps_it(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    store(engine, [domain("example.com", 2, "mailto:a@example.com,mailto:b@example.com")])
    config = make_config(migrated, sink)
    sink.reply = "451 4.3.0 try again later"
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.sent, first.retry_later) == (0, 2)
    sink.reply = None
    again = job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    assert again.sent == 2

    with engine.connect() as conn:
        rows = conn.execute(
            select(ReportDeliveryRow.address, ReportDeliveryRow.message_token, ReportRow.report_id)
            .join(ReportRow, ReportDeliveryRow.report_pk == ReportRow.id)
            .order_by(ReportDeliveryRow.position)
        ).all()
    tokens = [token for _, token, _ in rows]
    assert all(re.fullmatch(r"[0-9a-f]{32}", t or "") for t in tokens)
    assert len(set(tokens)) == 2
    expected = {address: f"<{report_id}.{token}@{SUBMITTER}>" for address, token, report_id in rows}
    # Two refused attempts and two sent ones: each destination's mail had
    # the same Message-ID both times.
    assert len(sink.offered) == 4
    seen: dict[str, set[str]] = {}
    for content in sink.offered:
        msg = email.message_from_bytes(content, policy=email.policy.default)
        seen.setdefault(str(msg["To"]), set()).add(str(msg["Message-ID"]).strip())
    assert seen == {address: {message_id} for address, message_id in expected.items()}


@SQLITE_ONLY
def test_a_delivery_queued_before_tokens_keeps_the_old_message_id(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    store(engine, [domain("example.com", 1)])
    config = make_config(migrated, sink)
    sink.reply = "451 4.3.0 try again later"
    job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    with engine.begin() as conn:
        conn.execute(update(ReportDeliveryRow).values(message_token=None))
    sink.reply = None
    job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    [(report_id, _, _, _, _)] = reports(engine)
    assert [m for _, _, m in received(sink)] == [f"<{report_id}@{SUBMITTER}>"]


# -- spreading ---------------------------------------------------------------------------


def spread_history() -> list[tuple[int, dict[str, Any]]]:
    return [domain(f"d{n}.example", 1) for n in range(12)]


def due_times(engine: Engine) -> dict[str, dt.datetime]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(ReportRow.report_id, ReportDeliveryRow.next_attempt_at).join(
                ReportRow, ReportDeliveryRow.report_pk == ReportRow.id
            )
        ).all()
    return {rid: at if at.tzinfo else at.replace(tzinfo=dt.UTC) for rid, at in rows}


def test_a_periods_reports_are_due_spread_over_the_window_and_sent_when_due(
    migrated: str,
    engine: Engine,
    resolver: Resolver,
    sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three read snapshots for the twelve domains' first reports.
    monkeypatch.setattr(report_job, "SNAPSHOT_DOMAINS", 5)
    store(engine, spread_history())
    config = make_config(migrated, sink, send_spread_minutes=120)
    window = dt.timedelta(minutes=120)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert first.reports_generated == 12
    due = due_times(engine)
    for report_id, at in due.items():
        # Its fixed place: the same from its id alone, on any run or host.
        assert at == PERIOD.end + spread_offset(report_id, window)
        assert PERIOD.end <= at < PERIOD.end + window
    # Spread, not bunched: the twelve fall on at least four different
    # half-hours of the window.
    assert len({(at - PERIOD.end) // dt.timedelta(minutes=30) for at in due.values()}) >= 4
    early = sum(at <= RUN_AT for at in due.values())
    assert first.sent == early < 12
    # Each later run sends exactly what has come due since.
    sent = early
    for minutes in (60, 90, 121):
        now = PERIOD.end + dt.timedelta(minutes=minutes)
        stats = job(config, engine, resolver, Clock(now)).run(PERIOD)
        now_due = sum(at <= now for at in due.values())
        assert stats.sent == now_due - sent
        sent = now_due
    assert sent == 12 == len(sink.messages)


@SQLITE_ONLY
def test_a_run_after_the_window_sends_at_once_and_zero_means_no_spread(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    store(engine, spread_history())
    late_run = PERIOD.end + dt.timedelta(hours=3)
    stats = job(
        make_config(migrated, sink, send_spread_minutes=120), engine, resolver, Clock(late_run)
    ).run(PERIOD)
    assert stats.sent == 12
    assert spread_offset("abc", dt.timedelta(0)) == dt.timedelta(0)
    store(engine, spread_history(), NOON + dt.timedelta(days=1))
    next_period = Period.day(DAY + dt.timedelta(days=1))
    stats = job(
        make_config(migrated, sink, send_spread_minutes=0),
        engine,
        resolver,
        Clock(RUN_AT + dt.timedelta(days=1)),
    ).run(next_period)
    assert stats.sent == 12


@SQLITE_ONLY
def test_the_first_reports_wait_until_the_period_has_been_over_for_the_grace(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    store(engine, [domain("example.com", 1)])
    config = make_config(migrated, sink)
    early = job(
        config, engine, resolver, Clock(PERIOD.end + REPORT_GRACE - dt.timedelta(seconds=1))
    ).run(PERIOD)
    assert early.period_not_over and early.reports_generated == 0 and reports(engine) == []
    on_time = job(config, engine, resolver, Clock(PERIOD.end + REPORT_GRACE)).run(PERIOD)
    assert not on_time.period_not_over and on_time.reports_generated == on_time.sent == 1


# -- min_messages -----------------------------------------------------------------------


def test_a_domain_below_min_messages_gets_no_report(
    migrated: str,
    engine: Engine,
    resolver: Resolver,
    sink: RecordingSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store(engine, [domain("small.example", 2), domain("big.example", 3)])
    config = make_config(migrated, sink, min_messages=3)
    caplog.set_level(logging.INFO, logger="dmarcmilter.report.job")
    stats = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (stats.domains, stats.domains_below_minimum, stats.reports_generated) == (2, 1, 1)
    assert [r.policy_domain for r in reports(engine)] == ["big.example"]
    assert [list(m.rcpt_tos) for m in sink.messages] == [["dmarc@big.example"]]
    assert (
        "no report for small.example on 2026-05-01: 2 message(s), "
        "fewer than report.min_messages (3)"
    ) in caplog.messages


# -- late rows ----------------------------------------------------------------------------


def test_late_rows_get_a_supplementary_report_and_each_message_counts_once(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    config = make_config(migrated, sink)
    written = store(engine, [domain("example.com", 3)])
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.reports_generated, first.supplementary_reports, first.sent) == (1, 0, 1)

    # A host's journal replayed the next morning.
    late = store_late(engine, [domain("example.com", 2)], NOON + dt.timedelta(hours=11))
    second = job(config, engine, resolver, Clock(RUN_AT + 8 * HOUR)).run(PERIOD)
    assert (second.reports_generated, second.supplementary_reports, second.sent) == (0, 1, 1)
    # Nothing more to report: a third run makes nothing.
    third = job(config, engine, resolver, Clock(RUN_AT + 9 * HOUR)).run(PERIOD)
    assert (third.supplementary_reports, third.sent) == (0, 0)

    more = store_late(engine, [domain("example.com", 4)], NOON - HOUR)
    fourth = job(config, engine, resolver, Clock(RUN_AT + 30 * HOUR)).run(
        Period.day(DAY + dt.timedelta(days=1))
    )
    assert (fourth.supplementary_reports, fourth.sent) == (1, 1)

    stored = reports(engine)
    base = stored[0].report_id
    assert [(r.report_id, r.sequence, r.message_count) for r in stored] == [
        (base, 0, 3),
        (f"{base}s1", 1, 2),
        (f"{base}s2", 2, 4),
    ]
    assert {r.period_begin for r in stored} == {PERIOD.begin_ts}
    got = received(sink)
    assert [(rid, count) for rid, count, _ in got] == [
        (base, 3),
        (f"{base}s1", 2),
        (f"{base}s2", 4),
    ]
    # Every message of the day, each exactly once across the reports.
    assert sum(count for _, count, _ in got) == written + len(late) + len(more)
    assert len({rid for rid, _, _ in got}) == 3
    # Every late row carries the final claim of the report that counted it.
    assert late_rows.pending_claims(engine) == 0
    assert len(set(claims(engine).values())) == 2


def test_a_late_row_there_before_the_first_report_is_counted_there_and_never_again(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    config = make_config(migrated, sink)
    store(engine, [domain("example.com", 3)])
    store_late(engine, [domain("example.com", 1)])
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert first.reports_generated == 1
    again = job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    assert again.supplementary_reports == again.sent == 0
    assert [count for _, count, _ in received(sink)] == [4]
    [claim] = claims(engine).values()
    assert claim is not None and not claim.startswith("p")


def test_a_late_row_committed_after_the_claim_waits_for_the_next_report(
    migrated: str,
    engine: Engine,
    resolver: Resolver,
    sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(migrated, sink)
    store(engine, [domain("example.com", 3)])
    store_late(engine, [domain("example.com", 1)])
    claim = late_rows.claim
    replayed: list[int] = []

    def claim_then_a_replay(*args: Any) -> bool:
        taken = claim(*args)
        if not replayed:
            # The writer commits more late rows while the report is built.
            replayed.extend(store_late(engine, [domain("example.com", 2)]))
        return taken

    monkeypatch.setattr(late_rows, "claim", claim_then_a_replay)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    # The first report counts the late row claimed; the supplementary
    # report, made by the same run after it, the two committed meanwhile.
    assert (first.reports_generated, first.supplementary_reports, first.sent) == (1, 1, 2)
    again = job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    assert again.supplementary_reports == again.sent == 0
    assert [count for _, count, _ in received(sink)] == [4, 2]


def test_a_claim_of_a_run_that_died_is_claimed_again(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    config = make_config(migrated, sink)
    store(engine, [domain("example.com", 3)])
    # A run claimed this row for a first report, then died: no report.
    [before] = store_late(engine, [domain("example.com", 1)])
    dead = late_rows.Claim("0" * 32)
    with engine.begin() as conn:
        conn.execute(update(LateMessageRow).values(claim=dead.pending))
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert first.reports_generated == 1
    # The same for a supplementary report.
    after = store_late(engine, [domain("example.com", 2)])
    with engine.begin() as conn:
        conn.execute(
            update(LateMessageRow)
            .where(LateMessageRow.message_pk.in_(after))
            .values(claim=late_rows.Claim("1" * 32).pending)
        )
    second = job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    assert second.supplementary_reports == 1
    assert [count for _, count, _ in received(sink)] == [4, 2]
    assert late_rows.pending_claims(engine) == 0
    assert claims(engine)[before] != claims(engine)[after[0]]


def test_late_rows_with_nowhere_to_report_are_claimed_once_and_left(
    migrated: str, engine: Engine, resolver: Resolver, sink: RecordingSink
) -> None:
    config = make_config(migrated, sink)
    store(engine, [domain("example.com", 1)])
    job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    # Rows whose record had no mailto: destination: no report, ever.
    store_late(engine, [domain("example.com", 2, "https://reports.example.com/")])
    second = job(config, engine, resolver, Clock(RUN_AT + HOUR)).run(PERIOD)
    assert second.supplementary_reports == 0
    assert late_rows.pending_claims(engine) == 0
    assert None not in claims(engine).values()
    assert late_rows.supplements(engine) == []
    assert len(reports(engine)) == 1


@SQLITE_ONLY
def test_a_dry_run_counts_unclaimed_late_rows_and_claims_nothing(
    migrated: str, engine: Engine, resolver: Resolver, tmp_path: Any
) -> None:
    from dmarcmilter.report.job import dry_run

    store(engine, [domain("example.com", 2)])
    store_late(engine, [domain("example.com", 1)])
    stats = dry_run(make_config(migrated), engine, PERIOD, tmp_path / "out", clock=Clock(RUN_AT))
    assert stats.reports_generated == 1
    [xml] = list((tmp_path / "out").glob("*.xml.gz"))
    assert b"<count>3</count>" in gzip.decompress(xml.read_bytes()).replace(b" ", b"")
    assert claims(engine) and set(claims(engine).values()) == {None}


def test_a_late_row_committed_while_a_run_builds_plain_reports_is_counted_once(
    migrated: str,
    engine: Engine,
    resolver: Resolver,
    sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(migrated, sink)
    written = store(engine, [domain("example.com", 3)])
    asked = late_rows.domains_with_late_rows
    replayed: list[int] = []

    def then_a_replay(*args: Any) -> set[str]:
        found = asked(*args)
        # No late rows when the run looked; one is committed before the
        # domain's report is built with the plain query.
        replayed.extend(store_late(engine, [domain("example.com", 1)]))
        return found

    monkeypatch.setattr(late_rows, "domains_with_late_rows", then_a_replay)
    first = job(config, engine, resolver, Clock(RUN_AT)).run(PERIOD)
    assert (first.reports_generated, first.supplementary_reports) == (1, 1)
    # The first report read the snapshot the run looked at: the replayed
    # row is in the supplementary report alone.
    assert [count for _, count, _ in received(sink)] == [3, 1]
    assert sum(count for _, count, _ in received(sink)) == written + len(replayed)
