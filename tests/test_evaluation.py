"""End-to-end evaluation: envelope + message + DNS → DMARC result and decision.

Each test publishes a zone on the loopback DNS server, builds real messages
(signed with the fixed test keys where needed) and runs the same core the
milter runs.  These are the digest's alignment and result rules (§3, §4) and
the cases the evaluation-core issue lists.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from dmarcmilter.config import Config, DNSConfig, PolicyConfig
from dmarcmilter.dmarc import Alignment, DMARCResultCode, OverrideReason
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.policy import Action, Decision, Disposition, decide
from dmarcmilter.record import Policy
from dmarcmilter.resolver import Resolver
from dmarcmilter.results import DKIMResultCode, SPFResultCode
from tests.dnsserver import TestDNSServer
from tests.signing import dkim_sign, dkim_zone, make_message

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
GOOD_IP = "192.0.2.1"
BAD_IP = "203.0.113.66"

BASE_ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80"), ("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.example.com": [("A", "192.0.2.1"), ("TXT", "v=spf1 a -all")],
    "news.example.com": [("A", "192.0.2.81")],
    "thirdparty.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.forwarder.example": [("A", "203.0.113.66")],
}


class Scenario:
    def __init__(self, server: TestDNSServer, resolver: Resolver) -> None:
        self.server = server
        self.resolver = resolver
        self.config = Config(
            authserv_id="mx.receiver.example",
            dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=0.5),
        )

    def zone(self, *zones: dict[str, Any]) -> None:
        self.server.set_zone(BASE_ZONE)
        for z in zones:
            self.server.add_zone(z)

    def run(
        self,
        message: bytes,
        *,
        ip: str = GOOD_IP,
        helo: str = "mx.example.com",
        mail_from: str = "bounce@bounce.example.com",
        config: Config | None = None,
    ) -> tuple[Evaluation, Decision]:
        cfg = config or self.config
        ev = evaluate(
            Envelope.create(ip, helo, mail_from, ["user@receiver.example"]),
            Message.from_bytes(message),
            self.resolver.session(),
            cfg,
            now=NOW,
        )
        return ev, decide(ev, cfg.policy)


@pytest.fixture
def sc(dns_server: TestDNSServer, resolver: Resolver) -> Scenario:
    return Scenario(dns_server, resolver)


def dmarc(record: str, name: str = "example.com") -> dict[str, Any]:
    return {f"_dmarc.{name}": [("TXT", record)]}


def signed(
    from_: str = "alice@example.com",
    domain: str = "example.com",
    selector: str = "s1",
    key: str = "rsa",
    body: str = "Hello.\r\n",
) -> bytes:
    return dkim_sign(make_message(from_=from_, body=body), domain, selector, key)


def test_e1_aligned_dkim_pass(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject; rua=mailto:d@example.com"), dkim_zone("example.com", "s1"))
    ev, dec = sc.run(signed(), mail_from="x@thirdparty.example")
    assert ev.dmarc.result is DMARCResultCode.PASS
    assert ev.dmarc.policy is Policy.REJECT
    assert ev.dmarc.policy_domain == "example.com"
    assert ev.dmarc.organizational_domain == "example.com"
    assert [v.aligned for v in ev.dmarc.dkim] == [True]
    assert ev.dmarc.dkim[0].alignment is Alignment.STRICT
    assert not ev.dmarc.spf_aligned
    assert dec.disposition is Disposition.PASS and dec.action is Action.ACCEPT


def test_only_the_second_of_several_signatures_is_aligned(sc: Scenario) -> None:
    sc.zone(
        dmarc("v=DMARC1; p=reject"),
        dkim_zone("thirdparty.example", "esp"),
        dkim_zone("example.com", "s1", "ed25519"),
    )
    msg = dkim_sign(signed(domain="example.com", key="ed25519"), "thirdparty.example", "esp")
    ev, _ = sc.run(msg, mail_from="x@thirdparty.example")
    sigs = [(v.signature.domain, v.signature.result, v.aligned) for v in ev.dmarc.dkim]
    assert sigs == [
        ("thirdparty.example", DKIMResultCode.PASS, False),
        ("example.com", DKIMResultCode.PASS, True),
    ]
    assert ev.dmarc.result is DMARCResultCode.PASS


def test_ed25519_signature_aligns(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=quarantine"), dkim_zone("example.com", "ed", "ed25519"))
    ev, _ = sc.run(signed(selector="ed", key="ed25519"), ip=BAD_IP)
    assert ev.dkim.signatures[0].algorithm == "ed25519-sha256"
    assert ev.dmarc.result is DMARCResultCode.PASS


def test_body_changed_after_signing_fails_and_p_reject_is_quarantined(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"), dkim_zone("example.com", "s1"))
    msg = signed(body="Pay invoice 100.\r\n").replace(b"100", b"900")
    ev, dec = sc.run(msg, ip=BAD_IP)
    assert ev.dkim.signatures[0].result is DKIMResultCode.FAIL
    assert ev.spf.mfrom.result is SPFResultCode.FAIL
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert ev.dmarc.policy is Policy.REJECT
    # RFC 9989 §8: never reject solely on p=reject.
    assert dec.disposition is Disposition.QUARANTINE and dec.action is Action.QUARANTINE
    assert [r.reason for r in dec.reasons] == [OverrideReason.LOCAL_POLICY]


def test_relaxed_spf_alignment_through_organizational_domain(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    ev, _ = sc.run(make_message(from_="alice@example.com"))
    assert ev.spf.mfrom.domain == "bounce.example.com"
    assert ev.dmarc.spf.alignment is Alignment.RELAXED
    assert ev.dmarc.result is DMARCResultCode.PASS


def test_strict_spf_alignment_refuses_subdomain(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject; aspf=s"))
    ev, _ = sc.run(make_message(from_="alice@example.com"))
    assert ev.spf.mfrom.result is SPFResultCode.PASS
    assert ev.dmarc.spf.alignment is Alignment.NONE
    assert ev.dmarc.result is DMARCResultCode.FAIL


def test_null_mail_from_uses_helo_identity(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    ev, _ = sc.run(make_message(from_="mailer-daemon@mx.example.com"), mail_from="")
    assert ev.spf.null_reverse_path
    assert ev.spf.mfrom.domain == "mx.example.com"
    assert ev.spf.mfrom.result is SPFResultCode.PASS
    assert ev.dmarc.spf_aligned and ev.dmarc.result is DMARCResultCode.PASS


def test_dns_timeout_on_policy_gives_temperror_and_no_policy(sc: Scenario) -> None:
    sc.zone({"_dmarc.example.com": "TIMEOUT"})
    ev, dec = sc.run(make_message(from_="alice@example.com"), ip=BAD_IP)
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR
    assert dec.disposition is Disposition.NONE and dec.action is Action.ACCEPT


def test_spf_temperror_on_aligned_identifier_gives_temperror(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"), {"bounce.example.com": "SERVFAIL"})
    ev, dec = sc.run(make_message(from_="alice@example.com"))
    assert ev.spf.mfrom.result is SPFResultCode.TEMPERROR
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR
    assert dec.action is Action.ACCEPT


def test_dkim_temperror_on_unaligned_domain_still_fails(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=quarantine"), {"esp._domainkey.thirdparty.example": "SERVFAIL"})
    msg = signed(from_="alice@example.com", domain="thirdparty.example", selector="esp")
    ev, dec = sc.run(msg, ip=BAD_IP)
    assert ev.dkim.signatures[0].result is DKIMResultCode.TEMPERROR
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert dec.disposition is Disposition.QUARANTINE


def test_dkim_temperror_on_aligned_domain_gives_temperror(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=quarantine"), {"s1._domainkey.example.com": "SERVFAIL"})
    ev, _ = sc.run(signed(), ip=BAD_IP)
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR


def test_e6_psd_n_splits_relaxed_alignment(sc: Scenario) -> None:
    sc.zone(
        dmarc("v=DMARC1; p=quarantine; psd=n", "mail.example.com"),
        dmarc("v=DMARC1; p=reject"),
        dkim_zone("example.com", "s1"),
        {"a.mail.example.com": [("A", "192.0.2.9")]},
    )
    msg = signed(from_="x@a.mail.example.com", domain="example.com")
    ev, dec = sc.run(msg, ip=BAD_IP)
    assert ev.dmarc.organizational_domain == "mail.example.com"
    assert ev.dmarc.dkim[0].alignment is Alignment.NONE
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert ev.dmarc.policy is Policy.QUARANTINE
    assert dec.disposition is Disposition.QUARANTINE


def test_e9_unflagged_tld_record_aligns_unrelated_domains(sc: Scenario) -> None:
    sc.zone(
        dmarc("v=DMARC1; p=none", "com"),
        dmarc("v=DMARC1; p=reject"),
        dkim_zone("evil.com", "x"),
    )
    msg = signed(from_="ceo@example.com", domain="evil.com", selector="x")
    ev, _ = sc.run(msg, ip=BAD_IP)
    assert ev.dmarc.dkim[0].alignment is Alignment.RELAXED
    assert ev.dmarc.result is DMARCResultCode.PASS


@pytest.mark.parametrize(
    ("record", "policy", "disposition", "reasons"),
    [
        (
            "v=DMARC1; p=reject; t=y",
            Policy.QUARANTINE,
            Disposition.QUARANTINE,
            [OverrideReason.POLICY_TEST_MODE],
        ),
        (
            "v=DMARC1; p=quarantine; t=y",
            Policy.NONE,
            Disposition.NONE,
            [OverrideReason.POLICY_TEST_MODE],
        ),
        (
            "v=DMARC1; p=quarantine; pct=0",
            Policy.NONE,
            Disposition.NONE,
            [OverrideReason.POLICY_TEST_MODE],
        ),
        ("v=DMARC1; p=quarantine; pct=50", Policy.QUARANTINE, Disposition.QUARANTINE, []),
        ("v=DMARC1; p=none", Policy.NONE, Disposition.NONE, []),
        ("v=DMARC1; p=rejct; rua=mailto:r@example.com", Policy.NONE, Disposition.NONE, []),
        ("v=DMARC1; rua=mailto:r@example.com", Policy.NONE, Disposition.NONE, []),
    ],
)
def test_testing_mode_and_e10_policies_on_failure(
    sc: Scenario,
    record: str,
    policy: Policy,
    disposition: Disposition,
    reasons: list[OverrideReason],
) -> None:
    sc.zone(dmarc(record))
    ev, dec = sc.run(make_message(from_="alice@example.com"), ip=BAD_IP)
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert ev.dmarc.policy is policy
    assert dec.disposition is disposition
    assert [r.reason for r in dec.reasons] == reasons


def test_e10_invalid_policy_without_rua_is_permerror(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=rejct"))
    ev, dec = sc.run(make_message(from_="alice@example.com"), ip=BAD_IP)
    assert ev.dmarc.result is DMARCResultCode.PERMERROR
    assert dec.action is Action.ACCEPT


def test_no_record_is_none(sc: Scenario) -> None:
    sc.zone()
    ev, dec = sc.run(make_message(from_="alice@example.com"), ip=BAD_IP)
    assert ev.dmarc.result is DMARCResultCode.NONE
    assert dec.disposition is Disposition.NONE


def test_np_applies_to_nonexistent_subdomain(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=none; sp=none; np=reject"))
    ev, dec = sc.run(make_message(from_="x@ghost.example.com"), ip=BAD_IP)
    assert ev.dmarc.discovery is not None and ev.dmarc.discovery.policy_tag == "np"
    assert ev.dmarc.policy is Policy.REJECT
    assert dec.disposition is Disposition.QUARANTINE
    ev2, dec2 = sc.run(make_message(from_="x@news.example.com"), ip=BAD_IP)
    assert ev2.dmarc.policy is Policy.NONE and dec2.disposition is Disposition.NONE


def _raw(*headers: str, body: str = "hi\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


@pytest.mark.parametrize(
    ("message", "status"),
    [
        (_raw("To: u@r.example", "Subject: no from"), "no_from"),
        (_raw("From: undisclosed:;", "To: u@r.example"), "no_domain"),
    ],
)
def test_out_of_scope_from_without_a_domain_is_permerror_and_accepted(
    sc: Scenario, message: bytes, status: str
) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    ev, dec = sc.run(message, ip=BAD_IP)
    assert ev.author.status.value == status
    assert ev.dmarc.result is DMARCResultCode.PERMERROR
    assert dec.action is Action.ACCEPT and dec.reply is None


@pytest.mark.parametrize(
    ("message", "status"),
    [
        (_raw("From: a@example.com", "From: b@example.com", "To: u@r.example"), "multiple_from"),
        (_raw("From: a@example.com, b@example.org", "To: u@r.example"), "multiple_domains"),
        (_raw("From: CEO <ceo@example.com>>", "To: u@r.example"), "no_domain"),
    ],
)
def test_out_of_scope_from_naming_a_p_reject_domain_is_not_delivered_unmarked(
    sc: Scenario, message: bytes, status: str
) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    ev, dec = sc.run(message, ip=BAD_IP)
    assert ev.author.status.value == status
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert ev.dmarc.author_domain == "example.com"
    assert dec.action is Action.QUARANTINE


def test_out_of_scope_from_can_be_accepted_as_before(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    config = dataclasses.replace(sc.config, policy=PolicyConfig(out_of_scope="accept"))
    ev, dec = sc.run(_raw("From: a@example.com", "From: b@example.com"), ip=BAD_IP, config=config)
    assert ev.dmarc.result is DMARCResultCode.PERMERROR
    assert dec.action is Action.ACCEPT and dec.reply is None


def test_out_of_scope_from_can_be_rejected(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    config = dataclasses.replace(sc.config, policy=PolicyConfig(out_of_scope="reject"))
    _, dec = sc.run(_raw("From: a@example.com", "From: b@example.com"), ip=BAD_IP, config=config)
    assert dec.action is Action.REJECT
    assert dec.reply is not None and str(dec.reply).startswith("550 5.7.1 ")
    assert "exactly one author domain" in dec.reply.text


def test_same_domain_twice_in_one_from_is_evaluated(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    ev, _ = sc.run(_raw("From: a@example.com, B@EXAMPLE.COM"))
    assert ev.author.domain == "example.com"
    assert ev.dmarc.result is DMARCResultCode.PASS


def test_psl_method_is_recorded(sc: Scenario) -> None:
    sc.zone(dmarc("v=DMARC1; p=reject"))
    config = dataclasses.replace(
        sc.config, dmarc=dataclasses.replace(sc.config.dmarc, discovery_method="psl")
    )
    ev, _ = sc.run(make_message(from_="alice@example.com"), config=config)
    assert ev.dmarc.discovery_method is not None
    assert ev.dmarc.discovery_method.value == "psl"
    assert ev.dmarc.result is DMARCResultCode.PASS
