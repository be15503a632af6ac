"""The DNS layer against the real loopback server: the four outcomes RFC 9989
needs kept apart, multi-string TXT, the cache and the per-message budget."""

from __future__ import annotations

import time

import pytest

from dmarcmilter.resolver import (
    DNSFailure,
    DNSStatus,
    Resolver,
    ResolverSettings,
    answer_size,
    parse_hostport,
)
from tests.dnsserver import TestDNSServer


def test_answer_nodata_nxdomain_and_empty_non_terminal(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {"example.com": [("A", "192.0.2.1")], "a.b.example.net": [("A", "192.0.2.2")]}
    )
    s = resolver.session()
    ok = s.query("example.com", "A")
    assert ok.status is DNSStatus.NOERROR and ok.records == ("192.0.2.1",)
    assert s.query("example.com", "TXT").status is DNSStatus.NODATA
    assert s.query("nope.example.com", "A").status is DNSStatus.NXDOMAIN
    # b.example.net has no records but a name below it: it exists.
    assert s.query("b.example.net", "A").status is DNSStatus.NODATA


def test_multi_string_txt_is_concatenated_without_separator(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"_dmarc.example.com": [("TXT", ["v=DMARC1; p=", "reject"])]})
    ans = resolver.session().query("_dmarc.example.com", "TXT")
    assert ans.records == ((b"v=DMARC1; p=", b"reject"),)
    assert ans.txt() == ["v=DMARC1; p=reject"]


def test_servfail_and_timeout_are_distinct_failures(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"bad.example": "SERVFAIL", "slow.example": "TIMEOUT"})
    s = resolver.session()
    fail = s.query("bad.example", "TXT")
    assert fail.status is DNSStatus.SERVFAIL and fail.status.is_failure
    t0 = time.monotonic()
    slow = s.query("slow.example", "TXT")
    assert slow.status is DNSStatus.TIMEOUT and slow.status.is_failure
    assert time.monotonic() - t0 < 2.0  # bounded by the 0.5 s per-query timeout


def test_cache_honours_ttl_and_skips_failures(dns_server: TestDNSServer) -> None:
    dns_server.ttl = 1
    try:
        r = Resolver(
            ResolverSettings(nameservers=("127.0.0.1",), port=dns_server.port, query_timeout=0.5)
        )
        dns_server.set_zone({"example.com": [("TXT", "one")], "bad.example": "SERVFAIL"})
        s = r.session()
        s.query("example.com", "TXT")
        s.query("example.com", "TXT")
        s.query("bad.example", "TXT")
        s.query("bad.example", "TXT")
        assert dns_server.queries.count(("example.com", "TXT")) == 1
        assert dns_server.queries.count(("bad.example", "TXT")) == 2
        assert [e.cached for e in s.log] == [False, True, False, False]
        time.sleep(1.1)
        r.session().query("example.com", "TXT")
        assert dns_server.queries.count(("example.com", "TXT")) == 2
    finally:
        dns_server.ttl = 300


def test_negative_answers_are_cached_from_the_soa(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    s = resolver.session()
    s.query("missing.example", "TXT")
    s.query("missing.example", "TXT")
    assert dns_server.queries.count(("missing.example", "TXT")) == 1


def test_cache_is_bounded(dns_server: TestDNSServer) -> None:
    r = Resolver(
        ResolverSettings(nameservers=("127.0.0.1",), port=dns_server.port, cache_entries=3)
    )
    dns_server.set_zone({f"n{i}.example": [("A", "192.0.2.1")] for i in range(10)})
    s = r.session()
    for i in range(10):
        s.query(f"n{i}.example", "A")
    assert len(r._cache) == 3
    assert r.cached("n9.example", "A") is not None and r.cached("n0.example", "A") is None


def test_cache_is_bounded_in_bytes(dns_server: TestDNSServer) -> None:
    r = Resolver(
        ResolverSettings(nameservers=("127.0.0.1",), port=dns_server.port, cache_bytes=20_000)
    )
    dns_server.set_zone({f"k{i}.example": [("TXT", "k" * 4000)] for i in range(20)})
    s = r.session()
    for i in range(20):
        assert s.query(f"k{i}.example", "TXT").txt() == ["k" * 4000]
    entries, size = r.cache_size
    assert size <= 20_000
    # Each answer is charged its 4000 bytes and more: three fit, the newest.
    one = answer_size(s.query("k19.example", "TXT"))
    assert 4000 < one < 20_000 // 3
    assert entries == 3
    assert r.cached("k17.example", "TXT") is not None and r.cached("k16.example", "TXT") is None


def test_answer_over_the_cap_is_used_but_not_cached(dns_server: TestDNSServer) -> None:
    r = Resolver(ResolverSettings(nameservers=("127.0.0.1",), port=dns_server.port))
    big = "y" * 40_000
    dns_server.set_zone({"big.example": [("TXT", big)], "small.example": [("TXT", "ok")]})
    s = r.session()
    for _ in range(2):
        assert s.query("big.example", "TXT").txt() == [big]
        assert s.query("small.example", "TXT").txt() == ["ok"]
    assert [e.cached for e in s.log] == [False, False, False, True]
    # Asked again each time (over UDP, then TCP after the truncated reply).
    assert dns_server.queries.count(("big.example", "TXT")) == 4
    assert r.cache_size[0] == 1
    # Nor is it kept in the message's query log.
    assert s.log[0].records[0] == f"[{answer_size(s.query('big.example', 'TXT'))} bytes, not kept]"


def test_budget_spent_gives_timeout_without_querying(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"slow.example": "TIMEOUT", "fine.example": [("A", "192.0.2.1")]})
    s = resolver.session(budget=0.3)
    assert s.query("slow.example", "A").status is DNSStatus.TIMEOUT
    dns_server.clear_log()
    after = s.query("fine.example", "A")
    assert after.status is DNSStatus.TIMEOUT and "budget" in after.detail
    assert dns_server.queries == []


def test_dkim_adapter_raises_on_failure_and_returns_none_on_nxdomain(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            "s._domainkey.example.com": [("TXT", ["v=DKIM1; k=rsa; ", "p=AAAA"])],
            "s._domainkey.bad.example": "SERVFAIL",
        }
    )
    s = resolver.session()
    assert s.txt_for_dkim(b"s._domainkey.example.com.") == b"v=DKIM1; k=rsa; p=AAAA"
    assert s.txt_for_dkim(b"x._domainkey.example.com.") is None
    with pytest.raises(DNSFailure):
        s.txt_for_dkim(b"s._domainkey.bad.example.")


def test_wildcard_and_cname(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "*._report._dmarc.reports.example": [("TXT", "v=DMARC1")],
            "alias.example": [("CNAME", "real.example")],
            "real.example": [("TXT", "hello")],
        }
    )
    s = resolver.session()
    assert s.query("example.com._report._dmarc.reports.example", "TXT").txt() == ["v=DMARC1"]
    assert s.query("alias.example", "TXT").txt() == ["hello"]


def test_large_answer_falls_back_to_tcp(dns_server: TestDNSServer, resolver: Resolver) -> None:
    big = "x" * 3000
    dns_server.set_zone({"big.example": [("TXT", big)]})
    assert resolver.session().query("big.example", "TXT").txt() == [big]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:53", ("::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_hostport(spec: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(spec) == expected


@pytest.mark.parametrize("spec", ["localhost:53", "127.0.0.1:0", "127.0.0.1:x", "1.2.3.4:70000"])
def test_parse_hostport_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(spec)
