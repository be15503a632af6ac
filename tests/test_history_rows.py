"""History rows built at the edge: what a row records, and how much of it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter import record as record_module
from dmarcmilter.config import Config, DNSConfig, PolicyConfig, config_from_mapping
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.history import db, rows
from dmarcmilter.history.bulk import insert_rows
from dmarcmilter.history.journal import encode_line
from dmarcmilter.history.rows import message_row
from dmarcmilter.history.writer import HistoryWriter
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
from dmarcmilter.record import parse_record
from dmarcmilter.report.aggregate import build_reports
from dmarcmilter.report.job import ReportJob
from dmarcmilter.report.period import Period
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.signing import make_message

ZONE: dict[str, Any] = {
    "bank.example": [("A", "192.0.2.80")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@bank.example")],
}

Run = Callable[..., tuple[Evaluation, dict[str, Any]]]


@pytest.fixture
def run(dns_server: TestDNSServer, resolver: Resolver) -> Run:
    def evaluate_message(
        raw: bytes, zone: dict[str, Any] | None = None, helo: str = "mx.evil.example"
    ) -> tuple[Evaluation, dict[str, Any]]:
        dns_server.set_zone({**ZONE, **(zone or {})})
        config = Config(dns=DNSConfig(nameservers=(dns_server.host,), port=dns_server.port))
        envelope = Envelope.create("203.0.113.66", helo, "x@evil.example", ["u@rx.example"])
        ev = evaluate(envelope, Message.from_bytes(raw), resolver.session(), config)
        return ev, message_row(ev, decide(ev, config.policy))

    return evaluate_message


def test_malformed_from_row_names_the_domain_whose_policy_applied(run: Run) -> None:
    raw = make_message(from_="CEO <ceo@bank.example>>")
    ev, row = run(raw)
    assert ev.author.domain is None
    assert (row["header_from_domain"], row["policy_domain"], row["dmarc_result"]) == (
        "bank.example",
        "bank.example",
        "fail",
    )
    assert (row["p"], row["disposition"], row["rua"]) == (
        "reject",
        "quarantine",
        "mailto:dmarc@bank.example",
    )


# -- what a row stores of attacker-chosen values -----------------------------------------

# The attacker's own 60 KB DMARC record: hundreds of report URIs, and
# hundreds of broken tags that each become a problem line.
HUGE_RUA = ",".join(f"mailto:dmarc-{i:04d}@evil.example" for i in range(1350))
HUGE_RUF = ",".join(f"mailto:ruf-{i:04d}@evil.example" for i in range(300))
HUGE_RECORD = (
    "v=DMARC1; p=reject; rua="
    + HUGE_RUA
    + "; ruf="
    + HUGE_RUF
    + "; "
    + "; ".join(f"x{i}" for i in range(1800))
)
HUGE_ZONE: dict[str, Any] = {
    "evil.example": [("A", "192.0.2.66")],
    # TXT character-strings are at most 255 octets each.
    "_dmarc.evil.example": [
        ("TXT", [HUGE_RECORD[i : i + 255] for i in range(0, len(HUGE_RECORD), 255)])
    ],
}


def _size(row: dict[str, Any]) -> int:
    return len(json.dumps(row).encode())


def test_a_row_from_a_huge_record_is_small(run: Run) -> None:
    assert len(HUGE_RECORD) > 60_000
    ev, row = run(make_message(from_="ceo@evil.example"), HUGE_ZONE)
    record = ev.dmarc.record
    assert record is not None and len(record.raw) == len(HUGE_RECORD)  # the whole record arrived
    assert _size(row) < 8_000
    for column, cap in (
        ("rua", rows.MAX_URI_LIST_BYTES),
        ("ruf", rows.MAX_URI_LIST_BYTES),
        ("record_errors", rows.MAX_ERRORS_BYTES),
    ):
        assert 0 < len(row[column].encode()) <= cap
    # Whole URIs only, in published order, each one as published.
    stored = row["rua"].split(",")
    assert stored == HUGE_RUA.split(",")[: len(stored)]
    # ... and the cut is visible.
    errors = row["record_errors"].split("\n")
    ruf_left = 300 - len(row["ruf"].split(","))
    assert errors[:2] == [
        f"ruf: {ruf_left} more URIs not stored",
        f"rua: {1350 - len(stored)} more URIs not stored",
    ]
    assert errors[-1].endswith("more not stored]")


def test_long_client_values_are_cut_visibly(run: Run) -> None:
    helo = "h" * 5000 + ".evil.example"
    _, row = run(make_message(from_="ceo@bank.example"), helo=helo)
    assert len(row["helo"].encode()) == rows.MAX_NAME_BYTES
    assert row["helo"].endswith(rows.TRUNCATED) and row["helo"].startswith("hhhh")


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ("a" * 600, 512),
        ("\u00e9" * 600, 512),  # two bytes each: never cut inside a character
        ("\U0001f600" * 200, 255),
        ("bad \udcff byte" * 100, 255),  # not UTF-8 from the client
    ],
)
def test_stored_values_respect_the_byte_cap(value: str, limit: int) -> None:
    stored = rows._stored(value, limit)
    data = stored.encode("utf-8")
    assert len(data) <= limit and stored.endswith(rows.TRUNCATED)
    assert rows._stored("short", limit) == "short"


def test_dkim_results_per_row_are_capped(run: Run) -> None:
    raw = make_message(from_="ceo@bank.example")
    headers = b"".join(
        b"DKIM-Signature: v=1; a=rsa-sha256; d=d%d.evil.example; s=%s; h=from; bh=x; b=y\r\n"
        % (i, b"s" * 300)
        for i in range(30)
    )
    _, row = run(headers + raw)
    assert len(row["dkim_results"]) == rows.MAX_DKIM_RESULTS
    assert all(len(d["selector"].encode()) <= rows.MAX_NAME_BYTES for d in row["dkim_results"])
    assert row["dkim_results"][-1]["human_result"].startswith("[10 more signatures not stored]")


def test_the_report_for_a_huge_record_goes_to_whole_addresses(run: Run, tmp_path: Path) -> None:
    _, row = run(make_message(from_="ceo@evil.example"), HUGE_ZONE)
    url = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            insert_rows(conn, [row], skip_existing=False)
        config = config_from_mapping(
            {
                "database": {"url": url},
                "report": {
                    "org_name": "Receiver Example",
                    "from_address": "dmarc-reports@receiver.example",
                    "submitter": "mx.receiver.example",
                    "smtp_host": "127.0.0.1",
                    "smtp_starttls": "off",
                },
            }
        )
        settings = ReportJob(config, engine, host="test").settings
        arrived = dt.datetime.fromisoformat(row["arrived_at"])
        (report,) = build_reports(engine, settings, Period.day(arrived.date()), "evil.example")
    finally:
        engine.dispose()
    addresses = [d.address for d in report.destinations]
    assert addresses == [f"dmarc-{i:04d}@evil.example" for i in range(settings.max_uris)]
    assert report.message_count == 1


def test_the_writer_queues_a_huge_record_as_its_capped_row(run: Run, tmp_path: Path) -> None:
    ev, _ = run(make_message(from_="ceo@evil.example"), HUGE_ZONE)
    writer = HistoryWriter(f"sqlite:///{tmp_path / 'h.sqlite3'}", tmp_path)  # not started
    writer.enqueue(ev, decide(ev, PolicyConfig()))
    # The queue (and the journal line) hold the capped row, never the
    # evaluation with the attacker's record whole.
    (queued,) = list(writer._queue)
    assert isinstance(queued.row, dict) and _size(queued.row) < 8_000
    assert len(encode_line(queued.row)) < 8_000


def test_huge_records_are_not_kept_in_the_parse_cache() -> None:
    before = record_module._parse_cached.cache_info().currsize
    first = parse_record(HUGE_RECORD)
    assert parse_record(HUGE_RECORD) is not first  # parsed again, not cached
    assert record_module._parse_cached.cache_info().currsize == before
    assert parse_record("v=DMARC1; p=reject") is parse_record("v=DMARC1; p=reject")
