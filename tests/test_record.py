"""DMARC record parsing: RFC 9989 §4.5-§4.8 and §4.10.1, digest §1."""

from __future__ import annotations

import random
import string
import time

import pytest

from dmarcmilter.record import (
    AlignmentMode,
    DMARCRecord,
    Policy,
    PSDFlag,
    RecordStatus,
    _parse_record,
    is_dmarc_record,
    parse_record,
    select_record,
)

RUA = "rua=mailto:r@example.com"


def problems_with(record: DMARCRecord, word: str) -> list[str]:
    return [p for p in record.problems if word in p]


# -- Policy helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "lowered"),
    [
        (Policy.REJECT, Policy.QUARANTINE),
        (Policy.QUARANTINE, Policy.NONE),
        (Policy.NONE, Policy.NONE),
    ],
)
def test_policy_lowered_for_t_y(policy: Policy, lowered: Policy) -> None:
    assert policy.lowered() is lowered


# -- v=DMARC1 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1", True),
        ("v=DMARC1;", True),
        ("v=DMARC1; p=reject", True),
        ("v = DMARC1 ; p=reject", True),  # WSP around "=" and ";" (§4.8)
        ("v=DMARC1\t;p=none", True),
        ("  v=DMARC1; p=none", True),  # [impl choice] leading WSP stripped
        ("V=DMARC1; p=none", True),  # [impl choice] tag-name case: accepted, flagged
        ("v=dmarc1; p=reject", False),  # the value is case-sensitive (%s)
        ("v=Dmarc1; p=reject", False),
        ("v=DMARC2; p=reject", False),
        ("v=DMARC1x; p=reject", False),
        ("v=DMARC1 p=reject", False),  # no separator: the v value is not DMARC1
        ("p=reject; v=DMARC1", False),  # v must be the first tag
        ("v=spf1 -all", False),
        ("", False),
        ("DMARC1", False),
        ("\nv=DMARC1", False),  # only WSP (SP/HTAB) is tolerated
    ],
)
def test_is_dmarc_record(text: str, expected: bool) -> None:
    assert is_dmarc_record(text) is expected


def test_not_a_dmarc_record_parses_unusable_without_raising() -> None:
    record = parse_record("v=spf1 -all")
    assert record.status is RecordStatus.UNUSABLE
    assert problems_with(record, "v=DMARC1")


def test_v_tag_name_in_upper_case_is_accepted_with_a_problem() -> None:
    record = parse_record("V=DMARC1; p=reject")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.REJECT
    assert record.problems == ("tag name 'V' should be lower case",)


# -- bare record and defaults ----------------------------------------------------------------


def test_bare_version_is_valid_and_means_p_none() -> None:
    record = parse_record("v=DMARC1")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.NONE
    assert record.sp is None and record.np is None
    assert record.rua == () and record.ruf == ()
    assert record.problems == ("no p tag: p=none applies",)


def test_defaults() -> None:
    record = parse_record("v=DMARC1; p=reject")
    assert record == DMARCRecord(
        raw="v=DMARC1; p=reject",
        status=RecordStatus.VALID,
        p=Policy.REJECT,
        sp=None,
        np=None,
        adkim=AlignmentMode.RELAXED,
        aspf=AlignmentMode.RELAXED,
        testing=False,
        psd=PSDFlag.UNKNOWN,
        fo="0",
        rua=(),
        ruf=(),
        pct=None,
        problems=(),
    )


def test_all_tags_parsed() -> None:
    record = parse_record(
        "v=DMARC1; p=quarantine; sp=none; np=reject; psd=n; t=y; adkim=s; aspf=s; "
        "fo=1:d:s; rua=mailto:a@example.com,mailto:b@example.net; ruf=mailto:f@example.com"
    )
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.QUARANTINE
    assert record.sp is Policy.NONE
    assert record.np is Policy.REJECT
    assert record.psd is PSDFlag.NO
    assert record.testing is True
    assert record.adkim is AlignmentMode.STRICT
    assert record.aspf is AlignmentMode.STRICT
    assert record.fo == "1:d:s"
    assert record.rua == ("mailto:a@example.com", "mailto:b@example.net")
    assert record.ruf == ("mailto:f@example.com",)
    assert record.problems == ()


def test_tag_order_is_free_after_v() -> None:
    # RFC 7489 wanted p second; RFC 9989 does not.
    record = parse_record("v=DMARC1; rua=mailto:a@example.com; adkim=s; p=reject")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.REJECT
    assert record.problems == ()


# -- policy values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "policy"),
    [
        ("none", Policy.NONE),
        ("quarantine", Policy.QUARANTINE),
        ("reject", Policy.REJECT),
        ("Reject", Policy.REJECT),  # ABNF literals are case-insensitive
        ("QUARANTINE", Policy.QUARANTINE),
    ],
)
def test_policy_values(value: str, policy: Policy) -> None:
    record = parse_record(f"v=DMARC1; p={value}; sp={value}; np={value}")
    assert record.status is RecordStatus.VALID
    assert (record.p, record.sp, record.np) == (policy, policy, policy)
    assert record.problems == ()


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("v=DMARC1; p=rejct", "invalid p 'rejct'"),
        ("v=DMARC1; p=", "invalid p ''"),
        ("v=DMARC1; p=reject,none", "invalid p 'reject,none'"),
        ("v=DMARC1; p=reject; sp=quarantin", "invalid sp 'quarantin'"),
        ("v=DMARC1; p=reject; np=nxdomain", "invalid np 'nxdomain'"),
        ("v=DMARC1; p=reject; sp=", "invalid sp ''"),
    ],
)
def test_invalid_policy_without_rua_is_unusable(text: str, bad: str) -> None:
    record = parse_record(text)
    assert record.status is RecordStatus.UNUSABLE
    assert record.p is Policy.NONE
    assert record.sp is None and record.np is None
    assert record.problems == (bad, "invalid policy and no valid rua: no DMARC processing")


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        (f"v=DMARC1; p=rejct; {RUA}", "invalid p 'rejct'"),
        # [impl choice, literal §4.10.1] a bad sp spoils the whole record,
        # even for Author Domains that would have used p.
        (f"v=DMARC1; p=reject; sp=quarantin; {RUA}", "invalid sp 'quarantin'"),
        (f"v=DMARC1; p=reject; sp=none; np=maybe; {RUA}", "invalid np 'maybe'"),
    ],
)
def test_invalid_policy_with_valid_rua_acts_as_none(text: str, bad: str) -> None:
    record = parse_record(text)
    assert record.status is RecordStatus.AS_NONE
    assert record.p is Policy.NONE
    assert record.sp is None and record.np is None
    assert record.rua == ("mailto:r@example.com",)
    assert record.problems == (bad, "acting as p=none because of the invalid policy")


def test_invalid_policy_with_only_malformed_rua_is_unusable() -> None:
    record = parse_record("v=DMARC1; p=rejct; rua=mailto:nobody, r@example.com")
    assert record.status is RecordStatus.UNUSABLE
    assert record.rua == ()


def test_invalid_policy_with_any_valid_scheme_counts_as_rua() -> None:
    # Any syntactically valid URI keeps reports flowing; whether the reporter
    # supports the scheme is decided later.
    record = parse_record("v=DMARC1; p=rejct; rua=https://reports.example.com/dmarc")
    assert record.status is RecordStatus.AS_NONE


def test_missing_p_with_rua_is_p_none() -> None:
    # E10: both readings of the spec agree here.
    record = parse_record(f"v=DMARC1; {RUA}")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.NONE
    assert record.problems == ("no p tag: p=none applies",)


def test_missing_p_without_rua_is_p_none_impl_choice() -> None:
    record = parse_record("v=DMARC1; adkim=s")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.NONE
    assert record.adkim is AlignmentMode.STRICT


def test_missing_p_keeps_sp_and_np() -> None:
    record = parse_record("v=DMARC1; sp=reject; np=quarantine")
    assert (record.p, record.sp, record.np) == (Policy.NONE, Policy.REJECT, Policy.QUARANTINE)


# -- E10 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "status", "p", "testing"),
    [
        ("v=DMARC1; p=rejct; rua=mailto:r@example.com", RecordStatus.AS_NONE, Policy.NONE, False),
        ("v=DMARC1; p=rejct", RecordStatus.UNUSABLE, Policy.NONE, False),
        ("v=DMARC1; rua=mailto:r@example.com", RecordStatus.VALID, Policy.NONE, False),
        ("v=DMARC1; p=reject; t=y", RecordStatus.VALID, Policy.REJECT, True),
        ("v=DMARC1; p=quarantine; t=y", RecordStatus.VALID, Policy.QUARANTINE, True),
    ],
)
def test_e10_bad_policy_values(text: str, status: RecordStatus, p: Policy, testing: bool) -> None:
    record = parse_record(text)
    assert (record.status, record.p, record.testing) == (status, p, testing)


def test_e10_testing_lowers_the_applied_policy() -> None:
    assert parse_record("v=DMARC1; p=reject; t=y").p.lowered() is Policy.QUARANTINE
    assert parse_record("v=DMARC1; p=quarantine; t=y").p.lowered() is Policy.NONE


# -- other known tags: invalid value -> default + problem ----------------------------


@pytest.mark.parametrize(
    ("tag", "value", "field", "default"),
    [
        ("adkim", "x", "adkim", AlignmentMode.RELAXED),
        ("aspf", "strict", "aspf", AlignmentMode.RELAXED),
        ("t", "maybe", "testing", False),
        ("psd", "q", "psd", PSDFlag.UNKNOWN),
        ("fo", "2", "fo", "0"),
        ("adkim", "", "adkim", AlignmentMode.RELAXED),
    ],
)
def test_invalid_value_of_other_known_tag_gives_default(
    tag: str, value: str, field: str, default: object
) -> None:
    record = parse_record(f"v=DMARC1; p=reject; {tag}={value}")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.REJECT
    assert getattr(record, field) == default
    assert record.problems == (f"invalid {tag} {value!r} ignored",)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("r", AlignmentMode.RELAXED), ("s", AlignmentMode.STRICT), ("S", AlignmentMode.STRICT)],
)
def test_alignment_modes(value: str, mode: AlignmentMode) -> None:
    record = parse_record(f"v=DMARC1; adkim={value}; aspf={value}")
    assert record.adkim is mode and record.aspf is mode


@pytest.mark.parametrize(
    ("value", "flag"),
    [("y", PSDFlag.YES), ("n", PSDFlag.NO), ("u", PSDFlag.UNKNOWN), ("Y", PSDFlag.YES)],
)
def test_psd_values(value: str, flag: PSDFlag) -> None:
    record = parse_record(f"v=DMARC1; p=none; psd={value}")
    assert record.psd is flag
    assert record.problems == ()


@pytest.mark.parametrize(("value", "testing"), [("y", True), ("n", False), ("Y", True)])
def test_t_values(value: str, testing: bool) -> None:
    assert parse_record(f"v=DMARC1; p=reject; t={value}").testing is testing


# -- fo grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("0", "0"),
        ("1", "1"),
        ("d", "d"),
        ("s", "s"),
        ("1:d:s", "1:d:s"),
        ("0:s", "0:s"),
        ("d:1", "d:1"),
        ("d:1:s", "d:1:s"),
        ("d:s", "d:s"),
        ("s:d:0", "s:d:0"),
        ("D:S", "d:s"),
    ],
)
def test_fo_valid(value: str, normalised: str) -> None:
    record = parse_record(f"v=DMARC1; p=none; fo={value}")
    assert record.fo == normalised
    assert record.problems == ()


@pytest.mark.parametrize(
    "value",
    ["0:1", "1:1", "d:d", "x", "1:", ":1", "1::d", "1,d", "01", "1:d:s:0", "", "1 : d"],
)
def test_fo_invalid_gives_0(value: str) -> None:
    record = parse_record(f"v=DMARC1; p=none; fo={value}; rua=mailto:a@example.com")
    assert record.fo == "0"
    assert record.status is RecordStatus.VALID
    assert problems_with(record, "invalid fo")


# -- URI lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "uris"),
    [
        ("mailto:a@example.com", ("mailto:a@example.com",)),
        ("mailto:a@example.com!10m", ("mailto:a@example.com",)),  # obsolete size stripped
        ("mailto:a@example.com!10", ("mailto:a@example.com",)),
        ("mailto:a@example.com!5K", ("mailto:a@example.com",)),
        (
            "mailto:a@example.com!10m, mailto:b@example.net!1g",
            ("mailto:a@example.com", "mailto:b@example.net"),
        ),
        (
            "mailto:a@example.com ,\tmailto:b@example.net",
            ("mailto:a@example.com", "mailto:b@example.net"),
        ),
        ("mailto:dmarc%2Breports@example.com", ("mailto:dmarc%2Breports@example.com",)),
        ("mailto:a@example.com?subject=dmarc", ("mailto:a@example.com?subject=dmarc",)),
        ("https://reports.example.com/dmarc", ("https://reports.example.com/dmarc",)),
        ("MAILTO:A@EXAMPLE.COM", ("MAILTO:A@EXAMPLE.COM",)),
        ("mailto:a@xn--bcher-kva.example", ("mailto:a@xn--bcher-kva.example",)),
    ],
)
def test_rua_valid(value: str, uris: tuple[str, ...]) -> None:
    record = parse_record(f"v=DMARC1; p=none; rua={value}; ruf={value}")
    assert record.rua == uris
    assert record.ruf == uris
    assert record.problems == ()


@pytest.mark.parametrize(
    ("value", "kept", "problem"),
    [
        ("a@example.com", (), "URI without a scheme"),
        ("mailto:a@example.com, example.net", ("mailto:a@example.com",), "URI without a scheme"),
        ("mailto:", (), "URI without a body"),
        ("mailto:nobody", (), "mailto URI without an address"),
        ("mailto:@example.com", (), "mailto URI without an address"),
        ("mailto:a@", (), "mailto URI without a valid domain"),
        ("mailto:a@exa mple.com", (), "malformed URI"),
        ("mailto:a@example..com", (), "mailto URI without a valid domain"),
        ("mailto:a@example.com!10x", (), "malformed URI"),  # "!" must be %-encoded
        ("mailto:a@example.com!", (), "malformed URI"),
        ("mailto:a%zz@example.com", (), "malformed URI"),
        ("1http://x.example", (), "URI without a scheme"),
        (
            "mailto:a@example.com,,mailto:b@example.com",
            ("mailto:a@example.com", "mailto:b@example.com"),
            "empty URI",
        ),
    ],
)
def test_rua_malformed_uris_dropped_valid_kept(
    value: str, kept: tuple[str, ...], problem: str
) -> None:
    record = parse_record(f"v=DMARC1; p=reject; rua={value}")
    assert record.status is RecordStatus.VALID
    assert record.rua == kept
    assert len(record.problems) == 1
    assert record.problems[0].startswith(f"rua: {problem}")


def test_empty_rua() -> None:
    record = parse_record("v=DMARC1; p=reject; rua=")
    assert record.rua == ()
    assert record.problems == ("empty rua",)


# -- legacy pct / rf / ri ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "pct"), [("0", 0), ("50", 50), ("100", 100), ("007", 7)])
def test_pct_valid_is_kept_without_problem(value: str, pct: int) -> None:
    record = parse_record(f"v=DMARC1; p=reject; pct={value}")
    assert record.pct == pct
    assert record.problems == ()


@pytest.mark.parametrize("value", ["101", "-1", "abc", "", "1000", "５"])
def test_pct_invalid_is_a_problem(value: str) -> None:
    record = parse_record(f"v=DMARC1; p=reject; pct={value}")
    assert record.pct is None
    assert record.testing is False
    assert record.problems == (f"invalid pct {value!r} ignored",)


@pytest.mark.parametrize(
    ("tags", "testing"),
    [
        ("pct=0", True),  # [impl choice, digest §4.6] pct=0 without t means t=y
        ("pct=50", False),  # other values ignored: never sample
        ("pct=100", False),
        ("pct=0; t=n", False),  # an explicit t wins
        ("pct=100; t=y", True),
        ("pct=0; t=bogus", True),  # an invalid t is dropped, as if absent
    ],
)
def test_pct_mapping_to_testing(tags: str, testing: bool) -> None:
    assert parse_record(f"v=DMARC1; p=reject; {tags}").testing is testing


@pytest.mark.parametrize("tags", ["rf=afrf", "rf=afrf:iodef", "ri=86400", "ri=3600; rf=AFRF"])
def test_rf_ri_valid_are_silent(tags: str) -> None:
    assert parse_record(f"v=DMARC1; p=reject; {tags}").problems == ()


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ("rf=", "invalid rf ''"),
        ("rf=afrf,iodef", "invalid rf 'afrf,iodef'"),
        ("ri=1d", "invalid ri '1d'"),
        ("ri=", "invalid ri ''"),
    ],
)
def test_rf_ri_invalid_are_problems(tags: str, problem: str) -> None:
    record = parse_record(f"v=DMARC1; p=reject; {tags}")
    assert record.status is RecordStatus.VALID
    assert record.problems == (f"{problem} ignored",)


# -- unknown tags, duplicates, case, whitespace, separators ------------------------------------


def test_unknown_tags_are_ignored() -> None:
    record = parse_record("v=DMARC1; p=reject; foo=bar; adkm=s; x=!!!")
    assert record.status is RecordStatus.VALID
    assert record.adkim is AlignmentMode.RELAXED
    assert record.unknown_tags == ("foo", "adkm", "x")
    assert record.problems == ()


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1; p=reject; p=none",
        "v=DMARC1; p=reject; p=reject",
        "v=DMARC1; p=reject; rua=mailto:a@example.com; rua=mailto:b@example.com",
        "v=DMARC1; v=DMARC1; p=reject",
        "v=DMARC1; p=reject; P=none",  # case-folded names collide too
        "v=DMARC1; p=reject; foo=1; foo=2",  # any repeated tag spoils the tag-list
    ],
)
def test_duplicate_tags_make_the_record_unusable(text: str) -> None:
    record = parse_record(text)
    assert record.status is RecordStatus.UNUSABLE
    assert record.rua == ()
    assert problems_with(record, "duplicate tag")
    assert record.problems[-1].endswith("the record is invalid")


def test_tag_names_in_other_case_are_accepted_with_problems() -> None:
    record = parse_record("v=DMARC1; P=Reject; ADKIM=s; Rua=mailto:a@example.com")
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.REJECT
    assert record.adkim is AlignmentMode.STRICT
    assert record.rua == ("mailto:a@example.com",)
    assert record.problems == (
        "tag name 'P' should be lower case",
        "tag name 'ADKIM' should be lower case",
        "tag name 'Rua' should be lower case",
    )


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1;p=reject;sp=none",
        "v=DMARC1 ; p = reject ; sp = none",
        "v=DMARC1;\tp=reject\t;\tsp=none\t",
        "  v=DMARC1; p=reject; sp=none  ",  # [impl choice] leading/trailing WSP stripped
        "v=DMARC1; p=reject; sp=none;",  # trailing ";"
        "v=DMARC1; p=reject; sp=none; ",
        "\tv=DMARC1; p=reject; sp=none;\t",
    ],
)
def test_whitespace_and_trailing_separator(text: str) -> None:
    record = parse_record(text)
    assert record.status is RecordStatus.VALID
    assert (record.p, record.sp) == (Policy.REJECT, Policy.NONE)
    assert record.problems == ()
    assert record.raw == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("v=DMARC1;; p=reject", "empty tag (';;') ignored"),
        ("v=DMARC1; reject; p=reject", "malformed tag 'reject' ignored"),
        ("v=DMARC1; a-b=1; p=reject", "malformed tag 'a-b=1' ignored"),
        ("v=DMARC1; =x; p=reject", "malformed tag '=x' ignored"),
    ],
)
def test_malformed_tag_specs_are_ignored_with_a_problem(text: str, problem: str) -> None:
    record = parse_record(text)
    assert record.status is RecordStatus.VALID
    assert record.p is Policy.REJECT
    assert record.problems == (problem,)


def test_np_is_an_unknown_tag_for_rfc7489_discovery() -> None:
    text = "v=DMARC1; p=reject; np=bogus"
    assert parse_record(text).status is RecordStatus.UNUSABLE
    legacy = parse_record(text, np_supported=False)
    assert legacy.status is RecordStatus.VALID
    assert legacy.p is Policy.REJECT and legacy.np is None
    assert legacy.unknown_tags == ("np",)


def test_long_values_are_cut_in_problems() -> None:
    record = parse_record("v=DMARC1; p=" + "x" * 500)
    assert all(len(p) < 100 for p in record.problems)


# -- select_record ---------------------------------------------------------------------------


def test_select_record_keeps_only_dmarc_strings() -> None:
    record, count = select_record(["v=spf1 -all", "v=DMARC1; p=reject", "hello"])
    assert count == 1
    assert record is not None and record.p is Policy.REJECT


def test_select_record_discards_all_of_several() -> None:
    assert select_record(["v=DMARC1; p=reject", "v=DMARC1; p=none"]) == (None, 2)
    # Identical strings are still two records.
    assert select_record(["v=DMARC1; p=reject", "v=DMARC1; p=reject"]) == (None, 2)


def test_select_record_none() -> None:
    assert select_record([]) == (None, 0)
    assert select_record(["v=spf1 -all", "v=DMARC2; p=reject"]) == (None, 0)


def test_select_record_unusable_record_is_still_the_record() -> None:
    # digest §2.1 [impl choice]: a lone v=DMARC1 record counts; its errors
    # are handled when it is applied.
    record, count = select_record(["v=DMARC1; p=bogus"])
    assert count == 1
    assert record is not None and record.status is RecordStatus.UNUSABLE


# -- robustness and speed --------------------------------------------------------------------


def test_parse_never_raises_on_random_text() -> None:
    rng = random.Random(9989)
    alphabet = string.printable + "é\x00;=,!:"
    for _ in range(3000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        record = parse_record("v=DMARC1;" + body)
        assert isinstance(record, DMARCRecord)
        parse_record(body)


def test_parse_is_memoised() -> None:
    text = "v=DMARC1; p=reject; rua=mailto:memo@example.com"
    assert parse_record(text) is parse_record(text)


def test_parse_is_fast() -> None:
    # Uncached parsing stays well below what 1000 messages/s needs.
    texts = [
        f"v=DMARC1; p=reject; sp=quarantine; adkim=s; fo=1:d; "
        f"rua=mailto:agg{i}@example.com!10m,mailto:x@example.net; ruf=mailto:f@example.com"
        for i in range(2000)
    ]
    start = time.perf_counter()
    for text in texts:
        _parse_record(text, True)
    per_record = (time.perf_counter() - start) / len(texts)
    assert per_record < 0.0005
