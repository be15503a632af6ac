"""Golden tests: message + envelope + DNS scenario in; the Authentication-Results
header, the disposition and the SMTP reply out, byte for byte.

The clock, the authserv-id and the DKIM keys are fixed, so the output is
stable.  To regenerate after an intended change, run with
DMARCMILTER_UPDATE_GOLDEN=1 and review the diff of tests/golden/.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.authres.render import render
from dmarcmilter.config import Config, DNSConfig, PolicyConfig
from dmarcmilter.evaluation import Envelope, evaluate
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

GOLDEN = Path(__file__).resolve().parent / "golden"
NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
AUTHSERV_ID = "mx.receiver.example"

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80"), ("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@example.com")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.example.com": [("A", "192.0.2.1"), ("TXT", "v=spf1 a -all")],
    "example.org": [("A", "192.0.2.90")],
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine; t=y")],
    "lists.example.net": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    "_dmarc.slow.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
    **dkim_zone("example.org", "ed", "ed25519"),
    **dkim_zone("lists.example.net", "arc"),
}

GOOD = ("192.0.2.1", "mx.example.com", "bounce@bounce.example.com")
BAD = ("203.0.113.66", "evil.example", "x@lists.example.net")


def _signed() -> bytes:
    return dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")


def _arc_forwarded() -> bytes:
    # The list saw a valid signature, then added a footer (breaking DKIM)
    # and sealed the message: the ARC chain passes, DKIM no longer does.
    with_footer = _signed() + b"-- \r\nlist footer\r\n"
    return arc_seal(
        with_footer,
        "lists.example.net",
        "arc",
        authserv_id="lists.example.net",
        results="dkim=pass header.d=example.com; dmarc=pass header.from=example.com",
    )


CASES: dict[str, tuple[Callable[[], bytes], tuple[str, str, str], dict[str, Any]]] = {
    "pass_dkim_spf": (_signed, GOOD, {}),
    "pass_ed25519_testing": (
        lambda: dkim_sign(make_message(from_="bob@example.org"), "example.org", "ed", "ed25519"),
        BAD,
        {},
    ),
    "fail_reject_as_quarantine": (lambda: make_message(from_="ceo@example.com"), BAD, {}),
    "fail_testing_mode": (lambda: make_message(from_="bob@example.org"), BAD, {}),
    "temperror_policy_timeout": (lambda: make_message(from_="a@slow.example"), BAD, {}),
    "none_no_record": (lambda: make_message(from_="a@norecord.example"), BAD, {}),
    "null_mail_from": (
        lambda: make_message(from_="postmaster@mx.example.com"),
        ("192.0.2.1", "mx.example.com", ""),
        {},
    ),
    "arc_forwarded_body_changed": (_arc_forwarded, BAD, {}),
    "fail_reject_enforced": (
        lambda: make_message(from_="ceo@example.com"),
        BAD,
        {"enforce_reject": True},
    ),
    "fail_held": (
        lambda: make_message(from_="ceo@example.com"),
        BAD,
        {"quarantine_action": "hold"},
    ),
    "fail_monitor_mode": (
        lambda: make_message(from_="ceo@example.com"),
        BAD,
        {"monitor": True, "enforce_reject": True},
    ),
    "mailing_list_downgraded": (
        lambda: make_message(
            from_="ceo@example.com", extra_headers={"List-Id": "<team.lists.example.net>"}
        ),
        BAD,
        {"enforce_reject": True},
    ),
    "temperror_tempfail": (
        lambda: make_message(from_="a@slow.example"),
        BAD,
        {"temperror_action": "tempfail"},
    ),
    "arc_trusted_forwarder": (_arc_forwarded, BAD, {"trusted_arc_sealers": ("lists.example.net",)}),
    "multiple_from_rejected": (
        lambda: b"From: a@example.com\r\nFrom: b@example.org\r\nTo: u@r.example\r\n\r\nhi\r\n",
        BAD,
        {"out_of_scope": "reject"},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, dns_server: TestDNSServer, resolver: Resolver) -> None:
    build, (ip, helo, mail_from), policy = CASES[name]
    dns_server.set_zone(ZONE)
    config = Config(
        authserv_id=AUTHSERV_ID,
        dns=DNSConfig(nameservers=("127.0.0.1",), port=dns_server.port, timeout=0.3),
    )
    if policy:
        config = dataclasses.replace(config, policy=PolicyConfig(**policy))
    envelope = Envelope.create(ip, helo, mail_from, ["user@receiver.example"])
    evaluation = evaluate(
        envelope, Message.from_bytes(build()), resolver.session(), config, now=NOW
    )
    decision = decide(evaluation, config.policy)
    output = (
        f"Authentication-Results: {render(evaluation, AUTHSERV_ID)}\n"
        f"Disposition: {decision.disposition.value}\n"
        f"Action: {decision.action.value}"
        + (f" ({decision.quarantine.value})" if decision.quarantine else "")
        + (f" (monitor mode: would {decision.monitored.value})" if decision.monitored else "")
        + "\n"
        f"Reasons: {', '.join(r.reason.value for r in decision.reasons) or '-'}\n"
        f"SMTP reply: {decision.reply or '-'}\n"
    )
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("DMARCMILTER_UPDATE_GOLDEN"):
        path.write_text(output)
    assert path.exists(), f"no golden file {path}; run with DMARCMILTER_UPDATE_GOLDEN=1"
    assert output == path.read_text()
