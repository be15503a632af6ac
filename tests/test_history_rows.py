"""History rows built at the edge: what a row records, and how much of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.history.rows import message_row
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
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
