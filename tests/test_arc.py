"""ARC chain validation (RFC 8617 §5.2) and hop extraction, against the
loopback DNS server, with ARC sets made by the signing kit."""

from __future__ import annotations

import random
import time

import pytest

from dmarcmilter.arc import hop_results, trusted_hops, verify_arc
from dmarcmilter.resolver import Resolver
from dmarcmilter.results import ARCHop, ARCOutcome, ARCResultCode
from dmarcmilter.taglist import domain_or_empty, header_text, loose_tags, unfold
from tests.dnsserver import TestDNSServer
from tests.signing import arc_seal, dkim_key_record, dkim_sign, dkim_zone, make_message

PASS = ARCResultCode.PASS
FAIL = ARCResultCode.FAIL
NONE = ARCResultCode.NONE

FIRST_RESULTS = (
    "spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com; "
    "dmarc=pass header.from=example.com"
)
SECOND_RESULTS = "arc=pass; spf=fail smtp.mailfrom=list.example; dkim=fail header.d=example.com"


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    dns_server.add_zone(dkim_zone("forwarder.example", "arc1"))
    dns_server.add_zone(dkim_zone("list.example", "arc2", "rsa1024"))
    return dns_server


def _one_hop() -> bytes:
    signed = dkim_sign(make_message(), "example.com", "s")
    return arc_seal(
        signed,
        "forwarder.example",
        "arc1",
        authserv_id="mx.forwarder.example",
        results=FIRST_RESULTS,
    )


def _two_hops(first: bytes | None = None) -> bytes:
    return arc_seal(
        first or _one_hop(),
        "list.example",
        "arc2",
        "rsa1024",
        authserv_id="lists.list.example",
        results=SECOND_RESULTS,
    )


def test_unsealed_message_is_none_without_queries(resolver: Resolver) -> None:
    session = resolver.session()
    assert verify_arc(make_message(), session) == ARCOutcome(NONE, "", ())
    assert session.log == []


def test_one_valid_hop_passes_with_hop_data(zone: TestDNSServer, resolver: Resolver) -> None:
    outcome = verify_arc(_one_hop(), resolver.session())
    assert (outcome.result, outcome.reason) == (PASS, "")
    assert outcome.hops == (
        ARCHop(
            instance=1,
            sealer_domain="forwarder.example",
            sealer_selector="arc1",
            cv="none",
            ams_domain="forwarder.example",
            authentication_results=f"mx.forwarder.example; {FIRST_RESULTS}",
        ),
    )
    assert outcome.sealing_domains == ("forwarder.example",)


def test_two_hops_pass_lowest_instance_first(zone: TestDNSServer, resolver: Resolver) -> None:
    outcome = verify_arc(_two_hops(), resolver.session())
    assert outcome.result is PASS
    assert [(h.instance, h.sealer_domain, h.cv) for h in outcome.hops] == [
        (1, "forwarder.example", "none"),
        (2, "list.example", "pass"),
    ]
    assert outcome.last_hop is not None
    assert outcome.last_hop.authentication_results == f"lists.list.example; {SECOND_RESULTS}"
    assert outcome.hops[1].ams_domain == "list.example"


def test_change_between_hops_is_fine_when_the_next_hop_seals(
    zone: TestDNSServer, resolver: Resolver
) -> None:
    # A list rewrites the subject after hop 1 sealed, then seals itself: only
    # the newest AMS must verify (RFC 8617 §5.2), so the chain passes.
    rewritten = _one_hop().replace(b"Subject: Quarterly", b"Subject: [list] Quarterly")
    assert verify_arc(_two_hops(rewritten), resolver.session()).result is PASS


def test_message_modified_after_sealing_fails_with_hops(
    zone: TestDNSServer, resolver: Resolver
) -> None:
    tampered = _two_hops().replace(b"the report", b"the invoice")
    outcome = verify_arc(tampered, resolver.session())
    assert outcome.result is FAIL
    assert outcome.reason == "Most recent ARC-Message-Signature did not validate"
    assert [h.instance for h in outcome.hops] == [1, 2]  # extracted for logging


def test_seal_modified_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    sealed = _two_hops()
    tampered = sealed.replace(
        b"i=1; mx.forwarder.example; spf=pass", b"i=1; mx.forwarder.example; spf=fail"
    )
    assert tampered != sealed
    outcome = verify_arc(tampered, resolver.session())
    assert outcome.result is FAIL
    assert outcome.reason == "ARC-Seal[2] did not validate"
    # The hop shows what the message now claims; only a pass is ever trusted.
    assert "spf=fail" in outcome.hops[0].authentication_results


def test_cv_fail_in_a_seal_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    broken = arc_seal(_one_hop(), "list.example", "arc2", "rsa1024", cv="fail")
    outcome = verify_arc(broken, resolver.session())
    assert outcome.result is FAIL
    assert "reported failure" in outcome.reason
    assert [h.cv for h in outcome.hops] == ["none", "fail"]


def test_first_hop_must_record_cv_none(zone: TestDNSServer, resolver: Resolver) -> None:
    signed = dkim_sign(make_message(), "example.com", "s")
    outcome = verify_arc(
        arc_seal(signed, "forwarder.example", "arc1", cv="pass"), resolver.session()
    )
    assert outcome.result is FAIL
    assert "invalid status" in outcome.reason


@pytest.mark.parametrize("behaviour", ["SERVFAIL", "TIMEOUT"])
def test_dns_failure_fails_with_reason(
    zone: TestDNSServer, resolver: Resolver, behaviour: str
) -> None:
    zone.add_zone({"arc2._domainkey.list.example": behaviour})
    start = time.monotonic()
    outcome = verify_arc(_two_hops(), resolver.session())
    assert outcome.result is FAIL
    assert outcome.reason.startswith("temporary DNS failure: arc2._domainkey.list.example")
    assert len(outcome.hops) == 2
    assert time.monotonic() - start < 2.0


def test_spent_budget_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    outcome = verify_arc(_one_hop(), resolver.session(budget=0.0))
    assert outcome.result is FAIL
    assert "temporary DNS failure" in outcome.reason and "budget" in outcome.reason


def test_missing_or_revoked_sealer_key_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    signed = dkim_sign(make_message(), "example.com", "s")
    unknown = arc_seal(signed, "nokey.example", "arc")
    assert verify_arc(unknown, resolver.session()).result is FAIL
    zone.add_zone(dkim_zone("revoked.example", "arc", record=dkim_key_record("rsa", p="")))
    revoked = arc_seal(signed, "revoked.example", "arc")
    assert verify_arc(revoked, resolver.session()).result is FAIL


def test_small_sealer_key_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    zone.add_zone(dkim_zone("tiny.example", "arc", "rsa512"))
    sealed = arc_seal(make_message(), "tiny.example", "arc", "rsa512")
    assert verify_arc(sealed, resolver.session()).result is FAIL
    assert verify_arc(sealed, resolver.session(), min_key_bits=512).result is PASS


def test_incomplete_set_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    sealed = _one_hop()
    head, body = sealed.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    without_aar = [line for line in lines if not line.startswith(b"ARC-Authentication-Results")]
    outcome = verify_arc(b"\r\n".join(without_aar) + b"\r\n\r\n" + body, resolver.session())
    assert outcome.result is FAIL
    assert "Incomplete ARC set" in outcome.reason
    assert outcome.hops[0].authentication_results == ""


def test_duplicate_field_fails(zone: TestDNSServer, resolver: Resolver) -> None:
    extra = b"ARC-Authentication-Results: i=1; evil.example; dmarc=pass\r\n"
    outcome = verify_arc(extra + _one_hop(), resolver.session())
    assert outcome.result is FAIL
    assert outcome.reason == "duplicate ARC-Authentication-Results for instance 1"


@pytest.mark.parametrize(
    "field",
    [
        b"ARC-Seal: a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n",
        b"ARC-Seal: i=0; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n",
        b"ARC-Authentication-Results: mx.example; spf=pass\r\n",
    ],
)
def test_field_without_valid_instance_fails(resolver: Resolver, field: bytes) -> None:
    session = resolver.session()
    outcome = verify_arc(field + make_message(), session)
    assert outcome.result is FAIL
    assert "without a valid instance tag" in outcome.reason
    assert session.log == []


def _fake_sets(count: int, first: int = 1) -> bytes:
    """Well-formed but unsigned ARC sets, newest on top as sealers prepend."""
    sets = [
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=x.example; s=s; h=from;"
        f" bh=AAAA; b=AAAA\r\n"
        f"ARC-Authentication-Results: i={i}; x.example; arc=pass\r\n"
        for i in range(first, first + count)
    ]
    return "".join(reversed(sets)).encode()


def test_more_than_fifty_sets_fails_before_any_query(resolver: Resolver) -> None:
    session = resolver.session()
    outcome = verify_arc(_fake_sets(51) + make_message(), session)
    assert (outcome.result, outcome.reason) == (FAIL, "more than 50 ARC sets")
    assert len(outcome.hops) == 50 and outcome.hops[-1].instance == 50
    assert session.log == []


def test_huge_instance_number_fails_fast(resolver: Resolver) -> None:
    start = time.monotonic()
    outcome = verify_arc(_fake_sets(1, first=999_999_999) + make_message(), resolver.session())
    assert outcome.result is FAIL
    assert time.monotonic() - start < 0.5


def test_fifty_forged_sets_fail_without_unbounded_work(
    zone: TestDNSServer, resolver: Resolver
) -> None:
    zone.add_zone(dkim_zone("x.example", "s"))
    outcome = verify_arc(_fake_sets(50) + make_message(), resolver.session())
    assert outcome.result is FAIL
    assert len(outcome.hops) == 50


def test_malformed_header_section_fails_with_hops(zone: TestDNSServer, resolver: Resolver) -> None:
    broken = _one_hop().replace(b"MIME-Version: 1.0\r\n", b"no colon on this line\r\n")
    outcome = verify_arc(broken, resolver.session())
    assert (outcome.result, outcome.reason) == (FAIL, "malformed header section")
    assert outcome.hops[0].sealer_domain == "forwarder.example"


def test_folded_aar_payload_is_unfolded(zone: TestDNSServer, resolver: Resolver) -> None:
    signed = dkim_sign(make_message(), "example.com", "s")
    sealed = arc_seal(
        signed,
        "forwarder.example",
        "arc1",
        authserv_id="mx.forwarder.example",
        results="spf=pass smtp.mailfrom=example.com;\r\n\tdmarc=pass  header.from=example.com",
    )
    outcome = verify_arc(sealed, resolver.session())
    assert outcome.result is PASS
    assert outcome.hops[0].authentication_results == (
        "mx.forwarder.example; spf=pass smtp.mailfrom=example.com; "
        "dmarc=pass header.from=example.com"
    )


def test_arc_sets_are_deterministic() -> None:
    assert _two_hops() == _two_hops()


def test_mutated_chains_never_raise(zone: TestDNSServer, resolver: Resolver) -> None:
    seed = _two_hops()
    rng = random.Random(8617)
    session = resolver.session(budget=30.0)
    for _ in range(200):
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 5)):
            pos = rng.randrange(len(data) + 1)
            op = rng.randrange(3)
            if op == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = rng.choice([b";", b"i=", b"\r\n", b"\r\n ", b"=", b"ARC-Seal:"])
            else:
                del data[pos : pos + rng.randrange(1, 30)]
        outcome = verify_arc(bytes(data), session)
        assert isinstance(outcome, ARCOutcome)
        # A chain is never trusted unless it verified.
        if outcome.result is PASS:
            assert outcome.reason == ""


def test_arbitrary_bytes_never_raise_property(resolver: Resolver) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    session = resolver.session(budget=60.0)
    names = st.sampled_from(
        [b"ARC-Seal:", b"ARC-Message-Signature:", b"ARC-Authentication-Results:"]
    )

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(
        st.lists(st.tuples(names, st.binary(max_size=60)), max_size=6), st.binary(max_size=100)
    )
    def check(fields: list[tuple[bytes, bytes]], tail: bytes) -> None:
        data = b"".join(n + v + b"\r\n" for n, v in fields) + tail
        assert isinstance(verify_arc(data, session), ARCOutcome)

    check()


def test_ams_without_space_before_instance_fails_safely(
    zone: TestDNSServer, resolver: Resolver
) -> None:
    # dkimpy finds the raw AMS by the text " i=N;"; a sealer writing
    # "ARC-Message-Signature:i=1;" cannot be validated by it.  The chain then
    # fails closed (no override granted) instead of raising.
    sealed = _one_hop().replace(b"ARC-Message-Signature: i=1;", b"ARC-Message-Signature:i=1;")
    outcome = verify_arc(sealed, resolver.session())
    assert outcome.result is FAIL
    assert outcome.reason == "malformed ARC set (IndexError)"
    assert outcome.hops[0].ams_domain == "forwarder.example"


# -- which hops may vouch (RFC 8617 §7.2, local policy) ----------------------------------


def _hop(instance: int, sealer: str, results: str = "dmarc=pass header.from=example.com") -> ARCHop:
    return ARCHop(instance, sealer, "arc", "pass", sealer, f"{sealer}; {results}")


def test_trusted_hops_stop_at_the_first_untrusted_one() -> None:
    hops = (_hop(1, "a.example"), _hop(2, "b.example"), _hop(3, "c.example"))
    chain = ARCOutcome(ARCResultCode.PASS, "", hops)
    newest = [h.instance for h in trusted_hops(chain, ("C.Example.", "b.example"))]
    assert newest == [3, 2]
    # The newest hop is not trusted: no older hop counts, trusted or not.
    assert trusted_hops(chain, ("a.example", "b.example")) == ()
    assert [h.instance for h in trusted_hops(chain, ("a.example", "b.example", "c.example"))] == [
        3,
        2,
        1,
    ]
    # Only a validated chain; a look-alike sealer name is another name.
    assert trusted_hops(ARCOutcome(ARCResultCode.FAIL, "", hops), ("c.example",)) == ()
    assert trusted_hops(chain, ("\u0441.example",)) == ()
    assert trusted_hops(chain, ()) == ()
    nameless = ARCOutcome(ARCResultCode.PASS, "", (_hop(1, ""),))
    assert trusted_hops(nameless, ("",)) == ()


def test_hop_results_read_the_aar() -> None:
    (res,) = hop_results(_hop(1, "a.example", "dkim=pass header.d=Example.COM"))
    assert (res.method, res.result, res.get("header.d")) == ("dkim", "pass", "Example.COM")
    assert hop_results(_hop(1, "a.example", "dkim=pass (unterminated")) == ()


def test_tag_lists_are_read_leniently() -> None:
    assert loose_tags(b" d = Example.COM ; s=sel;; junk; d=second; =x; b=\r\n\tAb Cd") == {
        b"d": b"Example.COM",
        b"s": b"sel",
        b"b": b"Ab Cd",
    }
    assert unfold(b"i=1;\r\n\tmx.example;  spf=pass\r\n dkim=none ") == (
        b"i=1; mx.example; spf=pass dkim=none"
    )
    assert domain_or_empty(b" Example.COM. ") == "example.com"
    assert domain_or_empty(b"not a domain") == ""
    assert header_text(b"\xff caf\xc3\xa9 ") == "\ufffd caf\u00e9"
