"""Author Domain extraction: RFC 9989 §4.2 and §11.5, RFC 5322 §3.4 and §3.6.2."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarcmilter import author
from dmarcmilter.author import MAX_ADDRESSES, MAX_FIELD_CHARS, extract_author, parse_from
from dmarcmilter.results import AuthorResult, AuthorStatus

OK = AuthorStatus.OK
NO_FROM = AuthorStatus.NO_FROM
MULTIPLE_FROM = AuthorStatus.MULTIPLE_FROM
MULTIPLE_DOMAINS = AuthorStatus.MULTIPLE_DOMAINS
NO_DOMAIN = AuthorStatus.NO_DOMAIN


def frm(value: str) -> list[tuple[str, str]]:
    return [("Received", "from mx.example by mx.example"), ("From", value), ("To", "x@y.example")]


# (id, headers, status, domain)
CASES: list[tuple[str, list[tuple[str, str]], AuthorStatus, str | None]] = [
    # -- one address -----------------------------------------------------------------------
    ("plain", frm("user@example.com"), OK, "example.com"),
    ("angle only", frm("<user@example.com>"), OK, "example.com"),
    ("display name", frm("Alice Example <alice@example.com>"), OK, "example.com"),
    ("quoted display name", frm('"Example, Alice" <alice@example.com>'), OK, "example.com"),
    (
        "quoted display name with @ and >",
        frm('"evil@bad.example <x>" <user@good.example>'),
        OK,
        "good.example",
    ),
    (
        "quoted display name with specials and escaped quote",
        frm(r'"a \"b@bad.example\", <c>; d" <user@good.example>'),
        OK,
        "good.example",
    ),
    ("unquoted comma in display name", frm("Doe, John <john@good.example>"), OK, "good.example"),
    ("no space before angle", frm("Alice<alice@good.example>"), OK, "good.example"),
    ("comment with @ after", frm("user@good.example (evil@bad.example)"), OK, "good.example"),
    ("comment with @ before", frm("(evil@bad.example) user@good.example"), OK, "good.example"),
    (
        "nested comment with @",
        frm("Alice (a (b@bad.example) \\) c) <alice@good.example> (x@bad.example)"),
        OK,
        "good.example",
    ),
    ("comment inside addr-spec", frm("user(x@bad.example)@(y)good.example"), OK, "good.example"),
    (
        "encoded-word display name",
        frm("=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@good.example>"),
        OK,
        "good.example",
    ),
    (
        "encoded word hiding @ in display name",
        frm("=?utf-8?q?ceo@bad.example?= <user@good.example>"),
        OK,
        "good.example",
    ),
    (
        "base64 encoded word",
        frm("=?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <joerg@good.example>"),
        OK,
        "good.example",
    ),
    ("encoded word alone", frm("=?utf-8?q?ceo@bad.example?="), NO_DOMAIN, None),
    ("IDN U-label", frm("user@bücher.example"), OK, "xn--bcher-kva.example"),
    ("IDN A-label", frm("user@xn--bcher-kva.example"), OK, "xn--bcher-kva.example"),
    ("IDN upper case U-label", frm("Jörg <user@BÜCHER.example>"), OK, "xn--bcher-kva.example"),
    ("UTF-8 local part", frm("jörg.müller@bücher.example"), OK, "xn--bcher-kva.example"),
    ("UTF-8 display name", frm("Jörg Müller <j@good.example>"), OK, "good.example"),
    ("upper case", frm("USER@GOOD.EXAMPLE"), OK, "good.example"),
    ("trailing dot", frm("user@good.example."), OK, "good.example"),
    ("quoted local part with @", frm('"a@bad.example"@good.example'), OK, "good.example"),
    ("quoted local part in angle", frm('Alice <"a b"@good.example>'), OK, "good.example"),
    ("obs route", frm("<@a.example,@b.example:user@good.example>"), OK, "good.example"),
    ("obs route with name", frm("Alice <@bad.example:alice@good.example>"), OK, "good.example"),
    ("obs CFWS around dots", frm("first . last @ good . example"), OK, "good.example"),
    ("folded CRLF", frm("Alice Example\r\n <alice@\r\n\tgood.example>"), OK, "good.example"),
    ("folded bare LF", frm("Alice Example\n <alice@good.example>"), OK, "good.example"),
    ("missing closing >", frm("Alice <alice@good.example"), OK, "good.example"),
    (
        "display name is the same address",
        frm("a@Good.Example <a@good.example>"),
        OK,
        "good.example",
    ),
    ("leading and trailing commas", frm(", a@good.example,,"), OK, "good.example"),
    # -- header selection ------------------------------------------------------------------
    ("no From", [("Subject", "hi"), ("Sender", "s@good.example")], NO_FROM, None),
    ("no headers", [], NO_FROM, None),
    ("From in upper case", [("FROM", "user@good.example")], OK, "good.example"),
    ("From in lower case", [("from", "user@good.example")], OK, "good.example"),
    ("From name with trailing blank", [("From ", "user@good.example")], OK, "good.example"),
    (
        "Sender ignored",
        [("Sender", "list@other.example"), ("From", "Alice <alice@good.example>")],
        OK,
        "good.example",
    ),
    (
        "Resent-From ignored",
        [("Resent-From", "a@other.example"), ("From", "b@good.example")],
        OK,
        "good.example",
    ),
    (
        "two From fields",
        [("From", "a@good.example"), ("From", "b@good.example")],
        MULTIPLE_FROM,
        None,
    ),
    ("two From fields in mixed case", [("From", "a@x.example"), ("fRoM", "")], MULTIPLE_FROM, None),
    # -- several addresses -----------------------------------------------------------------
    ("two addresses same domain", frm("a@good.example, b@good.example"), OK, "good.example"),
    (
        "two addresses differing in case",
        frm("Alice <a@Good.Example>, Bob <b@GOOD.EXAMPLE.>"),
        OK,
        "good.example",
    ),
    (
        "U-label and A-label same domain",
        frm("a@bücher.example, b@XN--BCHER-KVA.example"),
        OK,
        "xn--bcher-kva.example",
    ),
    ("two domains", frm("a@good.example, b@bad.example"), MULTIPLE_DOMAINS, None),
    (
        "subdomain is another domain",
        frm("a@good.example, b@sub.good.example"),
        MULTIPLE_DOMAINS,
        None,
    ),
    ("two domains without comma", frm("a@good.example b@bad.example"), MULTIPLE_DOMAINS, None),
    (
        "two angle addresses without comma",
        frm("<a@good.example> <b@bad.example>"),
        MULTIPLE_DOMAINS,
        None,
    ),
    (
        "unquoted address as display name",
        frm("ceo@bad.example <x@good.example>"),
        MULTIPLE_DOMAINS,
        None,
    ),
    (
        "structural encoded word is not opaque",
        frm("=?x?q?<u@bad.example>?= <u@good.example>"),
        MULTIPLE_DOMAINS,
        None,
    ),
    ("double @", frm("a@bad.example@good.example"), MULTIPLE_DOMAINS, None),
    # -- groups ----------------------------------------------------------------------------
    ("group with addresses", frm("Team: a@good.example, b@good.example;"), OK, "good.example"),
    ("group with one named address", frm("Team: Alice <a@good.example>;"), OK, "good.example"),
    ("group without ;", frm("Team: a@good.example"), OK, "good.example"),
    ("group with two domains", frm("Team: a@good.example, b@bad.example;"), MULTIPLE_DOMAINS, None),
    ("empty group", frm("undisclosed-recipients:;"), NO_DOMAIN, None),
    ("empty group with space", frm("undisclosed-recipients: ;"), NO_DOMAIN, None),
    ("group and address", frm("undisclosed-recipients:;, a@good.example"), OK, "good.example"),
    ("group inside a group", frm("a: b: c@good.example;;"), NO_DOMAIN, None),
    # -- no usable domain ------------------------------------------------------------------
    ("domain literal", frm("user@[192.0.2.1]"), NO_DOMAIN, None),
    ("domain literal IPv6", frm("Alice <user@[IPv6:2001:db8::1]>"), NO_DOMAIN, None),
    ("domain literal beside a domain", frm("a@good.example, b@[192.0.2.1]"), NO_DOMAIN, None),
    ("no @", frm("user"), NO_DOMAIN, None),
    ("name only", frm("Alice Example"), NO_DOMAIN, None),
    ("angle without @", frm("<postmaster>"), NO_DOMAIN, None),
    ("null angle address", frm("<>"), NO_DOMAIN, None),
    ("empty value", frm(""), NO_DOMAIN, None),
    ("blank value", frm(" \t"), NO_DOMAIN, None),
    ("only a comment", frm("(a@good.example)"), NO_DOMAIN, None),
    ("empty domain", frm("user@"), NO_DOMAIN, None),
    ("empty label", frm("user@good..example"), NO_DOMAIN, None),
    ("hyphen label", frm("user@-bad.example"), NO_DOMAIN, None),
    ("label too long", frm("user@" + "a" * 64 + ".example"), NO_DOMAIN, None),
    ("invalid character", frm("user@good!.example"), NO_DOMAIN, None),
    ("invalid IDN", frm("user@\u2764\ufe0f.example\u0000"), NO_DOMAIN, None),
    ("space inside domain", frm("user@good exa.mple"), NO_DOMAIN, None),
    ("garbage", frm("<<<>>>@@@"), NO_DOMAIN, None),
    ("garbage punctuation", frm(':;,<>[]()\\"'), NO_DOMAIN, None),
    ("stray >", frm("Alice <a@good.example>>"), NO_DOMAIN, None),
    ("angle address with two addresses", frm("<a@good.example, b@good.example>"), NO_DOMAIN, None),
    ("unterminated quoted string", frm('"Alice <alice@good.example>'), NO_DOMAIN, None),
    ("unterminated comment", frm("alice@good.example (x"), NO_DOMAIN, None),
    ("unterminated domain literal", frm("alice@[192.0.2.1"), NO_DOMAIN, None),
    ("NUL in domain", frm("alice@good.example\x00.bad.example"), NO_DOMAIN, None),
]


@pytest.mark.parametrize(
    ("headers", "status", "domain"),
    [pytest.param(h, s, d, id=i) for i, h, s, d in CASES],
)
def test_extract_author(
    headers: list[tuple[str, str]], status: AuthorStatus, domain: str | None
) -> None:
    result = extract_author(headers)
    assert (result.status, result.domain) == (status, domain), result.reason
    if status is OK:
        assert result.reason == ""
        assert result.addresses
    else:
        assert result.reason


def test_case_ids_are_unique() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


# -- details of the result ----------------------------------------------------------------


def test_addresses_are_listed_as_written() -> None:
    result = extract_author(
        frm('Alice <a@Good.Example>, "q@x" <b@good.example.>, c . d@good.example')
    )
    assert result.status is OK
    assert result.domain == "good.example"
    assert result.addresses == ("a@Good.Example", "b@good.example.", "c.d@good.example")


def test_route_is_not_part_of_the_address() -> None:
    result = extract_author(frm("<@relay.example:user@good.example>"))
    assert result.addresses == ("user@good.example",)


def test_group_addresses_are_listed() -> None:
    result = extract_author(frm("Team: a@good.example, Bob <b@good.example>;"))
    assert result.addresses == ("a@good.example", "b@good.example")


def test_multiple_domains_reason_names_them() -> None:
    result = extract_author(frm("a@good.example, b@bad.example, c@GOOD.example"))
    assert result.status is MULTIPLE_DOMAINS
    assert result.domain is None
    assert result.addresses == ("a@good.example", "b@bad.example", "c@GOOD.example")
    assert "good.example" in result.reason
    assert "bad.example" in result.reason
    assert "2 domains" in result.reason


def test_multiple_domains_reason_is_capped() -> None:
    value = ", ".join(f"u@d{i}.example" for i in range(30))
    result = extract_author(frm(value))
    assert result.status is MULTIPLE_DOMAINS
    assert "30 domains" in result.reason
    assert "and 25 more" in result.reason
    assert len(result.reason) < 200


def test_rejected_domain_is_named() -> None:
    result = extract_author(frm("user@good..example"))
    assert result.status is NO_DOMAIN
    assert "good..example" in result.reason
    assert result.addresses == ("user@good..example",)


def test_domain_literal_is_named() -> None:
    result = extract_author(frm("user@[192.0.2.1]"))
    assert "[192.0.2.1]" in result.reason
    assert "literal" in result.reason


def test_reason_names_the_status() -> None:
    assert "no From" in extract_author([]).reason
    assert "2 From fields" in extract_author([("From", "a@x.example")] * 2).reason
    assert "group" in extract_author(frm("undisclosed-recipients:;")).reason
    assert "empty" in extract_author(frm("")).reason


def test_reason_is_printable_and_short() -> None:
    hostile = "user@" + "\r\n\x00\u202e" * 30 + "x" * 300 + ".example"
    result = extract_author(frm(hostile))
    assert result.status is NO_DOMAIN
    assert result.reason.isprintable()
    assert len(result.reason) < 160


def test_sender_alone_is_not_an_author() -> None:
    result = extract_author([("Sender", "s@good.example")])
    assert result.status is NO_FROM


def test_header_order_does_not_matter() -> None:
    result = extract_author([("To", "a@x.example"), ("Subject", "s"), ("From", "b@good.example")])
    assert result.domain == "good.example"


# -- bounds --------------------------------------------------------------------------------


def test_too_many_addresses_same_domain() -> None:
    value = ", ".join(f"u{i}@good.example" for i in range(MAX_ADDRESSES + 1))
    assert len(value) <= MAX_FIELD_CHARS
    result = extract_author(frm(value))
    assert result.status is NO_DOMAIN
    assert str(MAX_ADDRESSES) in result.reason
    assert len(result.addresses) == MAX_ADDRESSES


def test_addresses_up_to_the_limit() -> None:
    value = ", ".join(f"u{i}@good.example" for i in range(MAX_ADDRESSES))
    result = extract_author(frm(value))
    assert result.status is OK
    assert len(result.addresses) == MAX_ADDRESSES


def test_too_many_addresses_with_two_domains_is_still_multiple() -> None:
    value = "a@bad.example, " + ", ".join(f"u{i}@good.example" for i in range(MAX_ADDRESSES))
    assert extract_author(frm(value)).status is MULTIPLE_DOMAINS


def test_field_too_long() -> None:
    value = '"' + "a" * MAX_FIELD_CHARS + '" <user@good.example>'
    result = extract_author(frm(value))
    assert result.status is NO_DOMAIN
    assert "longer" in result.reason


@pytest.mark.parametrize(
    "value",
    [
        "(" * MAX_FIELD_CHARS,
        "(" * 8000 + ")" * 8000 + " user@good.example",
        "<" * MAX_FIELD_CHARS,
        "@" * MAX_FIELD_CHARS,
        "a@" * (MAX_FIELD_CHARS // 2),
        "\\" * MAX_FIELD_CHARS,
        "=?a?q?" * (MAX_FIELD_CHARS // 6),
        "a:" * (MAX_FIELD_CHARS // 2),
        ",;" * (MAX_FIELD_CHARS // 2),
        '"\\' * (MAX_FIELD_CHARS // 2),
        "a." * (MAX_FIELD_CHARS // 2 - 1) + "@x",
    ],
    ids=lambda v: repr(v[:8]),
)
def test_hostile_input_is_fast(value: str) -> None:
    started = time.perf_counter()
    result = extract_author(frm(value))
    elapsed = time.perf_counter() - started
    assert (result.status is OK) == (result.domain is not None)
    assert elapsed < 0.5


def test_deeply_nested_comment_is_skipped() -> None:
    value = "(" * 5000 + ")" * 5000 + " Alice <alice@good.example>"
    assert extract_author(frm(value)).domain == "good.example"


def test_internal_error_becomes_no_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(value: str) -> AuthorResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(author, "parse_from", broken)
    result = extract_author(frm("user@good.example"))
    assert result.status is NO_DOMAIN
    assert result.reason


# -- properties ------------------------------------------------------------------------------

# Characters that exercise every branch of the tokenizer.
_MAIL_ALPHABET = st.sampled_from(
    [*'abcxyz.@<>,;:"()[]\\=? \t\r\n', "ü", "\u3002", "\x00", "\udcff", "=?utf-8?q?", "xn--"]
)
_MAIL_TEXT = st.lists(_MAIL_ALPHABET, max_size=80).map("".join)
_ANY_TEXT = st.text(max_size=200)


def _consistent(result: AuthorResult) -> None:
    assert isinstance(result, AuthorResult)
    assert (result.status is OK) == (result.domain is not None)
    assert (result.status is OK) == (result.reason == "")
    if result.domain is not None:
        assert result.domain == result.domain.lower()
        assert result.domain.isascii()
        assert not result.domain.endswith(".")
        assert result.addresses
    assert len(result.addresses) <= MAX_ADDRESSES


@settings(database=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_MAIL_TEXT, _ANY_TEXT))
def test_parse_never_raises(value: str) -> None:
    # parse_from is the unguarded parser: a bug here must not hide behind
    # the catch-all in extract_author.
    _consistent(parse_from(value))


@settings(database=None, max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from(["From", "from", "FROM", "Sender", "To", "X"]), _MAIL_TEXT),
        max_size=4,
    )
)
def test_extract_never_raises(headers: list[tuple[str, str]]) -> None:
    result = extract_author(headers)
    _consistent(result)
    count = sum(1 for name, _ in headers if name.lower() == "from")
    if count == 0:
        assert result.status is NO_FROM
    elif count > 1:
        assert result.status is MULTIPLE_FROM


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(database=None, max_examples=200)
@given(
    local=st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}", fullmatch=True),
    labels=st.lists(_LABEL, min_size=1, max_size=4),
    name=st.sampled_from(["", "Alice ", '"Bob, Jr. <b@x.example>" ', "(c@x.example) "]),
)
def test_well_formed_address_gives_its_domain(local: str, labels: list[str], name: str) -> None:
    domain = ".".join(labels)
    value = f"{name}<{local}@{domain.upper()}>" if name else f"{local}@{domain}"
    result = parse_from(value)
    assert result.status is OK, result.reason
    assert result.domain == domain


# -- domains recovered from an out-of-scope From (RFC 9989 §11.5) -------------------------

# (id, From field values, recovered domains, incomplete)
RECOVERY: list[tuple[str, list[str], tuple[str, ...], bool]] = [
    ("unterminated comment", ["CEO <ceo@bank.example> ("], ("bank.example",), False),
    ("extra closing angle", ["CEO <ceo@bank.example>>"], ("bank.example",), False),
    ("same field twice", ["CEO <ceo@bank.example>"] * 2, ("bank.example",), False),
    ("valid and garbage", ["ceo@bank.example", "(("], ("bank.example",), False),
    ("unterminated quote", ['"CEO <ceo@bank.example>'], ("bank.example",), False),
    (
        "address in an unterminated comment",
        ["attacker@evil.example (<ceo@bank.example>"],
        ("evil.example", "bank.example"),
        False,
    ),
    ("two domains", ["a@evil.example, b@bank.example"], ("evil.example", "bank.example"), False),
    (
        "two fields, two domains",
        ["a@evil.example", "B <b@bank.example>"],
        ("evil.example", "bank.example"),
        False,
    ),
    ("case differences", ["a@BANK.example", "b@bank.EXAMPLE"], ("bank.example",), False),
    ("u-label", ["CEO <ceo@b\u00e4nk.example>>"], ("xn--bnk-qla.example",), False),
    ("folded", ["CEO\r\n <ceo@bank\r\n .example>>"], ("bank.example",), False),
    ("group", ["Board: <ceo@bank.example>>;"], ("bank.example",), False),
    # A complete comment, quoted string or encoded word supplies no address,
    # as in an in-scope field.
    (
        "encoded word",
        ["=?utf-8?q?ceo=40bank.example?= <a@evil.example>>"],
        ("evil.example",),
        False,
    ),
    ("comment", ["a@evil.example (ceo@bank.example)>"], ("evil.example",), False),
    ("quoted", ['"ceo@bank.example" <a@evil.example>>'], ("evil.example",), False),
    # Literals and invalid names are skipped.
    ("literal", ["a@[192.0.2.1], b@bank.example"], ("bank.example",), False),
    ("no domain", ["undisclosed-recipients:;", "nobody"], (), False),
    # Bounds.
    (
        "domain cap",
        [", ".join(f"u@d{i}.example" for i in range(7))],
        tuple(f"d{i}.example" for i in range(author.MAX_RECOVERED_DOMAINS)),
        True,
    ),
    ("field cap, the last is read", ["junk"] * 30 + ["ceo@bank.example"], ("bank.example",), True),
    (
        "field length cap",
        ["ceo@bank.example, " + "x" * MAX_FIELD_CHARS + "@late.example"],
        ("bank.example",),
        True,
    ),
]


@pytest.mark.parametrize(
    ("values", "recovered", "incomplete"),
    [case[1:] for case in RECOVERY],
    ids=[case[0] for case in RECOVERY],
)
def test_recovered_domains(values: list[str], recovered: tuple[str, ...], incomplete: bool) -> None:
    result = extract_author([("From", v) for v in values])
    assert not result.status.in_scope
    assert (result.recovered, result.recovery_incomplete) == (recovered, incomplete)


def test_in_scope_from_recovers_nothing() -> None:
    result = extract_author(frm("attacker@evil.example (ceo@bank.example)"))
    assert (result.status, result.domain, result.recovered) == (OK, "evil.example", ())


def test_recovery_is_bounded_in_characters() -> None:
    # Ten fields just under the per-field cap: the total is cut at the byte budget.
    # The first fields fill MAX_RECOVERY_CHARS; the last ones, read because
    # readers show the last From, are then not read at all.
    field = "ceo@bank.example, " + "z" * (MAX_FIELD_CHARS - 40)
    late = "ceo@late.example"
    domains, incomplete = author.recover_domains([field] * 20 + [late])
    assert domains == ("bank.example",) and incomplete
    assert author.MAX_RECOVERY_CHARS < 5 * MAX_FIELD_CHARS  # the budget binds before the fields


@given(st.lists(st.text(max_size=200), min_size=2, max_size=12))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_recovery_never_raises_and_stays_bounded(values: list[str]) -> None:
    result = extract_author([("From", v) for v in values])
    assert len(result.recovered) <= author.MAX_RECOVERED_DOMAINS
    assert all(d == d.lower() and d.isascii() for d in result.recovered)
