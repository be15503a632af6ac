"""Authentication-Results parsing: RFC 8601 §2.2 and Appendix B, the fields
real software writes, our own rendering read back, and malformed input."""

from __future__ import annotations

import datetime as dt
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarcmilter.authres.parse import (
    MAX_AUTHSERV_ID_CHARS,
    MAX_RESULTS,
    MAX_VALUE_OCTETS,
    AuthResSyntaxError,
    AuthResults,
    ResInfo,
    authserv_id_key,
    authserv_id_of,
    claims_authserv_id,
    domain_part,
    parse,
    same_authserv_id,
    same_domain,
    trusted_id_key,
)
from dmarcmilter.authres.render import quote_value, render
from dmarcmilter.dmarc import DMARCOutcome, DMARCResultCode, SPFVerdict
from dmarcmilter.errors import InputError
from dmarcmilter.evaluation import Envelope, Evaluation
from dmarcmilter.results import (
    ARCOutcome,
    AuthorResult,
    AuthorStatus,
    DKIMOutcome,
    DKIMResultCode,
    DKIMSignatureResult,
    SPFOutcome,
    SPFResult,
    SPFResultCode,
    SPFScope,
)

GOLDEN = Path(__file__).resolve().parent / "golden"


def ri(method: str, result: str, *props: tuple[str, str], reason: str | None = None) -> ResInfo:
    return ResInfo(method, result, reason, tuple(props))


# -- RFC 8601 Appendix B ---------------------------------------------------------------------

APPENDIX_B: list[tuple[str, str, AuthResults]] = [
    ("B.2", "example.org 1; none", AuthResults("example.org", 1, ())),
    (
        "B.3",
        "example.com;\r\n          spf=pass smtp.mailfrom=example.net",
        AuthResults("example.com", None, (ri("spf", "pass", ("smtp.mailfrom", "example.net")),)),
    ),
    (
        "B.4 first",
        "example.com;\r\n          auth=pass (cram-md5) smtp.auth=sender@example.net;\r\n"
        "          spf=pass smtp.mailfrom=example.net",
        AuthResults(
            "example.com",
            None,
            (
                ri("auth", "pass", ("smtp.auth", "sender@example.net")),
                ri("spf", "pass", ("smtp.mailfrom", "example.net")),
            ),
        ),
    ),
    (
        "B.4 second",
        "example.com; iprev=pass\r\n          policy.iprev=192.0.2.200",
        AuthResults("example.com", None, (ri("iprev", "pass", ("policy.iprev", "192.0.2.200")),)),
    ),
    (
        "B.5 first",
        "example.com;\r\n          dkim=pass (good signature) header.d=example.com",
        AuthResults("example.com", None, (ri("dkim", "pass", ("header.d", "example.com")),)),
    ),
    (
        "B.5 second",
        "example.com;\r\n          auth=pass (cram-md5) smtp.auth=sender@example.com;\r\n"
        "          spf=fail smtp.mailfrom=example.com",
        AuthResults(
            "example.com",
            None,
            (
                ri("auth", "pass", ("smtp.auth", "sender@example.com")),
                ri("spf", "fail", ("smtp.mailfrom", "example.com")),
            ),
        ),
    ),
    (
        "B.6 first",
        'example.com;\r\n      dkim=pass reason="good signature"\r\n'
        "        header.i=@mail-router.example.net;\r\n"
        '      dkim=fail reason="bad signature"\r\n'
        "        header.i=@newyork.example.com",
        AuthResults(
            "example.com",
            None,
            (
                ri(
                    "dkim",
                    "pass",
                    ("header.i", "@mail-router.example.net"),
                    reason="good signature",
                ),
                ri("dkim", "fail", ("header.i", "@newyork.example.com"), reason="bad signature"),
            ),
        ),
    ),
    (
        "B.6 second",
        "example.net;\r\n      dkim=pass (good signature) header.i=@newyork.example.com",
        AuthResults(
            "example.net", None, (ri("dkim", "pass", ("header.i", "@newyork.example.com")),)
        ),
    ),
    (
        "B.7",
        "foo.example.net (foobar) 1 (baz);\r\n"
        "    dkim (Because I like it) / 1 (One yay) = (wait for it) fail\r\n"
        "      policy (A dot can go here) . (like that) expired\r\n"
        "      (this surprised me) = (as I wasn't expecting it) 1362471462",
        AuthResults("foo.example.net", 1, (ri("dkim", "fail", ("policy.expired", "1362471462")),)),
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _, v, e in APPENDIX_B], ids=[i for i, _, _ in APPENDIX_B]
)
def test_rfc8601_appendix_b(value: str, expected: AuthResults) -> None:
    assert parse(value) == expected
    assert authserv_id_of(value) == expected.authserv_id
    # The milter hands over folds as a bare LF.
    assert parse(value.replace("\r\n", "\n")) == expected


# -- fields as real software writes them -----------------------------------------------------

GMAIL = (
    "mx.google.com;\n"
    "       dkim=pass header.i=@example.com header.s=20230601 header.b=Wq3/Fz+a;\n"
    "       arc=pass (i=1 spf=pass spfdomain=example.com dkim=pass dkdomain=example.com"
    " dmarc=pass fromdomain=example.com);\n"
    "       spf=pass (google.com: domain of bounce@example.com designates 209.85.220.41 as"
    " permitted sender) smtp.mailfrom=bounce@example.com;\n"
    "       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=example.com;\n"
    "       dara=pass header.i=@example.com"
)

# Exchange Online writes no authserv-id at all.
MICROSOFT = (
    "spf=pass (sender IP is 209.85.128.41)\n"
    " smtp.mailfrom=example.com; dkim=pass (signature was verified)\n"
    " header.d=example.com;dmarc=pass action=none header.from=example.com;compauth=pass\n"
    " reason=100"
)
MICROSOFT_UNSIGNED = (
    "spf=fail (sender IP is 198.51.100.7) smtp.mailfrom=example.com; dkim=none (message not"
    " signed) header.d=none;dmarc=fail action=oreject header.from=example.com;compauth=fail"
    " reason=000;"
)
# ...but its ARC-Authentication-Results payloads (after "i=1;") have one.
MICROSOFT_AAR = (
    "mx.microsoft.com 1; spf=pass\n smtp.mailfrom=example.com; dmarc=pass action=none\n"
    " header.from=example.com; dkim=pass header.d=example.com; arc=none"
)

OPENDKIM = (
    "mail.example.net;\n\tdkim=pass (2048-bit key; unprotected) header.d=example.com"
    " header.i=@example.com header.a=rsa-sha256 header.s=mail header.b=Ab+/cD9e;\n"
    "\tdkim-atps=neutral"
)
OPENDMARC = "mail.example.net; dmarc=fail (p=reject dis=quarantine) header.from=example.com"

AUTHENTICATION_MILTER = (
    "mx.example.net;\n"
    "    dkim=pass (2048-bit rsa key sha256) header.d=example.com header.i=@example.com\n"
    "      header.b=Ab/Cd+Ef header.a=rsa-sha256 header.s=fm1 x-bits=2048;\n"
    "    dmarc=pass policy.published-domain-policy=reject\n"
    "      policy.applied-disposition=none policy.evaluated-disposition=none\n"
    "      (p=reject,d=none,d.eval=none) policy.policy-from=p header.from=example.com;\n"
    "    iprev=pass smtp.remote-ip=2001:db8::25 (mail.example.com);\n"
    "    spf=pass smtp.mailfrom=bounce@example.com smtp.helo=mail.example.com;\n"
    "    x-aligned-from=pass (Address match);\n"
    "    x-return-mx=pass header.domain=example.com policy.is_org=yes (MX Records found);\n"
    "    x-tls=pass smtp.version=TLSv1.3 smtp.cipher=TLS_AES_256_GCM_SHA384 smtp.bits=256/256"
)

RSPAMD = (
    "mx.example.net;\n"
    '\tdkim=pass header.d=example.com header.s=dkim header.b="AbCd/EfG";\n'
    '\tspf=pass (mx.example.net: domain of "bounce+tag"@example.com designates 192.0.2.1 as'
    ' permitted sender) smtp.mailfrom="bounce+tag"@example.com;\n'
    "\tdmarc=pass (policy=reject) header.from=example.com;\n"
    '\tarc=pass ("example.com:s=arc-2024:i=1")'
)

EXIM = (
    "mx.example.net;\n"
    "\tiprev=pass (mail.example.com) smtp.remote-ip=192.0.2.1;\n"
    "\tspf=pass smtp.mailfrom=example.com;\n"
    "\tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256;\n"
    "\tdmarc=pass header.from=example.com;\n"
    "\tarc=none"
)

# RFC 6532: UTF-8 in values.
UTF8 = (
    "mx.例え.jp;\n spf=pass smtp.mailfrom=用户@例子.广告;\n"
    ' dmarc=pass reason="Übereinstimmung" header.from=bücher.example'
)

REAL_WORLD: list[tuple[str, str, AuthResults]] = [
    (
        "gmail",
        GMAIL,
        AuthResults(
            "mx.google.com",
            None,
            (
                ri(
                    "dkim",
                    "pass",
                    ("header.i", "@example.com"),
                    ("header.s", "20230601"),
                    ("header.b", "Wq3/Fz+a"),
                ),
                ri("arc", "pass"),
                ri("spf", "pass", ("smtp.mailfrom", "bounce@example.com")),
                ri("dmarc", "pass", ("header.from", "example.com")),
                ri("dara", "pass", ("header.i", "@example.com")),
            ),
        ),
    ),
    (
        "microsoft",
        MICROSOFT,
        AuthResults(
            "",
            None,
            (
                ri("spf", "pass", ("smtp.mailfrom", "example.com")),
                ri("dkim", "pass", ("header.d", "example.com")),
                ri("dmarc", "pass", ("action", "none"), ("header.from", "example.com")),
                ri("compauth", "pass", reason="100"),
            ),
        ),
    ),
    (
        "microsoft unsigned",
        MICROSOFT_UNSIGNED,
        AuthResults(
            "",
            None,
            (
                ri("spf", "fail", ("smtp.mailfrom", "example.com")),
                ri("dkim", "none", ("header.d", "none")),
                ri("dmarc", "fail", ("action", "oreject"), ("header.from", "example.com")),
                ri("compauth", "fail", reason="000"),
            ),
        ),
    ),
    (
        "microsoft arc",
        MICROSOFT_AAR,
        AuthResults(
            "mx.microsoft.com",
            1,
            (
                ri("spf", "pass", ("smtp.mailfrom", "example.com")),
                ri("dmarc", "pass", ("action", "none"), ("header.from", "example.com")),
                ri("dkim", "pass", ("header.d", "example.com")),
                ri("arc", "none"),
            ),
        ),
    ),
    (
        "opendkim",
        OPENDKIM,
        AuthResults(
            "mail.example.net",
            None,
            (
                ri(
                    "dkim",
                    "pass",
                    ("header.d", "example.com"),
                    ("header.i", "@example.com"),
                    ("header.a", "rsa-sha256"),
                    ("header.s", "mail"),
                    ("header.b", "Ab+/cD9e"),
                ),
                ri("dkim-atps", "neutral"),
            ),
        ),
    ),
    (
        "opendmarc",
        OPENDMARC,
        AuthResults(
            "mail.example.net", None, (ri("dmarc", "fail", ("header.from", "example.com")),)
        ),
    ),
    (
        "authentication_milter",
        AUTHENTICATION_MILTER,
        AuthResults(
            "mx.example.net",
            None,
            (
                ri(
                    "dkim",
                    "pass",
                    ("header.d", "example.com"),
                    ("header.i", "@example.com"),
                    ("header.b", "Ab/Cd+Ef"),
                    ("header.a", "rsa-sha256"),
                    ("header.s", "fm1"),
                    ("x-bits", "2048"),
                ),
                ri(
                    "dmarc",
                    "pass",
                    ("policy.published-domain-policy", "reject"),
                    ("policy.applied-disposition", "none"),
                    ("policy.evaluated-disposition", "none"),
                    ("policy.policy-from", "p"),
                    ("header.from", "example.com"),
                ),
                ri("iprev", "pass", ("smtp.remote-ip", "2001:db8::25")),
                ri(
                    "spf",
                    "pass",
                    ("smtp.mailfrom", "bounce@example.com"),
                    ("smtp.helo", "mail.example.com"),
                ),
                ri("x-aligned-from", "pass"),
                ri(
                    "x-return-mx",
                    "pass",
                    ("header.domain", "example.com"),
                    ("policy.is_org", "yes"),
                ),
                ri(
                    "x-tls",
                    "pass",
                    ("smtp.version", "TLSv1.3"),
                    ("smtp.cipher", "TLS_AES_256_GCM_SHA384"),
                    ("smtp.bits", "256/256"),
                ),
            ),
        ),
    ),
    (
        "rspamd",
        RSPAMD,
        AuthResults(
            "mx.example.net",
            None,
            (
                ri(
                    "dkim",
                    "pass",
                    ("header.d", "example.com"),
                    ("header.s", "dkim"),
                    ("header.b", "AbCd/EfG"),
                ),
                ri("spf", "pass", ("smtp.mailfrom", '"bounce+tag"@example.com')),
                ri("dmarc", "pass", ("header.from", "example.com")),
                ri("arc", "pass"),
            ),
        ),
    ),
    (
        "exim",
        EXIM,
        AuthResults(
            "mx.example.net",
            None,
            (
                ri("iprev", "pass", ("smtp.remote-ip", "192.0.2.1")),
                ri("spf", "pass", ("smtp.mailfrom", "example.com")),
                ri(
                    "dkim",
                    "pass",
                    ("header.d", "example.com"),
                    ("header.s", "sel"),
                    ("header.a", "rsa-sha256"),
                ),
                ri("dmarc", "pass", ("header.from", "example.com")),
                ri("arc", "none"),
            ),
        ),
    ),
    (
        "utf-8",
        UTF8,
        AuthResults(
            "mx.例え.jp",
            None,
            (
                ri("spf", "pass", ("smtp.mailfrom", "用户@例子.广告")),
                ri("dmarc", "pass", ("header.from", "bücher.example"), reason="Übereinstimmung"),
            ),
        ),
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _, v, e in REAL_WORLD], ids=[i for i, _, _ in REAL_WORLD]
)
def test_real_world_fields(value: str, expected: AuthResults) -> None:
    assert parse(value) == expected
    assert authserv_id_of(value) == (expected.authserv_id or None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Keywords are case-insensitive; values keep their case.
        (
            "Example.ORG; SPF=Pass SMTP.MailFrom=User@Example.NET",
            AuthResults(
                "Example.ORG", None, (ri("spf", "pass", ("smtp.mailfrom", "User@Example.NET")),)
            ),
        ),
        # A trailing ";", doubled ";", no space anywhere it could be left out.
        (
            "example.org;spf=pass(ok)smtp.mailfrom=example.net;;dkim=none;",
            AuthResults(
                "example.org",
                None,
                (ri("spf", "pass", ("smtp.mailfrom", "example.net")), ri("dkim", "none")),
            ),
        ),
        # No CFWS after a quoted reason.
        (
            'example.org; dkim=fail reason="bad"header.d=example.net',
            AuthResults(
                "example.org",
                None,
                (ri("dkim", "fail", ("header.d", "example.net"), reason="bad"),),
            ),
        ),
        # reason after the properties; only the first reason counts.
        (
            "example.org; dkim=fail header.d=example.net reason=first reason=second",
            AuthResults(
                "example.org",
                None,
                (ri("dkim", "fail", ("header.d", "example.net"), reason="first"),),
            ),
        ),
        # A method version is dropped; CFWS may surround "=".
        (
            "example.org; dkim/1 = pass header.d = example.net",
            AuthResults("example.org", None, (ri("dkim", "pass", ("header.d", "example.net")),)),
        ),
        # Quoted-string authserv-id and values, with quoted-pairs.
        (
            r'"mx.example.org"; dkim=fail reason="a \"quoted\" \\ word" header.d="example.net"',
            AuthResults(
                "mx.example.org",
                None,
                (ri("dkim", "fail", ("header.d", "example.net"), reason='a "quoted" \\ word'),),
            ),
        ),
        # Empty values, quoted or not.
        (
            'example.org; spf=none smtp.mailfrom=""; dkim=none header.d=',
            AuthResults(
                "example.org",
                None,
                (ri("spf", "none", ("smtp.mailfrom", "")), ri("dkim", "none", ("header.d", ""))),
            ),
        ),
        # Base64 header.b, unquoted despite its tspecials.
        (
            "example.org; dkim=pass header.b=ab+/cd==",
            AuthResults("example.org", None, (ri("dkim", "pass", ("header.b", "ab+/cd==")),)),
        ),
        # Nested comments with quoted-pairs, a ";" and a "(" inside.
        (
            r"example.org (a (nested \) one; x=y) \( z) ; spf=pass (so ( \( ) good)",
            AuthResults("example.org", None, (ri("spf", "pass"),)),
        ),
        # Only an authserv-id, with or without a version or ";".
        ("example.org", AuthResults("example.org", None, ())),
        ("example.org 1", AuthResults("example.org", 1, ())),
        ("example.org;", AuthResults("example.org", None, ())),
        ("example.org ; NONE (nothing done)", AuthResults("example.org", None, ())),
        # An unknown version is reported, for the caller to ignore the field.
        ("example.org 2; spf=pass", AuthResults("example.org", 2, (ri("spf", "pass"),))),
        # A dotless authserv-id (not followed by "=") is still one.
        ("localhost; spf=pass", AuthResults("localhost", None, (ri("spf", "pass"),))),
        # Folding anywhere CFWS may be, CRLF or bare LF, and a final CRLF.
        (
            "\r\n\texample.org\r\n 1\r\n\t;\n\tspf\n =\n pass"
            "\n smtp\n .\n mailfrom\n =\n example.net\r\n",
            AuthResults("example.org", 1, (ri("spf", "pass", ("smtp.mailfrom", "example.net")),)),
        ),
        # A fold inside a quoted-string unfolds to its WSP.
        (
            'example.org; dkim=fail reason="two\r\n words"',
            AuthResults("example.org", None, (ri("dkim", "fail", reason="two words"),)),
        ),
    ],
)
def test_lenient_and_edge_forms(value: str, expected: AuthResults) -> None:
    assert parse(value) == expected


def test_resinfo_get_and_by_method() -> None:
    parsed = parse(GMAIL)
    dkim = parsed.results[0]
    assert dkim.get("header.i") == "@example.com"
    assert dkim.get("HEADER.S") == "20230601"
    assert dkim.get("header.d") is None
    assert [r.result for r in parsed.by_method("DMARC")] == ["pass"]
    assert parsed.by_method("bimi") == ()
    # get returns the first of repeated properties.
    assert parse("x; m=r a.b=1 a.b=2").results[0].get("a.b") == "1"


def test_arc_authentication_results_payload() -> None:
    # As ARCHop.authentication_results holds it: the AAR value after "i=N;".
    parsed = parse(
        "lists.example.net; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"
    )
    assert parsed.authserv_id == "lists.example.net"
    (dmarc,) = parsed.by_method("dmarc")
    assert same_domain(dmarc.get("header.from") or "", "EXAMPLE.com.")


# -- our own rendering, read back ------------------------------------------------------------


def _golden_fields() -> list[tuple[str, str]]:
    fields = []
    for path in sorted(GOLDEN.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        match = re.match(r"Authentication-Results:((?:.*\n)(?:[ \t].*\n)*)", text)
        assert match is not None, path
        fields.append((path.stem, match.group(1)))
    return fields


@pytest.mark.parametrize(("name", "value"), _golden_fields())
def test_golden_headers_parse(name: str, value: str) -> None:
    parsed = parse(value)
    assert parsed.authserv_id == "mx.receiver.example"
    assert parsed.version is None
    # Every resinfo of the field, in order, with its method and result.
    written = re.findall(r"^\s*([a-z]+)=([a-z]+)", value.partition(";")[2], re.MULTILINE)
    assert [(r.method, r.result) for r in parsed.results] == written
    assert parsed.results[-1].method == "dmarc"


def test_golden_header_details() -> None:
    fields = dict(_golden_fields())
    parsed = parse(fields["pass_dkim_spf"])
    assert parsed.results == (
        ri("spf", "pass", ("smtp.mailfrom", "bounce.example.com")),
        ri("spf", "pass", ("smtp.helo", "mx.example.com")),
        ri(
            "dkim",
            "pass",
            ("header.d", "example.com"),
            ("header.s", "s1"),
            ("header.a", "rsa-sha256"),
            ("header.b", "hRIdULfB"),
        ),
        ri("arc", "none"),
        ri("dmarc", "pass", ("policy.dmarc", "reject"), ("header.from", "example.com")),
    )
    dmarc = parse(fields["multiple_from_rejected"]).results[-1]
    assert dmarc.reason == "2 From fields, exactly one is allowed"
    dmarc = parse(fields["temperror_policy_timeout"]).results[-1]
    assert dmarc.reason == "_dmarc.slow.example TXT timeout: query timed out"
    assert dmarc.get("header.from") == "slow.example"
    spf = parse(fields["null_mail_from"]).results[0]
    assert spf.get("smtp.mailfrom") == "postmaster@mx.example.com"


def _evaluation(reason: str, header_b: str = "ab/+=CD") -> Evaluation:
    """An Evaluation built by hand, with ``reason`` wherever render writes one."""
    mfrom = SPFResult(SPFResultCode.PERMERROR, "", SPFScope.MFROM, reason)
    helo = SPFResult(SPFResultCode.PASS, "mx.example.com", SPFScope.HELO)
    signature = DKIMSignatureResult(
        "example.com", "s1", DKIMResultCode.FAIL, reason, "rsa-sha256", "", header_b
    )
    dmarc = DMARCOutcome(
        DMARCResultCode.TEMPERROR, "example.com", None, None, SPFVerdict(mfrom), (), reason=reason
    )
    return Evaluation(
        envelope=Envelope("192.0.2.1", "mx.example.com", "bounce@example.com"),
        author=AuthorResult(AuthorStatus.OK, "example.com", ("a@example.com",)),
        spf=SPFOutcome(mfrom, helo),
        dkim=DKIMOutcome((signature,)),
        arc=ARCOutcome(),
        dmarc=dmarc,
        evaluated_at=dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC),
    )


def test_render_round_trip() -> None:
    reason = 'odd "quoted" \\ text; with (parens) and a=b'
    value = render(_evaluation(reason), "mx.receiver.example")
    parsed = parse(value)
    assert parsed.authserv_id == "mx.receiver.example"
    assert parsed.results == (
        ri("spf", "permerror", reason=reason),
        ri("spf", "pass", ("smtp.helo", "mx.example.com")),
        ri(
            "dkim",
            "fail",
            ("header.d", "example.com"),
            ("header.s", "s1"),
            ("header.a", "rsa-sha256"),
            ("header.b", "ab/+=CD"),
            reason=reason,
        ),
        ri("arc", "none"),
        ri("dmarc", "temperror", ("header.from", "example.com"), reason=reason),
    )


_PRINTABLE = string.printable.replace("\n", "").replace("\r", "").replace("\x0b", "")
_PRINTABLE = _PRINTABLE.replace("\x0c", "")


@settings(database=None, max_examples=200)
@given(st.text(alphabet=_PRINTABLE.replace("\t", ""), max_size=150), st.text(max_size=60))
def test_render_round_trip_property(reason: str, anything: str) -> None:
    # Printable reasons come back exactly; any other text still renders to
    # something that parses.
    parsed = parse(render(_evaluation(reason), "mx.receiver.example"))
    assert [r.reason for r in parsed.results if r.method == "dmarc"] == [reason or None]
    assert len(parse(render(_evaluation(anything), "mx.receiver.example")).results) == 5


@settings(database=None, max_examples=300)
@given(st.text(alphabet=_PRINTABLE, max_size=40))
def test_quote_value_round_trip(text: str) -> None:
    parsed = parse(f"x; m=r reason={quote_value(text)} p.v={quote_value(text)}")
    assert parsed.results == (ri("m", "r", ("p.v", text), reason=text),)


# -- structured generation: anything the ABNF allows ----------------------------------------

_GAP = st.sampled_from(["", " ", "\t", "\r\n\t", "\n ", "(c)", " (a;b=c (d) \\)) "])
_SEP = st.sampled_from([" ", "\t", "\r\n ", "\n\t", "(c)", " (x=y; z) "])
_KW = st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,8}", fullmatch=True).filter(
    lambda k: k.lower() not in ("reason", "none")
)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


@st.composite
def _fields(draw: st.DrawFn) -> tuple[str, AuthResults]:
    labels = draw(st.lists(_LABEL, min_size=2, max_size=4))
    authserv_id = ".".join(labels)
    text = draw(_GAP) + authserv_id
    version = draw(st.none() | st.integers(0, 999))
    if version is not None:
        text += draw(_SEP) + str(version) + draw(_GAP)
    results = []
    for _ in range(draw(st.integers(0, 4))):
        method, result = draw(_KW), draw(_KW)
        text += draw(_GAP) + ";" + draw(_GAP) + method
        if draw(st.booleans()):
            text += draw(_GAP) + "/" + draw(_GAP) + "1"
        text += draw(_GAP) + "=" + draw(_GAP) + result
        reason = draw(st.none() | st.text(alphabet=_PRINTABLE, max_size=20))
        if reason is not None:
            text += draw(_SEP) + "reason" + draw(_GAP) + "=" + draw(_GAP) + quote_value(reason)
        props = []
        for _ in range(draw(st.integers(0, 3))):
            ptype, prop = draw(_KW), draw(_KW)
            value = draw(st.text(alphabet=_PRINTABLE, max_size=20))
            text += draw(_SEP) + ptype + draw(_GAP) + "." + draw(_GAP) + prop
            text += draw(_GAP) + "=" + draw(_GAP) + quote_value(value)
            props.append((f"{ptype}.{prop}".lower(), value))
        results.append(ResInfo(method.lower(), result.lower(), reason, tuple(props)))
    if not results and draw(st.booleans()):
        text += draw(_GAP) + ";" + draw(_GAP) + "none"
    text += draw(_GAP) + draw(st.sampled_from(["", ";", "\r\n"]))
    return text, AuthResults(authserv_id, version, tuple(results))


@settings(database=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_fields())
def test_generated_fields_parse(field: tuple[str, AuthResults]) -> None:
    text, expected = field
    assert parse(text) == expected
    assert authserv_id_of(text) == expected.authserv_id


# -- malformed input -------------------------------------------------------------------------

GARBAGE = b"\xff\xfe\x00\x01garbage;=".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no authserv-id"),
        ("   \r\n\t", "no authserv-id"),
        ("(only a comment)", "no authserv-id"),
        ("(one (nested) comment) (and another)", "no authserv-id"),
        (" ; spf=pass", "no authserv-id, found ';'"),
        ("example.org (unterminated; spf=pass", "unterminated comment"),
        ("example.org; spf=pass (unterminated (nested) comment", "unterminated comment"),
        ('"example.org; spf=pass', "unterminated quoted-string"),
        ('example.org; dkim=fail reason="unterminated', "unterminated quoted-string"),
        ('example.org; dkim=fail reason="ends in \\', "unterminated quoted-string"),
        ("example.org; spf pass", "expected '=' after method 'spf'"),
        ("example.org; spf", "expected '=' after method 'spf'"),
        ("example.org; spf=", "expected a result for method 'spf'"),
        ("example.org; =pass", "expected a method, found '='"),
        ("example.org; spf=pass smtp.mailfrom", "expected '=' after 'smtp.mailfrom'"),
        ("example.org; spf=pass smtp.mailfrom example.net", "expected '=' after 'smtp.mailfrom'"),
        ("example.org; spf=pass smtp.=x", "expected a property name, found '='"),
        ("example.org; spf=pass )", "expected a property, found ')'"),
        ("example.org; spf=pass, dkim=pass", "expected a property, found ','"),
        ("example.org spf=pass", "expected ';' after the authserv-id, found 's'"),
        ("example.org 1x; none", "malformed authres-version"),
        ("example.org 12345678901234567890; none", "malformed authres-version"),
        ("example.org; dkim/x=pass", "malformed version of method 'dkim'"),
        ("example.org; none/1", "expected '=' after method 'none'"),
        ("example.org; spf=pass smtp.mailfrom=(c))", "expected a value, found ')'"),
        ('example.org; dkim=fail reason="a\x00b"', "'\\x00' in a quoted-string"),
        ('example.org; dkim=fail reason="a\\\x07"', "'\\x07' in a quoted-string"),
        ('example.org; dkim=fail reason="\udcff"', "a byte that is not UTF-8 in a quoted-string"),
        ("example.org; spf=pass smtp.mailfrom=a\udcffb", "found a byte that is not UTF-8"),
        (GARBAGE, "no authserv-id, found a byte that is not UTF-8"),
        ("\x00\x01\x02", "no authserv-id, found '\\x00'"),
    ],
)
def test_malformed(value: str, message: str) -> None:
    with pytest.raises(AuthResSyntaxError, match=re.escape(message)):
        parse(value)


def test_syntax_error_is_an_input_error() -> None:
    assert issubclass(AuthResSyntaxError, InputError)


def test_limits() -> None:
    many = "x;" + ";".join(["spf=pass"] * MAX_RESULTS)
    assert len(parse(many).results) == MAX_RESULTS
    with pytest.raises(AuthResSyntaxError, match=f"more than {MAX_RESULTS} results"):
        parse(many + "; dkim=pass")
    # Empty results and "none" do not count.
    assert len(parse(many + ";;; none;").results) == MAX_RESULTS

    padding = " " * (MAX_VALUE_OCTETS - len("example.org; none"))
    assert parse("example.org; none" + padding).authserv_id == "example.org"
    with pytest.raises(AuthResSyntaxError, match="longer than"):
        parse("example.org; none " + padding)
    # The limit is in octets: 3 per character here.
    wide = "example.org; dkim=pass reason=" + "例" * (MAX_VALUE_OCTETS // 3)
    with pytest.raises(AuthResSyntaxError, match="longer than"):
        parse(wide)


def test_deep_comment_nesting_has_no_recursion() -> None:
    depth = 15000
    value = "(" * depth + ")" * depth + " example.org; spf=pass (" + "(" * depth + ")" * (depth + 1)
    assert parse(value) == AuthResults("example.org", None, (ri("spf", "pass"),))
    assert authserv_id_of(value) == "example.org"


# -- authserv_id_of: the id even when the rest is malformed ----------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ours.example; spf pass", "ours.example"),
        ("ours.example (unterminated", "ours.example"),
        ('ours.example; dkim=pass reason="unterminated', "ours.example"),
        ("  (c) ours.example 1; \x00\x00", "ours.example"),
        ("\r\n\tOURS.example.\r\n\t; spf=pass", "OURS.example."),
        ('"ours.example" junk', "ours.example"),
        ("ours.example\x00; spf=pass", "ours.example"),
        # The token stops at bytes that are not UTF-8: what precedes counts.
        ("ours.example\udcff; spf=pass", "ours.example"),
        ("localhost spf=pass", "localhost"),
        ("ours.example/1; spf=pass", "ours.example"),
        # No authserv-id.
        ("", None),
        ("(only a comment)", None),
        ("(unterminated ours.example; spf=pass", None),
        ('"unterminated ours.example; spf=pass', None),
        ('""; spf=pass', None),
        ("; spf=pass", None),
        (GARBAGE, None),
        # A field that starts with a result has none (Exchange Online).
        ("spf=pass smtp.mailfrom=example.com", None),
        ("dkim (c) / 1 = pass", None),
    ],
)
def test_authserv_id_of(value: str, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


# -- comparisons -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("mx.example.org", "mx.example.org", True),
        ("MX.Example.ORG.", "mx.example.org", True),
        (" mx.example.org", "mx.example.org..", True),
        ("mx.example.org", "mx.example.org.uk", False),
        ("", "", False),
        (".", "", False),
        # Only ASCII letters fold: the Kelvin sign is not "k".
        ("mx.\u212aexample", "mx.kexample", False),
        ("MX.ÉXAMPLE", "mx.éxample", False),
        ("mx.éxample", "mx.éxample", True),
    ],
)
def test_same_authserv_id(a: str, b: str, same: bool) -> None:
    assert same_authserv_id(a, b) is same
    assert same_authserv_id(b, a) is same


OURS = frozenset({authserv_id_key("mx.kiosk.example"), authserv_id_key("xn--bcher-kva.example")})


@pytest.mark.parametrize(
    "written",
    [
        "mx.kiosk.example",
        "MX.Kiosk.Example.",
        "mx.kiosk.example..",
        " mx.kiosk.example ",
        "mx.\u212aiosk.example",  # KELVIN SIGN: Unicode lower-casing gives "k"
        "mx\uff0ekiosk\uff0eexample",  # FULLWIDTH FULL STOP
        "mx\u3002kiosk\uff61example",  # ideographic and halfwidth ideographic full stops
        "\uff4d\uff58.kiosk.example",  # fullwidth letters
        "\uff2d\uff38.KIOSK.example",  # fullwidth capitals
        "mx.ki\u00adosk.example",  # SOFT HYPHEN, mapped to nothing by IDNA
        "mx.ki\u200cosk.example",  # ZERO WIDTH NON-JOINER
        "mx.ki\u200dosk.example",  # ZERO WIDTH JOINER
        "mx.kiosk\u2060.example",  # WORD JOINER
        "\ufeffmx.kiosk.example",  # BYTE ORDER MARK
        "mx.kio\ufe0fsk.example",  # VARIATION SELECTOR-16
        "mx.kiosk.example\uff0e",  # a fullwidth trailing dot
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.EXAMPLE.",
        "b\u00fccher.example",  # the U-label of the A-label we own
        "B\u00dcCHER.example",
        "bu\u0308cher.example",  # decomposed: NFKC composes it
        "\uff58\uff4e--bcher-kva.example",  # a fullwidth "xn"
        "x" * (MAX_AUTHSERV_ID_CHARS + 1),  # too long to examine: counts as ours
        "mx.kiosk.example" + "\u00ad" * MAX_AUTHSERV_ID_CHARS,
        "mx.kiosk.example" + "\u200b" * 200,  # padding within the bound is folded away
    ],
)
def test_every_spelling_a_reader_may_take_for_our_id_claims_it(written: str) -> None:
    assert claims_authserv_id(written, OURS)
    # Broad for stripping, strict for trusting: only ASCII may be trusted.
    if not written.isascii():
        assert trusted_id_key(written) is None


@pytest.mark.parametrize(
    "written",
    [
        "",
        "mx.kiosk.example.org",
        "mx.kiosk-example",
        "mx-kiosk.example",
        "mx.k1osk.example",
        "xn--bcher-kvb.example",
        "xn--zzzz-.example",  # punycode that decodes to something else
        "xn--" + "a" * 100 + ".example",  # too long to be an A-label: not decoded
        "mx.кiosk.example",  # CYRILLIC KA: a homoglyph, not a mapping
    ],
)
def test_other_ids_do_not_claim_ours(written: str) -> None:
    assert not claims_authserv_id(written, OURS)


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("Relay.Example", "relay.example"),
        ("relay.example.", "relay.example"),
        ("relay.e\u212aample", None),
        ("relay\uff0eexample", None),
        ("rel\u00aday.example", None),
        ("relay example", None),
        ("", None),
        (".", None),
        ("r" * (MAX_AUTHSERV_ID_CHARS + 1), None),
    ],
)
def test_trusted_id_key_is_exact_ascii(written: str, key: str | None) -> None:
    assert trusted_id_key(written) == key


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Example.COM.", "example.com", True),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("BÜCHER.example", "xn--bcher-kva.example", True),
        ("example.com", "sub.example.com", False),
        ("none", "example.com", False),
        ("", "", False),
        ("a..b", "a..b", False),
        ("\udcff.example", "\udcff.example", False),
    ],
)
def test_same_domain(a: str, b: str, same: bool) -> None:
    assert same_domain(a, b) is same


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        ("example.com", "example.com"),
        ("user@example.com", "example.com"),
        ("@example.com", "example.com"),
        ('"a@b"@example.com', "example.com"),
        ("<user@example.com>", "example.com"),
        ("", ""),
    ],
)
def test_domain_part(value: str, domain: str) -> None:
    assert domain_part(value) == domain


# -- never crash -----------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from(
    [
        "example.org", "spf", "dkim", "none", "pass", "reason", "header", "smtp", "mailfrom",
        "1", "12", " ", "\t", "\r\n", "\r\n ", "\n\t", "\r", ";", "=", ".", "/", "@", "(", ")",
        '"', "\\", ",", ":", "<", ">", "[", "]", "?", "+", "ä", "例", "\udcff", "\ud800",
        "\x00", "\x07", "\x7f", "\u212a", "\u2028",
    ]
)  # fmt: skip
_TEXT = st.one_of(
    st.lists(_FRAGMENTS, max_size=60).map("".join),
    st.text(max_size=200),
    st.text(st.characters(exclude_categories=()), max_size=100),
)


def _clean(text: str) -> bool:
    return not any(
        (ord(c) < 0x20 and c != "\t") or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in text
    )


@settings(database=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXT)
def test_parse_never_raises_anything_else(value: str) -> None:
    authserv_id = authserv_id_of(value)
    assert authserv_id is None or (authserv_id and _clean(authserv_id))
    try:
        parsed = parse(value)
    except AuthResSyntaxError as exc:
        assert str(exc)
        return
    # What parse returns agrees with authserv_id_of, and is printable.
    assert parsed.authserv_id == (authserv_id or "")
    assert parsed.version is None or parsed.version >= 0
    assert len(parsed.results) <= MAX_RESULTS
    for res in parsed.results:
        assert re.fullmatch(r"[a-z0-9_-]+", res.method)
        assert re.fullmatch(r"[a-z0-9_-]+", res.result)
        assert res.reason is None or _clean(res.reason)
        for name, pvalue in res.properties:
            assert re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", name)
            assert _clean(pvalue)
