"""Policy discovery and Organizational Domains: RFC 9989 §4.10, RFC 7489 §6.6.3.

Everything runs against the loopback authoritative server; the query
sequences asserted are the ones the DNS session logged.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dmarcmilter.discovery import (
    Discoverer,
    DiscoveryMethod,
    DiscoveryStatus,
    OrgDomainResult,
    load_psl,
    psl_organizational_domain,
    walk_names,
)
from dmarcmilter.errors import ConfigError
from dmarcmilter.record import Policy, RecordStatus
from dmarcmilter.resolver import DNSSession, Resolver
from tests.dnsserver import TestDNSServer

# See tests/test_psl_vectors.py: domains.normalize_domain still asks for the
# deprecated IDNA_2008_Transitional codec, which warns under idna >= 3.11.

TREEWALK = DiscoveryMethod.TREEWALK
PSL = DiscoveryMethod.PSL


def txt(value: str | list[str]) -> tuple[str, str | list[str]]:
    return ("TXT", value)


def new_discoverer(
    resolver: Resolver, method: DiscoveryMethod = TREEWALK, psl_file: Path | None = None
) -> tuple[Discoverer, DNSSession]:
    session = resolver.session()
    psl = load_psl(str(psl_file)) if psl_file is not None else None
    return Discoverer(session, method, psl), session


def queries(session: DNSSession, start: int = 0) -> list[str]:
    """Every query the session made (``name`` for TXT, ``name/A`` otherwise)."""
    return [e.qname if e.rdtype == "TXT" else f"{e.qname}/{e.rdtype}" for e in session.log[start:]]


# -- walk_names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "names"),
    [
        ("com", ["com"]),
        ("example.com", ["example.com", "com"]),
        (
            "a.b.c.d.e.f.g.h",  # 8 labels: the parent already has 7
            ["a.b.c.d.e.f.g.h", *(".".join("abcdefgh"[i:]) for i in range(1, 8))],
        ),
    ],
)
def test_walk_names(start: str, names: list[str]) -> None:
    assert walk_names(start) == names
    assert len(walk_names(start)) <= 8


# -- E1-E9 (digest §2.7) ---------------------------------------------------------------------


def test_e1_plain(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {"_dmarc.example.com": [txt("v=DMARC1; p=reject; rua=mailto:d@example.com")]}
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("example.com")
    assert found.status is DiscoveryStatus.FOUND
    assert found.policy_domain == "example.com"
    assert found.policy_tag == "p"
    assert found.requested_policy is Policy.REJECT
    assert found.from_psd is False
    assert found.author_domain_exists is None
    # The author's own record ends discovery; no psd tag, so the OD is left
    # to the separate walk.
    assert found.organizational_domain is None
    assert queries(session) == ["_dmarc.example.com"]

    assert disc.organizational_domain("example.com") == OrgDomainResult("example.com")
    assert queries(session) == ["_dmarc.example.com", "_dmarc.com"]


E2_ZONE = {
    "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine; np=reject")],
    "news.example.com": [("A", "192.0.2.1")],
    "nodata.example.com": [("MX", (10, "mx.example.com"))],
}


def test_e2_existing_subdomain_uses_sp(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E2_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("news.example.com")
    assert found.status is DiscoveryStatus.FOUND
    assert found.organizational_domain == "example.com"
    assert found.policy_domain == "example.com"
    assert (found.policy_tag, found.requested_policy) == ("sp", Policy.QUARANTINE)
    assert found.author_domain_exists is True
    assert queries(session) == [
        "_dmarc.news.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
        "news.example.com/A",  # §2.5: the Author Domain itself, not _dmarc
    ]


def test_e2_nxdomain_subdomain_uses_np(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E2_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("ghost.example.com")
    assert (found.policy_tag, found.requested_policy) == ("np", Policy.REJECT)
    assert found.author_domain_exists is False
    assert queries(session)[-1] == "ghost.example.com/A"


def test_e2_nodata_subdomain_exists_so_sp(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E2_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("nodata.example.com")
    assert (found.policy_tag, found.requested_policy) == ("sp", Policy.QUARANTINE)
    assert found.author_domain_exists is True
    assert queries(session)[-1] == "nodata.example.com/A"


def test_e2_without_np_nxdomain_uses_sp_and_skips_the_check(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("ghost.example.com")
    assert (found.policy_tag, found.requested_policy) == ("sp", Policy.QUARANTINE)
    assert found.author_domain_exists is None
    assert queries(session) == ["_dmarc.ghost.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_e2_without_np_and_sp_uses_p(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject")]})
    disc, _ = new_discoverer(resolver)
    for author in ("ghost.example.com", "news.example.com"):
        found = disc.discover_policy(author)
        assert (found.policy_tag, found.requested_policy) == ("p", Policy.REJECT)


def test_np_without_sp_nxdomain_and_existing(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.example.com": [txt("v=DMARC1; p=quarantine; np=reject")],
            "www.example.com": [("AAAA", "2001:db8::1")],
        }
    )
    disc, _ = new_discoverer(resolver)
    ghost = disc.discover_policy("ghost.example.com")
    assert (ghost.policy_tag, ghost.requested_policy) == ("np", Policy.REJECT)
    www = disc.discover_policy("www.example.com")  # NODATA for A: exists
    assert (www.policy_tag, www.requested_policy) == ("p", Policy.QUARANTINE)
    assert www.author_domain_exists is True


def test_np_equal_to_sp_still_checks_existence(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # [impl choice] the check is made whenever np is published, so the tag
    # reported is the one that applied.
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=none; np=none")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("ghost.example.com")
    assert (found.policy_tag, found.requested_policy) == ("np", Policy.NONE)
    assert "ghost.example.com/A" in queries(session)


def test_e3_eight_query_cap(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.co.uk": [txt("v=DMARC1; p=quarantine")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("a.b.c.d.e.f.g.h.example.co.uk")
    assert found.status is DiscoveryStatus.FOUND
    assert found.organizational_domain == "example.co.uk"
    assert found.policy_domain == "example.co.uk"
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.QUARANTINE)
    assert queries(session) == [
        "_dmarc.a.b.c.d.e.f.g.h.example.co.uk",
        "_dmarc.e.f.g.h.example.co.uk",
        "_dmarc.f.g.h.example.co.uk",
        "_dmarc.g.h.example.co.uk",
        "_dmarc.h.example.co.uk",
        "_dmarc.example.co.uk",
        "_dmarc.co.uk",
        "_dmarc.uk",
    ]
    # The PSL method gives the same OD here.
    assert psl_organizational_domain("a.b.c.d.e.f.g.h.example.co.uk", load_psl()) == (
        "example.co.uk"
    )


THIRTEEN = "a.b.c.d.e.f.g.h.i.j.mail.example.com"
THIRTEEN_WALK = [
    "_dmarc.a.b.c.d.e.f.g.h.i.j.mail.example.com",
    "_dmarc.g.h.i.j.mail.example.com",
    "_dmarc.h.i.j.mail.example.com",
    "_dmarc.i.j.mail.example.com",
    "_dmarc.j.mail.example.com",
    "_dmarc.mail.example.com",
    "_dmarc.example.com",
    "_dmarc.com",
]


def test_thirteen_label_walk_without_records(dns_server: TestDNSServer, resolver: Resolver) -> None:
    disc, session = new_discoverer(resolver)
    assert disc.organizational_domain(THIRTEEN) == OrgDomainResult(THIRTEEN)  # rule 4
    assert queries(session) == THIRTEEN_WALK
    assert [n for n, _ in dns_server.queries] == THIRTEEN_WALK


def test_thirteen_label_walk_with_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy(THIRTEEN)
    assert found.organizational_domain == "example.com"
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.REJECT)
    assert queries(session) == THIRTEEN_WALK


E4_ZONE = {"_dmarc.bank.example": [txt("v=DMARC1; p=reject; psd=y; rua=mailto:agg@bank.example")]}


def test_e4_psd_record_without_od_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E4_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("giant.bank.example")
    assert found.status is DiscoveryStatus.FOUND
    assert found.organizational_domain == "giant.bank.example"
    assert found.policy_domain == "bank.example"
    assert found.from_psd is True
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.REJECT)
    assert found.record is not None and found.record.rua == ("mailto:agg@bank.example",)
    assert queries(session) == ["_dmarc.giant.bank.example", "_dmarc.bank.example"]


def test_e4_od_of_a_deeper_name_is_one_below_the_psd(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(E4_ZONE)
    disc, session = new_discoverer(resolver)
    assert disc.organizational_domain("a.mail.giant.bank.example").domain == "giant.bank.example"
    assert queries(session) == [
        "_dmarc.a.mail.giant.bank.example",
        "_dmarc.mail.giant.bank.example",
        "_dmarc.giant.bank.example",
        "_dmarc.bank.example",
    ]


def test_e5_psd_never_used_when_the_od_has_a_record(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({**E4_ZONE, "_dmarc.giant.bank.example": [txt("v=DMARC1; p=none")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("mail.giant.bank.example")
    assert found.organizational_domain == "giant.bank.example"
    assert found.policy_domain == "giant.bank.example"
    assert found.from_psd is False
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.NONE)
    assert queries(session) == [
        "_dmarc.mail.giant.bank.example",
        "_dmarc.giant.bank.example",
        "_dmarc.bank.example",
    ]


def test_e6_psd_n_splits_organizational_domains(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {
            "_dmarc.mail.example.com": [txt("v=DMARC1; p=quarantine; psd=n")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("a.mail.example.com")
    assert found.organizational_domain == "mail.example.com"
    assert found.policy_domain == "mail.example.com"
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.QUARANTINE)
    assert queries(session) == ["_dmarc.a.mail.example.com", "_dmarc.mail.example.com"]
    assert disc.organizational_domain("a.mail.example.com").domain == "mail.example.com"
    assert disc.organizational_domain("example.com").domain == "example.com"
    assert queries(session)[2:] == ["_dmarc.example.com", "_dmarc.com"]


def test_e7_intermediate_record_ignored(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.b.example.com": [txt("v=DMARC1; p=none")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("a.b.example.com")
    assert found.organizational_domain == "example.com"
    assert found.policy_domain == "example.com"
    assert (found.policy_tag, found.requested_policy) == ("sp", Policy.QUARANTINE)
    assert queries(session) == [
        "_dmarc.a.b.example.com",
        "_dmarc.b.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
    ]


E8_ZONE = {
    "_dmarc.sub.example.com": [txt("v=DMARC1; p=none"), txt("v=DMARC1; p=quarantine")],
    "_dmarc.example.com": [txt("v=DMARC1; p=reject")],
    "sub.example.com": [("A", "192.0.2.8")],
}


def test_e8_duplicate_records_treewalk_continues(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(E8_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("sub.example.com")
    assert found.status is DiscoveryStatus.FOUND
    assert found.policy_domain == "example.com"
    assert found.organizational_domain == "example.com"
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.REJECT)
    assert queries(session) == ["_dmarc.sub.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_e9_unflagged_tld_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.com": [txt("v=DMARC1; p=none")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("example.com")
    assert (found.policy_domain, found.requested_policy) == ("example.com", Policy.REJECT)
    assert disc.organizational_domain("example.com").domain == "com"
    assert disc.organizational_domain("evil.com").domain == "com"
    assert queries(session) == ["_dmarc.example.com", "_dmarc.com", "_dmarc.evil.com"]


def test_e9_defence_psd_n(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.com": [txt("v=DMARC1; p=none")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject; psd=n")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("example.com")
    assert found.organizational_domain == "example.com"
    assert disc.organizational_domain("example.com").domain == "example.com"
    assert disc.organizational_domain("evil.com").domain == "com"
    assert queries(session) == ["_dmarc.example.com", "_dmarc.evil.com", "_dmarc.com"]


# -- more tree-walk rules ---------------------------------------------------------------------


def test_psd_y_at_the_start_name(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E4_ZONE)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("bank.example")
    assert found.status is DiscoveryStatus.FOUND
    assert found.policy_domain == "bank.example"
    assert found.organizational_domain == "bank.example"  # rule 3
    assert found.from_psd is False
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.REJECT)
    assert disc.organizational_domain("bank.example").domain == "bank.example"
    assert queries(session) == ["_dmarc.bank.example"]


def test_psd_n_on_the_author_record(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.mail.example.com": [txt("v=DMARC1; p=reject; psd=n")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("mail.example.com")
    assert found.organizational_domain == "mail.example.com"
    assert queries(session) == ["_dmarc.mail.example.com"]


def test_od_one_below_psd_skipped_by_the_jump_is_looked_up(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # 9 labels: the walk jumps to 7 labels, where psd=y is found, so the OD
    # has 8 labels and was never queried; whether it has a record decides.
    author = "a.b.c.d.e.f.g.h.example"
    dns_server.set_zone(
        {
            "_dmarc.c.d.e.f.g.h.example": [txt("v=DMARC1; p=reject; psd=y")],
            "_dmarc.b.c.d.e.f.g.h.example": [txt("v=DMARC1; p=quarantine")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy(author)
    assert found.organizational_domain == "b.c.d.e.f.g.h.example"
    assert found.policy_domain == "b.c.d.e.f.g.h.example"
    assert found.from_psd is False
    assert found.requested_policy is Policy.QUARANTINE
    assert queries(session) == [
        "_dmarc.a.b.c.d.e.f.g.h.example",
        "_dmarc.c.d.e.f.g.h.example",
        "_dmarc.b.c.d.e.f.g.h.example",
    ]
    # The OD walk itself stays within its eight names.
    assert disc.organizational_domain(author).domain == "b.c.d.e.f.g.h.example"
    assert len(queries(session)) == 3


def test_od_skipped_by_the_jump_without_record_uses_psd(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone({"_dmarc.c.d.e.f.g.h.example": [txt("v=DMARC1; p=reject; psd=y")]})
    disc, _ = new_discoverer(resolver)
    found = disc.discover_policy("a.b.c.d.e.f.g.h.example")
    assert found.policy_domain == "c.d.e.f.g.h.example"
    assert found.from_psd is True
    assert found.requested_policy is Policy.REJECT


def test_no_record_anywhere(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=spf1 -all")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("mail.example.com")
    assert found.status is DiscoveryStatus.NONE
    assert found.record is None and found.requested_policy is None
    assert found.organizational_domain == "mail.example.com"
    assert queries(session) == ["_dmarc.mail.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_multi_string_txt_is_concatenated(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt(["v=DMARC1; p=rej", "ect; sp=none"])]})
    disc, _ = new_discoverer(resolver)
    found = disc.discover_policy("example.com")
    assert found.requested_policy is Policy.REJECT
    assert found.record is not None and found.record.sp is Policy.NONE


def test_unusable_author_record_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.mail.example.com": [txt("v=DMARC1; p=bogus")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject")],
        }
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("mail.example.com")
    assert found.status is DiscoveryStatus.PERMERROR
    assert found.record is not None and found.record.status is RecordStatus.UNUSABLE
    assert found.policy_domain == "mail.example.com"
    assert found.requested_policy is None
    assert queries(session) == ["_dmarc.mail.example.com"]


def test_unusable_od_record_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject; p=none")]})
    disc, _ = new_discoverer(resolver)
    found = disc.discover_policy("mail.example.com")
    assert found.status is DiscoveryStatus.PERMERROR
    assert found.policy_domain == "example.com"
    assert found.requested_policy is None


def test_as_none_record_is_found_with_policy_none(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.set_zone(
        {"_dmarc.example.com": [txt("v=DMARC1; p=reject; np=nope; rua=mailto:r@example.com")]}
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("ghost.example.com")
    assert found.status is DiscoveryStatus.FOUND
    assert (found.policy_tag, found.requested_policy) == ("p", Policy.NONE)
    assert found.record is not None and found.record.status is RecordStatus.AS_NONE
    assert "ghost.example.com/A" not in queries(session)  # no np: no existence check


def test_one_character_labels(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.x.com": [txt("v=DMARC1; p=reject")],
            "_dmarc.t.co": [txt("v=DMARC1; p=quarantine; sp=none")],
            "m.t.co": [("A", "192.0.2.3")],
        }
    )
    disc, session = new_discoverer(resolver)
    own = disc.discover_policy("x.com")
    assert (own.policy_domain, own.requested_policy) == ("x.com", Policy.REJECT)
    assert disc.organizational_domain("a.x.com").domain == "x.com"
    sub = disc.discover_policy("m.t.co")
    assert (sub.organizational_domain, sub.policy_tag) == ("t.co", "sp")
    assert sub.requested_policy is Policy.NONE
    assert queries(session) == [
        "_dmarc.x.com",
        "_dmarc.a.x.com",
        "_dmarc.com",
        "_dmarc.m.t.co",
        "_dmarc.t.co",
        "_dmarc.co",
    ]


def test_idn_author_domain(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {"_dmarc.xn--bcher-kva.example": [txt("v=DMARC1; p=quarantine; sp=reject")]}
    )
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("Bücher.Example")
    assert found.author_domain == "xn--bcher-kva.example"
    assert found.policy_domain == "xn--bcher-kva.example"
    assert found.requested_policy is Policy.QUARANTINE
    sub = disc.discover_policy("Shop.BÜCHER.example.")
    assert sub.author_domain == "shop.xn--bcher-kva.example"
    assert sub.organizational_domain == "xn--bcher-kva.example"
    assert (sub.policy_tag, sub.requested_policy) == ("sp", Policy.REJECT)
    assert queries(session) == [
        "_dmarc.xn--bcher-kva.example",
        "_dmarc.shop.xn--bcher-kva.example",
        "_dmarc.example",
    ]


def test_author_domain_is_normalised(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject")]})
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("EXAMPLE.Com.")
    assert found.author_domain == "example.com"
    assert found.requested_policy is Policy.REJECT
    assert disc.discover_policy("example.com") is found
    assert queries(session) == ["_dmarc.example.com"]


@pytest.mark.parametrize("bad", ["", "exa mple.com", "a..b", "-" * 70 + ".com"])
def test_invalid_author_domain_is_none_without_queries(
    dns_server: TestDNSServer, resolver: Resolver, bad: str
) -> None:
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy(bad)
    assert found.status is DiscoveryStatus.NONE
    assert found.detail
    od = disc.organizational_domain(bad)
    assert od.temperror is False and od.domain is not None
    assert session.log == []


# -- DNS failures ----------------------------------------------------------------------------

FAIL_ZONE_BASE = {
    "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine; np=reject")],
    "news.example.com": [("A", "192.0.2.1")],
}


@pytest.mark.parametrize(
    ("failing", "author", "expected_queries"),
    [
        # The author's own _dmarc name.
        ("_dmarc.news.example.com", "news.example.com", ["_dmarc.news.example.com"]),
        # An intermediate name.
        (
            "_dmarc.b.example.com",
            "a.b.example.com",
            ["_dmarc.a.b.example.com", "_dmarc.b.example.com"],
        ),
        # The OD's own name.
        (
            "_dmarc.example.com",
            "news.example.com",
            ["_dmarc.news.example.com", "_dmarc.example.com"],
        ),
        # The TLD, after the OD record was found: a record there would move
        # the OD (E9), so its answer is needed.
        (
            "_dmarc.com",
            "news.example.com",
            ["_dmarc.news.example.com", "_dmarc.example.com", "_dmarc.com"],
        ),
    ],
)
@pytest.mark.parametrize("behaviour", ["SERVFAIL", "TIMEOUT"])
def test_walk_failure_is_temperror(
    dns_server: TestDNSServer,
    resolver: Resolver,
    failing: str,
    author: str,
    expected_queries: list[str],
    behaviour: str,
) -> None:
    dns_server.set_zone(FAIL_ZONE_BASE)
    dns_server.set_special(failing, behaviour)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy(author)
    assert found.status is DiscoveryStatus.TEMPERROR
    assert found.record is None and found.requested_policy is None
    assert found.detail.startswith(f"{failing} TXT {behaviour.lower()}")
    assert queries(session) == expected_queries  # the walk stops at the failure
    od = disc.organizational_domain(author)
    assert od.temperror is True and od.domain is None
    assert od.detail.startswith(f"{failing} TXT")
    assert queries(session) == expected_queries  # memoised, failure included


@pytest.mark.parametrize("behaviour", ["SERVFAIL", "TIMEOUT"])
def test_existence_check_failure_is_temperror(
    dns_server: TestDNSServer, resolver: Resolver, behaviour: str
) -> None:
    dns_server.set_zone(FAIL_ZONE_BASE)
    dns_server.set_special("ghost.example.com", behaviour)
    disc, session = new_discoverer(resolver)
    found = disc.discover_policy("ghost.example.com")
    assert found.status is DiscoveryStatus.TEMPERROR
    assert found.requested_policy is None and found.record is None
    assert found.policy_domain == "example.com"
    assert found.organizational_domain == "example.com"
    assert found.detail.startswith(f"ghost.example.com A {behaviour.lower()}")
    assert queries(session) == [
        "_dmarc.ghost.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
        "ghost.example.com/A",
    ]


def test_failure_elsewhere_does_not_matter_to_own_record(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # The author's own record ends discovery before any failing name.
    dns_server.set_zone(
        {"_dmarc.example.com": [txt("v=DMARC1; p=reject")], "_dmarc.com": "SERVFAIL"}
    )
    disc, _ = new_discoverer(resolver)
    assert disc.discover_policy("example.com").status is DiscoveryStatus.FOUND
    assert disc.organizational_domain("example.com").temperror is True


# -- memoisation ------------------------------------------------------------------------------


def test_memoisation(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(E2_ZONE)
    disc, session = new_discoverer(resolver)
    first = disc.discover_policy("ghost.example.com")
    disc.organizational_domain("ghost.example.com")
    disc.organizational_domain("example.com")
    disc.organizational_domain("mail.ghost.example.com")
    made = len(session.log)
    assert queries(session) == [
        "_dmarc.ghost.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
        "ghost.example.com/A",
        "_dmarc.mail.ghost.example.com",
    ]
    assert disc.discover_policy("ghost.example.com") is first
    assert disc.discover_policy("GHOST.example.com") is first
    for name in ("ghost.example.com", "example.com", "mail.ghost.example.com"):
        disc.organizational_domain(name)
    # A new author below the same names needs only its own _dmarc query and
    # reuses the walk above it and the memoised existence answers.
    disc.discover_policy("news.example.com")
    assert queries(session, made) == ["_dmarc.news.example.com", "news.example.com/A"]


# -- RFC 7489 (PSL) mode -----------------------------------------------------------------------

PSL_TEXT = """\
// ===BEGIN ICANN DOMAINS===
com
uk
co.uk
example
// ===END ICANN DOMAINS===
// ===BEGIN PRIVATE DOMAINS===
blogspot.com
// ===END PRIVATE DOMAINS===
"""


@pytest.fixture
def psl_file(tmp_path: Path) -> Path:
    path = tmp_path / "psl.dat"
    path.write_text(PSL_TEXT, encoding="utf-8")
    return path


def test_psl_e8_duplicate_records_mean_no_dmarc(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    dns_server.set_zone(E8_ZONE)
    disc, session = new_discoverer(resolver, PSL, psl_file)
    found = disc.discover_policy("sub.example.com")
    assert found.method is PSL
    assert found.status is DiscoveryStatus.NONE
    assert found.detail == "2 DMARC records at _dmarc.sub.example.com"
    assert queries(session) == ["_dmarc.sub.example.com"]  # the OD is not asked


def test_psl_od_queried_only_if_author_set_is_empty(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    dns_server.set_zone(
        {
            "_dmarc.a.example.com": [txt("v=spf1 -all")],  # not a DMARC record: empty set
            "_dmarc.b.example.com": [txt("v=DMARC1; p=none")],
            "_dmarc.c.example.com": [txt("v=DMARC1; p=bogus")],
            "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine")],
        }
    )
    disc, session = new_discoverer(resolver, PSL, psl_file)
    a = disc.discover_policy("a.example.com")
    assert (a.policy_domain, a.policy_tag, a.requested_policy) == (
        "example.com",
        "sp",
        Policy.QUARANTINE,
    )
    assert a.organizational_domain == "example.com"
    b = disc.discover_policy("b.example.com")
    assert (b.policy_domain, b.policy_tag, b.requested_policy) == (
        "b.example.com",
        "p",
        Policy.NONE,
    )
    c = disc.discover_policy("c.example.com")
    assert c.status is DiscoveryStatus.PERMERROR
    assert c.policy_domain == "c.example.com"
    assert queries(session) == [
        "_dmarc.a.example.com",
        "_dmarc.example.com",
        "_dmarc.b.example.com",
        "_dmarc.c.example.com",
    ]


def test_psl_no_record_at_od(dns_server: TestDNSServer, resolver: Resolver, psl_file: Path) -> None:
    dns_server.set_zone({"_dmarc.x.example.com": [txt("unrelated")]})
    disc, session = new_discoverer(resolver, PSL, psl_file)
    found = disc.discover_policy("x.example.com")
    assert found.status is DiscoveryStatus.NONE
    assert queries(session) == ["_dmarc.x.example.com", "_dmarc.example.com"]


def test_psl_author_is_od_no_second_query(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    disc, session = new_discoverer(resolver, PSL, psl_file)
    assert disc.discover_policy("example.com").status is DiscoveryStatus.NONE
    assert queries(session) == ["_dmarc.example.com"]


def test_psl_organizational_domain_without_dns(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    disc, session = new_discoverer(resolver, PSL, psl_file)
    assert disc.organizational_domain("a.b.example.co.uk").domain == "example.co.uk"
    assert disc.organizational_domain("co.uk").domain == "co.uk"  # a public suffix: itself
    assert disc.organizational_domain("x.com").domain == "x.com"
    assert disc.organizational_domain("a.unlisted").domain == "a.unlisted"  # implicit "*"
    assert session.log == []


def test_psl_private_section_diverges_from_treewalk(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    dns_server.set_zone({"_dmarc.blogspot.com": [txt("v=DMARC1; p=reject")]})
    psl_disc, psl_session = new_discoverer(resolver, PSL, psl_file)
    found = psl_disc.discover_policy("myblog.blogspot.com")
    # blogspot.com is a (private) public suffix, so the blog is its own OD
    # and has no record.
    assert found.status is DiscoveryStatus.NONE
    assert found.organizational_domain == "myblog.blogspot.com"
    assert psl_disc.organizational_domain("other.blogspot.com").domain == "other.blogspot.com"
    assert queries(psl_session) == ["_dmarc.myblog.blogspot.com"]

    walk_disc, _ = new_discoverer(resolver)
    walked = walk_disc.discover_policy("myblog.blogspot.com")
    assert walked.organizational_domain == "blogspot.com"
    assert walked.requested_policy is Policy.REJECT


def test_psl_mode_ignores_np_and_psd(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path
) -> None:
    dns_server.set_zone(
        {
            "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine; np=none")],
            "_dmarc.bank.example": [txt("v=DMARC1; p=reject; psd=y; np=junk")],
        }
    )
    disc, session = new_discoverer(resolver, PSL, psl_file)
    ghost = disc.discover_policy("ghost.example.com")
    assert (ghost.policy_tag, ghost.requested_policy) == ("sp", Policy.QUARANTINE)
    assert ghost.author_domain_exists is None
    assert ghost.record is not None and ghost.record.np is None
    assert "ghost.example.com/A" not in queries(session)
    # A psd=y record is just the OD's record under RFC 7489, and its
    # invalid np cannot spoil it.
    bank = disc.discover_policy("giant.bank.example")
    assert bank.status is DiscoveryStatus.FOUND
    assert (bank.policy_domain, bank.organizational_domain) == ("bank.example", "bank.example")
    assert bank.from_psd is False
    assert bank.requested_policy is Policy.REJECT


@pytest.mark.parametrize("failing", ["_dmarc.sub.example.com", "_dmarc.example.com"])
def test_psl_failure_is_temperror(
    dns_server: TestDNSServer, resolver: Resolver, psl_file: Path, failing: str
) -> None:
    dns_server.set_zone({"_dmarc.example.com": [txt("v=DMARC1; p=reject")], failing: "SERVFAIL"})
    disc, _ = new_discoverer(resolver, PSL, psl_file)
    found = disc.discover_policy("sub.example.com")
    assert found.status is DiscoveryStatus.TEMPERROR
    assert found.detail.startswith(f"{failing} TXT servfail")


def test_psl_default_list_is_bundled(dns_server: TestDNSServer, resolver: Resolver) -> None:
    disc = Discoverer(resolver.session(), PSL)
    assert disc.organizational_domain("www.example.co.uk").domain == "example.co.uk"
    assert load_psl() is load_psl(None)


def test_load_psl_is_memoised(psl_file: Path) -> None:
    assert load_psl(str(psl_file)) is load_psl(str(psl_file))


def test_load_psl_unreadable_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.dat"
    with pytest.raises(ConfigError, match=str(missing)):
        load_psl(str(missing))
    empty = tmp_path / "empty.dat"
    empty.write_text("// nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(empty)):
        load_psl(str(empty))


@pytest.mark.parametrize(
    ("domain", "od"),
    [
        ("com", "com"),
        ("example.com", "example.com"),
        ("a.b.example.com", "example.com"),
        ("example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("x.blogspot.com", "x.blogspot.com"),
        ("a.x.blogspot.com", "x.blogspot.com"),
        ("t.co", "t.co"),
    ],
)
def test_psl_organizational_domain(psl_file: Path, domain: str, od: str) -> None:
    assert psl_organizational_domain(domain, load_psl(str(psl_file))) == od


def test_psl_interior_names_of_rules_are_not_suffixes(tmp_path: Path) -> None:
    # "s3.amazonaws.com" is a rule; "amazonaws.com" is not, so a host
    # directly below it has amazonaws.com as OD.
    path = tmp_path / "aws.dat"
    path.write_text("com\ns3.amazonaws.com\n*.compute.amazonaws.com\n", encoding="utf-8")
    psl = load_psl(str(path))
    assert psl_organizational_domain("foo.amazonaws.com", psl) == "amazonaws.com"
    assert psl_organizational_domain("b.s3.amazonaws.com", psl) == "b.s3.amazonaws.com"
    assert (
        psl_organizational_domain("x.y.compute.amazonaws.com", psl) == "x.y.compute.amazonaws.com"
    )


# -- speed ------------------------------------------------------------------------------------


def test_discovery_is_fast_with_a_warm_cache(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.set_zone(
        {
            "_dmarc.example.com": [txt("v=DMARC1; p=reject; sp=quarantine; np=reject")],
            "news.example.com": [("A", "192.0.2.1")],
        }
    )

    def one_message() -> None:
        disc = Discoverer(resolver.session())
        disc.discover_policy("news.example.com")
        disc.organizational_domain("news.example.com")
        disc.organizational_domain("mail.example.com")

    one_message()  # warm the resolver cache
    start = time.perf_counter()
    for _ in range(500):
        one_message()
    per_message = (time.perf_counter() - start) / 500
    assert per_message < 0.0005  # discovery must leave most of a millisecond to the rest
