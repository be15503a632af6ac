"""SPF check against the real loopback DNS server: every result code, both
identities, the null reverse-path, IPv6 and IPv4-mapped clients, IDN, the DNS
budget and concurrent checks on several threads."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest
import spf as pyspf

from dmarcmilter.resolver import Resolver, ResolverSettings
from dmarcmilter.results import SPFResult, SPFResultCode, SPFScope
from dmarcmilter.spf import check_spf
from tests.dnsserver import TestDNSServer

R = SPFResultCode
IP = "192.0.2.1"
HELO = "mail.example.org"


@pytest.fixture
def fast_resolver(dns_server: TestDNSServer) -> Resolver:
    """Short query timeout, so the TIMEOUT cases stay quick."""
    return Resolver(
        ResolverSettings(
            nameservers=(dns_server.host,),
            port=dns_server.port,
            query_timeout=0.3,
            message_budget=5.0,
        )
    )


def _mfrom(resolver: Resolver, mail_from: str, ip: str = IP, helo: str = HELO) -> SPFResult:
    return check_spf(resolver.session(), ip, helo, mail_from, check_helo=False).mfrom


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable() and len(text) <= 200


# -- the result codes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "result", "reason"),
    [
        ("v=spf1 ip4:192.0.2.0/24 -all", R.PASS, "matched ip4:192.0.2.0/24"),
        ("v=spf1 ip4:198.51.100.1 -all", R.FAIL, "matched -all"),
        ("v=spf1 ip4:198.51.100.1 ~all", R.SOFTFAIL, "matched ~all"),
        ("v=spf1 ip4:198.51.100.1 ?all", R.NEUTRAL, "matched ?all"),
        ("v=spf1 ip4:198.51.100.1", R.NEUTRAL, "no mechanism matched"),
    ],
)
def test_result_codes(
    dns_server: TestDNSServer, resolver: Resolver, record: str, result: R, reason: str
) -> None:
    dns_server.set_zone({"example.com": [("TXT", "some other text"), ("TXT", record)]})
    session = resolver.session()
    outcome = check_spf(session, IP, HELO, "user@example.com", check_helo=False)
    assert outcome.mfrom == SPFResult(
        result, "example.com", SPFScope.MFROM, reason, "user@example.com"
    )
    assert outcome.helo is None and not outcome.null_reverse_path
    # The lookups went through our session, to the test server.
    assert [(e.qname, e.rdtype) for e in session.log] == [("example.com", "TXT")]
    assert dns_server.queries == [("example.com", "TXT")]


def test_a_mx_include_and_redirect_go_through_the_session(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 a mx include:_spf.example.net redirect=r.example.com")],
            "mx1.example.com": [("A", "198.51.100.7")],
            "_spf.example.net": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
            "r.example.com": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
        }
    )
    dns_server.add("example.com", "MX", (10, "mx1.example.com"))
    assert _mfrom(resolver, "user@example.com", ip="198.51.100.7").reason == "matched mx"
    assert _mfrom(resolver, "user@example.com", ip="203.0.113.9").reason == (
        "matched include:_spf.example.net"
    )
    for cached in (False, True):
        session = resolver.session()
        result = check_spf(session, IP, HELO, "user@example.com", check_helo=False).mfrom
        assert result.result is R.PASS and result.reason == "matched ip4:192.0.2.1"
        assert [(e.qname, e.rdtype, e.cached) for e in session.log] == [
            ("example.com", "TXT", True),
            ("example.com", "A", True),
            ("example.com", "MX", True),
            ("mx1.example.com", "A", True),
            ("_spf.example.net", "TXT", True),
            ("r.example.com", "TXT", cached),
        ]


def test_none_without_a_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "nodata.example.com": [("A", IP)],
            "other.example.com": [("TXT", "v=spf10 -all"), ("TXT", "not spf")],
        }
    )
    for domain in ("nodata.example.com", "other.example.com", "nxdomain.example.com"):
        result = _mfrom(resolver, f"user@{domain}")
        assert result.result is R.NONE
        assert result.reason == f"no SPF record for {domain}"
        assert result.domain == domain


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        (["v=spf1 -all", "v=spf1 +all"], "Two or more type TXT spf records found."),
        (["v=spf1 ip4:192.0.2.1 moo -all"], "Unknown mechanism found: moo"),
        (["v=spf1 ip4:192.0.2.300 -all"], "Invalid IP4 address: ip4:192.0.2.300"),
        (["v=spf1 redirect=a.example.com redirect=b.example.com"], "redirect= MUST appear"),
        (["v=spf1 include:missing.example.com -all"], "No valid SPF record for included"),
        (["v=spf1 a:b\u00e4d.example.com -all"], "Non-ascii characters found"),
    ],
)
def test_permerror(
    dns_server: TestDNSServer, resolver: Resolver, records: list[str], reason: str
) -> None:
    dns_server.set_zone({"example.com": [("TXT", r) for r in records]})
    result = _mfrom(resolver, "user@example.com")
    assert result.result is R.PERMERROR
    assert result.reason.startswith(reason)
    assert _printable(result.reason)


def test_permerror_reason_escapes_control_characters(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"example.com": [("TXT", "v=spf1 a:x.example.com\rptr -all")]})
    result = _mfrom(resolver, "user@example.com")
    assert result.result is R.PERMERROR
    assert "\\r" in result.reason and _printable(result.reason)


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_temperror_on_the_domain_txt(
    dns_server: TestDNSServer, fast_resolver: Resolver, failure: str
) -> None:
    dns_server.set_zone({"example.com": failure})
    start = time.monotonic()
    result = _mfrom(fast_resolver, "user@example.com")
    assert result.result is R.TEMPERROR
    assert result.reason.startswith(f"DNS {failure.lower()} for example.com/TXT")
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
def test_temperror_inside_include(
    dns_server: TestDNSServer, fast_resolver: Resolver, failure: str
) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 include:bad.example.net -all")],
            "bad.example.net": failure,
        }
    )
    assert _mfrom(fast_resolver, "user@example.com").result is R.TEMPERROR


# -- identities ------------------------------------------------------------------


@pytest.mark.parametrize("null_path", ["", "<>", " <> "])
def test_null_reverse_path_uses_postmaster_at_helo(
    dns_server: TestDNSServer, resolver: Resolver, null_path: str
) -> None:
    dns_server.set_zone({"mail.example.org": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
    session = resolver.session()
    outcome = check_spf(session, IP, "Mail.Example.ORG.", null_path)
    assert outcome.null_reverse_path
    assert outcome.mfrom == SPFResult(
        R.PASS,
        "mail.example.org",
        SPFScope.MFROM,
        "matched ip4:192.0.2.1",
        "postmaster@mail.example.org",
    )
    assert outcome.helo is not None
    assert outcome.helo.scope is SPFScope.HELO
    assert outcome.helo.result is R.PASS and outcome.helo.domain == "mail.example.org"
    # The HELO identity is the same check_host(): evaluated once.
    assert [(e.qname, e.rdtype) for e in session.log] == [("mail.example.org", "TXT")]


def test_null_reverse_path_with_address_literal_helo(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    outcome = check_spf(resolver.session(), IP, "[192.0.2.1]", "<>")
    assert outcome.null_reverse_path
    assert outcome.mfrom.result is R.NONE and outcome.mfrom.scope is SPFScope.MFROM
    assert "null reverse-path" in outcome.mfrom.reason
    assert outcome.helo is None
    assert dns_server.queries == []


def test_helo_identity_is_a_separate_result(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 -all")],
            "mail.example.org": [("TXT", "v=spf1 a -all"), ("A", IP)],
        }
    )
    outcome = check_spf(resolver.session(), IP, "mail.example.org", "<user@example.com>")
    assert outcome.mfrom.result is R.FAIL and outcome.mfrom.scope is SPFScope.MFROM
    assert outcome.helo == SPFResult(
        R.PASS, "mail.example.org", SPFScope.HELO, "matched a", "postmaster@mail.example.org"
    )
    assert not outcome.null_reverse_path


@pytest.mark.parametrize(
    "helo", ["", "[192.0.2.1]", "[IPv6:2001:db8::1]", "192.0.2.1", "2001:db8::1"]
)
def test_helo_that_is_not_a_name_gives_no_helo_result(resolver: Resolver, helo: str) -> None:
    assert check_spf(resolver.session(), IP, helo, "user@example.com").helo is None


@pytest.mark.parametrize(
    ("helo", "reason"),
    [
        ("localhost", "not a multi-label"),
        ("bad name!", "invalid character"),
        ("a..b", "empty label"),
    ],
)
def test_malformed_helo_name_gives_none(resolver: Resolver, helo: str, reason: str) -> None:
    outcome = check_spf(resolver.session(), IP, helo, "user@example.com")
    assert outcome.helo is not None
    assert outcome.helo.result is R.NONE and outcome.helo.scope is SPFScope.HELO
    assert reason in outcome.helo.reason


def test_check_helo_false(dns_server: TestDNSServer, resolver: Resolver) -> None:
    session = resolver.session()
    assert check_spf(session, IP, HELO, "user@example.com", check_helo=False).helo is None
    assert [e.qname for e in session.log] == ["example.com"]


@pytest.mark.parametrize(
    "mail_from",
    [
        "<user@example.com>",
        "user@EXAMPLE.com.",
        "<@relay.example.net,@relay2.example.net:user@example.com>",
        '"odd@local part"@example.com',
    ],
)
def test_mail_from_forms(dns_server: TestDNSServer, resolver: Resolver, mail_from: str) -> None:
    dns_server.set_zone({"example.com": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
    result = _mfrom(resolver, mail_from)
    assert result.result is R.PASS and result.domain == "example.com"
    assert result.identity.endswith("@example.com")


def test_empty_local_part_is_postmaster(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 exists:%{l}.%{d} -all")],
            "postmaster.example.com": [("A", "127.0.0.2")],
        }
    )
    result = _mfrom(resolver, "<@example.com>")
    assert result.result is R.PASS and result.identity == "postmaster@example.com"


@pytest.mark.parametrize(
    ("mail_from", "reason"),
    [
        ("postmaster", "no domain part"),
        ("<user>", "no domain part"),
        ("user@", "empty domain name"),
        ("user@[192.0.2.1]", "invalid character"),
        ("user@localhost", "not a multi-label"),
        ("user@bad..example.com", "empty label"),
        ("user@" + "a" * 64 + ".example.com", "longer than 63"),
    ],
)
def test_mail_from_without_usable_domain_is_none(
    dns_server: TestDNSServer, resolver: Resolver, mail_from: str, reason: str
) -> None:
    result = _mfrom(resolver, mail_from)
    assert result.result is R.NONE and result.scope is SPFScope.MFROM
    assert reason in result.reason and _printable(result.reason)
    assert dns_server.queries == []


def test_idn_mail_from_domain(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"xn--bcher-kva.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
    result = _mfrom(resolver, "käufer@Bücher.example")
    assert result.result is R.PASS
    assert result.domain == "xn--bcher-kva.example"
    assert result.identity == "käufer@xn--bcher-kva.example"
    assert dns_server.queries == [("xn--bcher-kva.example", "TXT")]


# -- client addresses ------------------------------------------------------------


def test_ipv6_client(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 ip6:2001:db8:1::/48 a:mail.example.com -all")],
            "mail.example.com": [("AAAA", "2001:db8:2::25"), ("A", IP)],
        }
    )
    assert _mfrom(resolver, "u@example.com", ip="2001:db8:1::99").result is R.PASS
    via_a = _mfrom(resolver, "u@example.com", ip="2001:DB8:2::25")
    assert via_a.result is R.PASS and via_a.reason == "matched a:mail.example.com"
    assert _mfrom(resolver, "u@example.com", ip="2001:db8:3::1").result is R.FAIL
    assert _mfrom(resolver, "u@example.com", ip="[IPv6:2001:db8:1::1]").result is R.PASS


def test_ipv4_mapped_ipv6_client_is_evaluated_as_ipv4(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            # ip6:::/0 would match any IPv6 client; a mapped client is IPv4.
            "example.com": [("TXT", "v=spf1 -ip6:::/0 exists:%{ir}.%{v}.ok.example.com -all")],
            "1.2.0.192.in-addr.ok.example.com": [("A", "127.0.0.2")],
        }
    )
    result = _mfrom(resolver, "u@example.com", ip="::ffff:192.0.2.1")
    assert result.result is R.PASS
    assert result.reason == "matched exists:%{ir}.%{v}.ok.example.com"


@pytest.mark.parametrize("bad_ip", ["", "not-an-ip", "192.0.2.256", "[192.0.2.1", "2001:db8::g"])
def test_invalid_client_ip_is_a_value_error(resolver: Resolver, bad_ip: str) -> None:
    with pytest.raises(ValueError, match="invalid client IP address"):
        check_spf(resolver.session(), bad_ip, HELO, "user@example.com")


# -- RFC 7208 points where pyspf is corrected ------------------------------------


def test_ptr_skips_names_whose_address_lookup_fails(
    dns_server: TestDNSServer, fast_resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 ptr -all")],
            "1.2.0.192.in-addr.arpa": [("PTR", "broken.example.com"), ("PTR", "mail.example.com")],
            "broken.example.com": "SERVFAIL",
            "mail.example.com": [("A", IP)],
        }
    )
    # RFC 7208 §5.5: the failing name is skipped, the next one validates.
    assert _mfrom(fast_resolver, "u@example.com").result is R.PASS


def test_ptr_lookup_error_is_no_match(dns_server: TestDNSServer, fast_resolver: Resolver) -> None:
    dns_server.set_zone(
        {"example.com": [("TXT", "v=spf1 ptr -all")], "1.2.0.192.in-addr.arpa": "TIMEOUT"}
    )
    result = _mfrom(fast_resolver, "u@example.com")
    assert result.result is R.FAIL and result.reason == "matched -all"


def test_explanation_is_not_fetched(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 ip4:192.0.2.1 -all exp=why.example.com")],
            "why.example.com": [("TXT", "%{i} is not one of our servers")],
        }
    )
    assert _mfrom(resolver, "u@example.com").result is R.PASS
    assert _mfrom(resolver, "u@example.com", ip="198.51.100.1").result is R.FAIL
    assert ("why.example.com", "TXT") not in dns_server.queries


# -- the DNS budget ----------------------------------------------------------------


def test_budget_running_out_is_temperror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 include:slow.example.net -all")],
            "slow.example.net": "TIMEOUT",
        }
    )
    start = time.monotonic()
    outcome = check_spf(resolver.session(budget=0.2), IP, HELO, "user@example.com")
    elapsed = time.monotonic() - start
    assert outcome.mfrom.result is R.TEMPERROR
    assert "budget spent" in outcome.mfrom.reason
    # Bounded by the 0.2 s budget, not by the 0.5 s query timeout.
    assert elapsed < 0.45
    assert outcome.helo is not None and outcome.helo.result is R.TEMPERROR


def test_spent_budget_is_not_swallowed_by_ptr(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            "example.com": [("TXT", "v=spf1 ptr -all")],
            "1.2.0.192.in-addr.arpa": [("PTR", "mail.example.com")],
            "mail.example.com": [("A", IP)],
        }
    )
    check_spf(resolver.session(), "198.51.100.1", HELO, "u@example.com", check_helo=False)
    # example.com/TXT is cached now; the PTR lookup for 192.0.2.1 is not.
    result = check_spf(resolver.session(budget=0.0), IP, HELO, "u@example.com").mfrom
    assert result.result is R.TEMPERROR and "budget spent" in result.reason


# -- robustness --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helo", "mail_from"),
    [
        ("\x00", "\x00"),
        ("mail.example.org", "<"),
        ("mail.example.org", "@"),
        ("mail.example.org", "@@"),
        ("mail.example.org", "<@relay:>"),
        ("mail.example.org", "a" * 1000 + "@" + "b." * 200 + "com"),
        ("mail.example.org", "user@exa mple.com"),
        ("mail.example.org", "user@-bad-.example.com"),
        ("mail.example.org", "user@."),
        ("mail.example.org", "user@example.com\r\n"),
        ("mail.example.org", "üñí@çødé.example"),
        ("mail.example.org", "user@xn--zz.example"),
        ("mail.example.org", "%{l}%%{d}@example.com"),
        ("%%%%%%", ""),
        ("ünïcode.example", "<>"),
        ("[", ""),
        ("x" * 300, ""),
    ],
)
def test_odd_input_never_raises(
    dns_server: TestDNSServer, fast_resolver: Resolver, helo: str, mail_from: str
) -> None:
    dns_server.set_zone({"example.com": [("TXT", "v=spf1 exists:%{l}.%{h}.example.com -all")]})
    outcome = check_spf(fast_resolver.session(), IP, helo, mail_from)
    for result in (outcome.mfrom, outcome.helo):
        if result is not None:
            assert isinstance(result.result, SPFResultCode)
            assert _printable(result.reason)


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 " + "a " * 50 + "-all",
        "v=spf1 include:example.com",
        "v=spf1 redirect=example.com",
        "v=spf1 exists:%{l1r+-=}.%{d99}.%{i0} -all",
        "v=spf1 a:" + "x" * 300 + ".example.com -all",
        "v=spf1 mx:%{p}.example.com ptr:%{p} -all",
        "v=spf1 \x00\x01\x7f -all",
        "v=spf1 ip6:::ffff:192.0.2.1/200 -all",
        "v=spf1 a/-1 -all",
    ],
)
def test_odd_policy_never_raises(
    dns_server: TestDNSServer, fast_resolver: Resolver, record: str
) -> None:
    dns_server.set_zone({"example.com": [("TXT", record)]})
    result = _mfrom(fast_resolver, "user@example.com")
    assert result.result in (R.PERMERROR, R.FAIL, R.NEUTRAL)
    assert _printable(result.reason)


def test_lookups_outside_a_check_never_reach_dns(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    check_spf(resolver.session(), IP, HELO, "user@example.com")
    dns_server.clear_log()
    with pytest.raises(pyspf.TempError, match="no DNS session"):
        pyspf.DNSLookup("example.com", "TXT")
    assert pyspf.query(i=IP, s="user@example.com", h=HELO).check()[0] == "temperror"
    assert dns_server.queries == []


# -- concurrency -------------------------------------------------------------------


@pytest.fixture
def second_dns_server() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    yield server
    server.stop()


def test_concurrent_checks_each_use_their_own_session(
    dns_server: TestDNSServer, second_dns_server: TestDNSServer
) -> None:
    """Two DNS servers publish different policies for the same names; each
    thread's session points at one of them.  Were the lookups not routed to
    the calling thread's session, threads would see the other server's data."""
    threads_n, rounds = 8, 25
    for server, (tail, inner) in (
        (dns_server, ("-all", "ip4:192.0.2.1")),
        (second_dns_server, ("~all", "ip4:198.51.100.1")),
    ):
        zone: dict[str, list[tuple[str, str]]] = {}
        for k in range(threads_n):
            zone[f"d{k}.example"] = [("TXT", f"v=spf1 include:_i.d{k}.example {tail}")]
            zone[f"_i.d{k}.example"] = [("TXT", f"v=spf1 {inner} -all")]
        server.set_zone(zone)
    resolvers = [
        Resolver(ResolverSettings(nameservers=(s.host,), port=s.port, query_timeout=1.0))
        for s in (dns_server, second_dns_server)
    ]
    expected = [R.PASS, R.SOFTFAIL]
    barrier = threading.Barrier(threads_n)
    errors: list[str] = []

    def work(k: int) -> None:
        resolver = resolvers[k % 2]
        barrier.wait()
        for _ in range(rounds):
            session = resolver.session()
            outcome = check_spf(session, IP, f"h{k}.example", f"u{k}@d{k}.example")
            names = {e.qname for e in session.log}
            if outcome.mfrom.result is not expected[k % 2]:
                errors.append(f"thread {k}: {outcome.mfrom}")
            if names != {f"d{k}.example", f"_i.d{k}.example", f"h{k}.example"}:
                errors.append(f"thread {k}: foreign queries {names}")

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible
    try:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(worker.is_alive() for worker in workers)
    assert errors == []
