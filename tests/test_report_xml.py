"""Aggregate reports as XML (dmarcmilter.report.xml), in both formats.

Every document is checked three ways: against the format's XML schema
(../shared/specs), read back with ElementTree and compared, element by
element, with the data it was written from, and read by parsedmarc, a real
consumer, offline.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import itertools
import logging
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from xml.parsers import expat

import parsedmarc
import pytest
import xmlschema

from dmarcmilter.history.reader import (
    DKIMAuthResult,
    PolicyOverrideReason,
    PublishedPolicy,
    ReportRecord,
    SPFAuthResult,
)
from dmarcmilter.report.model import AggregateReport, ReportMetadata
from dmarcmilter.report.xml import ReportFormat, WrittenReport, render_report, write_report
from tests.conftest import shared_path

NS_9990 = "urn:ietf:params:xml:ns:dmarc-2.0"
NS_7489 = "http://dmarc.org/dmarc-xml/0.1"
BOTH = pytest.mark.parametrize("fmt", list(ReportFormat), ids=lambda f: f.value)

BEGIN = 1_777_593_600  # 2026-05-01T00:00:00Z

POLICY = PublishedPolicy(
    domain="example.com",
    discovery_method="treewalk",
    p="reject",
    sp="quarantine",
    np="none",
    adkim="s",
    aspf="r",
    testing="n",
    fo="1:d",
    psd="n",
    pct=50,
    rua="mailto:dmarc@example.com",
)
# Nothing but p: the least a published policy can say.
MINIMAL_POLICY = PublishedPolicy(
    domain="example.org",
    discovery_method=None,
    p="none",
    sp=None,
    np=None,
    adkim=None,
    aspf=None,
    testing=None,
    fo=None,
    psd=None,
    pct=None,
    rua="mailto:dmarc@example.org",
)

METADATA = ReportMetadata(
    org_name="Receiver Example",
    email="dmarc-noreply@receiver.example",
    report_id="1a2b3c4d",
    begin=BEGIN,
    end=BEGIN + 86399,
    generator="dmarcmilter/0.1.0",
    extra_contact_info="https://receiver.example/dmarc",
    errors=("unknown tag: foo", "invalid rua URI: bar"),
)
MINIMAL_METADATA = ReportMetadata(
    "Receiver Example", "dmarc@receiver.example", "5e6f", BEGIN, BEGIN + 86399, "dmarcmilter/0.1.0"
)


def record(**changes: Any) -> ReportRecord:
    base = ReportRecord(
        source_ip="192.0.2.1",
        count=7,
        disposition="none",
        dkim="pass",
        spf="pass",
        reasons=(),
        header_from="example.com",
        envelope_from="bounce.example.com",
        envelope_to=None,
        dkim_results=(DKIMAuthResult("example.com", "s2026", "pass"),),
        spf_result=SPFAuthResult("bounce.example.com", "mfrom", "pass"),
        policy=POLICY,
    )
    return replace(base, **changes)


FULL_RECORDS = (
    record(
        disposition="pass",
        envelope_to="receiver.example",
        dkim_results=(
            DKIMAuthResult("example.com", "s2026", "pass"),
            DKIMAuthResult("esp.example", "k1", "pass"),
            DKIMAuthResult("example.com", "old", "fail"),
        ),
    ),
    record(
        source_ip="2001:db8::25",
        count=2,
        dkim="fail",
        spf="fail",
        reasons=(
            PolicyOverrideReason("policy_test_mode", ""),
            PolicyOverrideReason("local_policy", "allowed by the local allow list"),
        ),
        header_from="sub.example.com",
        envelope_from="",  # the null reverse-path: SPF checked the HELO name
        dkim_results=(),
        spf_result=SPFAuthResult("mx.sender.example", "helo", "neutral"),
    ),
    record(
        source_ip="198.51.100.7",
        count=1,
        disposition="reject",
        dkim="fail",
        spf="fail",
        reasons=(PolicyOverrideReason("mailing_list", "list.example"),),
        envelope_from=None,  # unknown
        envelope_to="receiver.example",
        dkim_results=(DKIMAuthResult("example.com", "s2026", "permerror"),),
        spf_result=SPFAuthResult("example.com", "mfrom", "fail"),
    ),
    record(
        source_ip="203.0.113.9",
        count=3,
        disposition="quarantine",
        dkim="fail",
        spf="fail",
        reasons=(PolicyOverrideReason("trusted_forwarder", ""),),
        dkim_results=(DKIMAuthResult("example.com", "s2026", "temperror"),),
        spf_result=SPFAuthResult("bounce.example.com", "mfrom", "temperror"),
    ),
)
FULL = AggregateReport(METADATA, POLICY, FULL_RECORDS)
MINIMAL = AggregateReport(
    MINIMAL_METADATA,
    MINIMAL_POLICY,
    (
        record(
            envelope_from=None,
            dkim_results=(),
            spf_result=SPFAuthResult("example.org", "mfrom", "none"),
            header_from="example.org",
            policy=MINIMAL_POLICY,
        ),
    ),
)


# -- schemas ------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_9990() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(shared_path("specs", "dmarc-aggregate-report.xsd")))


@pytest.fixture(scope="module")
def schema_7489() -> xmlschema.XMLSchema:
    """RFC 7489 Appendix C's schema, with its two publication defects repaired.

    Its xs:schema element binds no prefix to the target namespace, so the
    references to its own types ("DateRangeType", ...) resolve to no
    namespace and the schema does not compile: the default namespace is
    declared.  Its IPAddress pattern is wrapped over three lines, and the
    spaces the wrapping leaves are part of it, so it matches no address:
    they are removed.  Nothing else changes; in particular
    elementFormDefault stays unqualified.
    """
    text = shared_path("specs", "rfc7489-aggregate-report.xsd").read_text()
    if f'xmlns="{NS_7489}"' not in text:
        text = text.replace("<xs:schema ", f'<xs:schema xmlns="{NS_7489}" ', 1)
    text, patterns = re.subn(
        r'(<xs:pattern value=")([^"]*)(")',
        lambda m: m.group(1) + re.sub(r"\s+", "", m.group(2)) + m.group(3),
        text,
    )
    assert patterns == 1
    return xmlschema.XMLSchema(text)


Validate = Callable[[bytes, ReportFormat], None]


@pytest.fixture
def validate(schema_9990: xmlschema.XMLSchema, schema_7489: xmlschema.XMLSchema) -> Validate:
    """Raises xmlschema's validation error, naming the element, if invalid."""

    def check(doc: bytes, fmt: ReportFormat) -> None:
        schema = schema_9990 if fmt is ReportFormat.RFC9990 else schema_7489
        schema.validate(io.BytesIO(doc))

    return check


# -- reading a document back, and what it should say -------------------------

Tree = dict[str, list[Any]]


def read_back(doc: bytes, fmt: ReportFormat) -> Tree:
    """The document as nested {element name: [values]}, leaves as text.

    RFC 9990 puts every element in its namespace; RFC 7489's schema
    (elementFormDefault unqualified) only the root.
    """
    assert doc.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    root = ET.fromstring(doc)
    if fmt is ReportFormat.RFC9990:
        assert root.tag == f"{{{NS_9990}}}feedback"
        prefix = f"{{{NS_9990}}}"
    else:
        assert root.tag == f"{{{NS_7489}}}feedback"
        prefix = ""
    tree = _tree(root, prefix)
    assert isinstance(tree, dict)
    return tree


def _tree(element: ET.Element, prefix: str) -> Tree | str:
    children = list(element)
    if not children:
        assert not element.attrib
        return element.text or ""
    assert not (element.text or "").strip()
    tree: Tree = {}
    for child in children:
        assert child.tag.startswith(prefix)
        name = child.tag.removeprefix(prefix)
        assert "{" not in name, f"{child.tag} in the wrong namespace"
        tree.setdefault(name, []).append(_tree(child, prefix))
    return tree


_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def clean(text: str) -> str:
    """What an XML parser should read back for ``text``."""
    return _NOT_XML_CHAR.sub("\ufffd", text)


def expected(report: AggregateReport, fmt: ReportFormat) -> Tree:
    """The tree ``read_back`` should return, for data whose values are all
    in the schemas' enumerations."""
    legacy = fmt is ReportFormat.RFC7489
    m, p = report.metadata, report.policy
    metadata: Tree = {
        "org_name": [clean(m.org_name)],
        "email": [clean(m.email)],
        "report_id": [clean(m.report_id)],
        "date_range": [{"begin": [str(m.begin)], "end": [str(m.end)]}],
    }
    if m.extra_contact_info is not None:
        metadata["extra_contact_info"] = [clean(m.extra_contact_info)]
    if m.errors:
        # RFC 9990 allows a single error element.
        errors = list(m.errors) if legacy else ["; ".join(m.errors)]
        metadata["error"] = [clean(e) for e in errors]
    policy: Tree = {"domain": [clean(p.domain)], "p": [p.p]}
    if legacy:
        policy |= {
            "sp": [p.sp or p.p],
            "pct": [str(100 if p.pct is None else p.pct)],
            "fo": [clean(p.fo or "0")],
        }
        policy |= {name: [getattr(p, name)] for name in ("adkim", "aspf") if getattr(p, name)}
    else:
        metadata["generator"] = [clean(m.generator)]
        names = ("sp", "np", "adkim", "aspf", "discovery_method", "fo", "testing")
        policy |= {name: [clean(getattr(p, name))] for name in names if getattr(p, name)}
    return {
        "version": ["1.0"],
        "report_metadata": [metadata],
        "policy_published": [policy],
        "record": [expected_record(r, fmt) for r in report.records],
    }


def expected_record(r: ReportRecord, fmt: ReportFormat) -> Tree:
    legacy = fmt is ReportFormat.RFC7489
    evaluated: Tree = {
        # RFC 7489 has no "pass" disposition.
        "disposition": ["none" if legacy and r.disposition == "pass" else r.disposition],
        "dkim": [r.dkim],
        "spf": [r.spf],
    }
    if r.reasons:
        evaluated["reason"] = [
            {
                "type": [
                    "sampled_out" if legacy and reason.type == "policy_test_mode" else reason.type
                ],
                **({"comment": [clean(reason.comment)]} if reason.comment else {}),
            }
            for reason in r.reasons
        ]
    ip = r.source_ip
    if legacy and ipaddress.ip_address(ip).version == 6:
        ip = ipaddress.ip_address(ip).exploded  # the RFC 7489 pattern knows no "::"
    identifiers: Tree = {"header_from": [clean(r.header_from)]}
    if r.envelope_from is not None or legacy:  # required in RFC 7489
        identifiers["envelope_from"] = [clean(r.envelope_from or "")]
    if r.envelope_to is not None:
        identifiers["envelope_to"] = [clean(r.envelope_to)]
    auth: Tree = {}
    if r.dkim_results:
        auth["dkim"] = [
            {"domain": [clean(d.domain)], "selector": [clean(d.selector)], "result": [d.result]}
            for d in r.dkim_results
        ]
    spf: Tree = {"domain": [clean(r.spf_result.domain)], "result": [r.spf_result.result]}
    # RFC 9990's scope allows only "mfrom"; RFC 7489 requires a scope.
    if legacy or r.spf_result.scope == "mfrom":
        spf["scope"] = [r.spf_result.scope]
    auth["spf"] = [spf]
    return {
        "row": [{"source_ip": [ip], "count": [str(r.count)], "policy_evaluated": [evaluated]}],
        "identifiers": [identifiers],
        "auth_results": [auth],
    }


# -- documents -----------------------------------------------------------------


@BOTH
def test_full_report_is_valid_and_matches_its_data(validate: Validate, fmt: ReportFormat) -> None:
    doc = render_report(FULL, fmt)
    validate(doc, fmt)
    assert read_back(doc, fmt) == expected(FULL, fmt)


@BOTH
def test_minimal_report_is_valid(validate: Validate, fmt: ReportFormat) -> None:
    doc = render_report(MINIMAL, fmt)
    validate(doc, fmt)
    tree = read_back(doc, fmt)
    assert tree == expected(MINIMAL, fmt)
    policy = tree["policy_published"][0]
    if fmt is ReportFormat.RFC7489:
        # Required there, so the defaults of RFC 7489 §6.3.
        assert (policy["sp"], policy["pct"], policy["fo"]) == (["none"], ["100"], ["0"])
        assert tree["record"][0]["identifiers"][0]["envelope_from"] == [""]
    else:
        assert set(policy) == {"domain", "p"}
        assert "envelope_from" not in tree["record"][0]["identifiers"][0]
    assert "dkim" not in tree["record"][0]["auth_results"][0]
    assert not {"error", "extra_contact_info"} & set(tree["report_metadata"][0])


@BOTH
def test_hostile_text_cannot_break_the_document(validate: Validate, fmt: ReportFormat) -> None:
    nasty = "a<b>&c\"d'e]]>f\x00g\x01\x08\x0b\x0c\x1fh\ud800i\udcffj\ufffe\uffffk\tl\r\nm"
    u_label = "bücher.例え.example"
    metadata = replace(
        METADATA,
        org_name=nasty,
        email=nasty,
        report_id=nasty,
        extra_contact_info=nasty,
        generator=nasty,
        errors=(nasty, "second <error>"),
    )
    policy = replace(POLICY, domain=u_label, fo=nasty)
    hostile = record(
        header_from=u_label,
        envelope_from=nasty,
        envelope_to=nasty,
        reasons=(PolicyOverrideReason("other", nasty),),
        dkim_results=(DKIMAuthResult(nasty, nasty, "fail"),),
        spf_result=SPFAuthResult(nasty, "mfrom", "softfail"),
    )
    report = AggregateReport(metadata, policy, (hostile, record(header_from=u_label)))
    doc = render_report(report, fmt)
    validate(doc, fmt)
    # Nothing raw that a parser would refuse, or rewrite (CR becomes LF).
    assert re.search(rb"[\x00-\x08\x0b-\x1f]", doc) is None
    assert "\ufffe" not in doc.decode() and "\uffff" not in doc.decode()
    tree = read_back(doc, fmt)
    assert tree == expected(report, fmt)
    # The escapable characters come back exactly, the others as U+FFFD.
    comment = tree["record"][0]["row"][0]["policy_evaluated"][0]["reason"][0]["comment"][0]
    assert (
        comment == "a<b>&c\"d'e]]>f\ufffdg" + "\ufffd" * 5 + "h\ufffdi\ufffdj\ufffd\ufffdk\tl\r\nm"
    )
    assert tree["record"][0]["identifiers"][0]["header_from"] == [u_label]


@BOTH
def test_values_outside_the_enumerations_are_mapped_not_refused(
    validate: Validate, fmt: ReportFormat
) -> None:
    legacy = fmt is ReportFormat.RFC7489
    odd_policy = replace(
        POLICY, p="Reject", sp="bogus", np="", adkim="x", aspf=" S ", testing="maybe", pct=None
    )
    odd = record(
        source_ip="not an address <>",
        disposition="discard",
        dkim="PASS",
        spf="maybe",
        reasons=(
            PolicyOverrideReason("forwarded", ""),
            PolicyOverrideReason("sampled_out", ""),
            PolicyOverrideReason("made_up", ""),
        ),
        dkim_results=(DKIMAuthResult("example.com", "s", "weird"),),
        spf_result=SPFAuthResult("example.com", "pra", "policy"),
    )
    doc = render_report(AggregateReport(METADATA, odd_policy, (odd,)), fmt)
    validate(doc, fmt)
    tree = read_back(doc, fmt)
    policy = tree["policy_published"][0]
    row = tree["record"][0]["row"][0]
    evaluated = row["policy_evaluated"][0]
    auth = tree["record"][0]["auth_results"][0]
    assert policy["p"] == ["reject"]
    assert policy["aspf"] == ["s"]
    assert "adkim" not in policy
    assert (evaluated["disposition"], evaluated["dkim"], evaluated["spf"]) == (
        ["none"],
        ["pass"],
        ["fail"],
    )
    assert auth["dkim"][0]["result"] == ["neutral"]
    if legacy:
        assert policy["sp"] == ["reject"]  # an unusable sp falls back to p
        assert row["source_ip"] == ["0.0.0.0"]
        assert [r["type"] for r in evaluated["reason"]] == [
            ["forwarded"],
            ["sampled_out"],
            ["other"],
        ]
        assert auth["spf"][0]["result"] == ["neutral"]  # RFC 7489 has no "policy"
        assert auth["spf"][0]["scope"] == ["mfrom"]
    else:
        assert not {"sp", "np", "testing"} & set(policy)
        assert row["source_ip"] == ["not an address <>"]
        assert [r["type"] for r in evaluated["reason"]] == [
            ["other"],
            ["policy_test_mode"],
            ["other"],
        ]
        assert auth["spf"][0]["result"] == ["policy"]
        assert "scope" not in auth["spf"][0]


@BOTH
def test_at_most_100_dkim_results_per_record(validate: Validate, fmt: ReportFormat) -> None:
    signatures = tuple(DKIMAuthResult(f"d{i}.example", f"s{i}", "pass") for i in range(150))
    doc = render_report(AggregateReport(METADATA, POLICY, (record(dkim_results=signatures),)), fmt)
    validate(doc, fmt)
    dkim = read_back(doc, fmt)["record"][0]["auth_results"][0]["dkim"]
    # The first 100: they come in report order, the aligned passes first.
    assert [d["domain"][0] for d in dkim] == [f"d{i}.example" for i in range(100)]


def test_pass_disposition_is_none_in_rfc_7489(validate: Validate) -> None:
    report = AggregateReport(METADATA, POLICY, (record(disposition="pass"),))
    for fmt, disposition in ((ReportFormat.RFC9990, "pass"), (ReportFormat.RFC7489, "none")):
        doc = render_report(report, fmt)
        validate(doc, fmt)
        evaluated = read_back(doc, fmt)["record"][0]["row"][0]["policy_evaluated"][0]
        assert evaluated["disposition"] == [disposition]


@BOTH
def test_output_is_deterministic(fmt: ReportFormat) -> None:
    first = render_report(FULL, fmt)
    out = io.BytesIO()
    written = write_report(out, FULL.metadata, FULL.policy, iter(FULL.records), fmt)
    assert render_report(FULL, fmt) == first == out.getvalue()
    assert written == WrittenReport(len(FULL_RECORDS), FULL.message_count)
    assert written.message_count == 13


def test_no_records_is_refused_before_anything_is_written() -> None:
    out = io.BytesIO()
    with pytest.raises(ValueError, match="at least one record"):
        write_report(out, METADATA, POLICY, iter(()))
    assert out.getvalue() == b""


class CountingSink:
    """Passes writes on, noting how many bytes, and the largest write."""

    def __init__(self, inner: gzip.GzipFile) -> None:
        self.inner = inner
        self.written = 0
        self.largest = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        self.largest = max(self.largest, len(data))
        return self.inner.write(data)


class TrackedRecord(ReportRecord):
    """A record that knows how many of its kind are alive."""

    __slots__ = ("__weakref__",)
    alive = 0

    def __del__(self) -> None:
        TrackedRecord.alive -= 1


@BOTH
def test_records_are_streamed(fmt: ReportFormat) -> None:
    n = 50_000
    buffer = io.BytesIO()
    sink = CountingSink(gzip.GzipFile(fileobj=buffer, mode="wb"))
    progress: list[int] = []
    most_alive = 0
    template = record()
    fields = {f: getattr(template, f) for f in template.__dataclass_fields__}
    del fields["source_ip"], fields["count"]

    def records() -> Iterator[ReportRecord]:
        nonlocal most_alive
        for i in range(n):
            if i and i % 10_000 == 0:
                progress.append(sink.written)
            most_alive = max(most_alive, TrackedRecord.alive)
            TrackedRecord.alive += 1
            ip = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
            yield TrackedRecord(source_ip=ip, count=i % 5 + 1, **fields)

    written = write_report(sink, METADATA, POLICY, records(), fmt)
    sink.inner.close()
    assert written == WrittenReport(n, sum(i % 5 + 1 for i in range(n)))
    # The records were let go as they were written, not collected...
    assert most_alive <= 2
    # ...and the output flowed while they were still being produced, in
    # pieces, never as one document (some 30 MB).
    assert progress[0] > 0 and all(a < b for a, b in itertools.pairwise(progress))
    assert sink.written > 25_000_000
    assert sink.largest < 200_000
    doc = gzip.decompress(buffer.getvalue())
    assert len(doc) == sink.written
    parser = expat.ParserCreate()
    parser.Parse(doc, True)  # well-formed, or ExpatError
    counts = re.findall(rb"<count>(\d+)</count>", doc)
    assert (doc.count(b"<record"), len(counts), sum(map(int, counts))) == (
        written.record_count,
        written.record_count,
        written.message_count,
    )


# -- parsedmarc -----------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """parsedmarc must do its work offline: fail loudly on any attempt."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@BOTH
@pytest.mark.usefixtures("no_network")
def test_parsedmarc_reads_what_was_written(
    fmt: ReportFormat, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = fmt is ReportFormat.RFC7489
    with caplog.at_level(logging.DEBUG):
        parsed = parsedmarc.parse_aggregate_report_xml(
            render_report(FULL, fmt), offline=True, always_use_local_files=True
        )
    # parsedmarc complains of what departs from the format (a missing
    # selector, an override type of the other format, a record it skips).
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    metadata = parsed["report_metadata"]
    assert metadata["org_name"] == METADATA.org_name
    assert metadata["report_id"] == METADATA.report_id
    assert metadata["errors"] == (list(METADATA.errors) if legacy else ["; ".join(METADATA.errors)])
    assert metadata["generator"] == (None if legacy else METADATA.generator)
    policy = parsed["policy_published"]
    assert (policy["domain"], policy["p"], policy["sp"]) == ("example.com", "reject", "quarantine")
    assert (policy["adkim"], policy["aspf"], policy["fo"]) == ("s", "r", "1:d")
    assert policy["np"] == (None if legacy else "none")
    assert policy["pct"] == ("50" if legacy else None)
    assert len(parsed["records"]) == len(FULL_RECORDS)
    for got, want in zip(parsed["records"], FULL_RECORDS, strict=True):
        assert ipaddress.ip_address(got["source"]["ip_address"]) == ipaddress.ip_address(
            want.source_ip
        )
        assert got["count"] == want.count
        assert got["identifiers"]["header_from"] == want.header_from
        assert got["identifiers"]["envelope_to"] == want.envelope_to
        if want.envelope_from:
            # (parsedmarc puts the SPF domain in place of an empty one.)
            assert got["identifiers"]["envelope_from"] == want.envelope_from
        evaluated = got["policy_evaluated"]
        disposition = "none" if legacy and want.disposition == "pass" else want.disposition
        assert (evaluated["disposition"], evaluated["dkim"], evaluated["spf"]) == (
            disposition,
            want.dkim,
            want.spf,
        )
        assert got["alignment"]["dkim"] == (want.dkim == "pass")
        assert got["alignment"]["spf"] == (want.spf == "pass")
        reasons = [(r["type"], r["comment"]) for r in evaluated["policy_override_reasons"]]
        assert reasons == [
            (
                "sampled_out" if legacy and r.type == "policy_test_mode" else r.type,
                r.comment or None,
            )
            for r in want.reasons
        ]
        dkim = [(d["domain"], d["selector"], d["result"]) for d in got["auth_results"]["dkim"]]
        assert dkim == [(d.domain, d.selector, d.result) for d in want.dkim_results]
        [spf] = got["auth_results"]["spf"]
        assert (spf["domain"], spf["result"]) == (want.spf_result.domain, want.spf_result.result)
        if legacy or want.spf_result.scope == "mfrom":
            # (RFC 9990 cannot say "helo", and parsedmarc then assumes "mfrom".)
            assert spf["scope"] == want.spf_result.scope
