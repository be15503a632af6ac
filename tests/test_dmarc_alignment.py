"""Which lookups may decide the DMARC result, and in what order they run.

RFC 9989 §4.4 and §4.10.2: an identifier's Organizational Domain is the
identifier or one of its ancestors, so only an identifier at or below the
Author Domain's OD can align (relaxed), and only the Author Domain itself
(strict).  For every other identifier no walk is made, and a DNS failure on
it cannot make the result temperror (digest §4.5).  And the lookups DMARC
needs run before any lookup an attacker chose, so that the attacker's slow
DNS cannot spend the message's budget first.

Everything runs against the loopback DNS server; its query log shows which
names were asked, and in what order.
"""

from __future__ import annotations

import datetime as dt

import pytest

from dmarcmilter.config import Config, DKIMConfig, DNSConfig
from dmarcmilter.dmarc import Alignment, DMARCResultCode, could_align
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.record import AlignmentMode
from dmarcmilter.resolver import Resolver, ResolverSettings
from dmarcmilter.results import ARCResultCode, DKIMResultCode, SPFResultCode
from tests.dnsserver import TestDNSServer
from tests.hostile import ATTACKER_IP
from tests.hostile import VICTIM_ZONE as VICTIM
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
RELAXED, STRICT = AlignmentMode.RELAXED, AlignmentMode.STRICT


# -- the rule itself, without DNS -------------------------------------------------------------


@pytest.mark.parametrize(
    ("identifier", "author", "author_od", "mode", "expected"),
    [
        ("bank.example", "bank.example", "bank.example", STRICT, True),
        ("BANK.example.", "bank.example", "bank.example", STRICT, True),
        ("mail.bank.example", "bank.example", "bank.example", STRICT, False),
        ("mail.bank.example", "bank.example", "bank.example", RELAXED, True),
        ("bank.example", "mail.bank.example", "bank.example", RELAXED, True),
        ("a.b.bank.example", "x.bank.example", "bank.example", RELAXED, True),
        # No common suffix below the root: never.
        ("attacker.org", "bank.example", "bank.example", RELAXED, False),
        # Siblings under one TLD: the author's OD is not the TLD.
        ("attacker.net", "bank.net", "bank.net", RELAXED, False),
        ("net", "bank.net", "bank.net", RELAXED, False),
        # A suffix shared in the string but not label-wise.
        ("evilbank.net", "bank.net", "bank.net", RELAXED, False),
        # psd=n at the author (digest E6): its parent cannot align.
        ("example.com", "a.mail.example.com", "mail.example.com", RELAXED, False),
        # An unflagged TLD record (digest E9) makes the TLD the author's OD.
        ("evil.com", "example.com", "com", RELAXED, True),
        # The author's own walk failed: anything under its TLD could align.
        ("attacker.net", "bank.net", None, RELAXED, True),
        ("attacker.org", "bank.net", None, RELAXED, False),
        ("", "bank.net", "bank.net", RELAXED, False),
    ],
)
def test_could_align(
    identifier: str, author: str, author_od: str | None, mode: AlignmentMode, expected: bool
) -> None:
    assert could_align(identifier, author, author_od, mode) is expected


# -- through the evaluation core ----------------------------------------------------------------


class Run:
    def __init__(self, server: TestDNSServer, timeout: float = 0.3, budget: float = 5.0) -> None:
        self.server = server
        self.resolver = Resolver(
            ResolverSettings(
                nameservers=(server.host,),
                port=server.port,
                query_timeout=timeout,
                message_budget=budget,
            )
        )
        self.config = Config(
            authserv_id="mx.receiver.example",
            dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=timeout),
            dkim=DKIMConfig(max_signatures=5),
        )

    def __call__(
        self,
        message: bytes,
        mail_from: str = "x@attacker.example",
        helo: str = "mx.attacker.example",
    ) -> Evaluation:
        self.server.clear_log()
        return evaluate(
            Envelope.create(ATTACKER_IP, helo, mail_from, ["user@receiver.example"]),
            Message.from_bytes(message),
            self.resolver.session(),
            self.config,
            now=NOW,
        )

    def asked(self) -> list[str]:
        return [name for name, _ in self.server.queries]


@pytest.fixture
def run(dns_server: TestDNSServer) -> Run:
    dns_server.set_zone(VICTIM)
    return Run(dns_server)


def from_(domain: str) -> bytes:
    return make_message(from_=f"CEO <ceo@{domain}>")


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_attacker_spf_pass_with_failing_dmarc_walk_still_fails(run: Run, failure: str) -> None:
    run.server.add_zone({"_dmarc.attacker.example": failure})
    ev = run(from_("bank.example"))
    assert ev.spf.mfrom.result is SPFResultCode.PASS
    assert ev.dmarc.spf.alignment is Alignment.NONE
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert "_dmarc.attacker.example" not in run.asked()


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_attacker_dkim_pass_with_failing_dmarc_walk_still_fails(run: Run, failure: str) -> None:
    run.server.add_zone({"_dmarc.attacker.example": failure})
    ev = run(dkim_sign(from_("bank.example"), "attacker.example", "a1"), mail_from="")
    assert ev.dkim.signatures[0].result is DKIMResultCode.PASS
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert not any(name.startswith("_dmarc.attacker") for name in run.asked())


def test_attacker_spf_temperror_does_not_give_temperror(run: Run) -> None:
    run.server.add_zone({"attacker.example": "SERVFAIL", "_dmarc.attacker.example": "SERVFAIL"})
    ev = run(from_("bank.example"))
    assert ev.spf.mfrom.result is SPFResultCode.TEMPERROR
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert "_dmarc.attacker.example" not in run.asked()


def test_attacker_dkim_key_temperror_does_not_give_temperror(run: Run) -> None:
    run.server.add_zone(
        {"a1._domainkey.attacker.example": "TIMEOUT", "_dmarc.attacker.example": "SERVFAIL"}
    )
    ev = run(dkim_sign(from_("bank.example"), "attacker.example", "a1"), mail_from="")
    assert ev.dkim.signatures[0].result is DKIMResultCode.TEMPERROR
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert "_dmarc.attacker.example" not in run.asked()


def test_sibling_under_the_same_tld_is_not_walked(run: Run) -> None:
    run.server.add_zone({"_dmarc.attacker.net": "SERVFAIL"})
    msg = dkim_sign(from_("bank.net"), "attacker.net", "a1")
    ev = run(msg, mail_from="x@attacker.net")
    assert ev.spf.mfrom.result is SPFResultCode.PASS
    assert ev.dkim.signatures[0].result is DKIMResultCode.PASS
    assert ev.dmarc.result is DMARCResultCode.FAIL
    # The author's own walk reaches the TLD; the attacker's is never made.
    assert run.asked()[:2] == ["_dmarc.bank.net", "_dmarc.net"]
    assert "_dmarc.attacker.net" not in run.asked()


def test_failure_below_the_author_od_still_gives_temperror(run: Run) -> None:
    # A subdomain of the author's OD could align; its walk is needed, and a
    # failure there is the author's own DNS failing.
    run.server.add_zone(
        {
            **dkim_zone("mail.bank.example", "s1"),
            "_dmarc.mail.bank.example": "SERVFAIL",
        }
    )
    ev = run(dkim_sign(from_("bank.example"), "mail.bank.example", "s1"), mail_from="")
    assert ev.dkim.signatures[0].result is DKIMResultCode.PASS
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR
    assert "_dmarc.mail.bank.example" in run.asked()


def test_unflagged_tld_record_still_walks_and_can_fail(run: Run) -> None:
    # Digest E9: with _dmarc.net published without psd=y, attacker.net and
    # bank.net share the OD "net", so attacker.net's walk decides, and its
    # failure is a needed lookup failing.
    run.server.add_zone(
        {"_dmarc.net": [("TXT", "v=DMARC1; p=none")], "_dmarc.attacker.net": "SERVFAIL"}
    )
    ev = run(dkim_sign(from_("bank.net"), "attacker.net", "a1"), mail_from="")
    assert ev.dmarc.organizational_domain == "net"
    assert ev.dmarc.result is DMARCResultCode.TEMPERROR


def test_failed_author_walk_only_matters_for_identifiers_under_its_tld(run: Run) -> None:
    run.server.add_zone({"_dmarc.example": "TIMEOUT"})
    unrelated = run(dkim_sign(from_("bank.example"), "attacker.net", "a1"), mail_from="")
    assert unrelated.dmarc.result is DMARCResultCode.FAIL
    assert "_dmarc.attacker.net" not in run.asked()
    related = run(dkim_sign(from_("bank.example"), "attacker.example", "a1"), mail_from="")
    assert related.dmarc.result is DMARCResultCode.TEMPERROR


def test_strict_mode_walks_nothing_for_subdomains(run: Run) -> None:
    run.server.set_zone({k: v for k, v in VICTIM.items() if k != "_dmarc.bank.example"})
    run.server.add_zone(
        {
            "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
            **dkim_zone("mail.bank.example", "s1"),
            "_dmarc.mail.bank.example": "SERVFAIL",
        }
    )
    ev = run(dkim_sign(from_("bank.example"), "mail.bank.example", "s1"), mail_from="")
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert "_dmarc.mail.bank.example" not in run.asked()


# -- the order of lookups (the DNS budget) ------------------------------------------------------


def junk_signed(message: bytes, count: int) -> bytes:
    for i in range(count):
        message = dkim_sign(message, f"slow{i}.attacker.example", "k")
    return message


def test_attacker_keys_that_never_answer_cannot_starve_the_policy(
    dns_server: TestDNSServer,
) -> None:
    dns_server.set_zone(VICTIM)
    dns_server.add_zone({f"k._domainkey.slow{i}.attacker.example": "TIMEOUT" for i in range(4)})
    dns_server.add_zone({"mx.attacker.example": "TIMEOUT"})
    # Four keys that never answer cost four per-query timeouts, twice the
    # message's budget: the budget runs out in the attacker's lookups.
    run = Run(dns_server, timeout=0.4, budget=0.8)
    msg = dkim_sign(from_("bank.example"), "bank.example", "s1")
    msg = msg.replace(b"Hello Bob", b"Hello Rob")  # the victim's signature now fails
    ev = run(junk_signed(msg, 4), mail_from="x@attacker.example")
    assert ev.dmarc.result is DMARCResultCode.FAIL
    results = [s.result for s in ev.dkim.signatures]
    # Header order is kept: the four junk signatures above the victim's.
    assert [s.domain for s in ev.dkim.signatures][-1] == "bank.example"
    assert results[-1] is DKIMResultCode.FAIL
    assert results[:4] == [DKIMResultCode.TEMPERROR] * 4
    asked = run.asked()
    first_junk = min(i for i, name in enumerate(asked) if "slow" in name)
    # Everything DMARC needs was asked before any of the attacker's keys.
    needed = ["_dmarc.bank.example", "_dmarc.example", "s1._domainkey.bank.example"]
    assert all(asked.index(name) < first_junk for name in needed)
    assert "attacker.example" in asked  # SPF on the non-aligning MAIL FROM still ran
    assert ev.spf.mfrom.result in (SPFResultCode.PASS, SPFResultCode.TEMPERROR)


def test_without_the_order_the_same_message_would_run_out(dns_server: TestDNSServer) -> None:
    # The scenario above is a real starvation: the attacker's four keys alone
    # spend the whole budget (the last ones never even get asked).
    dns_server.set_zone(VICTIM)
    dns_server.add_zone({f"k._domainkey.slow{i}.attacker.example": "TIMEOUT" for i in range(4)})
    run = Run(dns_server, timeout=0.4, budget=0.8)
    ev = run(junk_signed(from_("attacker.org"), 4), mail_from="x@attacker.org")
    reasons = [s.reason for s in ev.dkim.signatures]
    assert any("budget" in r for r in reasons)


def test_aligning_signatures_are_verified_first_within_max_signatures(run: Run) -> None:
    # max_signatures is 5 here: six junk signatures above the victim's own
    # must not push it past the bound.
    msg = junk_signed(dkim_sign(from_("bank.example"), "bank.example", "s1"), 6)
    ev = run(msg, mail_from="x@attacker.example")
    sigs = ev.dkim.signatures
    assert [s.domain for s in sigs][-1] == "bank.example"
    assert sigs[-1].result is DKIMResultCode.PASS
    assert ev.dmarc.result is DMARCResultCode.PASS
    too_many = [s for s in sigs if s.reason == "too many signatures"]
    assert len(too_many) == 2  # 7 signatures, 5 verified
    asked = run.asked()
    assert asked.index("s1._domainkey.bank.example") < min(
        i for i, n in enumerate(asked) if "slow" in n
    )


def test_arc_and_helo_lookups_come_after_dmarc(dns_server: TestDNSServer) -> None:
    dns_server.set_zone(VICTIM)
    dns_server.add_zone({"arc._domainkey.sealer.attacker.example": "TIMEOUT"})
    dns_server.add_zone({"mx.attacker.example": "TIMEOUT"})
    run = Run(dns_server, timeout=0.4, budget=0.6)
    msg = arc_seal(from_("bank.example"), "sealer.attacker.example", "arc")
    ev = run(msg, mail_from="x@attacker.example")
    assert ev.dmarc.result is DMARCResultCode.FAIL
    assert ev.arc.result is not ARCResultCode.PASS
    asked = run.asked()
    assert asked[0] == "_dmarc.bank.example"
    assert asked.index("_dmarc.example") < asked.index("arc._domainkey.sealer.attacker.example")


def test_spf_on_an_aligning_mail_from_is_checked_before_attacker_lookups(
    dns_server: TestDNSServer,
) -> None:
    dns_server.set_zone(VICTIM)
    dns_server.add_zone(
        {
            "bounce.bank.example": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
            **{f"k._domainkey.slow{i}.attacker.example": "TIMEOUT" for i in range(4)},
        }
    )
    run = Run(dns_server, timeout=0.4, budget=0.8)
    ev = run(junk_signed(from_("bank.example"), 4), mail_from="x@bounce.bank.example")
    assert ev.spf.mfrom.result is SPFResultCode.PASS
    assert ev.dmarc.spf.alignment is Alignment.RELAXED
    assert ev.dmarc.result is DMARCResultCode.PASS
    asked = run.asked()
    assert asked.index("bounce.bank.example") < min(i for i, n in enumerate(asked) if "slow" in n)


def test_attacker_reverse_dns_cannot_starve_a_victim_spf_ptr(dns_server: TestDNSServer) -> None:
    # The victim's SPF uses "ptr"; the attacker's reverse DNS names ten
    # hosts of his whose addresses never answer.  RFC 7208 §5.5 skips them;
    # they get one query timeout of the budget in all, not ten.
    ptr_names = [f"h{i}.attacker.example" for i in range(10)]
    dns_server.set_zone(VICTIM)
    dns_server.add_zone(
        {
            "bounce.bank.example": [("TXT", "v=spf1 ptr -all")],
            "66.113.0.203.in-addr.arpa": [("PTR", name) for name in ptr_names],
            **{name: "TIMEOUT" for name in ptr_names},
        }
    )
    run = Run(dns_server, timeout=0.3, budget=1.5)
    ev = run(from_("bank.example"), mail_from="x@bounce.bank.example")
    assert ev.spf.mfrom.result is SPFResultCode.FAIL
    assert ev.dmarc.result is DMARCResultCode.FAIL
    asked = run.asked()
    assert sum(name in ptr_names for name in asked) == 1


def test_a_malformed_from_gets_its_policies_before_the_attackers_lookups(
    dns_server: TestDNSServer,
) -> None:
    # The same starvation attempt with a From field that is out of scope
    # (the victim's address twice over, with trailing junk): every domain a
    # reader would see is an Author Domain whose policy comes first.
    dns_server.set_zone(VICTIM)
    dns_server.add_zone({f"k._domainkey.slow{i}.attacker.example": "TIMEOUT" for i in range(4)})
    dns_server.add_zone({"mx.attacker.example": "TIMEOUT"})
    run = Run(dns_server, timeout=0.4, budget=0.8)
    msg = make_message(from_="CEO <ceo@bank.example>>")
    ev = run(junk_signed(msg, 4), mail_from="x@attacker.example")
    assert not ev.author.status.in_scope
    assert ev.dmarc.author_domain == "bank.example"
    assert ev.dmarc.result is DMARCResultCode.FAIL
    asked = run.asked()
    first_junk = min(i for i, name in enumerate(asked) if "slow" in name)
    assert asked.index("_dmarc.bank.example") < first_junk
