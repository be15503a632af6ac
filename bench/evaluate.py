"""Benchmark: full evaluations per second on one core, warm DNS cache.

A mix of 4 KB messages (RSA-2048 signed, ed25519 signed, unsigned, failing)
is evaluated against the loopback test DNS server: SPF, DKIM, ARC, policy
discovery, alignment, the policy step and the Authentication-Results header,
exactly what the milter does at end-of-message.  The cache is warmed first,
so the figure is the CPU cost of evaluation.

    .venv/bin/python -m bench.evaluate [--seconds 10]

Target: at least 1,000 evaluations per second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

from dmarcmilter.authres.render import render
from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.evaluation import Envelope, evaluate, resolver_from_config
from dmarcmilter.message import Message
from dmarcmilter.policy import decide
from tests.dnsserver import TestDNSServer
from tests.signing import dkim_sign, dkim_zone, make_message

FILLER = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua.\r\n"
)


def body_of(size: int) -> str:
    return (FILLER * (size // len(FILLER) + 1))[:size]


def build_zone() -> dict[str, list[tuple[str, object]]]:
    zone: dict[str, list[tuple[str, object]]] = {
        "example.com": [("A", "192.0.2.10"), ("MX", (10, "mx.example.com"))],
        "_dmarc.example.com": [
            ("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com; adkim=r; aspf=r")
        ],
        "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "example.org": [("A", "192.0.2.20"), ("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine")],
        "mx.sender.example": [("A", "192.0.2.1"), ("TXT", "v=spf1 a -all")],
        "spoof.example": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    }
    zone.update(dkim_zone("example.com", "rsa2048", "rsa"))
    zone.update(dkim_zone("example.org", "ed", "ed25519"))
    return zone


def build_cases() -> list[tuple[Envelope, Message]]:
    body = body_of(3500)
    env_ok = Envelope.create("192.0.2.1", "mx.sender.example", "bounce@bounce.example.com")
    rsa = dkim_sign(
        make_message(from_="news@example.com", subject="rsa", body=body),
        "example.com",
        "rsa2048",
        "rsa",
    )
    ed = dkim_sign(
        make_message(from_="news@example.org", subject="ed25519", body=body),
        "example.org",
        "ed",
        "ed25519",
    )
    unsigned = make_message(from_="news@example.com", subject="unsigned", body=body)
    # Signed, then altered in transit, and sent from an address SPF refuses.
    tampered = dkim_sign(
        make_message(from_="ceo@example.com", subject="fail", body=body),
        "example.com",
        "rsa2048",
        "rsa",
    ).replace(b"Lorem", b"L0rem", 1)
    env_bad = Envelope.create("203.0.113.9", "spoof.example", "x@spoof.example")
    return [
        (env_ok, Message.from_bytes(rsa)),
        (
            Envelope.create("192.0.2.1", "mx.sender.example", "a@example.org"),
            Message.from_bytes(ed),
        ),
        (env_ok, Message.from_bytes(unsigned)),
        (env_bad, Message.from_bytes(tampered)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time")
    args = parser.parse_args()

    server = TestDNSServer(ttl=3600).start()
    server.set_zone(build_zone())
    config = Config(
        authserv_id="mx.receiver.example",
        dns=DNSConfig(nameservers=("127.0.0.1",), port=server.port, timeout=1.0),
    )
    resolver = resolver_from_config(config)
    cases = build_cases()
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def one(envelope: Envelope, message: Message) -> str:
        evaluation = evaluate(envelope, message, resolver.session(), config, now=now)
        decision = decide(evaluation, config.policy)
        render(evaluation, config.authserv_id)
        return f"{evaluation.dmarc.result.value}/{decision.disposition.value}"

    print("message mix:", ", ".join(one(e, m) for e, m in cases))  # also warms the cache
    sizes = sorted({len(m.raw) for _, m in cases})
    print(f"message sizes: {sizes} bytes")
    for _ in range(50):
        for envelope, message in cases:
            one(envelope, message)
    queries_before = len(server.queries)

    timings: list[float] = []
    deadline = time.perf_counter() + args.seconds
    start = time.perf_counter()
    i = 0
    while time.perf_counter() < deadline:
        envelope, message = cases[i % len(cases)]
        t0 = time.perf_counter()
        one(envelope, message)
        timings.append(time.perf_counter() - t0)
        i += 1
    wall = time.perf_counter() - start
    server.stop()

    timings.sort()
    p50 = statistics.median(timings) * 1000
    p99 = timings[int(len(timings) * 0.99)] * 1000
    print(f"evaluations:        {len(timings)} in {wall:.1f} s (one thread)")
    print(f"evaluations/second: {len(timings) / wall:.0f}")
    print(f"per message:        p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    print(f"DNS queries sent during the run: {len(server.queries) - queries_before} (warm cache)")


if __name__ == "__main__":
    main()
