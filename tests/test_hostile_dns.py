"""Hostile mail through attacker-controlled DNS, against the real daemon.

An attacker owns the DNS of his own domains: he can make them SERVFAIL, never
answer, or answer with 64 KiB records.  None of that may soften a victim's
``p=reject`` (RFC 9989 §4.4, §4.10.2, digest §4.5: only a lookup whose
answer could change the verdict may make it temperror), starve the victim's
policy discovery of the message's DNS budget, or grow the daemon's memory
without bound.  Each case runs over the milter protocol with the loopback DNS
server, and what the MTA is told is compared with a golden file
(tests/golden/hostile/dns_*.txt); the DNS server's query log shows which
names were asked and in what order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.hostile import (
    ATTACKER_IP,
    VICTIM_ZONE,
    Start,
    check_golden,
    daemons,
    one_message,
    outcome_text,
    send,
)
from tests.milterclient import EndOfMessage, MilterClient
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

HELO = "mx.attacker.example"

ZONE: dict[str, Any] = {**VICTIM_ZONE, **dkim_zone("mail.bank.example", "s1")}


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    yield from daemons(tmp_path, dns_server, ZONE)


def one(daemon: MilterDaemon, message: bytes, sender: str = "x@attacker.example") -> EndOfMessage:
    return one_message(daemon, message, ip=ATTACKER_IP, sender=sender, helo=HELO, queue_id="4QDNS1")


def asked(server: TestDNSServer) -> list[str]:
    """Names the daemon asked, in order, each once (a TCP retry after a
    truncated UDP answer repeats a name)."""
    out: list[str] = []
    for name, _ in server.queries:
        if not out or out[-1] != name:
            out.append(name)
    return out


def victim(domain: str = "bank.example") -> bytes:
    return make_message(from_=f"Bank CEO <ceo@{domain}>", subject="Wire transfer")


# The default for a p=reject failure (policy.enforce_reject = false, RFC
# 9989 §8) is to quarantine it: the message is marked for the spam folder.
REJECTED = "dmarc=fail policy.dmarc=reject header.from=bank"
MARKED = "addheader: X-Spam-Flag: YES"


# -- finding 1: the attacker's own DNS failing cannot soften the verdict ------------------


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_attacker_spf_pass_and_failing_dmarc_walk(
    start: Start, dns_server: TestDNSServer, failure: str
) -> None:
    dns_server.add_zone({"_dmarc.attacker.example": failure})
    daemon = start()
    dns_server.clear_log()
    text = outcome_text(one(daemon, victim()))
    check_golden("dns_spf_pass_attacker_walk_fails", text)
    assert REJECTED in text and MARKED in text
    assert "_dmarc.attacker.example" not in asked(dns_server)


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_attacker_dkim_pass_and_failing_dmarc_walk(
    start: Start, dns_server: TestDNSServer, failure: str
) -> None:
    dns_server.add_zone({"_dmarc.attacker.example": failure})
    daemon = start()
    dns_server.clear_log()
    message = dkim_sign(victim(), "attacker.example", "a1")
    text = outcome_text(one(daemon, message, sender="x@elsewhere.invalid"))
    check_golden("dns_dkim_pass_attacker_walk_fails", text)
    assert REJECTED in text and MARKED in text
    assert "_dmarc.attacker.example" not in asked(dns_server)


def test_attacker_spf_temperror(start: Start, dns_server: TestDNSServer) -> None:
    dns_server.add_zone({"attacker.example": "SERVFAIL", "_dmarc.attacker.example": "SERVFAIL"})
    daemon = start()
    text = outcome_text(one(daemon, victim()))
    check_golden("dns_spf_temperror_attacker", text)
    assert "spf=temperror" in text and REJECTED in text and MARKED in text


def test_attacker_dkim_key_temperror(start: Start, dns_server: TestDNSServer) -> None:
    dns_server.add_zone(
        {"a1._domainkey.attacker.example": "TIMEOUT", "_dmarc.attacker.example": "TIMEOUT"}
    )
    daemon = start()
    message = dkim_sign(victim(), "attacker.example", "a1")
    text = outcome_text(one(daemon, message, sender="x@elsewhere.invalid"))
    check_golden("dns_dkim_key_temperror_attacker", text)
    assert "dkim=temperror" in text and REJECTED in text and MARKED in text


def test_sibling_domain_under_the_same_tld(start: Start, dns_server: TestDNSServer) -> None:
    # bank.net and attacker.net share only "net": the author's walk asks
    # _dmarc.net, the attacker's name is never walked.
    dns_server.add_zone({"_dmarc.attacker.net": "SERVFAIL"})
    daemon = start()
    dns_server.clear_log()
    message = dkim_sign(victim("bank.net"), "attacker.net", "a1")
    text = outcome_text(one(daemon, message, sender="x@attacker.net"))
    check_golden("dns_sibling_under_tld", text)
    assert REJECTED in text and MARKED in text
    names = asked(dns_server)
    assert "_dmarc.net" in names and "_dmarc.attacker.net" not in names


def test_failure_below_the_author_od_is_a_real_temperror(
    start: Start, dns_server: TestDNSServer
) -> None:
    # d=mail.bank.example could align with bank.example; its walk is needed,
    # and a failure there is the victim's own DNS failing: temperror stays.
    dns_server.add_zone({"_dmarc.mail.bank.example": "SERVFAIL"})
    daemon = start()
    message = dkim_sign(victim(), "mail.bank.example", "s1")
    text = outcome_text(one(daemon, message, sender="x@elsewhere.invalid"))
    check_golden("dns_subdomain_walk_fails", text)
    assert "dmarc=temperror" in text


# -- finding 2: the attacker's lookups cannot starve the policy discovery ------------------

SLOW_KEYS = {f"k._domainkey.slow{i}.attacker.example": "TIMEOUT" for i in range(4)}
# Four keys that never answer take four per-query timeouts (0.5 s each in
# the test daemon), more than this whole per-message budget.
TIGHT_BUDGET = {"dns": {"timeout": 0.5, "budget": 1.5}}


def with_junk(message: bytes, count: int, domain: str = "attacker.example") -> bytes:
    for i in range(count):
        message = dkim_sign(message, f"slow{i}.{domain}", "k")
    return message


def test_keys_that_never_answer_cannot_starve_policy_discovery(
    start: Start, dns_server: TestDNSServer
) -> None:
    dns_server.add_zone(SLOW_KEYS)
    daemon = start(TIGHT_BUDGET)
    dns_server.clear_log()
    started = time.monotonic()
    text = outcome_text(one(daemon, with_junk(victim(), 4)))
    assert time.monotonic() - started < 30  # it finished
    check_golden("dns_budget_junk_keys", text)
    assert REJECTED in text and MARKED in text
    names = asked(dns_server)
    first_junk = min(i for i, n in enumerate(names) if n.startswith("k._domainkey.slow"))
    assert names.index("_dmarc.bank.example") < first_junk
    assert names.index("_dmarc.example") < first_junk


def test_victim_signature_below_junk_is_still_verified(
    start: Start, dns_server: TestDNSServer
) -> None:
    # A replayed, validly signed message with junk signatures put above the
    # victim's: the bound on signatures verified counts aligning ones first.
    daemon = start({"dkim": {"max_signatures": 3}})
    dns_server.clear_log()
    message = with_junk(dkim_sign(victim(), "bank.example", "s1"), 4, "nx.invalid")
    text = outcome_text(one(daemon, message, sender="x@elsewhere.invalid"))
    check_golden("dns_victim_signature_below_junk", text)
    assert "dmarc=pass" in text
    names = asked(dns_server)
    assert names.index("s1._domainkey.bank.example") < min(
        i for i, n in enumerate(names) if "slow" in n
    )


def test_arc_and_helo_lookups_cannot_starve_policy_discovery(
    start: Start, dns_server: TestDNSServer
) -> None:
    dns_server.add_zone(
        {
            **SLOW_KEYS,
            "arc._domainkey.sealer.attacker.example": "TIMEOUT",
            HELO: "TIMEOUT",
        }
    )
    daemon = start(TIGHT_BUDGET)
    dns_server.clear_log()
    message = arc_seal(with_junk(victim(), 2), "sealer.attacker.example", "arc")
    text = outcome_text(one(daemon, message))
    check_golden("dns_budget_arc_helo", text)
    assert REJECTED in text and MARKED in text
    names = asked(dns_server)
    assert names[:2] == ["_dmarc.bank.example", "_dmarc.example"]


def test_reverse_dns_of_the_attacker_cannot_starve_a_victim_spf_ptr(
    start: Start, dns_server: TestDNSServer
) -> None:
    ptr_names = [f"h{i}.attacker.example" for i in range(10)]
    dns_server.add_zone(
        {
            "bounce.bank.example": [("TXT", "v=spf1 ptr -all")],
            "66.113.0.203.in-addr.arpa": [("PTR", name) for name in ptr_names],
            **{name: "TIMEOUT" for name in ptr_names},
        }
    )
    daemon = start(TIGHT_BUDGET)
    dns_server.clear_log()
    text = outcome_text(one(daemon, victim(), sender="x@bounce.bank.example"))
    check_golden("dns_spf_ptr_attacker_reverse", text)
    assert "spf=fail smtp.mailfrom=bounce.bank.example" in text
    assert REJECTED in text and MARKED in text
    assert sum(name in ptr_names for name in asked(dns_server)) == 1


# -- finding 9: memory the attacker controls through DNS ------------------------------------

BIG_KEY = "v=DKIM1; k=rsa; n=" + "z" * 60_000 + "; p=AAAA"
MID_KEY = "v=DKIM1; k=rsa; n=" + "m" * 7_000 + "; p=AAAA"
CACHE_BYTES = 4 * 1024 * 1024
MiB = 1024
# Growth allowed while the cache fills: the DNS cache bound, the DKIM key
# parse cache (at most 1024 records of 8 KiB), and room for the allocator
# (per-thread malloc arenas, the history writer).  The stream below grew the
# daemon by about 120 MB before the cache was bounded in bytes.
FILLING_BOUND_KB = CACHE_BYTES // 1024 + 8 * MiB + 24 * MiB
# Once the cache is full, the same stream again grows only by what the
# allocator settles into (measured: 2 to 9 MB); each such stream added some
# 85 MB before.
FULL_BOUND_KB = 24 * MiB


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def keyed(template: bytes, n: int, count: int) -> bytes:
    """The template's signatures, each with a selector of its own."""
    for i in range(count):
        template = template.replace(f"s=SEL{i:02d};".encode(), f"s=m{n}x{i};".encode(), 1)
    return template


def test_unique_large_keys_do_not_grow_the_daemon(start: Start, dns_server: TestDNSServer) -> None:
    dns_server.add_zone(
        {
            "*._domainkey.big.attacker.example": [("TXT", BIG_KEY)],
            "*._domainkey.mid.attacker.example": [("TXT", MID_KEY)],
            "big.attacker.example": [("A", "192.0.2.9")],
            "mid.attacker.example": [("A", "192.0.2.9")],
        }
    )
    daemon = start({"dns": {"cache_bytes": CACHE_BYTES}})
    assert daemon.proc is not None
    template = victim()
    for i in range(10):
        domain = "big.attacker.example" if i % 2 else "mid.attacker.example"
        template = dkim_sign(template, domain, f"SEL{i:02d}")

    def stream(first: int, count: int) -> None:
        client = MilterClient(daemon.socket)
        try:
            client.negotiate()
            client.connect(HELO, ATTACKER_IP)
            client.helo(HELO)
            for n in range(first, first + count):
                eom = send(client, keyed(template, n, 10), "x@attacker.example", f"Q{n}")
                assert MARKED in outcome_text(eom)  # p=reject, nothing passes
        finally:
            client.quit()
            client.close()

    stream(0, 30)  # warm up: imports, pools, the history writer
    before = rss_kb(daemon.proc.pid)
    # Each message: five unique 60 KB keys (over the 16 KiB an answer may
    # have to be cached, and over the 8 KiB a key record may have) and five
    # unique 7 KB ones (cached, until the 4 MiB bound evicts them).
    stream(30, 250)
    filled = rss_kb(daemon.proc.pid)
    stream(280, 250)
    after = rss_kb(daemon.proc.pid)
    assert filled - before < FILLING_BOUND_KB, (before, filled)
    assert after - filled < FULL_BOUND_KB, (filled, after)
    # The keys really were fetched, the large ones each time (never cached).
    big = [n for n, _ in dns_server.queries if n == "m500x1._domainkey.big.attacker.example"]
    assert big
