"""Hostile From fields through the real daemon: a From that is out of
DMARC's scope (RFC 9989 §4.2) but still shows a reader the victim's address
must not be delivered unmarked (RFC 9989 §11.5, digest §4.1).

bank.example publishes p=reject and never passes here; evil.example is the
attacker's own domain, whose SPF passes for the connecting client.  Each
case is one message over the milter protocol, compared with its golden
outcome in tests/golden/hostile/from_*.txt.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.authres.parse import parse
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.hostile import check_golden, one_message, outcome_text
from tests.milterclient import EndOfMessage
from tests.signing import make_message

ZONE: dict[str, Any] = {
    "bank.example": [("A", "192.0.2.80")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@bank.example")],
    "xn--bnk-qla.example": [("A", "192.0.2.81")],
    "_dmarc.xn--bnk-qla.example": [("TXT", "v=DMARC1; p=reject")],
    "shop.example": [("A", "192.0.2.82")],
    "_dmarc.shop.example": [("TXT", "v=DMARC1; p=quarantine")],
    "evil.example": [("TXT", "v=spf1 ip4:203.0.113.66 -all")],
    "_dmarc.evil.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.slow.example": "TIMEOUT",
}
ATTACKER_IP = "203.0.113.66"
SENDER = "bounce@evil.example"


def message(*froms: str) -> bytes:
    """A message whose From fields are ``froms``, in order (raw, may be folded)."""
    raw = make_message(from_="PLACEHOLDER")
    head = b"".join(b"From: " + f.encode() + b"\r\n" for f in froms)
    return raw.replace(b"From: PLACEHOLDER\r\n", head, 1)


@pytest.fixture(scope="module")
def daemons(
    tmp_path_factory: pytest.TempPathFactory, dns_server_session: TestDNSServer
) -> Iterator[dict[str, MilterDaemon]]:
    # One daemon per out_of_scope setting for the whole module: starting a
    # process per case would cost more than the cases.
    dns_server_session.set_zone(ZONE)
    base: Path = tmp_path_factory.mktemp("hostile_from")
    started: dict[str, MilterDaemon] = {}
    try:
        for setting in ("evaluate", "accept", "reject"):
            directory = base / setting
            directory.mkdir()
            config = {} if setting == "evaluate" else {"policy": {"out_of_scope": setting}}
            started[setting] = MilterDaemon(directory, dns_server_session.port, config).start()
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()
        dns_server_session.set_zone({})


def run(daemon: MilterDaemon, raw: bytes) -> EndOfMessage:
    return one_message(daemon, raw, ip=ATTACKER_IP, sender=SENDER, helo="mx.evil.example")


def dmarc_result(eom: EndOfMessage) -> Any:
    """The dmarc= result of our A-R, parsed back: it must be valid RFC 8601."""
    (value,) = [
        m.value
        for m in eom.modifications
        if m.kind == "insheader" and m.name == "Authentication-Results"
    ]
    assert value is not None
    return parse(value).results[-1]


MANY_JUNK_FIELDS = ["junk"] * 29 + ["CEO <ceo@bank.example>"]
# Past the cap of five domains, none with an enforcing policy among them.
MANY_DOMAINS = [", ".join(f"u@n{i}.example" for i in range(6)) + ", ceo@bank.example"]

# name: (From field values, out_of_scope setting, dmarc result, header.from)
CASES: dict[str, tuple[list[str], str, str, str | None]] = {
    # The three reported fields.
    "unterminated_comment": (["CEO <ceo@bank.example> ("], "evaluate", "fail", "bank.example"),
    "double_closing_angle": (["CEO <ceo@bank.example>>"], "evaluate", "fail", "bank.example"),
    "same_field_twice": (["CEO <ceo@bank.example>"] * 2, "evaluate", "fail", "bank.example"),
    # Variants of the class.
    "unterminated_quote": (['"CEO <ceo@bank.example>'], "evaluate", "fail", "bank.example"),
    "valid_then_garbage": (
        ["CEO <ceo@bank.example>", "garbage"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    "garbage_then_valid": (["((", "CEO <ceo@bank.example>"], "evaluate", "fail", "bank.example"),
    # The attacker's own domain passes; the victim's p=reject failure wins.
    "own_domain_and_victim_in_one_field": (
        ["attacker@evil.example, CEO <ceo@bank.example>"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    "own_domain_and_victim_in_two_fields": (
        ["attacker@evil.example", "CEO <ceo@bank.example>"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    # An unquoted address as the display name: readers differ on which
    # they show, so both count.
    "address_as_display_name": (
        ["ceo@bank.example <attacker@evil.example>"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    # p=reject beats p=quarantine whatever the order.
    "strictest_policy_wins": (
        ["<a@shop.example>", "<ceo@bank.example>", "<b@shop.example>"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    "quarantine_domain_alone": (
        ["Shop <orders@shop.example>>"],
        "evaluate",
        "fail",
        "shop.example",
    ),
    "trailing_garbage": (["<ceo@bank.example> garbage@@ <"], "evaluate", "fail", "bank.example"),
    "odd_folding": (["CEO\r\n <ceo@bank\r\n .example>\r\n >"], "evaluate", "fail", "bank.example"),
    "encoded_word_display_name": (
        ["=?utf-8?q?CEO_of_the_Bank?= <ceo@bank.example>>"],
        "evaluate",
        "fail",
        "bank.example",
    ),
    "group_with_victim": (["Board: <ceo@bank.example>>;"], "evaluate", "fail", "bank.example"),
    "idn_u_label": (["CEO <ceo@b\u00e4nk.example>>"], "evaluate", "fail", "xn--bnk-qla.example"),
    "case_differs": (["ceo@BANK.example", "ceo@bank.EXAMPLE"], "evaluate", "fail", "bank.example"),
    # A domain whose policy cannot be fetched: deferred (451), not delivered.
    "temperror_domain": (
        ["attacker@evil.example", "CEO <ceo@slow.example>"],
        "evaluate",
        "temperror",
        "slow.example",
    ),
    # Past the bounds: the search stops, and the message is not let through.
    "many_from_fields": (MANY_JUNK_FIELDS, "evaluate", "fail", "bank.example"),
    "too_many_domains": (MANY_DOMAINS, "evaluate", "permerror", None),
    # ... even when the attacker's own p=none domain comes first and passes.
    "too_many_domains_own_first": (
        ["attacker@evil.example, " + MANY_DOMAINS[0]],
        "evaluate",
        "permerror",
        None,
    ),
    # In scope, not recovered: an address in a comment or an encoded word is
    # a display name (RFC 9989 Appendix A.3), and the attacker's own domain
    # is the Author Domain.
    "address_in_comment": (
        ["attacker@evil.example (ceo@bank.example)"],
        "evaluate",
        "pass",
        "evil.example",
    ),
    "address_in_encoded_word": (
        ["=?utf-8?q?ceo=40bank=2Eexample?= <attacker@evil.example>"],
        "evaluate",
        "pass",
        "evil.example",
    ),
    # No domain to recover: unchanged, delivered with dmarc=permerror.
    "no_recoverable_domain": (
        ["undisclosed-recipients:;", "nobody"],
        "evaluate",
        "permerror",
        None,
    ),
    # The other settings.
    "setting_accept": (["CEO <ceo@bank.example>>"], "accept", "permerror", None),
    "setting_reject": (["CEO <ceo@bank.example>>"], "reject", "permerror", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_from(name: str, daemons: dict[str, MilterDaemon]) -> None:
    froms, setting, result, header_from = CASES[name]
    eom = run(daemons[setting], message(*froms))
    check_golden(f"from_{name}", outcome_text(eom))
    final = eom.reply.kind if eom.reply.kind != "replycode" else eom.reply.code
    if name in ("too_many_domains", "too_many_domains_own_first", "setting_reject"):
        assert final == "550"
        return
    if name == "temperror_domain":
        assert final == "451"
        return
    dmarc = dmarc_result(eom)
    assert (dmarc.result, dmarc.get("header.from")) == (result, header_from)
    quarantined = any(m.name == "X-Spam-Flag" for m in eom.modifications)
    if result == "fail":
        # Never delivered unmarked: marked as junk, or refused.
        assert quarantined or final == "550"
        assert "malformed From" in (dmarc.reason or "")
    if name in ("setting_accept", "no_recoverable_domain", "address_in_comment"):
        assert not quarantined and final in ("accept", "continue")
