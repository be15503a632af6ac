"""The history reader: the RFC 9990 report records, the policy domains to
report on and the record errors, read back from a hand-made history.

Every test runs on SQLite, PostgreSQL and MariaDB (the ``migrated`` fixture
in conftest.py) and expects exactly the same records, in the same order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from dmarcmilter.errors import DatabaseError
from dmarcmilter.history import db
from dmarcmilter.history.models import MessageRow
from dmarcmilter.history.reader import (
    DKIMAuthResult,
    PolicyOverrideReason,
    PublishedPolicy,
    ReportRecord,
    SPFAuthResult,
    policy_domains,
    record_errors,
    report_records,
)
from dmarcmilter.history.rows import RECORD_KEY_COLUMNS, new_idempotency_key, record_key
from tests.history_worker import BASE_MESSAGE as BASE

BEGIN = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
END = BEGIN + dt.timedelta(days=1)
US = dt.timedelta(microseconds=1)


# Unsigned, from a host SPF refuses, with a null reverse-path (SPF checked
# the HELO name): quarantined instead of rejected by local policy.
SPOOF: dict[str, Any] = {
    "client_ip": "198.51.100.7",
    "helo": "mx.spoof.example",
    "envelope_from_domain": "",
    "dmarc_result": "fail",
    "disposition": "quarantine",
    "dkim_aligned": False,
    "spf_aligned": False,
    "spf_domain": "mx.spoof.example",
    "spf_scope": "helo",
    "spf_result": "fail",
    "dkim_summary": "[]",
    "reasons_summary": '[["local_policy","p=reject is quarantined here"]]',
}

# From a subdomain, through a mailing list that broke the signature.
LIST: dict[str, Any] = {
    "client_ip": "198.51.100.7",
    "helo": "lists.example.net",
    "envelope_from_domain": "lists.example.net",
    "header_from_domain": "sub.example.com",
    "dmarc_result": "fail",
    "disposition": "none",
    "dkim_aligned": False,
    "spf_aligned": False,
    "spf_domain": "lists.example.net",
    "spf_result": "pass",
    "dkim_summary": '[["sub.example.com","s1","fail"]]',
    "reasons_summary": '[["mailing_list",""],["local_policy","list.example.net"]]',
}

# The record example.com published from 18:00: enforcing less, in testing.
NEW_POLICY: dict[str, Any] = {"p": "quarantine", "sp": None, "testing": "y", "pct": 0}


def at(hours: float) -> dt.datetime:
    return BEGIN + dt.timedelta(hours=hours)


HISTORY: list[tuple[dt.datetime, dict[str, Any]]] = [
    # The same message four times; the last one to another recipient domain.
    (BEGIN, {}),  # the period includes its first instant...
    (at(10), {}),
    (END - US, {}),  # ...and its last one
    (at(11), {"envelope_to_domain": "other.example"}),
    # A second, failing signature makes another record.
    (at(12), {"dkim_summary": '[["example.com","s1","pass"],["esp.example","sel","fail"]]'}),
    # A second source IP.
    (at(1), SPOOF),
    (at(2), SPOOF),
    (at(3), LIST),
    # IPv6, once with the MAIL FROM domain unknown (NULL).
    (at(4), {"client_ip": "2001:db8::25"}),
    (at(5), {"client_ip": "2001:db8::25", "envelope_from_domain": None}),
    # The policy changed: a second configuration, with NULLs (sp) in it.
    (at(18), NEW_POLICY),
    (at(19), {**NEW_POLICY, "envelope_to_domain": None}),
    # Outside the period, on both edges.
    (BEGIN - US, {}),
    (END, {}),
    # Another policy domain.
    (at(6), {"policy_domain": "example.org", "header_from_domain": "example.org"}),
]

REJECT = PublishedPolicy(
    domain="example.com",
    discovery_method="treewalk",
    p="reject",
    sp="quarantine",
    np=None,
    adkim="r",
    aspf="r",
    testing="n",
    fo="0",
    psd="u",
    pct=None,
    rua="mailto:dmarc@example.com",
)
TESTING = PublishedPolicy(
    domain="example.com",
    discovery_method="treewalk",
    p="quarantine",
    sp=None,
    np=None,
    adkim="r",
    aspf="r",
    testing="y",
    fo="0",
    psd="u",
    pct=0,
    rua="mailto:dmarc@example.com",
)
ALIGNED_DKIM = (DKIMAuthResult("example.com", "s1", "pass"),)
BOUNCE_SPF = SPFAuthResult("bounce.example.com", "mfrom", "pass")


def passing(count: int, **changes: Any) -> ReportRecord:
    """A record of the BASE message."""
    fields: dict[str, Any] = {
        "source_ip": "192.0.2.1",
        "count": count,
        "disposition": "pass",
        "dkim": "pass",
        "spf": "pass",
        "reasons": (),
        "header_from": "example.com",
        "envelope_from": "bounce.example.com",
        "envelope_to": None,
        "dkim_results": ALIGNED_DKIM,
        "spf_result": BOUNCE_SPF,
        "policy": REJECT,
    }
    return ReportRecord(**{**fields, **changes})


SPOOF_RECORD = ReportRecord(
    source_ip="198.51.100.7",
    count=2,
    disposition="quarantine",
    dkim="fail",
    spf="fail",
    reasons=(PolicyOverrideReason("local_policy", "p=reject is quarantined here"),),
    header_from="example.com",
    envelope_from="",
    envelope_to=None,
    dkim_results=(),
    spf_result=SPFAuthResult("mx.spoof.example", "helo", "fail"),
    policy=REJECT,
)
LIST_RECORD = ReportRecord(
    source_ip="198.51.100.7",
    count=1,
    disposition="none",
    dkim="fail",
    spf="fail",
    reasons=(
        PolicyOverrideReason("mailing_list", ""),
        PolicyOverrideReason("local_policy", "list.example.net"),
    ),
    header_from="sub.example.com",
    envelope_from="lists.example.net",
    envelope_to=None,
    dkim_results=(DKIMAuthResult("sub.example.com", "s1", "fail"),),
    spf_result=SPFAuthResult("lists.example.net", "mfrom", "pass"),
    policy=REJECT,
)
TWO_SIGNATURES = (*ALIGNED_DKIM, DKIMAuthResult("esp.example", "sel", "fail"))
# Configurations in the order of their policy values ("quarantine" sorts
# before "reject"); within one, by source IP and then the rest of the key.
EXPECTED = [
    passing(2, policy=TESTING),
    # "]," sorts before "]]": the two-signature summary comes first.
    passing(1, dkim_results=TWO_SIGNATURES),
    passing(4),
    # The disposition "none" sorts before "quarantine".
    LIST_RECORD,
    SPOOF_RECORD,
    # NULL sorts first, on PostgreSQL too.
    passing(1, source_ip="2001:db8::25", envelope_from=None),
    passing(1, source_ip="2001:db8::25"),
]
TO = "receiver.example"
EXPECTED_WITH_ENVELOPE_TO = [
    passing(1, policy=TESTING, envelope_to=None),
    passing(1, policy=TESTING, envelope_to=TO),
    # The recipient domain comes before the DKIM results in the key.
    passing(1, envelope_to="other.example"),
    passing(1, dkim_results=TWO_SIGNATURES, envelope_to=TO),
    passing(3, envelope_to=TO),
    replace(LIST_RECORD, envelope_to=TO),
    replace(SPOOF_RECORD, envelope_to=TO),
    passing(1, source_ip="2001:db8::25", envelope_from=None, envelope_to=TO),
    passing(1, source_ip="2001:db8::25", envelope_to=TO),
]


def store(engine: Engine, history: list[tuple[dt.datetime, dict[str, Any]]]) -> None:
    rows = [
        {**BASE, **changes, "arrived_at": arrived, "idempotency_key": new_idempotency_key()}
        for arrived, changes in history
    ]
    for row in rows:
        row["record_key"] = record_key(row)
    with engine.begin() as conn:
        conn.execute(insert(MessageRow), rows)


@pytest.fixture
def history(engine: Engine) -> Engine:
    store(engine, HISTORY)
    return engine


# -- report records -----------------------------------------------------------


def test_report_records(history: Engine) -> None:
    assert list(report_records(history, "example.com", BEGIN, END)) == EXPECTED


def test_report_records_with_envelope_to(history: Engine) -> None:
    records = report_records(history, "example.com", BEGIN, END, include_envelope_to=True)
    assert list(records) == EXPECTED_WITH_ENVELOPE_TO


def test_report_records_in_small_batches(history: Engine) -> None:
    assert list(report_records(history, "example.com", BEGIN, END, batch_size=2)) == EXPECTED


def test_period_in_another_time_zone(history: Engine) -> None:
    # The same instants written in UTC+02:00 select the same messages.
    cest = dt.timezone(dt.timedelta(hours=2))
    begin, end = BEGIN.astimezone(cest), END.astimezone(cest)
    assert begin.hour == 2
    assert list(report_records(history, "example.com", begin, end)) == EXPECTED


def test_report_records_of_other_periods_and_domains(history: Engine) -> None:
    # Each edge message falls in exactly one of two consecutive periods.
    day_before = list(report_records(history, "example.com", BEGIN - dt.timedelta(days=1), BEGIN))
    day_after = list(report_records(history, "example.com", END, END + dt.timedelta(days=1)))
    assert day_before == [passing(1)]
    assert day_after == [passing(1)]
    assert list(report_records(history, "example.org", BEGIN, END)) == [
        passing(
            1,
            header_from="example.org",
            policy=replace(REJECT, domain="example.org"),
        )
    ]
    assert list(report_records(history, "nowhere.example", BEGIN, END)) == []
    # Domains compare as stored (lower case), not case-insensitively.
    assert list(report_records(history, "EXAMPLE.COM", BEGIN, END)) == []


def test_stopping_early_releases_the_connection(history: Engine) -> None:
    pool = history.pool
    assert isinstance(pool, QueuePool)
    records = cast(
        "Generator[ReportRecord, None, None]",
        report_records(history, "example.com", BEGIN, END, batch_size=1),
    )
    assert next(records) == EXPECTED[0]
    assert pool.checkedout() == 1
    # On PostgreSQL this also closes the server-side cursor: an open one
    # left to the garbage collector would fail the test with a warning.
    records.close()
    assert pool.checkedout() == 0


def test_malformed_summary_is_a_database_error(engine: Engine) -> None:
    store(engine, [(at(1), {"dkim_summary": '[["example.com","s1"]]'})])
    with pytest.raises(
        DatabaseError,
        match=r"""^malformed dkim_summary in the history: '\[\["example.com","s1"\]\]'$""",
    ):
        list(report_records(engine, "example.com", BEGIN, END))


# -- policy domains and record errors -----------------------------------------


def test_policy_domains(engine: Engine) -> None:
    store(
        engine,
        [
            (at(1), {}),
            (at(2), {}),
            (at(3), {"policy_domain": "b.example", "header_from_domain": "x.b.example"}),
            (at(4), {"policy_domain": "a.example"}),
            # Records without aggregate report addresses.
            (at(5), {"policy_domain": "empty-rua.example", "rua": ""}),
            (at(6), {"policy_domain": "no-rua.example", "rua": None}),
            # No DMARC record at all.
            (at(7), {"policy_domain": None, **dict.fromkeys(("p", "rua", "fo", "psd"))}),
            # Outside the period.
            (BEGIN - US, {"policy_domain": "before.example"}),
            (END, {"policy_domain": "after.example"}),
        ],
    )
    assert list(policy_domains(engine, BEGIN, END)) == ["a.example", "b.example", "example.com"]
    assert list(policy_domains(engine, END, END + dt.timedelta(days=1))) == ["after.example"]


def test_record_errors(engine: Engine) -> None:
    store(
        engine,
        [
            (at(1), {"record_errors": "unknown tag x=1 ignored\ninvalid fo 'q' ignored"}),
            (at(2), {"record_errors": "unknown tag x=1 ignored"}),
            (at(3), {"record_errors": "unknown tag x=1 ignored"}),
            (at(4), {"record_errors": ""}),
            (at(5), {"record_errors": None}),
            (BEGIN - US, {"record_errors": "from the day before"}),
            (END, {"record_errors": "from the day after"}),
            (at(6), {"policy_domain": "example.org", "record_errors": "another domain's"}),
        ],
    )
    assert record_errors(engine, "example.com", BEGIN, END) == [
        "invalid fo 'q' ignored",
        "unknown tag x=1 ignored",
    ]
    assert record_errors(engine, "example.org", BEGIN, END) == ["another domain's"]
    assert record_errors(engine, "nowhere.example", BEGIN, END) == []


# -- bad arguments and unusable databases -------------------------------------


NAIVE = dt.datetime(2026, 5, 1)


@pytest.mark.parametrize(
    ("begin", "end", "message"),
    [
        (NAIVE, END, r"^begin must be an aware datetime, not 2026-05-01T00:00:00$"),
        (BEGIN, NAIVE, r"^end must be an aware datetime, not 2026-05-01T00:00:00$"),
        (END, BEGIN, r"^empty period: end 2026-05-01T00:00:00\+00:00 is not after "),
        (BEGIN, BEGIN, r"^empty period: "),
    ],
)
def test_bad_periods_are_refused_at_once(
    begin: dt.datetime, end: dt.datetime, message: str
) -> None:
    # Checked when called, before any query: no database is needed.
    engine = db.make_engine("sqlite://")
    try:
        with pytest.raises(ValueError, match=message):
            report_records(engine, "example.com", begin, end)
        with pytest.raises(ValueError, match=message):
            policy_domains(engine, begin, end)
        with pytest.raises(ValueError, match=message):
            record_errors(engine, "example.com", begin, end)
        with pytest.raises(ValueError, match=r"^batch_size must be at least 1, not 0$"):
            report_records(engine, "example.com", BEGIN, END, batch_size=0)
    finally:
        engine.dispose()


def test_unreachable_database() -> None:
    # Nothing listens on port 1.
    engine = db.make_engine("postgresql://nobody@127.0.0.1:1/nothing")
    try:
        with pytest.raises(
            DatabaseError, match=r"^cannot read the report records of example\.com: "
        ):
            list(report_records(engine, "example.com", BEGIN, END))
        with pytest.raises(DatabaseError, match=r"^cannot read the policy domains: "):
            list(policy_domains(engine, BEGIN, END))
        with pytest.raises(
            DatabaseError, match=r"^cannot read the record errors of example\.com: "
        ):
            record_errors(engine, "example.com", BEGIN, END)
    finally:
        engine.dispose()


def test_unmigrated_database(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        with pytest.raises(
            DatabaseError,
            match=r"^cannot read the report records of example\.com: no such table: messages$",
        ):
            list(report_records(engine, "example.com", BEGIN, END))
    finally:
        engine.dispose()


def test_record_key_covers_every_record_column() -> None:
    """Two messages share a report record exactly when every column of
    RECORD_KEY_COLUMNS is equal: each one changes the key."""
    row = {**BASE, "arrived_at": BEGIN, "idempotency_key": "0" * 32}
    key = record_key(row)
    assert key == record_key({**row, "queue_id": "other", "idempotency_key": "1" * 32})
    assert key == record_key({**row, "envelope_to_domain": "elsewhere.example"})
    for column in RECORD_KEY_COLUMNS:
        changed = {**row, column: "changed" if row[column] != "changed" else "other"}
        assert record_key(changed) != key, column
    assert len(key) == 32 and int(key, 16) >= 0
