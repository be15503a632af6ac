"""Property tests: hostile input never makes a parser or the milter raise.

Each parser a sender can reach (the From field, DMARC records, other hosts'
Authentication-Results, DKIM-Signature and ARC header fields) and the milter
object itself are fed generated input.  Any exception other than the one a
parser documents fails the test, and so does a result of the wrong type or
one that breaks an invariant (a domain the input never named, a rendered
field that does not read back).  The examples are derandomized, so CI sees
the same inputs on every run; bench/fuzz.py runs the same targets on a
million inputs.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Iterator
from typing import Any

import Milter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarcmilter.arc import MAX_ARC_SETS, verify_arc
from dmarcmilter.author import extract_author
from dmarcmilter.authres.parse import AuthResSyntaxError, AuthResults, authserv_id_of, parse
from dmarcmilter.authres.render import render
from dmarcmilter.config import Config, DNSConfig, PolicyConfig
from dmarcmilter.dkim import verify_dkim
from dmarcmilter.dmarc import DMARCOutcome, DMARCResultCode, SPFVerdict
from dmarcmilter.domains import normalize_domain
from dmarcmilter.evaluation import Envelope, Evaluation
from dmarcmilter.milter import CONTINUE, REJECT, TEMPFAIL, DMARCMilter, MilterState, Runtime
from dmarcmilter.record import (
    AlignmentMode,
    DMARCRecord,
    Policy,
    PSDFlag,
    RecordStatus,
    parse_record,
)
from dmarcmilter.resolver import Resolver, ResolverSettings
from dmarcmilter.results import (
    ARCOutcome,
    ARCResultCode,
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
from tests.dnsserver import TestDNSServer
from tests.hostile import named_in
from tests.inprocess import MilterContext as _Context

# Deterministic (derandomize), no example database, no per-example deadline
# (a loaded CI machine is slow, not wrong).  The whole module stays well
# under a minute of CPU.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

AUTHSERV_ID = "mx.receiver.example"
ZONE: dict[str, Any] = {
    "_dmarc.victim.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=quarantine; sp=reject; np=reject")],
    "victim.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all"), ("A", "192.0.2.10")],
    "_dmarc.broken.example": "SERVFAIL",
    "attacker.net": [("TXT", "v=spf1 +all")],
}


@pytest.fixture(scope="module")
def zone_server(dns_server_session: TestDNSServer) -> Iterator[TestDNSServer]:
    """The loopback DNS server, serving ZONE to this module's tests (module
    scope: hypothesis runs many examples per test)."""
    dns_server_session.set_zone(ZONE)
    yield dns_server_session
    dns_server_session.set_zone({})


@pytest.fixture(scope="module")
def quiet_resolver(zone_server: TestDNSServer) -> Resolver:
    return Resolver(
        ResolverSettings(
            nameservers=(zone_server.host,),
            port=zone_server.port,
            query_timeout=0.5,
            message_budget=2.0,
        )
    )


# -- From fields ------------------------------------------------------------------------------

_FROM_PIECES = st.sampled_from(
    [
        "CEO",
        " ",
        "\t",
        "\r\n ",
        "\n\t",
        "<",
        ">",
        "@",
        ",",
        ";",
        ":",
        ".",
        " . ",
        '"',
        '\\"',
        "\\",
        "(",
        ")",
        "(c)",
        "[",
        "]",
        "[192.0.2.1]",
        "ceo",
        "victim.example",
        "Victim.EXAMPLE.",
        "bank.example",
        "ceo@victim.example",
        "<ceo@bank.example>",
        "@relay.example:",
        "=?utf-8?q?ceo@victim.example?=",
        "=?utf-8?b?",
        "?=",
        "bücher.example",
        "xn--bcher-kva.example",
        "ＥＸＡＭＰＬＥ",
        "\u212akiosk.example",
        "\udcff",
        "\x00",
        "\x7f",
        "group:",
        "undisclosed-recipients:;",
        "a" * 70,
    ]
)
_FROM_TEXT = st.one_of(
    st.lists(st.one_of(_FROM_PIECES, st.text(max_size=3)), max_size=25).map("".join),
    st.text(max_size=60),
)
_HEADER_NAMES = st.sampled_from(["From", "from", "FROM", "From ", "To", "Sender", "Reply-To"])


@settings(FUZZ, max_examples=700)
@given(st.lists(st.tuples(_HEADER_NAMES, _FROM_TEXT), max_size=3))
def test_author_extraction_never_raises_and_invents_nothing(
    headers: list[tuple[str, str]],
) -> None:
    result = extract_author(headers)
    assert isinstance(result, AuthorResult)
    assert isinstance(result.status, AuthorStatus)
    assert isinstance(result.reason, str) and result.reason.isprintable()
    values = [v for n, v in headers if n.strip(" \t").lower() == "from"]
    if result.status is AuthorStatus.OK:
        assert len(values) == 1
        assert result.domain is not None
        assert normalize_domain(result.domain) == result.domain
        assert named_in(result.domain, values[0])
    else:
        assert result.domain is None
        assert result.reason
    if len(values) != 1:
        assert result.status in (AuthorStatus.NO_FROM, AuthorStatus.MULTIPLE_FROM)


# -- DMARC records ----------------------------------------------------------------------------

_RECORD_PIECES = st.sampled_from(
    [
        "v=DMARC1",
        "V=DMARC1",
        "v = DMARC1 ",
        ";",
        "; ",
        " ",
        "\t",
        "=",
        "p=",
        "sp=",
        "np=",
        "reject",
        "REJECT",
        "quarantine",
        "none",
        "adkim=",
        "aspf=",
        "s",
        "r",
        "psd=",
        "y",
        "n",
        "u",
        "t=",
        "pct=",
        "0",
        "100",
        "101",
        "9" * 80,
        "fo=",
        "1:d:s",
        "0:1",
        "rua=",
        "ruf=",
        "mailto:",
        "agg@victim.example",
        "mailto:a@b.example!10m",
        "mailto:%40@x.example",
        "%",
        "%zz",
        ",",
        "!",
        "https://r.example/x?a=b",
        "ri=86400",
        "rf=afrf:iodef",
        "x=",
        "é",
        "\x00",
        "\udcff",
    ]
)
_RECORD_TEXT = st.one_of(
    st.lists(st.one_of(_RECORD_PIECES, st.text(max_size=3)), max_size=25).map("".join),
    st.text(max_size=60),
)


def _record_text(record: DMARCRecord) -> str:
    """A record that says what ``record`` means, written out."""
    tags = [f"p={record.p.value}"]
    if record.sp is not None:
        tags.append(f"sp={record.sp.value}")
    if record.np is not None:
        tags.append(f"np={record.np.value}")
    tags += [
        f"adkim={record.adkim.value}",
        f"aspf={record.aspf.value}",
        f"t={'y' if record.testing else 'n'}",
        f"psd={record.psd.value}",
        f"fo={record.fo}",
    ]
    if record.rua:
        tags.append("rua=" + ",".join(record.rua))
    if record.ruf:
        tags.append("ruf=" + ",".join(record.ruf))
    return "v=DMARC1; " + "; ".join(tags)


def _meaning(record: DMARCRecord) -> tuple[Any, ...]:
    return (
        record.p,
        record.sp,
        record.np,
        record.adkim,
        record.aspf,
        record.testing,
        record.psd,
        record.fo,
        record.rua,
        record.ruf,
    )


@settings(FUZZ, max_examples=700)
@given(_RECORD_TEXT, st.booleans())
def test_record_parsing_never_raises_and_round_trips(text: str, np_supported: bool) -> None:
    record = parse_record(text, np_supported=np_supported)
    assert isinstance(record, DMARCRecord)
    assert record.raw == text
    assert isinstance(record.status, RecordStatus)
    assert isinstance(record.p, Policy)
    assert isinstance(record.adkim, AlignmentMode) and isinstance(record.aspf, AlignmentMode)
    assert isinstance(record.psd, PSDFlag)
    assert record.pct is None or 0 <= record.pct <= 100
    assert all(isinstance(p, str) for p in record.problems)
    if not np_supported:
        assert record.np is None
    if not record.usable:
        assert (record.p, record.sp, record.np, record.rua) == (Policy.NONE, None, None, ())
        return
    # The tags round-trip: what the record means, written out, means the same.
    again = parse_record(_record_text(record), np_supported=np_supported)
    assert again.status is RecordStatus.VALID
    assert _meaning(again) == _meaning(record)


# -- Authentication-Results -------------------------------------------------------------------

_ANY = st.text(max_size=40)
_LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?(\.[a-z0-9]{1,8}){1,3}", fullmatch=True)


def _shown(text: str) -> str:
    # What render does to any value: printable ASCII (and tab) kept, else "?".
    return "".join(c if " " <= c <= "~" or c == "\t" else "?" for c in text)


@st.composite
def _evaluations(draw: st.DrawFn) -> Evaluation:
    """An Evaluation with sender-controlled text wherever render writes it."""
    mfrom_domain = draw(st.one_of(_LABELS, _ANY))
    mfrom = SPFResult(
        draw(st.sampled_from(list(SPFResultCode))), mfrom_domain, SPFScope.MFROM, draw(_ANY)
    )
    helo = SPFResult(draw(st.sampled_from(list(SPFResultCode))), draw(_ANY), SPFScope.HELO)
    signatures = tuple(
        DKIMSignatureResult(
            draw(st.one_of(_LABELS, _ANY)),
            draw(_ANY),
            draw(st.sampled_from(list(DKIMResultCode))),
            draw(_ANY),
            draw(_ANY),
            draw(_ANY),
            draw(_ANY),
        )
        for _ in range(draw(st.integers(0, 4)))
    )
    dmarc = DMARCOutcome(
        draw(st.sampled_from(list(DMARCResultCode))),
        draw(st.one_of(st.none(), _LABELS, _ANY)),
        None,
        draw(st.one_of(st.none(), st.sampled_from(list(Policy)))),
        SPFVerdict(mfrom),
        (),
        reason=draw(_ANY),
    )
    return Evaluation(
        envelope=Envelope("192.0.2.1", "helo.example", "bounce@example.com"),
        author=AuthorResult(AuthorStatus.OK, "example.com", ("a@example.com",)),
        spf=SPFOutcome(mfrom, helo, null_reverse_path=draw(st.booleans())),
        dkim=DKIMOutcome(signatures),
        arc=ARCOutcome(draw(st.sampled_from(list(ARCResultCode)))),
        dmarc=dmarc,
        evaluated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )


@settings(FUZZ, max_examples=400)
@given(_evaluations(), _LABELS)
def test_rendered_authentication_results_parse_back(evaluation: Evaluation, sid: str) -> None:
    value = render(evaluation, sid)
    parsed = parse(value)
    assert parsed.authserv_id == sid == authserv_id_of(value)
    methods = [r.method for r in parsed.results]
    assert methods.count("dkim") == max(1, len(evaluation.dkim.signatures))
    assert methods[-2:] == ["arc", "dmarc"]
    dkim = [r for r in parsed.results if r.method == "dkim"]
    for res, sig in zip(dkim, evaluation.dkim.signatures, strict=False):
        assert res.result == sig.result.value
        assert res.get("header.d") == (_shown(sig.domain) or None)
        assert res.get("header.s") == (_shown(sig.selector) or None)
        assert res.get("header.b") == (_shown(sig.header_b) or None)
    dmarc = parsed.results[-1]
    assert dmarc.result == evaluation.dmarc.result.value
    assert dmarc.get("header.from") == (_shown(evaluation.dmarc.author_domain or "") or None)


_AR_SEEDS = [
    "mx.receiver.example; spf=pass smtp.mailfrom=a@victim.example; dkim=pass "
    'header.d=victim.example header.s=s1 header.b="ab/+=CD"; dmarc=pass '
    "policy.dmarc=reject header.from=victim.example",
    'mx.receiver.example 1; dkim=fail (bad sig) reason="body hash" header.i=@x.example; arc=none',
    "spf=pass (sender SPF authorized) smtp.mailfrom=bounce.example; dkim=none; action=none",
    '"quoted id"; none',
    'mx.example; auth=pass smtp.auth="john doe"@example.com; iprev=pass policy.iprev=2001:db8::1',
    "i=1; mx.example; dmarc=fail (p=reject dis=none) header.from=bank.example",
]
_AR_PIECES = st.sampled_from(
    [";", " ", "(", ")", "\\", '"', "=", ".", "/", "1", "dkim", "pass", "none", "reason",
     "header.d", "\r\n\t", "\n", "\udcff", "\x00", "\u212a", "@"]
)  # fmt: skip


@st.composite
def _mutated_ar(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(_AR_SEEDS))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(text)))
        what = draw(st.integers(0, 2))
        if what == 0:
            text = text[:at] + draw(st.one_of(_AR_PIECES, st.text(max_size=3))) + text[at:]
        elif what == 1:
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        else:
            text = text[:at] + text[at:] * 2 if len(text) < 2000 else text
    return text


@settings(FUZZ, max_examples=800)
@given(st.one_of(_mutated_ar(), st.text(max_size=80)))
def test_authserv_id_of_agrees_with_parse(value: str) -> None:
    authserv_id = authserv_id_of(value)
    assert authserv_id is None or (isinstance(authserv_id, str) and authserv_id)
    try:
        parsed = parse(value)
    except AuthResSyntaxError:
        return
    assert isinstance(parsed, AuthResults)
    assert parsed.authserv_id == (authserv_id or "")


# -- DKIM-Signature and ARC sets --------------------------------------------------------------

_TAG_VALUES = st.one_of(
    st.sampled_from(
        ["1", "rsa-sha256", "ed25519-sha256", "rsa-sha1", "victim.example", "s1", "from:to",
         "From : Subject", "relaxed/relaxed", "simple", "dns/txt", "AAAA", "YWJj", "=", "",
         "@victim.example", "x@sub.victim.example", "99999999999999999999", "-1", "none", "pass",
         "fail", "0", "51", "\udcff", "é", ";", " ", "\r\n\t", "Zm9v\r\n Zm9v"]
    ),
    st.text(max_size=8),
)  # fmt: skip
_DKIM_TAGS = st.sampled_from(
    ["v", "a", "b", "bh", "d", "s", "h", "c", "q", "i", "l", "t", "x", "z"]
)
_ARC_TAGS = st.sampled_from(["i", "a", "b", "bh", "d", "s", "h", "c", "cv", "t"])


def _tag_list(tags: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(tags, st.sampled_from(["=", " = ", "=", ""]), _TAG_VALUES)
    return st.lists(pair, max_size=12).map(lambda ps: "; ".join(f"{t}{e}{v}" for t, e, v in ps))


def _message(fields: list[tuple[str, str]], body: str) -> bytes:
    head = "".join(f"{name}:{value}\r\n" for name, value in fields)
    return (head + "\r\n" + body).encode("utf-8", "surrogateescape")


_BASE_FIELDS = [
    ("From", " CEO <ceo@victim.example>"),
    ("To", " x@receiver.example"),
    ("Subject", " hi"),
]


@settings(FUZZ, max_examples=250)
@given(
    st.lists(
        st.tuples(st.sampled_from(["DKIM-Signature", "dkim-signature", "DKIM-Signature "]),
                  _tag_list(_DKIM_TAGS)),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["", "body\r\n", "x" * 100]),
)  # fmt: skip
def test_dkim_never_raises_on_random_signatures(
    quiet_resolver: Resolver, signatures: list[tuple[str, str]], body: str
) -> None:
    message = _message(signatures + _BASE_FIELDS, body)
    outcome = verify_dkim(message, quiet_resolver.session(), now=1_700_000_000.0)
    assert isinstance(outcome, DKIMOutcome)
    # One result per signature field, none of them a pass: no key exists.
    assert len(outcome.signatures) == len(signatures)
    for sig in outcome.signatures:
        assert isinstance(sig, DKIMSignatureResult)
        assert sig.result in (
            DKIMResultCode.PERMERROR,
            DKIMResultCode.TEMPERROR,
            DKIMResultCode.FAIL,
            DKIMResultCode.NEUTRAL,
            DKIMResultCode.POLICY,
        )
        assert not sig.domain or normalize_domain(sig.domain) == sig.domain


_ARC_FIELDS = st.sampled_from(
    ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results", "arc-seal"]
)


@st.composite
def _arc_field(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(_ARC_FIELDS)
    if name == "ARC-Authentication-Results":
        return name, f" i={draw(st.sampled_from(['1', '2', '0', '51', 'x']))}; " + draw(
            st.one_of(_mutated_ar(), _ANY)
        )
    return name, " " + draw(_tag_list(_ARC_TAGS))


@settings(FUZZ, max_examples=250)
@given(st.lists(_arc_field(), min_size=1, max_size=6))
def test_arc_never_raises_on_random_sets(
    quiet_resolver: Resolver, fields: list[tuple[str, str]]
) -> None:
    outcome = verify_arc(_message(fields + _BASE_FIELDS, "body\r\n"), quiet_resolver.session())
    assert isinstance(outcome, ARCOutcome)
    assert outcome.result in (ARCResultCode.NONE, ARCResultCode.FAIL)
    assert isinstance(outcome.reason, str)
    assert len(outcome.hops) <= MAX_ARC_SETS
    instances = [hop.instance for hop in outcome.hops]
    assert instances == sorted(set(instances))


# -- the milter object, driven callback by callback -------------------------------------------


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", params=["default", "strict"])
def milter_state(zone_server: TestDNSServer, request: pytest.FixtureRequest) -> MilterState:
    """The default configuration, and one where every outcome acts: rejects,
    holds, tempfails (so setreply and quarantine are reached too)."""
    policy = PolicyConfig()
    if request.param == "strict":
        policy = PolicyConfig(
            out_of_scope="reject",
            quarantine_action="hold",
            enforce_reject=True,
            temperror_action="tempfail",
            reject_text="Rejected for {domain}",
        )
    config = Config(
        authserv_id=AUTHSERV_ID,
        dns=DNSConfig(
            nameservers=(zone_server.host,), port=zone_server.port, timeout=0.5, budget=2.0
        ),
        policy=policy,
    )
    return MilterState(Runtime.build(config), None)


_BYTES_TEXT = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
_VALUE = st.one_of(_FROM_TEXT, _BYTES_TEXT, st.just(""))
_PLAUSIBLE_FROM = st.sampled_from(
    [
        "CEO <ceo@victim.example>",
        "ceo@bank.example",
        "ceo@sub.bank.example",
        "CEO <ceo@bank.example> (",
        "CEO <ceo@bank.example>>",
        "a@victim.example, b@attacker.net",
        "ceo@broken.example",
        "x@attacker.net",
        "50%% <ceo@victim.example>",
    ]
)
_HEADER_FIELD = st.one_of(
    st.tuples(st.sampled_from(["From", "from", "FROM"]), st.one_of(_PLAUSIBLE_FROM, _FROM_TEXT)),
    st.tuples(st.just("DKIM-Signature"), _tag_list(_DKIM_TAGS)),
    st.tuples(_ARC_FIELDS, _tag_list(_ARC_TAGS)),
    st.tuples(
        st.sampled_from(["Authentication-Results", "ARC-Authentication-Results"]),
        st.one_of(
            _mutated_ar(),
            st.sampled_from([AUTHSERV_ID, "MX.RECEIVER.EXAMPLE.", "mx.receiver.example (c)"]).map(
                lambda sid: f"{sid}; dmarc=pass header.from=victim.example"
            ),
        ),
    ),
    st.tuples(st.sampled_from(["Subject", "To", "List-Id", "X-\udcff", ""]), _VALUE),
)
_ADDRESS = st.one_of(
    st.sampled_from(["<a@victim.example>", "<>", "<a@attacker.net>", "a@broken.example", "<@>"]),
    _BYTES_TEXT,
)
_STEP = st.one_of(
    st.tuples(
        st.just("connect"),
        st.one_of(st.sampled_from(["mx.sender.example", "", "[203.0.113.9]"]), _BYTES_TEXT),
        st.sampled_from([socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, 0]),
        st.sampled_from([("203.0.113.66", 25), ("2001:db8::1", 25, 0, 0), ("192.0.2.1", 1), ""]),
    ),
    st.tuples(st.just("hello"), st.one_of(st.just("mx.sender.example"), _BYTES_TEXT)),
    st.tuples(st.just("envfrom"), _ADDRESS),
    st.tuples(st.just("envrcpt"), _ADDRESS),
    st.tuples(st.just("header"), _HEADER_FIELD),
    st.tuples(st.just("eoh")),
    st.tuples(st.just("body"), st.binary(max_size=30)),
    st.tuples(st.just("eom")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("close")),
)


@st.composite
def _transaction(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """One plausible transaction (MAIL to end of message), whose steps may then
    be dropped, repeated or swapped."""
    steps: list[tuple[Any, ...]] = [("envfrom", draw(_ADDRESS)), ("envrcpt", draw(_ADDRESS))]
    steps += [("header", f) for f in draw(st.lists(_HEADER_FIELD, min_size=1, max_size=6))]
    steps += [("eoh",), ("body", draw(st.binary(max_size=30))), ("eom",)]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(steps) - 1))
        if draw(st.booleans()):
            del steps[at]
        else:
            steps.insert(draw(st.integers(0, len(steps))), steps[at])
    return steps


@st.composite
def _sequences(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    steps: list[tuple[Any, ...]] = []
    if draw(st.integers(0, 3)):
        steps.append(("connect", "mx.sender.example", socket.AF_INET, ("203.0.113.66", 25)))
        steps.append(("hello", "mx.sender.example"))
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)):
            steps += draw(_transaction())
        else:
            steps += draw(st.lists(_STEP, max_size=10))
    if draw(st.booleans()):
        steps.append(("close",))
    return steps


_MACROS = st.fixed_dictionaries(
    {},
    optional={
        "i": st.sampled_from(["4QID1", "%s%d", ""]),
        "j": st.one_of(st.sampled_from([AUTHSERV_ID, "mx.other.example"]), _BYTES_TEXT),
        "{client_addr}": st.sampled_from(["203.0.113.66", "IPv6:2001:db8::1", "junk", ""]),
        "_": st.sampled_from(["host [203.0.113.66]", "[2001:db8::2]", "x [", "\udcff"]),
        "{auth_authen}": st.sampled_from(["", "alice"]),
    },
)


def _run(milter: DMARCMilter, step: tuple[Any, ...]) -> int:
    name, *args = step
    if name == "header":
        field_name, value = args[0]
        if milter._protocol & Milter.P_HDR_LEADSPC:
            value = " " + value
        return int(milter.header(field_name, value))
    result: int = getattr(milter, name)(*args)
    return result


@settings(FUZZ, max_examples=300)
@given(_sequences(), _MACROS, st.booleans())
def test_milter_callbacks_in_any_order(
    milter_state: MilterState,
    steps: list[tuple[Any, ...]],
    macros: dict[str, str],
    leading_space: bool,
) -> None:
    errors = _Errors()
    logger = logging.getLogger("dmarcmilter")
    logger.addHandler(errors)
    try:
        context = _Context(macros)
        milter = DMARCMilter(milter_state)
        milter._setctx(context)
        milter._protocol = Milter.P_HDR_LEADSPC if leading_space else 0
        for step in steps:
            before = len(context.calls)
            code = _run(milter, step)
            assert code in (CONTINUE, REJECT, TEMPFAIL), step
            if step[0] != "eom":
                assert code == CONTINUE and len(context.calls) == before, step
            elif code != CONTINUE:
                assert context.calls[-1][0] == "setreply"
            if step[0] == "close":
                assert milter.txn is None
        milter.close()
    finally:
        logger.removeHandler(errors)
    assert milter_state.active == 0
    # The end-of-message handler turns any exception into a log line: none
    # may have happened.
    assert not errors.records, [r.getMessage() for r in errors.records]


def test_domain_check_helper() -> None:
    # The helper the From property relies on: it must be able to say no.
    assert named_in("victim.example", "ceo@Victim.Example")
    assert named_in("xn--bcher-kva.example", "a@BÜCHER.example")
    assert not named_in("victim.example", "ceo@attacker.example")
    assert named_in("xn--bcher-kv", "a@xn--bcher-kv")


# -- crash inputs the fuzzers found, kept as regression tests --------------------------------


def _one_message(
    state: MilterState, fields: list[tuple[str, str]]
) -> tuple[int, _Context, list[logging.LogRecord]]:
    """One transaction through the milter object, as libmilter calls it."""
    errors = _Errors()
    logger = logging.getLogger("dmarcmilter")
    logger.addHandler(errors)
    try:
        context = _Context({"i": "FUZZQ"})
        milter = DMARCMilter(state)
        milter._setctx(context)
        milter._protocol = Milter.P_HDR_LEADSPC
        milter.connect("mx.sender.example", socket.AF_INET, ("203.0.113.66", 25))
        milter.hello("mx.sender.example")
        milter.envfrom("<a@attacker.net>")
        milter.envrcpt("<user@receiver.example>")
        for name, value in fields:
            milter.header(name, " " + value)
        milter.eoh()
        milter.body(b"hello\r\n")
        code = int(milter.eom())
        milter.close()
    finally:
        logger.removeHandler(errors)
    return code, context, errors.records


def _state(server: TestDNSServer, policy: PolicyConfig) -> MilterState:
    dns = DNSConfig(nameservers=(server.host,), port=server.port, timeout=0.5, budget=2.0)
    return MilterState(Runtime.build(Config(AUTHSERV_ID, dns=dns, policy=policy)), None)


# Inputs the fuzzers found that once crashed the end-of-message path or
# delivered a message unchecked (SMTP reply escaping; caps on what one
# message puts into our A-R); kept as regression tests.
def test_percent_in_the_from_domain_reaches_the_reply_safely(zone_server: TestDNSServer) -> None:
    # bench.fuzz eom: the out-of-scope refusal quotes the invalid domain
    # "victim.example%", and pymilter's setreply refuses a lone "%".
    state = _state(zone_server, PolicyConfig(out_of_scope="reject"))
    code, context, errors = _one_message(
        state, [("From", ": a.b@victim.example%; a.b@bank.example;")]
    )
    assert not errors, [r.getMessage() for r in errors]
    assert code == REJECT and context.calls[-1][0] == "setreply"


def test_a_flood_of_signatures_still_gets_our_header(zone_server: TestDNSServer) -> None:
    # bench.fuzz eom: 300 junk signatures with long d= and s= made our A-R
    # longer than libmilter can send; the message went out unchecked.
    flood = [
        ("DKIM-Signature", f"v=1; a=rsa-sha256; d={'d' * 60}.{n}.example; s={'s' * 200}; "
                           "h=from; bh=YWJj; b=YWJj")
        for n in range(300)
    ]  # fmt: skip
    state = _state(zone_server, PolicyConfig())
    _, context, errors = _one_message(state, [*flood, ("From", "ceo@victim.example")])
    assert not errors, [r.getMessage() for r in errors]
    assert any(c[:2] == ("addheader", "Authentication-Results") for c in context.calls)


def test_our_header_reads_back_whatever_the_signature_count(zone_server: TestDNSServer) -> None:
    # bench.fuzz eom: 264 short junk signatures fit in 64 KiB, but our A-R
    # then lists more results than our own parser (MAX_RESULTS) reads.
    flood = [
        ("DKIM-Signature", f"v=1; a=rsa-sha256; d=d.{n}.example; s=s; h=from; bh=YWJj; b=YWJj")
        for n in range(264)
    ]
    state = _state(zone_server, PolicyConfig())
    _, context, errors = _one_message(state, [*flood, ("From", "ceo@victim.example")])
    assert not errors, [r.getMessage() for r in errors]
    (ours,) = [c[2] for c in context.calls if c[:2] == ("addheader", "Authentication-Results")]
    assert parse(ours).authserv_id == AUTHSERV_ID
