"""Failure reports (RFC 9991): when one is due.

The decision runs on real evaluations (the loopback DNS server, real DKIM
signatures and SPF records).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.dmarc import DMARCResultCode
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.record import parse_record
from dmarcmilter.report.failure import (
    FailureKind,
    FailureOptions,
    FailureReportDue,
    NotDue,
    failure_reports_due,
    usable_ruf,
)
from dmarcmilter.resolver import Resolver, ResolverSettings
from tests.dnsserver import TestDNSServer
from tests.signing import dkim_sign, dkim_zone, make_message

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
CLIENT_IP = "203.0.113.66"
AUTHOR = "bank.example"
RUF = "mailto:ruf@bank.example"
DMARC = FailureKind.DMARC
DKIM = FailureKind.DKIM
SPF = FailureKind.SPF

ZONE: dict[str, Any] = {
    AUTHOR: [("A", "192.0.2.80"), ("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    # The client is not authorized: SPF fails for this aligned MAIL FROM domain.
    f"bounce.{AUTHOR}": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    "other.example": [("A", "192.0.2.90"), ("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    "elsewhere.example": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    **dkim_zone(AUTHOR, "s1"),
    **dkim_zone("other.example", "o1"),
}


class Run:
    def __init__(self, server: TestDNSServer) -> None:
        self.server = server
        self.resolver = Resolver(
            ResolverSettings(nameservers=(server.host,), port=server.port, query_timeout=0.5)
        )
        self.config = Config(
            authserv_id="mx.receiver.example",
            dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=0.5),
        )

    def record(self, text: str) -> None:
        self.server.add_zone({f"_dmarc.{AUTHOR}": [("TXT", text)]})

    def __call__(self, message: bytes, mail_from: str, rcpt: tuple[str, ...] = ()) -> Evaluation:
        return evaluate(
            Envelope.create(CLIENT_IP, "mx.sender.example", mail_from, list(rcpt)),
            Message.from_bytes(message),
            self.resolver.session(),
            self.config,
            now=NOW,
        )


@pytest.fixture
def run(dns_server: TestDNSServer) -> Run:
    dns_server.set_zone(ZONE)
    return Run(dns_server)


def author_message(**kwargs: Any) -> bytes:
    return make_message(from_=f"Chief Executive <ceo@{AUTHOR}>", **kwargs)


def tampered(message: bytes) -> bytes:
    """The signed message with its body changed: the signature fails."""
    return message + b"One more line.\r\n"


# The mechanisms in each scenario: (DKIM signer and whether it verifies, MAIL FROM).
# "aligned" names an identifier in the Author Domain's Organizational Domain.
SCENARIOS: dict[str, tuple[str | None, bool, str]] = {
    # DMARC fail: both mechanisms fail, on aligned identifiers.
    "dkim-fail-aligned/spf-fail-aligned": (AUTHOR, False, f"x@bounce.{AUTHOR}"),
    # DMARC fail: both fail, on identifiers of another domain.
    "dkim-fail-unaligned/spf-fail-unaligned": ("other.example", False, "x@elsewhere.example"),
    # DMARC pass through DKIM; SPF fails on an aligned MAIL FROM.
    "dkim-pass/spf-fail-aligned": (AUTHOR, True, f"x@bounce.{AUTHOR}"),
    # DMARC pass through DKIM; SPF fails on an unaligned MAIL FROM.
    "dkim-pass/spf-fail-unaligned": (AUTHOR, True, "x@elsewhere.example"),
    # DMARC pass through SPF; an aligned signature fails.
    "dkim-fail-aligned/spf-pass": (AUTHOR, False, f"x@{AUTHOR}"),
    # DMARC pass through SPF; an unaligned signature fails.
    "dkim-fail-unaligned/spf-pass": ("other.example", False, f"x@{AUTHOR}"),
    # DMARC pass through SPF, and no signature at all.
    "unsigned/spf-pass": (None, True, f"x@{AUTHOR}"),
    # Everything passes, aligned.
    "all-pass": (AUTHOR, True, f"x@{AUTHOR}"),
}


def scenario_message(name: str) -> tuple[bytes, str]:
    signer, verifies, mail_from = SCENARIOS[name]
    message = author_message()
    if signer is not None:
        selector = "s1" if signer == AUTHOR else "o1"
        message = dkim_sign(message, signer, selector)
        if not verifies:
            message = tampered(message)
    return message, mail_from


S = list(SCENARIOS)
# fo -> scenario -> the exact kinds due.  fo=0 asks for DMARC fail only, 1 for
# any mechanism without an aligned pass, d for any failed signature, s for
# any SPF failure, aligned or not; each option stands alone.
EXPECTED: dict[str, dict[str, set[FailureKind]]] = {
    "0": {S[0]: {DMARC}, S[1]: {DMARC}},
    "1": {
        S[0]: {DMARC},
        S[1]: {DMARC},
        S[2]: {DMARC},
        S[3]: {DMARC},
        S[4]: {DMARC},
        S[5]: {DMARC},
        S[6]: {DMARC},
    },
    "d": {S[0]: {DKIM}, S[1]: {DKIM}, S[4]: {DKIM}, S[5]: {DKIM}},
    "s": {S[0]: {SPF}, S[1]: {SPF}, S[2]: {SPF}, S[3]: {SPF}},
    "0:d:s": {
        S[0]: {DMARC, DKIM, SPF},
        S[1]: {DMARC, DKIM, SPF},
        S[2]: {SPF},
        S[3]: {SPF},
        S[4]: {DKIM},
        S[5]: {DKIM},
    },
    "1:d": {
        S[0]: {DMARC, DKIM},
        S[1]: {DMARC, DKIM},
        S[2]: {DMARC},
        S[3]: {DMARC},
        S[4]: {DMARC, DKIM},
        S[5]: {DMARC, DKIM},
        S[6]: {DMARC},
    },
    "s:1": {
        S[0]: {DMARC, SPF},
        S[1]: {DMARC, SPF},
        S[2]: {DMARC, SPF},
        S[3]: {DMARC, SPF},
        S[4]: {DMARC},
        S[5]: {DMARC},
        S[6]: {DMARC},
    },
    "d:s": {
        S[0]: {DKIM, SPF},
        S[1]: {DKIM, SPF},
        S[2]: {SPF},
        S[3]: {SPF},
        S[4]: {DKIM},
        S[5]: {DKIM},
    },
}


def test_scenarios_are_what_they_say(run: Run) -> None:
    run.record(f"v=DMARC1; p=reject; ruf={RUF}")
    results = {}
    for name in SCENARIOS:
        ev = run(*scenario_message(name))
        results[name] = ev.dmarc.result
    assert [n for n, r in results.items() if r is DMARCResultCode.FAIL] == S[:2]
    assert all(results[n] is DMARCResultCode.PASS for n in S[2:])


@pytest.mark.parametrize("fo", list(EXPECTED))
@pytest.mark.parametrize("scenario", S)
def test_fo_matrix(run: Run, fo: str, scenario: str) -> None:
    run.record(f"v=DMARC1; p=reject; fo={fo}; ruf={RUF}")
    due = failure_reports_due(run(*scenario_message(scenario)).dmarc)
    expected = EXPECTED[fo].get(scenario, set())
    assert set(due.kinds) == expected
    assert len(due.kinds) == len(due.reasons)
    assert due.due is bool(expected)
    assert due.not_due is (None if expected else NotDue.NO_FAILURE)
    assert [d.address for d in due.destinations] == ["ruf@bank.example"]


def test_fo_absent_is_zero(run: Run) -> None:
    run.record(f"v=DMARC1; p=none; ruf={RUF}")
    assert failure_reports_due(run(*scenario_message(S[0])).dmarc).kinds == (DMARC,)
    assert failure_reports_due(run(*scenario_message(S[4])).dmarc).kinds == ()


def test_malformed_fo_is_zero(run: Run) -> None:
    run.record(f"v=DMARC1; p=none; fo=0:1:x; ruf={RUF}")
    assert failure_reports_due(run(*scenario_message(S[0])).dmarc).kinds == (DMARC,)
    assert failure_reports_due(run(*scenario_message(S[2])).dmarc).kinds == ()


@pytest.mark.parametrize(
    ("fo", "flags"),
    [
        ("0", (True, False, False, False)),
        ("1", (False, True, False, False)),
        ("d", (False, False, True, False)),
        ("s:d:1", (False, True, True, True)),
        ("0:1", (True, False, False, False)),  # not kept by the parser; read as 0
        ("q", (True, False, False, False)),
    ],
)
def test_fo_options(fo: str, flags: tuple[bool, bool, bool, bool]) -> None:
    options = FailureOptions.parse(fo)
    assert (options.all_failed, options.any_failed, options.dkim, options.spf) == flags


def test_psd_y_record_gives_no_report(run: Run) -> None:
    run.record(f"v=DMARC1; p=reject; psd=y; fo=1:d:s; ruf={RUF}")
    ev = run(*scenario_message(S[0]))
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert failure_reports_due(ev.dmarc) == FailureReportDue(not_due=NotDue.PSD)


@pytest.mark.parametrize(
    "tags",
    [
        "",  # no ruf at all
        "ruf=https://reports.bank.example/ruf",  # a scheme we cannot mail to
        "ruf=mailto:no-domain",  # malformed: dropped by the record parser
        "rua=mailto:rua@bank.example",  # rua is not ruf
    ],
)
def test_no_usable_ruf_gives_no_report(run: Run, tags: str) -> None:
    run.record(f"v=DMARC1; p=reject; fo=1:d:s; {tags}")
    ev = run(*scenario_message(S[0]))
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert failure_reports_due(ev.dmarc) == FailureReportDue(not_due=NotDue.NO_RUF)


def test_no_record_gives_no_report(run: Run) -> None:
    ev = run(*scenario_message(S[0]))
    assert ev.dmarc.result is DMARCResultCode.NONE
    assert failure_reports_due(ev.dmarc).not_due is NotDue.NO_RECORD


def test_temperror_gives_no_dmarc_report_but_spf_still_counts(run: Run) -> None:
    # The aligned DKIM key lookup fails: no verdict, so no fo=0/1 report.
    run.server.add_zone({f"s1._domainkey.{AUTHOR}": "SERVFAIL"})
    run.record(f"v=DMARC1; p=reject; fo=1:s; ruf={RUF}")
    message = dkim_sign(author_message(), AUTHOR, "s1")
    ev = run(message, f"x@bounce.{AUTHOR}")
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR
    assert failure_reports_due(ev.dmarc).kinds == (SPF,)


def test_ruf_uses_the_rua_rules() -> None:
    record = parse_record(
        "v=DMARC1; p=none; ruf=https://x.example/r, mailto:a@x.example!10m, mailto:a@X.example"
    )
    assert [d.address for d in usable_ruf(record)] == ["a@x.example"]
