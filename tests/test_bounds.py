"""The bounds on the work one message can cause (README: "Bounded work per
message") that no other test holds to its number: each is driven just past
its limit, and what happens there is checked."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket

import Milter

from dmarcmilter import domains
from dmarcmilter import spf as spf_module
from dmarcmilter.authres.parse import ResInfo, parse
from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.discovery import Discoverer, DiscoveryMethod
from dmarcmilter.dmarc import MAX_SEALER_IDENTIFIERS, DMARCResultCode, sealer_vouch
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.milter import (
    LOG_SIGNATURES,
    MAX_HEADER_FIELDS,
    MAX_LATE_FIELDS,
    MAX_LATE_VALUE,
    MAX_LOG_VALUE,
    MAX_RECIPIENTS,
    DMARCMilter,
    MilterState,
    Runtime,
    message_fields,
)
from dmarcmilter.policy import decide
from dmarcmilter.resolver import MIN_QUERY_SECONDS, DNSStatus, Resolver
from dmarcmilter.results import DKIMOutcome, DKIMResultCode, DKIMSignatureResult
from tests.dnsserver import TestDNSServer
from tests.inprocess import MilterContext
from tests.signing import make_message

ZONE = {
    "bank.example": [("A", "192.0.2.10")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject")],
}
NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def _milter(server: TestDNSServer) -> tuple[DMARCMilter, MilterContext]:
    dns = DNSConfig(nameservers=(server.host,), port=server.port, timeout=0.5, budget=2.0)
    state = MilterState(Runtime.build(Config("mx.receiver.example", dns=dns)), None)
    context = MilterContext({"i": "QBOUND", "j": "mx.receiver.example"})
    milter = DMARCMilter(state)
    milter._setctx(context)
    milter._protocol = Milter.P_HDR_LEADSPC
    milter._actions = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE
    milter.connect("mx.attacker.example", socket.AF_INET, ("203.0.113.66", 25))
    milter.hello("mx.attacker.example")
    milter.envfrom("<x@attacker.example>")
    return milter, context


def _evaluated(server: TestDNSServer, resolver: Resolver) -> Evaluation:
    server.set_zone(ZONE)
    config = Config(
        "mx.receiver.example",
        dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=0.5),
    )
    envelope = Envelope.create("203.0.113.66", "mx.attacker.example", "x@attacker.example")
    message = Message.from_bytes(make_message(from_="ceo@bank.example"))
    return evaluate(envelope, message, resolver.session(), config, now=NOW)


def test_recipients_kept_are_bounded(dns_server: TestDNSServer) -> None:
    milter, _ = _milter(dns_server)
    for n in range(MAX_RECIPIENTS + 50):
        milter.envrcpt(f"<user{n}@receiver.example>")
    assert milter.txn is not None
    assert len(milter.txn.recipients) == MAX_RECIPIENTS


def test_fields_past_the_cut_are_kept_only_when_they_matter_and_only_so_many(
    dns_server: TestDNSServer,
) -> None:
    milter, _ = _milter(dns_server)
    for n in range(MAX_HEADER_FIELDS):
        milter.header("X-Filler", f" {n}")
    txn = milter.txn
    assert txn is not None and not txn.headers_cut
    milter.header("X-Filler", " past the cut")
    assert txn.headers_cut
    # Past the cut only From and Authentication-Results are kept, each cut
    # to MAX_LATE_VALUE, and no more than MAX_LATE_FIELDS of them.
    milter.header("Subject", " not kept")
    milter.header("From", " " + "a" * (MAX_LATE_VALUE * 2) + "@bank.example")
    for _ in range(MAX_LATE_FIELDS + 10):
        milter.header("Authentication-Results", " mx.receiver.example; dmarc=pass")
    late = txn.headers[MAX_HEADER_FIELDS:]
    assert len(late) == MAX_LATE_FIELDS
    assert {name for name, _ in late} == {"From", "Authentication-Results"}
    assert all(len(value) <= MAX_LATE_VALUE for _, value in late)


def test_the_log_line_is_bounded(dns_server: TestDNSServer, resolver: Resolver) -> None:
    evaluation = _evaluated(dns_server, resolver)
    signature = DKIMSignatureResult("x" * 2000, "s", DKIMResultCode.FAIL)
    big = dataclasses.replace(
        evaluation,
        envelope=dataclasses.replace(evaluation.envelope, helo="h" * 5000),
        dkim=DKIMOutcome((signature,) * (LOG_SIGNATURES + 7)),
    )
    fields = message_fields(big, decide(big, Config().policy), 0, 1.0)
    assert all(len(v) <= MAX_LOG_VALUE for v in fields.values() if isinstance(v, str))
    assert fields["helo"].endswith("...")
    assert fields["dkim"].endswith(",+7") or fields["dkim"].endswith("...")


def test_sealer_identifiers_judged_per_message_are_bounded(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    evaluation = _evaluated(dns_server, resolver)
    outcome = evaluation.dmarc
    assert outcome.result is DMARCResultCode.FAIL
    discoverer = Discoverer(resolver.session(), DiscoveryMethod.TREEWALK, None)

    def hop(domains: list[str]) -> tuple[str, tuple[ResInfo, ...]]:
        value = "lists.example; " + "; ".join(f"dkim=pass header.d={d}" for d in domains)
        return ("lists.example", parse(value).results)

    unrelated = [f"unrelated{n}.example" for n in range(MAX_SEALER_IDENTIFIERS)]
    # Within the bound the aligned identifier is reached and vouches ...
    within = hop([*unrelated[:-1], "bank.example"])
    assert sealer_vouch(outcome, (within,), discoverer) == "lists.example"
    # ... past it, it is not judged: no trusted_forwarder override.
    past = hop([*unrelated, "bank.example"])
    assert sealer_vouch(outcome, (past,), discoverer) is None


def test_a_query_with_too_little_budget_left_is_not_sent(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(ZONE)
    session = resolver.session(budget=MIN_QUERY_SECONDS / 2)
    answer = session.query("_dmarc.bank.example", "TXT")
    assert answer.status is DNSStatus.TIMEOUT
    assert "budget" in answer.detail
    assert not dns_server.queries


def test_name_caches_keep_only_short_texts() -> None:
    assert domains._normalize_cached.cache_info().maxsize == domains._CACHE_ENTRIES
    domains.normalize_domain("Bank.Example.")
    size = domains._normalize_cached.cache_info().currsize
    # A text longer than any domain name is normalised, never kept.
    assert domains.normalize_domain(" " * 300 + "Bank.Example") == "bank.example"
    assert domains._normalize_cached.cache_info().currsize == size
    assert spf_module._client_ip_cached.cache_info().maxsize == 4096
    spf_module._client_ip("203.0.113.7")
    size = spf_module._client_ip_cached.cache_info().currsize
    # A text too long to be kept is parsed every time.
    assert spf_module._client_ip(" " * 100 + "203.0.113.8") == "203.0.113.8"
    assert spf_module._client_ip_cached.cache_info().currsize == size
