"""Aggregate report destinations: rua parsing (digest §1.2, §6.3) and RFC 9990
"Verifying External Destinations" (digest §6.4).

Verification runs against the loopback authoritative server; the ``_dmarc``
records in the zones are there so that tree walks find the Organizational
Domains (example.com, example.net, reports.example).
"""

from __future__ import annotations

import pytest

from dmarcmilter.discovery import Discoverer, DiscoveryMethod
from dmarcmilter.record import parse_record
from dmarcmilter.report.destinations import (
    Destination,
    Verification,
    VerificationStatus,
    parse_rua,
    verify_destination,
)
from dmarcmilter.resolver import Resolver
from tests.dnsserver import TestDNSServer

AUTHORIZED = VerificationStatus.AUTHORIZED
REFUSED = VerificationStatus.REFUSED
DEFERRED = VerificationStatus.DEFERRED

# Policy domain example.com (OD example.com) sends its reports to
# reports.example.net (OD example.net): an external destination.
POLICY = "example.com"
HOST = "reports.example.net"
AUTH_NAME = "example.com._report._dmarc.reports.example.net"

BASE_ZONE: dict[str, list[tuple[str, object]]] = {
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@reports.example.net")],
    "_dmarc.example.net": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.reports.example": [("TXT", "v=DMARC1; p=none")],
}


def txt(value: str | list[str]) -> tuple[str, str | list[str]]:
    return ("TXT", value)


def dest(uri: str) -> Destination:
    found, problems = parse_rua(uri, 10)
    assert problems == ()
    assert len(found) == 1
    return found[0]


def zone(extra: dict[str, object] | None = None) -> dict[str, object]:
    data: dict[str, object] = dict(BASE_ZONE)
    data.update(extra or {})
    return data


def verify(
    resolver: Resolver,
    destination: Destination,
    policy: str = POLICY,
    method: DiscoveryMethod = DiscoveryMethod.TREEWALK,
) -> Verification:
    return verify_destination(policy, destination, Discoverer(resolver.session(), method))


def report_queries(server: TestDNSServer) -> list[tuple[str, str]]:
    return [q for q in server.queries if "._report._dmarc." in q[0]]


# -- parse_rua -------------------------------------------------------------------------------


def test_parse_empty() -> None:
    assert parse_rua("", 5) == ((), ())
    assert parse_rua(" \t", 5) == ((), ())


def test_parse_order_and_duplicates() -> None:
    found, problems = parse_rua(
        "mailto:b@example.org, mailto:a@example.net ,mailto:b@EXAMPLE.org.,mailto:B@example.org",
        10,
    )
    assert [d.address for d in found] == ["b@example.org", "a@example.net", "B@example.org"]
    assert [d.uri for d in found] == [
        "mailto:b@example.org",
        "mailto:a@example.net",
        "mailto:B@example.org",  # the local part is case-sensitive: not a duplicate
    ]
    assert [d.host for d in found] == ["example.org", "example.net", "example.org"]
    assert len(problems) == 1
    assert "duplicate" in problems[0]


@pytest.mark.parametrize("suffix", ["!10m", "!5", "!1g", "!20K"])
def test_parse_size_suffix_stripped(suffix: str) -> None:
    found, problems = parse_rua(f"mailto:dmarc@example.net{suffix}", 5)
    assert problems == ()
    assert found == (
        Destination(f"mailto:dmarc@example.net{suffix}", "dmarc@example.net", "example.net"),
    )


def test_parse_unsupported_schemes_ignored() -> None:
    found, problems = parse_rua(
        "https://reports.example/dmarc,http://x.example/,mailto:d@example.net,ftp://f.example/r",
        10,
    )
    assert [d.address for d in found] == ["d@example.net"]
    assert len(problems) == 3
    for scheme, problem in zip(("https", "http", "ftp"), problems, strict=True):
        assert "unsupported URI scheme" in problem
        assert scheme in problem


@pytest.mark.parametrize(
    "uri",
    [
        "dmarc@example.net",  # no scheme
        ":dmarc@example.net",
        "mailto:",
        "mailto:nobody",
        "mailto:a@b@example.net",
        "mailto:a%40b@example.net",
        "mailto:@example.net",
        "mailto:dmarc@",
        "mailto:a b@example.net",
        "mailto:a%20b@example.net",
        "mailto:a%0D%0ARCPT@example.net",
        "mailto:%3Ca%3E@example.net",
        "mailto:a%2Cb@example.net",
        "mailto:a%E2%80%AEb@example.net",  # RIGHT-TO-LEFT OVERRIDE
        "mailto:dmarc@exa..mple.net",
        "mailto:dmarc@[192.0.2.1]",
        "mailto:dmarc@" + "x" * 64 + ".example",
        "mailto:a%zz@example.net",
        "mailto:a%ff@example.net",  # not UTF-8
        "mailto:dmarc@example.net!x",
        "mailto:dmarc@example.net!10m!10m",
        "mailto:?to=dmarc@example.net",
    ],
)
def test_parse_malformed_ignored(uri: str) -> None:
    found, problems = parse_rua(f"{uri},mailto:ok@example.org", 5)
    assert [d.address for d in found] == ["ok@example.org"]
    assert len(problems) == 1
    assert problems[0].startswith("rua: ")
    assert problems[0].endswith(" ignored")


def test_parse_empty_elements() -> None:
    found, problems = parse_rua("mailto:a@example.net,,mailto:b@example.net,", 5)
    assert [d.address for d in found] == ["a@example.net", "b@example.net"]
    assert len(problems) == 2
    assert all("empty URI" in p for p in problems)


def test_parse_cap() -> None:
    found, problems = parse_rua(
        "mailto:a@example.net,mailto:a@example.net,mailto:b@example.net,mailto:c@example.net,"
        "https://x.example/,mailto:d@example.net",
        2,
    )
    # Duplicates and unusable URIs do not take a place under the cap.
    assert [d.address for d in found] == ["a@example.net", "b@example.net"]
    assert len(problems) == 4
    assert "duplicate" in problems[0]
    assert "more than 2 URIs" in problems[1]
    assert "unsupported" in problems[2]
    assert "more than 2 URIs" in problems[3]
    assert "d@example.net" in problems[3]


def test_parse_cap_zero() -> None:
    found, problems = parse_rua("mailto:a@example.net", 0)
    assert found == ()
    assert len(problems) == 1


@pytest.mark.parametrize(
    "uri",
    [
        "mailto:dmarc@bücher.example",
        "mailto:dmarc@b%C3%BCcher.example",
        "mailto:dmarc@BÜCHER.Example",
    ],
)
def test_parse_idn_to_a_label(uri: str) -> None:
    found = dest(uri)
    assert found.host == "xn--bcher-kva.example"
    assert found.address == "dmarc@xn--bcher-kva.example"
    assert found.uri == uri


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("mailto:d%6Darc@example.net", "dmarc@example.net"),
        ("mailto:dmarc%2Breports@example.net", "dmarc+reports@example.net"),
        ("mailto:DMARC@Example.NET", "DMARC@example.net"),
        ("MAILTO:dmarc@example.net", "dmarc@example.net"),
        ("mailto:dmarc@example.net?subject=DMARC%20report&body=x", "dmarc@example.net"),
        ("mailto:dmarc@example.net.", "dmarc@example.net"),
    ],
)
def test_parse_percent_decoding_and_hfields(uri: str, address: str) -> None:
    found = dest(uri)
    assert found.address == address
    assert found.host == "example.net"


@pytest.mark.parametrize(
    "uri", ["mailto:%C3%BCser@example.net", "mailto:r@localhost", "mailto:r@under_score.example"]
)
def test_parse_ignores_addresses_report_mail_cannot_reach(uri: str) -> None:
    """No SMTPUTF8 local part, and a host name the mail can carry: anything
    else could only fail at delivery."""
    found, problems = parse_rua(f"{uri},mailto:ok@example.net", 5)
    assert [d.address for d in found] == ["ok@example.net"]
    assert len(problems) == 1
    assert "report mail cannot be sent to" in problems[0]


def test_parse_stored_record_rua_round_trips() -> None:
    # The value may come from DMARCRecord.rua joined back with ",".
    record = parse_record("v=DMARC1; p=none; rua=mailto:a@example.net!10m, mailto:b@example.org")
    found, problems = parse_rua(",".join(record.rua), 5)
    assert problems == ()
    assert [d.address for d in found] == ["a@example.net", "b@example.org"]


# -- verify_destination: the trigger --------------------------------------------------------


def test_identical_host_needs_no_dns(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone())
    destination = dest("mailto:dmarc@EXAMPLE.com")
    result = verify(resolver, destination)
    assert result.status is AUTHORIZED
    assert result.destination == destination
    assert dns_server.queries == []


def test_same_od_needs_no_txt_query(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone())
    destination = dest("mailto:dmarc@reports.example.com")
    result = verify(resolver, destination)
    assert result.status is AUTHORIZED
    assert result.destination == destination
    assert "same Organizational Domain example.com" in result.detail
    assert report_queries(dns_server) == []
    assert dns_server.queries  # the OD walks did run


def test_subdomain_with_its_own_od_is_external(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # reports.example.com is below the policy domain, but psd=n makes it its
    # own OD: that is why there is no "subdomain" shortcut.
    dns_server.set_zone(zone({"_dmarc.reports.example.com": [txt("v=DMARC1; psd=n")]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.com"))
    assert result.status is REFUSED
    assert report_queries(dns_server) == [("example.com._report._dmarc.reports.example.com", "TXT")]


def test_psl_method_same_od(dns_server: TestDNSServer, resolver: Resolver) -> None:
    destination = dest("mailto:dmarc@reports.example.com")
    result = verify(resolver, destination, method=DiscoveryMethod.PSL)
    assert result.status is AUTHORIZED
    assert result.destination == destination
    assert dns_server.queries == []


# -- verify_destination: authorization records ----------------------------------------------


@pytest.mark.parametrize("record", ["v=DMARC1;", "v=DMARC1", "v=DMARC1; p=none", "v=DMARC1 ; "])
def test_authorized(dns_server: TestDNSServer, resolver: Resolver, record: str) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(record)]}))
    destination = dest("mailto:dmarc@reports.example.net!10m")
    result = verify(resolver, destination)
    assert result.status is AUTHORIZED
    assert result.destination == destination
    assert AUTH_NAME in result.detail
    assert report_queries(dns_server) == [(AUTH_NAME, "TXT")]


def test_authorized_among_other_txt(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt("v=spf1 -all"), txt(["v=DMARC1", "; p=none"])]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is AUTHORIZED


def test_policy_domain_as_a_label(dns_server: TestDNSServer, resolver: Resolver) -> None:
    name = "xn--bcher-kva.example._report._dmarc.reports.example.net"
    dns_server.set_zone(zone({name: [txt("v=DMARC1")]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"), policy="Bücher.example")
    assert result.status is AUTHORIZED
    assert report_queries(dns_server) == [(name, "TXT")]


def test_nxdomain_refused(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone())
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result == Verification(REFUSED, None, f"not authorized: {AUTH_NAME} TXT nxdomain")
    assert report_queries(dns_server) == [(AUTH_NAME, "TXT")]


def test_nodata_refused(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [("A", "192.0.2.1")]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is REFUSED
    assert result.destination is None
    assert "nodata" in result.detail


@pytest.mark.parametrize(
    "records",
    [
        ["v=spf1 -all"],
        ["v=DMARC2"],
        ["v=dmarc1"],  # the version value is case-sensitive
        ["p=none; v=DMARC1"],
        ["v=DMARC1p=none"],
        ["v=DMARC1; p=none; p=none"],  # a repeated tag: not a valid tag-list
        ["v=DMARC1; rua=mailto:a@reports.example.net; rua=mailto:b@elsewhere.example"],
    ],
)
def test_no_dmarc_record_refused(
    dns_server: TestDNSServer, resolver: Resolver, records: list[str]
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(r) for r in records]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is REFUSED
    assert result.destination is None
    assert "no v=DMARC1 record" in result.detail


# -- verify_destination: rua overrides -------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "mailto:other@reports.example.net",
        "mailto:other@REPORTS.Example.net!50m",
        "https://x.example/r, mailto:other@reports.example.net, mailto:more@reports.example.net",
    ],
)
def test_override_on_same_host(
    dns_server: TestDNSServer, resolver: Resolver, override: str
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(f"v=DMARC1; rua={override}")]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is AUTHORIZED
    assert result.destination is not None
    assert result.destination.address == "other@reports.example.net"
    assert result.destination.host == HOST
    assert result.destination.uri.lower().startswith("mailto:other@reports.example.net")
    assert "replaces" in result.detail
    # The override needs no second lookup: the same name authorized it.
    assert report_queries(dns_server) == [(AUTH_NAME, "TXT")]


def test_override_naming_the_same_address(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt("v=DMARC1; rua=mailto:dmarc@reports.example.net")]}))
    destination = dest("mailto:dmarc@reports.example.net!10m")
    result = verify(resolver, destination)
    assert result.status is AUTHORIZED
    assert result.destination == destination


@pytest.mark.parametrize(
    "override",
    [
        "mailto:dmarc@elsewhere.example",
        "mailto:dmarc@sub.reports.example.net",
        # Only the first usable URI counts, and it is on another host.
        "mailto:x@elsewhere.example,mailto:dmarc@reports.example.net",
    ],
)
def test_override_on_another_host_refused(
    dns_server: TestDNSServer, resolver: Resolver, override: str
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(f"v=DMARC1; rua={override}")]}))
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is REFUSED
    assert result.destination is None
    assert "another host" in result.detail
    assert "neither" in result.detail


@pytest.mark.parametrize(
    "override", ["https://reports.example.net/dmarc", "mailto:nobody", "", "mailto:a@exa..mple"]
)
def test_override_without_usable_mailto_keeps_destination(
    dns_server: TestDNSServer, resolver: Resolver, override: str
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(f"v=DMARC1; rua={override}")]}))
    destination = dest("mailto:dmarc@reports.example.net")
    result = verify(resolver, destination)
    assert result.status is AUTHORIZED
    assert result.destination == destination


def test_several_records_any_other_host_refuses(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        zone(
            {
                AUTH_NAME: [
                    txt("v=DMARC1"),
                    txt("v=DMARC1; rua=mailto:x@reports.example.net"),
                    txt("v=DMARC1; rua=mailto:x@elsewhere.example"),
                ]
            }
        )
    )
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is REFUSED


def test_several_overrides_on_same_host_smallest_wins(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        zone(
            {
                AUTH_NAME: [
                    txt("v=DMARC1; rua=mailto:zz@reports.example.net"),
                    txt("v=DMARC1"),
                    txt("v=DMARC1; rua=mailto:aa@reports.example.net"),
                ]
            }
        )
    )
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is AUTHORIZED
    assert result.destination is not None
    assert result.destination.address == "aa@reports.example.net"


# -- verify_destination: wildcards ------------------------------------------------------------


@pytest.mark.parametrize("policy", ["example.com", "blue.example.com", "example.org"])
def test_wildcard_authorization(dns_server: TestDNSServer, resolver: Resolver, policy: str) -> None:
    dns_server.set_zone(zone({"*._report._dmarc.reports.example": [txt("v=DMARC1;")]}))
    destination = dest("mailto:rua@reports.example")
    result = verify(resolver, destination, policy=policy)
    assert result.status is AUTHORIZED
    assert result.destination == destination
    assert report_queries(dns_server) == [(f"{policy}._report._dmarc.reports.example", "TXT")]


def test_wildcard_override(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        zone(
            {"*._report._dmarc.reports.example": [txt("v=DMARC1; rua=mailto:all@reports.example")]}
        )
    )
    result = verify(resolver, dest("mailto:rua@reports.example"))
    assert result.status is AUTHORIZED
    assert result.destination is not None
    assert result.destination.address == "all@reports.example"


# -- verify_destination: DNS errors and limits ------------------------------------------------


@pytest.mark.parametrize("behaviour", ["servfail", "timeout"])
def test_dns_failure_defers(dns_server: TestDNSServer, resolver: Resolver, behaviour: str) -> None:
    dns_server.set_zone(zone())
    dns_server.set_special(AUTH_NAME, behaviour)
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is DEFERRED
    assert result.destination is None
    assert AUTH_NAME in result.detail
    assert behaviour in result.detail


@pytest.mark.parametrize("failing", ["_dmarc.reports.example.net", "_dmarc.example.com"])
def test_od_walk_temperror_defers(
    dns_server: TestDNSServer, resolver: Resolver, failing: str
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt("v=DMARC1")]}))
    dns_server.set_special(failing, "servfail")
    result = verify(resolver, dest("mailto:dmarc@reports.example.net"))
    assert result.status is DEFERRED
    assert "Organizational Domain" in result.detail
    assert report_queries(dns_server) == []


def test_name_too_long_refused_without_query(dns_server: TestDNSServer, resolver: Resolver) -> None:
    policy = ".".join(c * 63 for c in "abc") + ".example.com"  # 203 characters
    host = "d" * 40 + ".example.net"
    dns_server.set_zone(zone())
    result = verify(resolver, dest(f"mailto:dmarc@{host}"), policy=policy)
    assert result.status is REFUSED
    assert "255-octet limit" in result.detail
    assert report_queries(dns_server) == []


def test_name_at_the_limit_is_queried(dns_server: TestDNSServer, resolver: Resolver) -> None:
    # 253 characters of text are 255 octets on the wire: still allowed.
    host = "example.net"
    policy_len = 253 - len("._report._dmarc.") - len(host)
    policy = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * (policy_len - 192 - 4)
    policy += ".com"
    assert len(f"{policy}._report._dmarc.{host}") == 253
    dns_server.set_zone(zone())
    result = verify(resolver, dest(f"mailto:dmarc@{host}"), policy=policy)
    assert result.status is REFUSED
    assert "nxdomain" in result.detail
    assert report_queries(dns_server) == [(f"{policy}._report._dmarc.{host}", "TXT")]


def test_bad_input_is_a_result(dns_server: TestDNSServer, resolver: Resolver) -> None:
    good = dest("mailto:dmarc@reports.example.net")
    bad_host = Destination("mailto:x@bad..host", "x@bad..host", "bad..host")
    assert verify(resolver, bad_host).status is REFUSED
    assert verify(resolver, good, policy="").status is REFUSED
    assert verify(resolver, good, policy="exa mple.com").status is REFUSED
    assert dns_server.queries == []


# -- ruf: the same verification, the override from the ruf tag ---------------------------


def verify_ruf(resolver: Resolver, destination: Destination) -> Verification:
    return verify_destination(
        POLICY, destination, Discoverer(resolver.session(), DiscoveryMethod.TREEWALK), tag="ruf"
    )


def test_parse_ruf_problems_name_ruf() -> None:
    found, problems = parse_rua(
        "https://x.example/r, mailto:a@x.example, mailto:a@X.example", 5, "ruf"
    )
    assert [d.address for d in found] == ["a@x.example"]
    assert len(problems) == 2
    assert all(p.startswith("ruf: ") for p in problems)
    _, rua_problems = parse_rua("https://x.example/r", 5)
    assert rua_problems[0].startswith("rua: ")


@pytest.mark.parametrize(
    ("record", "address"),
    [
        ("v=DMARC1", "forensic@reports.example.net"),
        # The ruf tag overrides a ruf destination; a rua tag there is about
        # aggregate reports and changes nothing.
        ("v=DMARC1; rua=mailto:agg@reports.example.net", "forensic@reports.example.net"),
        ("v=DMARC1; ruf=mailto:other@reports.example.net", "other@reports.example.net"),
    ],
    ids=["plain", "rua-override-ignored", "ruf-override"],
)
def test_ruf_authorized(
    dns_server: TestDNSServer, resolver: Resolver, record: str, address: str
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt(record)]}))
    result = verify_ruf(resolver, dest("mailto:forensic@reports.example.net"))
    assert result.status is AUTHORIZED
    assert result.destination is not None
    assert result.destination.address == address
    assert report_queries(dns_server) == [(AUTH_NAME, "TXT")]


@pytest.mark.parametrize(
    "records",
    [
        [],
        [txt("v=spf1 -all")],
        [txt("v=DMARC1; ruf=mailto:forensic@elsewhere.example")],
    ],
    ids=["nxdomain", "not-dmarc", "ruf-override-on-another-host"],
)
def test_ruf_not_authorized(
    dns_server: TestDNSServer, resolver: Resolver, records: list[tuple[str, object]]
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: records} if records else None))
    result = verify_ruf(resolver, dest("mailto:forensic@reports.example.net"))
    assert result.status is REFUSED
    assert result.destination is None
    if records and "ruf=" in str(records[0][1]):
        assert "overrides ruf with" in result.detail


def test_an_override_elsewhere_refuses_only_its_own_tag(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(zone({AUTH_NAME: [txt("v=DMARC1; rua=mailto:agg@elsewhere.example")]}))
    assert verify_ruf(resolver, dest("mailto:f@reports.example.net")).status is AUTHORIZED
    assert verify(resolver, dest("mailto:agg@reports.example.net")).status is REFUSED
    dns_server.set_zone(zone({AUTH_NAME: [txt("v=DMARC1; ruf=mailto:f@elsewhere.example")]}))
    resolver.clear_cache()
    assert verify(resolver, dest("mailto:agg@reports.example.net")).status is AUTHORIZED
    assert verify_ruf(resolver, dest("mailto:f@reports.example.net")).status is REFUSED


@pytest.mark.parametrize("behaviour", ["servfail", "timeout"])
def test_ruf_dns_failure_defers(
    dns_server: TestDNSServer, resolver: Resolver, behaviour: str
) -> None:
    dns_server.set_zone(zone())
    dns_server.set_special(AUTH_NAME, behaviour)
    result = verify_ruf(resolver, dest("mailto:forensic@reports.example.net"))
    assert result.status is DEFERRED
    assert result.destination is None
    assert behaviour in result.detail
