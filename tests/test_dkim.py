"""DKIM verification (RFC 6376 §6) against the loopback DNS server: every
signature, each result code of the mapping in ``dmarcmilter.dkim``, the DNS
failure modes, the bounds, and inputs that must never raise."""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

import dkim
import hypothesis
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import strategies as st

from dmarcmilter import dkim as dkim_module
from dmarcmilter.dkim import (
    BODY_WINDOW,
    canonical_body_chunks,
    parse_message,
    relaxed_body,
    relaxed_headers,
    verify_dkim,
)
from dmarcmilter.resolver import QueryLogEntry, Resolver
from dmarcmilter.results import DKIMOutcome, DKIMResultCode
from dmarcmilter.taglist import domain_or_empty, loose_tags
from tests.dnsserver import TestDNSServer
from tests.signing import (
    FIXED_TIMESTAMP,
    dkim_key_record,
    dkim_sign,
    dkim_zone,
    make_message,
    public_key_b64,
)

PASS = DKIMResultCode.PASS
FAIL = DKIMResultCode.FAIL
PERMERROR = DKIMResultCode.PERMERROR
TEMPERROR = DKIMResultCode.TEMPERROR


def _b_value(signed: bytes) -> str:
    """The b= of the topmost signature, whitespace removed."""
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    match = re.search(r";\s*b=([A-Za-z0-9+/=\s]+?)(?:\r\n(?!\s)|$)", header)
    assert match
    return re.sub(r"\s+", "", match.group(1))


def _queries(session_log: list[QueryLogEntry]) -> list[str]:
    return [entry.qname for entry in session_log]


# -- passing signatures -------------------------------------------------------


def test_rsa2048_signature_passes(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s2048"))
    signed = dkim_sign(make_message(), "example.com", "s2048")
    session = resolver.session()
    outcome = verify_dkim(signed, session)
    (sig,) = outcome.signatures
    assert sig.result is PASS and sig.reason == ""
    assert (sig.domain, sig.selector, sig.algorithm) == ("example.com", "s2048", "rsa-sha256")
    assert sig.header_b == _b_value(signed)[:8]
    assert outcome.passing_domains == ("example.com",)
    assert _queries(session.log) == ["s2048._domainkey.example.com"]


def test_ed25519_signature_passes(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.org", "ed", "ed25519"))
    signed = dkim_sign(make_message(), "example.org", "ed", "ed25519")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert sig.result is PASS
    assert (sig.domain, sig.algorithm) == ("example.org", "ed25519-sha256")


def test_two_signatures_both_pass_in_header_order(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "rsa"))
    dns_server.add_zone(dkim_zone("esp.example", "ed", "ed25519"))
    inner = dkim_sign(make_message(), "example.com", "rsa")
    signed = dkim_sign(inner, "esp.example", "ed", "ed25519")  # prepended: topmost
    outcome = verify_dkim(signed, resolver.session())
    assert [(s.domain, s.selector, s.result) for s in outcome.signatures] == [
        ("esp.example", "ed", PASS),
        ("example.com", "rsa", PASS),
    ]


def test_first_signature_fails_and_second_passes(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # The wrong public key is published for the first (topmost) signature.
    dns_server.add_zone(dkim_zone("bad.example", "s1", "rsa1024"))
    dns_server.add_zone(dkim_zone("good.example", "s2"))
    inner = dkim_sign(make_message(), "good.example", "s2")
    signed = dkim_sign(inner, "bad.example", "s1", "rsa")
    outcome = verify_dkim(signed, resolver.session())
    first, second = outcome.signatures
    assert (first.domain, first.selector, first.result) == ("bad.example", "s1", FAIL)
    assert "signature mismatch" in first.reason
    assert (second.domain, second.selector, second.result) == ("good.example", "s2", PASS)
    assert outcome.passing_domains == ("good.example",)


def test_rsa1024_passes_at_default_minimum_and_is_refused_above(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "k1024", "rsa1024"))
    signed = dkim_sign(make_message(), "example.com", "k1024", "rsa1024")
    assert verify_dkim(signed, resolver.session()).signatures[0].result is PASS
    (sig,) = verify_dkim(signed, resolver.session(), min_key_bits=2048).signatures
    assert sig.result is PERMERROR and sig.reason == "key too small (1024 bits)"


@pytest.mark.parametrize("canon", [("simple", "simple"), ("relaxed", "relaxed")])
def test_other_canonicalisations_pass(
    dns_server: TestDNSServer, resolver: Resolver, canon: tuple[str, str]
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    body = "Tabs\tand  double  spaces   \nand trailing blanks \t\n\n\n"
    signed = dkim_sign(make_message(body=body), "example.com", "s", canonicalize=canon)
    assert verify_dkim(signed, resolver.session()).signatures[0].result is PASS


def test_identity_and_testing_flag_are_reported(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s", record=dkim_key_record("rsa", extra="t=y")))
    signed = dkim_sign(make_message(), "example.com", "s", identity="news@mail.example.com")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert sig.result is PASS
    assert sig.identity == "news@mail.example.com"
    assert sig.reason == "key in testing mode (t=y)"


# -- fail ---------------------------------------------------------------------


def test_body_changed_after_signing_fails(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(body="Pay invoice 100.\n"), "example.com", "s")
    tampered = signed.replace(b"Pay invoice 100.", b"Pay invoice 900.")
    (sig,) = verify_dkim(tampered, resolver.session()).signatures
    assert (sig.result, sig.reason) == (FAIL, "body hash mismatch")


def test_header_changed_after_signing_fails(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(subject="Lunch"), "example.com", "s")
    tampered = signed.replace(b"Subject: Lunch", b"Subject: Wire transfer")
    (sig,) = verify_dkim(tampered, resolver.session()).signatures
    assert sig.result is FAIL
    assert sig.reason == "signature mismatch (signed header fields changed or wrong key)"


def test_added_second_from_field_breaks_the_signature(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(), "example.com", "s")
    forged = b"From: ceo@example.com\r\n" + signed
    assert verify_dkim(forged, resolver.session()).signatures[0].result is FAIL


def test_ed25519_signature_of_wrong_length_fails(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.org", "ed", "ed25519"))
    signed = dkim_sign(make_message(), "example.org", "ed", "ed25519")
    head, body = signed.split(b"\r\n\r\n", 1)
    # Valid base64, but 48 octets where ed25519 signatures have 64.
    short = re.sub(rb";\s*b=[A-Za-z0-9+/=\s]+?\r\n(?=\S)", b"; b=" + b"QUJD" * 16 + b"\r\n", head)
    assert short != head
    (sig,) = verify_dkim(short + b"\r\n\r\n" + body, resolver.session()).signatures
    assert (sig.result, sig.reason) == (FAIL, "signature mismatch (b= has the wrong length)")


def test_expired_signature_fails(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(), "example.com", "s", expire=FIXED_TIMESTAMP + 86400)
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (FAIL, "signature expired")
    # Before x= (give or take the tolerated clock skew) the same signature passes.
    at = float(FIXED_TIMESTAMP + 86400 + 60)
    assert verify_dkim(signed, resolver.session(), now=at).signatures[0].result is PASS


# -- l= -----------------------------------------------------------------------


def test_l_tag_covering_the_whole_body_passes(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(), "example.com", "s", length=True)
    assert b" l=" in signed
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PASS, "")


def test_l_tag_with_appended_content_is_policy_unless_accepted(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("lists.example", "s"))
    signed = dkim_sign(make_message(body="Original text.\n"), "lists.example", "s", length=True)
    appended = signed + b"Click here: http://phish.example/\r\n"
    (sig,) = verify_dkim(appended, resolver.session()).signatures
    assert sig.result is DKIMResultCode.POLICY
    assert sig.reason == "l= leaves 35 body octets unsigned"
    (lenient,) = verify_dkim(appended, resolver.session(), accept_partial_body=True).signatures
    assert (lenient.result, lenient.reason) == (PASS, "l= leaves 35 body octets unsigned")


def test_l_tag_longer_than_the_body_fails(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    message = make_message(body="Short.\n")  # canonical body: 8 octets
    signed = dkim_sign(message, "example.com", "s", length=100)
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (FAIL, "l=100 exceeds the body length (8)")


def test_l_tag_shorter_than_signed_prefix_of_body(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # The signer covered only the first 5 octets; the rest was there at signing.
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(body="Hello world\n"), "example.com", "s", length=5)
    (sig,) = verify_dkim(signed, resolver.session(), accept_partial_body=True).signatures
    assert sig.result is PASS and "8 body octets unsigned" in sig.reason


# A body past BODY_WINDOW is canonicalised and hashed window by window; a tab,
# a double space and trailing whitespace on each line give every relaxed rule
# work, and windows cut lines at every offset.
_LARGE_BODY = b"one\ttwo  three \r\n \t\r\nfour\r\n" * (3 * BODY_WINDOW // 29) + b"\r\n \r\n"


@pytest.mark.parametrize("canonicalize", [("relaxed", "relaxed"), ("relaxed", "simple")])
def test_large_body_streamed_signatures_pass(
    dns_server: TestDNSServer, resolver: Resolver, canonicalize: tuple[str, str]
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    message = make_message(body=_LARGE_BODY)
    signed = dkim_sign(message, "example.com", "s", canonicalize=canonicalize)
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PASS, "")
    (broken,) = verify_dkim(signed.replace(b"four", b"fout", 1), resolver.session()).signatures
    assert (broken.result, broken.reason) == (FAIL, "body hash mismatch")


@pytest.mark.parametrize("canonicalize", [("relaxed", "relaxed"), ("relaxed", "simple")])
def test_large_body_l_tag_is_honoured(
    dns_server: TestDNSServer, resolver: Resolver, canonicalize: tuple[str, str]
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    message = make_message(body=_LARGE_BODY)
    body = message.split(b"\r\n\r\n", 1)[1]
    algorithm = Relaxed if canonicalize[1] == "relaxed" else Simple
    size = len(algorithm.canonicalize_body(body))
    signed = dkim_sign(message, "example.com", "s", canonicalize=canonicalize, length=True)
    (sig,) = verify_dkim(signed + b"appended\r\n", resolver.session()).signatures
    # Relaxed: the whitespace line that ended the body counts once text
    # follows it.
    unsigned = len(algorithm.canonicalize_body(body + b"appended\r\n")) - size
    assert unsigned == (14 if algorithm is Relaxed else 10)
    assert (sig.result, sig.reason) == (
        DKIMResultCode.POLICY,
        f"l= leaves {unsigned} body octets unsigned",
    )
    # A prefix ending inside a window, and an l= past the end.
    prefix = dkim_sign(
        message, "example.com", "s", canonicalize=canonicalize, length=BODY_WINDOW + 7
    )
    (sig,) = verify_dkim(prefix, resolver.session(), accept_partial_body=True).signatures
    assert sig.result is PASS
    assert sig.reason == f"l= leaves {size - BODY_WINDOW - 7} body octets unsigned"
    longer = dkim_sign(message, "example.com", "s", canonicalize=canonicalize, length=size + 1)
    (sig,) = verify_dkim(longer, resolver.session()).signatures
    assert (sig.result, sig.reason) == (FAIL, f"l={size + 1} exceeds the body length ({size})")


def test_large_body_is_canonicalised_once_for_every_l_tag(
    dns_server: TestDNSServer, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each l= value needs its own hash, never its own canonicalisation pass
    # over a large body: the signatures' hashes are computed together.
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = make_message(body=_LARGE_BODY)
    lengths = [BODY_WINDOW // 3, BODY_WINDOW + 1, 2 * BODY_WINDOW, True, None]
    for length in lengths:
        signed = dkim_sign(
            signed,
            "example.com",
            "s",
            canonicalize=("relaxed", "relaxed"),
            length=False if length is None else length,
        )
    passes: list[bool] = []
    real = dkim_module.canonical_body_chunks

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(kwargs["relaxed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dkim_module, "canonical_body_chunks", counted)
    outcome = verify_dkim(signed, resolver.session(), accept_partial_body=True)
    assert [s.result for s in outcome.signatures] == [PASS] * len(lengths)
    assert passes == [True]


def test_streamed_canonicalisation_matches_dkimpy() -> None:
    rng = random.Random(6376)
    pieces = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b"b c", b"  "]
    for _ in range(4000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        lead = b"H" * rng.randrange(0, 3)
        window = rng.randrange(1, 9)
        for relaxed, algorithm in ((True, Relaxed), (False, Simple)):
            chunks = canonical_body_chunks(lead + data, len(lead), relaxed=relaxed, window=window)
            assert b"".join(chunks) == algorithm.canonicalize_body(data)


def test_streamed_canonicalisation_matches_dkimpy_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tokens = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"  b"])
    data = st.lists(tokens, max_size=60).map(b"".join) | st.binary(max_size=80)

    @hypothesis.settings(max_examples=500, deadline=None, database=None)
    @hypothesis.given(data, st.integers(min_value=1, max_value=16))
    def check(raw: bytes, window: int) -> None:
        for relaxed, algorithm in ((True, Relaxed), (False, Simple)):
            chunks = canonical_body_chunks(raw, 0, relaxed=relaxed, window=window)
            assert b"".join(chunks) == algorithm.canonicalize_body(raw)

    check()


def test_empty_lines_across_windows_end_the_body() -> None:
    # Held back window after window, then dropped at the end; a body of
    # nothing but empty lines is empty (relaxed) or one CRLF (simple).
    body = b"text\r\n" + b"\r\n" * 300_000 + b" \t\r\n" * 1000 + b"\r\n" * 5000
    for data in (body, body[6:]):
        for relaxed, algorithm in ((True, Relaxed), (False, Simple)):
            chunks = canonical_body_chunks(data, 0, relaxed=relaxed)
            assert b"".join(chunks) == algorithm.canonicalize_body(data)
    assert b"".join(canonical_body_chunks(body, 0, relaxed=True)) == b"text\r\n"
    assert b"".join(canonical_body_chunks(body[6:], 0, relaxed=True)) == b""


# -- permerror: the key -------------------------------------------------------


def test_key_nxdomain_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    signed = dkim_sign(make_message(), "example.com", "gone")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PERMERROR, "no key for signature (NXDOMAIN)")
    assert sig.domain == "example.com" and sig.selector == "gone"


def test_key_name_without_txt_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone({"gone._domainkey.example.com": [("A", "192.0.2.1")]})
    signed = dkim_sign(make_message(), "example.com", "gone")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PERMERROR, "no key for signature (no TXT record)")


def test_revoked_key_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "old", record=dkim_key_record("rsa", p="")))
    signed = dkim_sign(make_message(), "example.com", "old")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PERMERROR, "key revoked")


def test_key_too_small_is_permerror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "tiny", "rsa512"))
    signed = dkim_sign(make_message(), "example.com", "tiny", "rsa512")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (PERMERROR, "key too small (512 bits)")
    # Allowed by configuration, the same key verifies.
    relaxed = verify_dkim(signed, resolver.session(), min_key_bits=512)
    assert relaxed.signatures[0].result is PASS


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("v=DKIM1; k=rsa; p=not*base64", "key syntax error: p= is not valid base64"),
        ("v=DKIM1; k=rsa; p=QUJDRA==", "malformed RSA key"),
        ("v=DKIM1; k=rsa", "key syntax error: no p="),
        ("v=DKIM2; k=rsa; p=QUJDRA==", "key syntax error: v= is not DKIM1"),
        ("v=DKIM1; k=dsa; p=QUJDRA==", "unknown key type k=dsa"),
        ("v=DKIM1; k=rsa; k=rsa; p=QUJDRA==", "key syntax error"),
        ("this is not a key record", "key syntax error"),
        (f"v=DKIM1; k=ed25519; p={public_key_b64('ed25519')}", "key type k=ed25519 does not"),
        (dkim_key_record("rsa", extra="h=sha1"), "inappropriate hash algorithm for key (h=)"),
        (dkim_key_record("rsa", extra="s=tlsrpt"), "key not for email (s=)"),
    ],
)
def test_unusable_key_records_are_permerror(
    dns_server: TestDNSServer, resolver: Resolver, record: str, reason: str
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s", record=record))
    signed = dkim_sign(make_message(), "example.com", "s")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert sig.result is PERMERROR
    assert sig.reason.startswith(reason)


def test_strict_key_flag_requires_i_equal_to_d(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s", record=dkim_key_record("rsa", extra="t=s")))
    message = make_message()
    sub = dkim_sign(message, "example.com", "s", identity="a@sub.example.com")
    same = dkim_sign(message, "example.com", "s", identity="a@example.com")
    (bad,) = verify_dkim(sub, resolver.session()).signatures
    assert (bad.result, bad.reason) == (PERMERROR, "key requires i= domain to equal d= (t=s)")
    assert verify_dkim(same, resolver.session()).signatures[0].result is PASS


def test_key_record_split_into_character_strings(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    zone = dkim_zone("example.com", "s")
    ((rtype, chunks),) = zone["s._domainkey.example.com"]
    assert rtype == "TXT" and len(chunks) >= 2 and all(len(c) <= 255 for c in chunks)
    assert "".join(chunks) == dkim_key_record("rsa")
    dns_server.add_zone(zone)
    answer = resolver.session().query("s._domainkey.example.com", "TXT")
    assert len(answer.records[0]) == len(chunks)  # type: ignore[arg-type]


# -- temperror ----------------------------------------------------------------


def test_key_servfail_is_temperror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone({"s._domainkey.example.com": "SERVFAIL"})
    signed = dkim_sign(make_message(), "example.com", "s")
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (TEMPERROR, "key lookup failed (servfail)")


def test_key_timeout_is_temperror_quickly(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone({"s._domainkey.example.com": "TIMEOUT"})
    signed = dkim_sign(make_message(), "example.com", "s")
    start = time.monotonic()
    (sig,) = verify_dkim(signed, resolver.session()).signatures
    assert (sig.result, sig.reason) == (TEMPERROR, "key lookup failed (timeout)")
    assert time.monotonic() - start < 2.0  # the 0.5 s per-query timeout, not dkimpy's 5 s


def test_spent_dns_budget_is_temperror(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(), "example.com", "s")
    session = resolver.session(budget=0.0)
    (sig,) = verify_dkim(signed, session).signatures
    assert (sig.result, sig.reason) == (TEMPERROR, "key lookup failed (DNS budget spent)")
    assert dns_server.queries == []  # refused before reaching the wire


def test_temperror_on_one_signature_does_not_hide_another(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone({"s1._domainkey.flaky.example": "SERVFAIL"})
    dns_server.add_zone(dkim_zone("example.com", "s2"))
    signed = dkim_sign(dkim_sign(make_message(), "example.com", "s2"), "flaky.example", "s1")
    results = [s.result for s in verify_dkim(signed, resolver.session()).signatures]
    assert results == [TEMPERROR, PASS]


# -- permerror: the signature -------------------------------------------------

_GOOD_B = "A" * 342 + "=="
_GOOD_BH = "yme1J3zd4bOxnt29nkyiWFaw0GZ+ZdbJ1BE1LVoVjH4="


def _sig(**tags: str) -> str:
    base = {
        "v": "1",
        "a": "rsa-sha256",
        "c": "relaxed/simple",
        "d": "example.com",
        "s": "s",
        "h": "from:subject",
        "bh": _GOOD_BH,
        "b": _GOOD_B,
    }
    base.update(tags)
    return "; ".join(f"{k}={v}" for k, v in base.items() if v != "-")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("this is not a tag list", "malformed tag list"),
        (_sig() + "; d=example.net", "duplicate tag d="),
        (_sig(v="-"), "signature missing required tag v="),
        (_sig(bh="-"), "signature missing required tag bh="),
        (_sig(h="-"), "signature missing required tag h="),
        (_sig(v="2"), "incompatible version v=2"),
        (_sig(a="rsa-sha1"), "rsa-sha1 is not acceptable (RFC 8301)"),
        (_sig(a="dsa-sha512"), "unsupported algorithm a=dsa-sha512"),
        (_sig(b="not base64!"), "b= is empty or not valid base64"),
        (_sig(b=""), "b= is empty or not valid base64"),
        (_sig(bh="QUJD"), None),  # valid base64, wrong hash: reaches DNS, see below
        (_sig(d="exa mple.com"), "invalid d=exa mple.com"),
        (_sig(d=""), "invalid d="),
        (_sig(s="bad selector"), "invalid s=bad selector"),
        (_sig(c="weird/simple"), "invalid c=weird/simple"),
        (_sig(q="http/well-known"), "unsupported query method q=http/well-known"),
        (_sig(i="user@other.example"), "i= domain is not within d="),
        (_sig(i="no-at-sign"), "i= has no @"),
        (_sig(h="subject:to"), "From field not signed"),
        (_sig(h="from::subject"), "empty header field name in h="),
        (_sig(l="12abc"), "l= is not a decimal number"),
        (_sig(t="yesterday"), "t= is not a decimal number"),
        (_sig(t="2000", x="1000"), "x= is before t="),
    ],
)
def test_malformed_signature_is_permerror_without_dns(
    dns_server: TestDNSServer, resolver: Resolver, value: str, reason: str | None
) -> None:
    message = b"DKIM-Signature: " + value.encode() + b"\r\n" + make_message()
    session = resolver.session()
    (sig,) = verify_dkim(message, session).signatures
    if reason is None:
        # No key published: permerror from the key step, after one query.
        assert sig.result is PERMERROR and "no key" in sig.reason
        return
    assert (sig.result, sig.reason) == (PERMERROR, reason)
    assert session.log == []


def test_malformed_signature_still_reports_what_it_can(resolver: Resolver) -> None:
    value = _sig(v="9", d="Example.COM", s="sel", i="@example.com")
    message = b"DKIM-Signature: " + value.encode() + b"\r\n" + make_message()
    (sig,) = verify_dkim(message, resolver.session()).signatures
    assert sig.result is PERMERROR
    assert (sig.domain, sig.selector, sig.identity, sig.algorithm) == (
        "example.com",
        "sel",
        "@example.com",
        "rsa-sha256",
    )
    assert sig.header_b == "AAAAAAAA"


def test_malformed_header_section_reports_signatures_as_permerror(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = dkim_sign(make_message(), "example.com", "s")
    broken = signed.replace(b"MIME-Version: 1.0\r\n", b"this line has no colon\r\n")
    (sig,) = verify_dkim(broken, resolver.session()).signatures
    assert sig.result is PERMERROR
    assert sig.reason == "message header section is malformed"
    assert (sig.domain, sig.selector) == ("example.com", "s")


# -- bounds, none, header.b -----------------------------------------------------


def test_no_signature_gives_empty_outcome_and_no_queries(resolver: Resolver) -> None:
    session = resolver.session()
    assert verify_dkim(make_message(), session) == DKIMOutcome()
    assert session.log == []
    assert verify_dkim(b"", session) == DKIMOutcome()


def test_signatures_past_max_are_not_looked_up(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    signed = make_message()
    for selector in ("late1", "late2", "s", "s"):
        signed = dkim_sign(signed, "example.com", selector)
    session = resolver.session()
    outcome = verify_dkim(signed, session, max_signatures=2)
    assert [(s.selector, s.result) for s in outcome.signatures] == [
        ("s", PASS),
        ("s", PASS),
        ("late2", PERMERROR),
        ("late1", PERMERROR),
    ]
    assert outcome.signatures[2].reason == "too many signatures"
    assert outcome.signatures[2].domain == "example.com"
    assert _queries(session.log) == ["s._domainkey.example.com"] * 2


def test_header_b_is_first_eight_characters_of_b(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    dns_server.add_zone(dkim_zone("example.com", "a"))
    dns_server.add_zone(dkim_zone("example.com", "b"))
    signed = dkim_sign(dkim_sign(make_message(), "example.com", "a"), "example.com", "b")
    top, bottom = verify_dkim(signed, resolver.session()).signatures
    assert top.header_b == _b_value(signed)[:8]
    assert len(top.header_b) == len(bottom.header_b) == 8
    # RFC 6008: it tells apart two signatures from the same domain.
    assert top.header_b != bottom.header_b


def test_signing_kit_is_deterministic() -> None:
    """Golden outputs depend on byte-stable signatures from the fixed keys."""
    message = make_message()
    assert dkim_sign(message, "example.com", "s") == dkim_sign(message, "example.com", "s")
    assert _b_value(dkim_sign(message, "example.com", "s"))[:8] == "iem81HRW"
    assert _b_value(dkim_sign(message, "example.com", "s", "ed25519"))[:8] == "gbbsjh8Y"


def test_dkimpy_logs_nothing(
    dns_server: TestDNSServer, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signed = dkim_sign(make_message(), "example.com", "missing")
    verify_dkim(signed.replace(b"Quarterly", b"Monthly"), resolver.session())
    assert caplog.records == []


# -- canonicalisation and parsing stay dkimpy's, result for result ------------


def test_fast_paths_match_dkimpy_on_random_input() -> None:
    rng = random.Random(6376)
    pieces = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"B:", b"From ", b"x: y", b":", b"\xff"]
    for _ in range(4000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        assert relaxed_body(data) == Relaxed.canonicalize_body(data)
        pairs = [(b"X-H ", data), (b"Subject", data[::-1])]
        assert relaxed_headers(pairs) == Relaxed.canonicalize_headers(pairs)
        try:
            expected = dkim.rfc822_parse(data)
        except Exception as exc:
            with pytest.raises(type(exc)):
                parse_message(data)
        else:
            assert parse_message(data) == expected


def test_fast_paths_match_dkimpy_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tokens = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"K:", b"From ", b"\x00"])
    data = st.lists(tokens, max_size=40).map(b"".join) | st.binary(max_size=80)

    @hypothesis.settings(max_examples=600, deadline=None, database=None)
    @hypothesis.given(data)
    def check(raw: bytes) -> None:
        assert relaxed_body(raw) == Relaxed.canonicalize_body(raw)
        assert relaxed_headers([(b"N", raw)]) == Relaxed.canonicalize_headers([(b"N", raw)])
        try:
            expected = dkim.rfc822_parse(raw)
        except Exception as exc:
            with pytest.raises(type(exc)):
                parse_message(raw)
        else:
            assert parse_message(raw) == expected

    check()


# -- never raises -----------------------------------------------------------------


def _mutations(seed: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(data) + 1)
            choice = rng.randrange(4)
            if choice == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif choice == 1:
                data[pos:pos] = rng.choice([b";", b"=", b"\r\n", b"\n ", b"\x00", b"b=", b":"])
            elif choice == 2:
                del data[pos : pos + rng.randrange(1, 40)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        out.append(bytes(data))
    return out


def test_mutated_messages_never_raise(dns_server: TestDNSServer, resolver: Resolver) -> None:
    dns_server.add_zone(dkim_zone("example.com", "s"))
    dns_server.add_zone(dkim_zone("example.com", "ed", "ed25519"))
    seed = dkim_sign(dkim_sign(make_message(), "example.com", "s"), "example.com", "ed", "ed25519")
    session = resolver.session(budget=30.0)
    for data in _mutations(seed, random.Random(8601), 300):
        outcome = verify_dkim(data, session)
        assert isinstance(outcome, DKIMOutcome)
        assert all(isinstance(s.result, DKIMResultCode) for s in outcome.signatures)


def test_arbitrary_bytes_never_raise_property(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    dns_server.add_zone(dkim_zone("example.com", "s"))
    seed = dkim_sign(make_message(), "example.com", "s")
    session = resolver.session(budget=60.0)
    junk = st.binary(max_size=200)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(prefix=junk, cut=st.integers(0, len(seed)), insert=junk)
    def check(prefix: bytes, cut: int, insert: bytes) -> None:
        for data in (prefix, b"DKIM-Signature:" + prefix, seed[:cut] + insert + seed[cut:]):
            outcome = verify_dkim(data, session)
            assert isinstance(outcome, DKIMOutcome)

    check()


def test_key_record_larger_than_any_key_is_permerror(
    dns_server: TestDNSServer, resolver: Resolver
) -> None:
    # A real key record with an n= note padding it past 8 KiB: refused before
    # parsing, so an attacker's huge keys never enter the key cache.
    record = dkim_key_record() + "; n=" + "x" * 8000
    dns_server.set_zone(dkim_zone("example.com", "s1", record=record))
    message = dkim_sign(make_message(), "example.com", "s1")
    (sig,) = verify_dkim(message, resolver.session()).signatures
    assert sig.result is DKIMResultCode.PERMERROR
    assert sig.reason.startswith("key record too large")
    dns_server.set_zone(dkim_zone("example.com", "s1", record=dkim_key_record() + "; n=short"))
    resolver.clear_cache()
    (sig,) = verify_dkim(message, resolver.session()).signatures
    assert sig.result is DKIMResultCode.PASS


@hypothesis.given(
    st.lists(
        st.tuples(
            st.sampled_from([b"d", b" d ", b"dd", b"s", b"\r\n\td", b"", b"v"]),
            st.sampled_from([b"=", b" = ", b""]),
            st.sampled_from([b"example.com", b" Ex.ORG ", b"", b"a b", b"x.y;"]),
        ),
        max_size=6,
    )
)
@hypothesis.settings(derandomize=True, database=None, max_examples=300)
def test_signing_domain_is_the_first_d_tag(specs: list[tuple[bytes, bytes, bytes]]) -> None:
    # The quick d= scan that orders verification reads the signature as the
    # tag-list parser does.
    value = b";".join(name + eq + val for name, eq, val in specs)
    expected = domain_or_empty(loose_tags(value).get(b"d", b""))
    assert dkim_module._signing_domain(value) == expected
