"""Results from a trusted upstream host's Authentication-Results (RFC 8601 §5)."""

from __future__ import annotations

from dmarcmilter.results import DKIMResultCode, SPFResultCode, SPFScope
from dmarcmilter.upstream import upstream_results

TRUSTED = frozenset({"relay.internal.example"})


def test_only_a_trusted_authserv_id_counts() -> None:
    headers = [
        ("Authentication-Results", "evil.example; spf=pass smtp.mailfrom=a@example.com"),
        ("X-Other", "relay.internal.example; spf=pass smtp.mailfrom=a@example.com"),
    ]
    assert upstream_results(headers, TRUSTED, False) is None
    assert upstream_results(headers, frozenset(), False) is None


def test_spf_and_dkim_results_are_taken() -> None:
    headers = [
        ("Received", "from relay"),
        (
            "Authentication-Results",
            "Relay.Internal.Example.;\n\tspf=pass smtp.mailfrom=Bounce@Mail.Example.COM;\n"
            "\tspf=none smtp.helo=out.example;\n"
            "\tdkim=pass header.d=example.com header.s=s1 header.a=rsa-sha256 header.b=AbCd1234;\n"
            '\tdkim=fail reason="body hash mismatch" header.d=esp.example header.s=x;\n'
            "\tdmarc=pass header.from=example.com",
        ),
        # A lower (older) one from the same relay is not used.
        ("Authentication-Results", "relay.internal.example; spf=fail smtp.mailfrom=x@y.example"),
    ]
    upstream = upstream_results(headers, TRUSTED, False)
    assert upstream is not None
    assert upstream.authserv_id == "Relay.Internal.Example."
    assert upstream.spf is not None and upstream.dkim is not None
    mfrom = upstream.spf.mfrom
    assert (mfrom.result, mfrom.domain, mfrom.scope, mfrom.identity) == (
        SPFResultCode.PASS,
        "mail.example.com",
        SPFScope.MFROM,
        "Bounce@Mail.Example.COM",
    )
    assert upstream.spf.helo is not None and upstream.spf.helo.domain == "out.example"
    assert [(s.domain, s.selector, s.result, s.reason) for s in upstream.dkim.signatures] == [
        ("example.com", "s1", DKIMResultCode.PASS, ""),
        ("esp.example", "x", DKIMResultCode.FAIL, "body hash mismatch"),
    ]
    assert upstream.dkim.signatures[0].header_b == "AbCd1234"


def test_partial_results_leave_the_rest_to_us() -> None:
    only_dkim = [("Authentication-Results", "relay.internal.example; dkim=none")]
    upstream = upstream_results(only_dkim, TRUSTED, False)
    assert upstream is not None and upstream.spf is None
    assert upstream.dkim is not None and upstream.dkim.signatures == ()
    # A result name we cannot map (or only DMARC) means: check ourselves.
    nothing = [
        (
            "Authentication-Results",
            "relay.internal.example; spf=policy smtp.mailfrom=a@b.c; dmarc=pass",
        )
    ]
    assert upstream_results(nothing, TRUSTED, False) is None


def test_aliases_and_null_reverse_path() -> None:
    headers = [
        ("Authentication-Results", "relay.internal.example; spf=tempfail smtp.helo=mx.example")
    ]
    upstream = upstream_results(headers, TRUSTED, True)
    assert upstream is not None and upstream.spf is not None
    assert upstream.spf.null_reverse_path
    assert (upstream.spf.mfrom.result, upstream.spf.mfrom.domain) == (
        SPFResultCode.TEMPERROR,
        "mx.example",
    )
    # Without a null reverse-path a HELO result says nothing about MAIL FROM.
    assert upstream_results(headers, TRUSTED, False) is None


def test_malformed_and_unknown_versions_are_skipped() -> None:
    headers = [
        ("Authentication-Results", "relay.internal.example; spf=pass (unterminated"),
        ("Authentication-Results", "relay.internal.example 2; spf=pass smtp.mailfrom=a@b.example"),
    ]
    assert upstream_results(headers, TRUSTED, False) is None


def test_look_alike_ids_do_not_match() -> None:
    # U+212A KELVIN SIGN lowers to "k" in Python; it must not match.
    headers = [
        (
            "Authentication-Results",
            "relay.internal.e\u212aample; spf=pass smtp.mailfrom=a@b.example",
        )
    ]
    trusted = frozenset({"relay.internal.ekample"})
    assert upstream_results(headers, trusted, False) is None
