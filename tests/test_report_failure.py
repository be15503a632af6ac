"""Failure reports (RFC 9991): when one is due, and what it looks like.

The decision runs on real evaluations (the loopback DNS server, real DKIM
signatures and SPF records); the format is checked field by field against
digest §7.2, for privacy against §7.3, and read back by a real consumer,
parsedmarc.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.message
import email.policy
import re
from typing import Any

import parsedmarc
import pytest

from dmarcmilter.authres.render import render
from dmarcmilter.config import Config, DNSConfig, ReportConfig
from dmarcmilter.dmarc import DMARCResultCode
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
from dmarcmilter.record import parse_record
from dmarcmilter.report.failure import (
    FailureKind,
    FailureOptions,
    FailureReportDue,
    NotDue,
    failure_reports_due,
    usable_ruf,
)
from dmarcmilter.report.failure_mail import (
    TOKEN_PREFIX,
    DeliveryResult,
    FailedSignature,
    FailureIncident,
    FailureReportSettings,
    Redactor,
    build_failure_report,
    defang,
    delivery_result,
    failure_report_bytes,
    incident_from_evaluation,
)
from dmarcmilter.report.guard import is_own_report
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


# -- the format ---------------------------------------------------------------------------

SETTINGS = FailureReportSettings(
    from_address="dmarc-reports@receiver.example",
    submitter="mx.receiver.example",
    org_name="Receiver Example",
)
KEY = b"k" * 32


def incident(**overrides: Any) -> FailureIncident:
    values: dict[str, Any] = {
        "kind": DMARC,
        "reported_domain": AUTHOR,
        "source_ip": CLIENT_IP,
        "arrival_date": NOW,
        "mail_from": "bounces+ceo@bank.example",
        "rcpt_to": ("jane.doe@receiver.example",),
        "authentication_results": (
            "mx.receiver.example; spf=fail smtp.mailfrom=bank.example; "
            "dkim=fail header.d=bank.example header.s=s1; dmarc=fail header.from=bank.example"
        ),
        "delivery_result": DeliveryResult.REJECT,
        "headers": (
            ("From", "Chief Executive <ceo@bank.example>"),
            ("To", "Jane Doe <jane.doe@receiver.example>"),
            ("Subject", "Invoice for jane.doe: see https://pay.attacker.example/x?id=1"),
            ("Message-ID", "<abc123@bank.example>"),
        ),
        "dkim_failed": (FailedSignature(AUTHOR, "s1", "fail", "", True, "body hash mismatch"),),
        "spf_domain": AUTHOR,
        "spf_result": "fail",
        "spf_aligned": True,
        "spf_record": "v=spf1 ip4:198.51.100.0/24 -all",
    }
    values.update(overrides)
    return FailureIncident(**values)


def build(inc: FailureIncident, **settings: Any) -> bytes:
    msg = build_failure_report(
        inc,
        to_address="ruf@bank.example",
        report_id="r1a2b3",
        date=NOW,
        settings=dataclasses.replace(SETTINGS, **settings),
        redaction_key=KEY,
    )
    return failure_report_bytes(msg)


def parts(data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def feedback_text(data: bytes) -> str:
    """The message/feedback-report part, as sent."""
    match = re.search(
        rb"Content-Type: message/feedback-report\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--", data, re.S
    )
    assert match is not None
    return match.group(1).decode("ascii")


def fields(data: bytes) -> list[tuple[str, str]]:
    text = feedback_text(data)
    out = []
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = out[-1]
            out[-1] = (name, value + line)
        elif line:
            name, _, value = line.partition(": ")
            out.append((name, value))
    return out


def test_structure_and_every_field() -> None:
    data = build(incident(incidents=3))
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    top = email.message_from_bytes(data, policy=email.policy.default)
    assert top["From"].addresses[0].addr_spec == "dmarc-reports@receiver.example"
    assert top["To"] == "ruf@bank.example"
    assert top["Message-ID"] == "<r1a2b3@mx.receiver.example>"
    assert top["Auto-Submitted"] == "auto-generated"
    assert top["Date"].datetime == NOW
    human, feedback, original = parts(data)
    assert human.get_content_type() == "text/plain"
    assert feedback.get_content_type() == "message/feedback-report"
    assert original.get_content_type() == "text/rfc822-headers"
    assert fields(data) == [
        ("Feedback-Type", "auth-failure"),
        ("User-Agent", "dmarcmilter/" + __import__("dmarcmilter").__version__),
        ("Version", "1"),
        ("Auth-Failure", "dmarc"),
        (
            "Authentication-Results",
            "mx.receiver.example; spf=fail smtp.mailfrom=bank.example; "
            "dkim=fail header.d=bank.example header.s=s1; dmarc=fail header.from=bank.example",
        ),
        ("Identity-Alignment", "dkim, spf"),
        ("Original-Mail-From", f"<{Redactor(KEY).token('bounces+ceo')}@bank.example>"),
        ("Original-Rcpt-To", f"<{Redactor(KEY).token('jane.doe')}@receiver.example>"),
        ("Arrival-Date", "Fri, 01 May 2026 12:00:00 +0000"),
        ("Source-IP", CLIENT_IP),
        ("Reported-Domain", AUTHOR),
        ("Delivery-Result", "reject"),
        ("Incidents", "3"),
        ("DKIM-Domain", AUTHOR),
        ("DKIM-Identity", "@bank.example"),
        ("DKIM-Selector", "s1"),
        ("SPF-DNS", "txt : bank.example : v=spf1 ip4:198.51.100.0/24 -all"),
    ]


@pytest.mark.parametrize(
    ("dkim_aligned", "spf_aligned", "expected"),
    [
        (True, False, "dkim"),
        (False, True, "spf"),
        (True, True, "dkim, spf"),
        (False, False, "none"),
    ],
)
def test_identity_alignment(dkim_aligned: bool, spf_aligned: bool, expected: str) -> None:
    sig = FailedSignature(
        AUTHOR if dkim_aligned else "other.example", "s1", "fail", "", dkim_aligned
    )
    data = build(incident(dkim_failed=(sig,), spf_aligned=spf_aligned))
    got = dict(fields(data))
    assert got["Identity-Alignment"] == expected
    # The DKIM and SPF fields are there exactly for a failed aligned identifier.
    assert ("DKIM-Domain" in got) is dkim_aligned
    assert ("DKIM-Identity" in got) is dkim_aligned
    assert ("DKIM-Selector" in got) is dkim_aligned
    assert ("SPF-DNS" in got) is spf_aligned


@pytest.mark.parametrize(
    ("kind", "reason", "expected"),
    [
        (DMARC, "", "dmarc"),
        (SPF, "", "spf"),
        (DKIM, "body hash mismatch", "bodyhash"),
        (DKIM, "key revoked", "revoked"),
        (DKIM, "signature did not verify", "signature"),
    ],
)
def test_auth_failure(kind: FailureKind, reason: str, expected: str) -> None:
    sig = FailedSignature(AUTHOR, "s1", "fail", "", True, reason)
    assert dict(fields(build(incident(kind=kind, dkim_failed=(sig,)))))["Auth-Failure"] == expected


def test_null_reverse_path_and_many_recipients() -> None:
    rcpts = tuple(f"user{i}@receiver.example" for i in range(25))
    data = build(incident(mail_from="", rcpt_to=rcpts))
    got = fields(data)
    assert ("Original-Mail-From", "<>") in got
    assert len([v for n, v in got if n == "Original-Rcpt-To"]) == 20
    assert b"Recipients not listed: 5." in data


def test_headers_only_by_default_and_full_message_when_asked() -> None:
    body = b"Dear jane.doe,\r\nPay at http://pay.attacker.example/now today.\r\n"
    data = build(incident(body=body))
    assert b"Pay at" not in data
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"

    full = build(incident(body=body), include_body=True)
    original = parts(full)[2]
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload(0)
    assert isinstance(inner, email.message.Message)
    text = inner.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"Pay at hxxp[://]pay[.]attacker[.]example/now today." in text
    assert b"jane.doe" not in text and b"jane.doe" not in full


def test_attachments_are_left_out_of_a_full_message() -> None:
    headers = (
        ("From", "ceo@bank.example"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'multipart/mixed; boundary="b1"'),
    )
    body = (
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment;"
        b' filename="x.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n'
        b"--b1--\r\n"
    )
    full = build(incident(headers=headers, body=body), include_body=True)
    inner = parts(full)[2].get_payload(0)
    assert isinstance(inner, email.message.Message)
    assert inner.get_content_type() == "text/plain"
    assert inner.get_payload(decode=True) == b"See the attachment."
    assert b"TVqQ" not in full
    assert b"a application/octet-stream part" in full


def test_redaction_leaves_no_local_part_anywhere() -> None:
    inc = incident(
        headers=(
            ("From", "Chief Executive <ceo@bank.example>"),
            ("Reply-To", '"jane.doe" <Jane.Doe@receiver.example>'),
            ("To", "jane.doe@receiver.example,\r\n\tother.person@receiver.example"),
            ("Received", "from x by mx for <jane.doe@receiver.example>; Fri, 1 May 2026"),
            ("Subject", "for jane.doe only"),
            ("Message-ID", "<jane.doe.42@bank.example>"),
        ),
        dkim_failed=(FailedSignature(AUTHOR, "s1", "fail", "ceo@bank.example", True),),
        authentication_results=(
            "mx.receiver.example; spf=fail smtp.mailfrom=bounces+ceo@bank.example"
        ),
    )
    data = build(inc)
    for local in (b"jane.doe", b"ceo@", b"bounces+ceo", b"other.person", b"Jane.Doe"):
        assert local.lower() not in data.lower(), local
    token = Redactor(KEY).token("jane.doe").encode()
    # One address, one token, wherever it appears (any case of the local-part).
    assert data.count(token) >= 6
    assert Redactor(KEY).token("jane.doe") == Redactor(KEY).token("Jane.Doe")
    assert Redactor(KEY).token("jane.doe") != Redactor(b"x" * 32).token("jane.doe")
    got = dict(fields(data))
    assert got["DKIM-Identity"] == f"{Redactor(KEY).token('ceo')}@bank.example"
    # A property name before "=" is not taken for part of a local-part.
    assert got["Authentication-Results"] == (
        f"mx.receiver.example; spf=fail smtp.mailfrom={Redactor(KEY).token('bounces+ceo')}"
        "@bank.example"
    )
    # The domains stay: they are what the report is about.
    assert b"@receiver.example" in data and b"@bank.example" in data


def test_each_report_has_its_own_tokens() -> None:
    one = build_failure_report(
        incident(), to_address="ruf@bank.example", report_id="a1", date=NOW, settings=SETTINGS
    )
    two = build_failure_report(
        incident(), to_address="ruf@bank.example", report_id="a1", date=NOW, settings=SETTINGS
    )
    tokens = [
        set(re.findall(rf"{TOKEN_PREFIX}[0-9a-f]{{16}}", failure_report_bytes(m).decode()))
        for m in (one, two)
    ]
    assert tokens[0] and tokens[1] and not tokens[0] & tokens[1]


def test_redaction_can_be_turned_off() -> None:
    data = build(incident(), redact=False)
    assert b"<jane.doe@receiver.example>" in data
    assert TOKEN_PREFIX.encode() not in data
    # Links are defanged all the same.
    assert b"hxxps[://]pay[.]attacker[.]example/x?id=1" in data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see https://evil.example/a.b", "see hxxps[://]evil[.]example/a.b"),
        ("HTTP://Evil.Example", "hxxp[://]Evil[.]Example"),
        ("ftp://files.example/x", "fxp[://]files[.]example/x"),
        (
            "<http://a.example>, <https://b.example>",
            "<hxxp[://]a[.]example>, <hxxps[://]b[.]example>",
        ),
        ("no link here", "no link here"),
    ],
)
def test_defang(text: str, expected: str) -> None:
    assert defang(text) == expected


def test_hostile_header_values_cannot_break_the_structure() -> None:
    inc = incident(
        headers=(
            ("Subject", "a\r\n--=_failure_x\r\nContent-Type: text/html\r\n\r\n<b>"),
            ("X-Long", "y" * 5000),
            ("X-Bytes", "caf\u00e9 \x00 \x1b"),
        )
    )
    data = build(inc)
    original = parts(data)[2]
    assert original.get_content_type() == "text/rfc822-headers"
    text = original.get_payload()
    assert isinstance(text, str)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    # Every line is a field of the original or continues one: nothing else.
    starts = [line.split(":")[0] for line in text.splitlines() if line[:1] not in " \t"]
    assert starts == ["Subject", "X-Long", "X-Bytes"]
    assert data.isascii()


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        build(incident(source_ip="not an ip"))
    with pytest.raises(ValueError):
        build(incident(incidents=0))
    with pytest.raises(ValueError):
        build(incident(reported_domain="bank example"))
    with pytest.raises(ValueError):
        build(incident(arrival_date=NOW.replace(tzinfo=None)))


# -- a real consumer -------------------------------------------------------------------


def parsed(data: bytes) -> dict[str, Any]:
    result = parsedmarc.parse_report_email(data, offline=True)
    assert result["report_type"] == "failure"
    report: dict[str, Any] = dict(result["report"])
    return report


@pytest.mark.parametrize(
    ("dkim_aligned", "spf_aligned", "mechanisms"),
    [
        (True, True, ["dkim", "spf"]),
        (True, False, ["dkim"]),
        (False, True, ["spf"]),
        (False, False, []),
    ],
)
def test_parsedmarc_reads_the_report(
    dkim_aligned: bool, spf_aligned: bool, mechanisms: list[str]
) -> None:
    sig = FailedSignature(AUTHOR, "s1", "fail", "", dkim_aligned)
    inc = incident(dkim_failed=(sig,), spf_aligned=spf_aligned, incidents=4)
    report = parsed(build(inc))
    redactor = Redactor(KEY)
    assert report["feedback_type"] == "auth-failure"
    assert report["version"] == "1"
    assert report["user_agent"].startswith("dmarcmilter/")
    assert report["auth_failure"] == ["dmarc"]
    assert report["authentication_mechanisms"] == mechanisms
    assert report["authentication_results"] == inc.authentication_results
    assert report["original_mail_from"] == f"<{redactor.token('bounces+ceo')}@bank.example>"
    assert report["original_rcpt_to"] == f"<{redactor.token('jane.doe')}@receiver.example>"
    assert report["arrival_date_utc"] == "2026-05-01 12:00:00"
    assert report["source"]["ip_address"] == CLIENT_IP
    assert report["reported_domain"] == AUTHOR
    assert report["delivery_result"] == "reject"
    assert report["incidents"] == "4"
    assert report["dkim_domain"] == (AUTHOR if dkim_aligned else None)
    assert report["sample_headers_only"] is True
    assert report["parsed_sample"]["from"]["domain"] == AUTHOR
    assert report["parsed_sample"]["subject"].startswith("Invoice for ")


def test_parsedmarc_reads_a_report_built_from_an_evaluation(run: Run) -> None:
    run.record(f"v=DMARC1; p=reject; fo=1:d:s; ruf={RUF}")
    message, mail_from = scenario_message(S[0])
    ev = run(message, mail_from, ("jane.doe@receiver.example",))
    decision = decide(ev, run.config.policy)
    due = failure_reports_due(ev.dmarc)
    assert due.kinds == (DMARC, DKIM, SPF)
    authres = render(ev, "mx.receiver.example")
    for kind in due.kinds:
        inc = incident_from_evaluation(
            ev,
            decision,
            kind,
            headers=Message.from_bytes(message).headers,
            authentication_results=authres,
        )
        assert inc.identity_alignment == "dkim, spf"
        report = parsed(build(inc))
        assert report["auth_failure"] == [{DMARC: "dmarc", DKIM: "bodyhash", SPF: "spf"}[kind]]
        assert report["authentication_mechanisms"] == ["dkim", "spf"]
        assert report["reported_domain"] == AUTHOR
        assert report["source"]["ip_address"] == CLIENT_IP
        assert report["delivery_result"] == delivery_result(decision.action).value == "spam"
        assert report["dkim_domain"] == AUTHOR
        assert report["original_mail_from"] == f"<{Redactor(KEY).token('x')}@bounce.bank.example>"
        assert report["authentication_results"] == " ".join(authres.split())
        assert report["incidents"] == "1"


def test_the_loop_guard_knows_our_failure_reports() -> None:
    config = Config(
        authserv_id="mx.receiver.example",
        report=ReportConfig(
            org_name="Receiver Example",
            from_address=SETTINGS.from_address,
            submitter=SETTINGS.submitter,
        ),
    )
    report_id = "f" * 128
    data = build_failure_report(
        incident(), to_address="ruf@bank.example", report_id=report_id, date=NOW, settings=SETTINGS
    )
    headers = Message.from_bytes(failure_report_bytes(data)).headers
    assert is_own_report(headers, config)
    assert ("Message-ID", f"<{report_id}@mx.receiver.example>") in headers


def test_oversized_originals_are_cut_and_the_cut_is_said() -> None:
    many = tuple((f"X-Field-{i}", f"value {i}") for i in range(250))
    data = build(incident(headers=many))
    original = parts(data)[2].get_payload()
    assert isinstance(original, str)
    assert original.count("X-Field-") == 200
    assert b"50 more header fields" in data
    big = tuple((f"X-Big-{i}", "z " * 10_000) for i in range(10))
    data = build(incident(headers=big))
    assert b"more header fields (size)" in data
    assert len(data) < 80_000
