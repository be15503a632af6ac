"""Results from a trusted upstream host's Authentication-Results (RFC 8601 §5)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dmarcmilter.config import HeadersConfig
from dmarcmilter.evaluation import Envelope, UpstreamResults
from dmarcmilter.results import DKIMResultCode, SPFResultCode, SPFScope
from dmarcmilter.upstream import (
    UpstreamTrust,
    norm_id,
    own_ids,
    same_reverse_path,
    upstream_results,
)

RELAY_IP = "10.1.2.3"
TRUST = UpstreamTrust.from_config(
    HeadersConfig(
        trusted_authserv_ids=("relay.internal.example",),
        trusted_upstream_networks=("10.1.0.0/16", "fd00::/8"),
    )
)
TRUSTED = TRUST


def upstream(
    headers: Sequence[tuple[str, str]],
    trust: UpstreamTrust = TRUST,
    null_reverse_path: bool = False,
    *,
    ip: str = RELAY_IP,
    mail_from: str = "a@example.com",
    owned: frozenset[str] = frozenset(),
) -> UpstreamResults | None:
    envelope = Envelope.create(ip, "relay.internal.example", "" if null_reverse_path else mail_from)
    return upstream_results(headers, trust, envelope, owned)


def test_only_a_trusted_authserv_id_counts() -> None:
    headers = [
        ("Authentication-Results", "evil.example; spf=pass smtp.mailfrom=a@example.com"),
        ("X-Other", "relay.internal.example; spf=pass smtp.mailfrom=a@example.com"),
    ]
    assert upstream(headers) is None
    assert upstream(headers, UpstreamTrust()) is None


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
    found = upstream(headers, mail_from="Bounce@mail.example.com")
    assert found is not None
    assert found.authserv_id == "Relay.Internal.Example."
    assert found.spf is not None and found.dkim is not None
    mfrom = found.spf.mfrom
    assert (mfrom.result, mfrom.domain, mfrom.scope, mfrom.identity) == (
        SPFResultCode.PASS,
        "mail.example.com",
        SPFScope.MFROM,
        "Bounce@Mail.Example.COM",
    )
    assert found.spf.helo is not None and found.spf.helo.domain == "out.example"
    assert [(s.domain, s.selector, s.result, s.reason) for s in found.dkim.signatures] == [
        ("example.com", "s1", DKIMResultCode.PASS, ""),
        ("esp.example", "x", DKIMResultCode.FAIL, "body hash mismatch"),
    ]
    assert found.dkim.signatures[0].header_b == "AbCd1234"


def test_partial_results_leave_the_rest_to_us() -> None:
    only_dkim = [("Authentication-Results", "relay.internal.example; dkim=none")]
    found = upstream(only_dkim)
    assert found is not None and found.spf is None
    assert found.dkim is not None and found.dkim.signatures == ()
    # A result name we cannot map (or only DMARC) means: check ourselves.
    nothing = [
        (
            "Authentication-Results",
            "relay.internal.example; spf=policy smtp.mailfrom=a@b.c; dmarc=pass",
        )
    ]
    assert upstream(nothing) is None


def test_aliases_and_null_reverse_path() -> None:
    headers = [
        ("Authentication-Results", "relay.internal.example; spf=tempfail smtp.helo=mx.example")
    ]
    found = upstream(headers, null_reverse_path=True)
    assert found is not None and found.spf is not None
    assert found.spf.null_reverse_path
    assert (found.spf.mfrom.result, found.spf.mfrom.domain) == (
        SPFResultCode.TEMPERROR,
        "mx.example",
    )
    # Without a null reverse-path a HELO result says nothing about MAIL FROM.
    assert upstream(headers) is None


def test_malformed_and_unknown_versions_are_skipped() -> None:
    headers = [
        ("Authentication-Results", "relay.internal.example; spf=pass (unterminated"),
        ("Authentication-Results", "relay.internal.example 2; spf=pass smtp.mailfrom=a@b.example"),
    ]
    assert upstream(headers) is None


def test_look_alike_ids_do_not_match() -> None:
    # U+212A KELVIN SIGN lowers to "k" in Python; it must not match.
    headers = [
        (
            "Authentication-Results",
            "relay.internal.e\u212aample; spf=pass smtp.mailfrom=a@b.example",
        )
    ]
    trusted = UpstreamTrust(frozenset({"relay.internal.ekample"}), TRUST.networks)
    assert upstream(headers, trusted) is None


RELAY_AR = (
    "Authentication-Results",
    "relay.internal.example; spf=pass smtp.mailfrom=a@example.com; dkim=pass header.d=example.com",
)


@pytest.mark.parametrize(
    ("ip", "used"),
    [
        (RELAY_IP, True),
        ("10.1.255.254", True),
        ("fd00::25", True),
        ("10.2.0.1", False),  # outside the relay network
        ("203.0.113.66", False),  # any sender on the internet
        ("::ffff:10.1.2.3", False),  # a mapped address is another address
    ],
)
def test_only_a_client_in_the_upstream_networks_may_carry_results(ip: str, used: bool) -> None:
    assert (upstream([RELAY_AR], ip=ip) is not None) is used


def test_no_networks_no_upstream_trust() -> None:
    ids_only = UpstreamTrust(TRUST.ids, ())
    assert upstream([RELAY_AR], ids_only) is None


@pytest.mark.parametrize(
    ("recorded", "envelope", "same"),
    [
        ("a@example.com", "a@example.com", True),
        ("a@EXAMPLE.com.", "a@example.com", True),
        ("<a@example.com>", "a@example.com", True),
        ("example.com", "a@example.com", True),  # RFC 8601 §2.7.2: the domain alone
        ("a@bücher.example", "a@xn--bcher-kva.example", True),
        ("A@example.com", "a@example.com", False),  # local-parts are case-sensitive
        ("b@example.com", "a@example.com", False),
        ("a@example.com", "a@example.net", False),
        ("example.net", "a@example.com", False),
        ("a@example.com", "", False),  # the null reverse-path
        ("", "a@example.com", False),
        ("a@", "a@example.com", False),
    ],
)
def test_same_reverse_path(recorded: str, envelope: str, same: bool) -> None:
    assert same_reverse_path(recorded, envelope) is same


def test_an_spf_result_about_another_mail_from_is_not_used() -> None:
    # The relay recorded SPF for a@example.com; this transaction's MAIL FROM
    # is someone else's: check SPF ourselves, keep the relay's DKIM results.
    found = upstream([RELAY_AR], mail_from="spoof@evil.example")
    assert found is not None and found.spf is None
    assert found.dkim is not None and found.dkim.signatures[0].domain == "example.com"
    only_spf = [("Authentication-Results", "relay.internal.example; spf=pass smtp.mailfrom=a@b.c")]
    assert upstream(only_spf, mail_from="x@b.c") is None
    # A later spf= entry for the right address does not rescue the field.
    two = [
        (
            "Authentication-Results",
            "relay.internal.example; spf=pass smtp.mailfrom=x@evil.example;"
            " spf=pass smtp.mailfrom=a@example.com",
        )
    ]
    assert upstream(two) is None


@pytest.mark.parametrize(
    "our_names",
    [
        # The MTA's j name, the name we write, a configured owned id: each
        # also listed as trusted, the field is a forgery and is not used.
        ("relay.internal.example",),
        ("mx.receiver.example", "RELAY.internal.example."),
        ("relay.internal.\u212aample", "relay.internal.example"),
    ],
)
def test_an_id_that_is_ours_is_never_trusted(our_names: tuple[str, ...]) -> None:
    assert upstream([RELAY_AR], owned=own_ids(*our_names)) is None
    assert upstream([RELAY_AR], owned=own_ids("mx.receiver.example")) is not None


@pytest.mark.parametrize(
    "written",
    [
        "relay.\u212aiosk.example",  # Kelvin sign
        "relay\uff0ekiosk\uff0eexample",  # fullwidth full stops
        "\uff52elay.kiosk.example",  # fullwidth r
        "relay.ki\u00adosk.example",  # soft hyphen
        "relay.ki\u200dosk.example",  # zero width joiner
        "relay.kiosk.example\u3002",  # ideographic full stop
    ],
)
def test_trust_is_strict_while_stripping_is_broad(written: str) -> None:
    # Each of these is read as the relay's id by some consumer, so the act
    # step would remove it were it ours; none is trusted as the relay's.
    trust = UpstreamTrust(frozenset({"relay.kiosk.example"}), TRUST.networks)
    field = ("Authentication-Results", f"{written}; spf=pass smtp.mailfrom=a@example.com")
    assert upstream([field], trust) is None
    exact = ("Authentication-Results", "Relay.Kiosk.Example; spf=pass smtp.mailfrom=a@example.com")
    assert upstream([exact], trust) is not None
    assert norm_id(written) == norm_id("relay.kiosk.example")
