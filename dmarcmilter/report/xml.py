"""Aggregate reports as XML: RFC 9990 §2.1 (the ``feedback`` document, its
XML schema in Appendix A), or the legacy format of RFC 7489 §7.2 and
Appendix C for consumers that predate RFC 9990.

The document is written as text, record by record, straight into a binary
stream (typically a :class:`gzip.GzipFile`): a report for a busy domain has
a million records, which are never all in memory, and a DOM would cost far
more than the string building below.  Every value is escaped, and every
character XML 1.0 forbids becomes U+FFFD, so no value from a hostile client
or header can make the document malformed; every value outside a schema
enumeration is mapped to the closest valid one, so the document always
validates against the schema of its format.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..history.reader import PublishedPolicy, ReportRecord
from .model import AggregateReport, ReportMetadata

__all__ = ["BinaryWriter", "ReportFormat", "WrittenReport", "render_report", "write_report"]

NAMESPACE_9990 = "urn:ietf:params:xml:ns:dmarc-2.0"
NAMESPACE_7489 = "http://dmarc.org/dmarc-xml/0.1"

# RFC 9990 §2.1: "SHOULD NOT include more than 100" DKIM results per record.
MAX_DKIM_RESULTS = 100

# Records rendered per write: a write into a GzipFile costs a CRC and a
# compressor call, worth amortising over several records, while the text
# held at once stays small (about 1 KB per record).
_RECORDS_PER_WRITE = 64


class ReportFormat(enum.Enum):
    RFC9990 = "rfc9990"
    RFC7489 = "rfc7489"


@dataclass(frozen=True, slots=True)
class WrittenReport:
    record_count: int
    message_count: int


class BinaryWriter(Protocol):
    """Where a report is written: ``typing.BinaryIO``, but also
    :class:`gzip.GzipFile`, which typeshed does not declare a BinaryIO."""

    def write(self, data: bytes, /) -> object: ...


# Element content must escape "&" and "<", and ">" because of "]]>"; a
# literal CR would come back as LF (XML 1.0 §2.11), so it is a reference.
# Everything else the Char production (XML 1.0 §2.2) excludes -- C0 controls
# but tab, LF and CR, lone surrogates, U+FFFE and U+FFFF -- is replaced:
# a parser would refuse the whole document for one of them.
_UNSAFE = re.compile("[^\t\n\x20-\x25\x27-\x3b\x3d\x3f-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}


def _entity(match: re.Match[str]) -> str:
    return _ENTITIES.get(match.group(), "\ufffd")


# ``_text(value)``: ``value`` safe as XML element content.  A partial, not a
# def: it costs one C call when there is nothing to replace, as there almost
# never is.
_text = functools.partial(_UNSAFE.sub, _entity)

# Record values repeat: the From domain, the envelope and DKIM domains and
# selectors, the source IPs.  A dictionary hit costs a tenth of a scan, and
# the scans were half the time a record took.  Only short (domain-sized)
# values are kept, and the cache is emptied when full, so a stream of
# distinct hostile values costs at most a few megabytes.
_CACHE_ENTRIES = 8192
_CACHE_VALUE_LENGTH = 255
_escaped: dict[str, str] = {}
_cached = _escaped.get


def _escape(value: str) -> str:
    """``_text(value)``, remembered; the record renderers call it only on a
    cache miss, as ``_cached(value) or _escape(value)``."""
    text = _text(value)
    if len(value) <= _CACHE_VALUE_LENGTH:
        if len(_escaped) >= _CACHE_ENTRIES:
            _escaped.clear()
        _escaped[value] = text
    return text


# Schema enumerations.  The history stores values of dmarcmilter's own enums,
# which match RFC 9990; the maps also cover RFC 7489's older vocabulary and
# say how each format spells what the other cannot.  A value in neither
# (a damaged or hand-edited history) falls back to the default named at each
# use rather than failing the whole report: for results, the value that
# asserts least -- DKIM "neutral" (a signature that could not be judged;
# "none" would say there was none) and SPF "none" -- and for reason types,
# "other".

_POLICIES = {v: v for v in ("none", "quarantine", "reject")}
_ALIGNMENT = {"r": "r", "s": "s"}
_TESTING = {"n": "n", "y": "y"}
_DISCOVERY = {"psl": "psl", "treewalk": "treewalk"}
# policy_evaluated dkim/spf: the DMARC-aligned outcome; anything but an
# aligned pass is a fail.
_ALIGNED = {"pass": "pass", "fail": "fail"}

_DISPOSITIONS_9990 = {v: v for v in ("none", "pass", "quarantine", "reject")}
# RFC 7489 has no "pass": RFC 9990 added it for a message that passed DMARC
# under an enforcing policy, to which nothing was done, which is what
# RFC 7489 reported as "none".
_DISPOSITIONS_7489 = {**_DISPOSITIONS_9990, "pass": "none"}

_DKIM_RESULTS = {
    v: v for v in ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
}
_SPF_RESULTS_9990 = {
    v: v
    for v in ("none", "pass", "fail", "softfail", "policy", "neutral", "temperror", "permerror")
}
# Some software says "tempfail" for temperror (digest §5).
_SPF_RESULTS_9990["tempfail"] = "temperror"
# RFC 7489 has no SPF "policy" (the check ran, but local policy set its
# result aside): "neutral" reports a result that asserts neither way, where
# "none" would claim that no SPF check was possible.
_SPF_RESULTS_7489 = {**_SPF_RESULTS_9990, "policy": "neutral"}
_SPF_SCOPES_7489 = {"mfrom": "mfrom", "helo": "helo"}

_REASONS_9990 = {
    v: v for v in ("local_policy", "mailing_list", "other", "policy_test_mode", "trusted_forwarder")
}
# RFC 7489's types RFC 9990 dropped: pct sampling became t=y, testing mode;
# "forwarded" also covered mere heuristics, which "trusted_forwarder" (a
# locally maintained list) would overstate.
_REASONS_9990 |= {"sampled_out": "policy_test_mode", "forwarded": "other"}
_REASONS_7489 = {
    v: v
    for v in (
        "forwarded",
        "sampled_out",
        "trusted_forwarder",
        "mailing_list",
        "local_policy",
        "other",
    )
}
# t=y (RFC 9989) replaces pct=0, whose messages RFC 7489 called sampled out.
_REASONS_7489["policy_test_mode"] = "sampled_out"


def _lookup(table: Mapping[str, str], value: str | None) -> str | None:
    """``table``'s spelling of ``value``, tolerating case and stray spaces."""
    if value is None:
        return None
    found = table.get(value)
    if found is None:
        found = table.get(value.strip().lower())
    return found


def _pick(table: Mapping[str, str], value: str | None, default: str) -> str:
    found = _lookup(table, value)
    return default if found is None else found


@functools.lru_cache(maxsize=4096)
def _ip_7489(source_ip: str) -> str:
    """``source_ip`` in the form RFC 7489's IPAddress pattern means to accept:
    dotted IPv4, or IPv6 with all eight groups, as it knows no "::".

    As published, the pattern is wrapped over three lines, and the spaces
    the wrapping leaves in it are part of it: read literally it matches no
    address at all.  Validators are given it with the spaces removed.
    """
    try:
        address = ipaddress.ip_address(source_ip.strip())
    except ValueError:
        # Not an address (the history holds what the MTA said): the report
        # must still be valid and still count the messages, so report them
        # from the unspecified address rather than drop the record.
        return "0.0.0.0"
    if address.version == 6:
        return address.exploded
    return str(address)


def write_report(
    out: BinaryWriter,
    metadata: ReportMetadata,
    policy: PublishedPolicy,
    records: Iterable[ReportRecord],
    fmt: ReportFormat = ReportFormat.RFC9990,
) -> WrittenReport:
    """Write one complete report, UTF-8 XML with an XML declaration, to ``out``.

    ``records`` is consumed lazily, a few dozen records per write, so a
    report of any size takes little memory.  Both schemas require at least
    one record: ValueError, before anything is written, when there is none.
    """
    legacy = fmt is ReportFormat.RFC7489
    iterator = iter(records)
    first = next(iterator, None)
    if first is None:
        raise ValueError("an aggregate report needs at least one record")
    out.write((_head_7489 if legacy else _head_9990)(metadata, policy).encode())
    dialect = _RFC7489 if legacy else _RFC9990
    chunk: list[str] = []
    _record(first, dialect, chunk)
    record_count = 1
    message_count = first.count
    for record in iterator:
        _record(record, dialect, chunk)
        record_count += 1
        message_count += record.count
        if not record_count % _RECORDS_PER_WRITE:
            out.write("".join(chunk).encode())
            chunk.clear()
    chunk.append("</feedback>\n")
    out.write("".join(chunk).encode())
    return WrittenReport(record_count, message_count)


def render_report(report: AggregateReport, fmt: ReportFormat = ReportFormat.RFC9990) -> bytes:
    """The whole report document as bytes."""
    parts: list[bytes] = []
    write_report(_ListWriter(parts), report.metadata, report.policy, report.records, fmt)
    return b"".join(parts)


class _ListWriter:
    __slots__ = ("parts",)

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def write(self, data: bytes, /) -> int:
        self.parts.append(data)
        return len(data)


def _head_9990(metadata: ReportMetadata, policy: PublishedPolicy) -> str:
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<feedback xmlns="{NAMESPACE_9990}">',
        # RFC 9990 §2.1: the version MUST be 1.0.
        "  <version>1.0</version>",
        *_metadata_lines(metadata),
    ]
    errors = [e for e in metadata.errors if e.strip()]
    if errors:
        # RFC 9990 allows one error element (RFC 7489 allowed several), and
        # asks to keep it terse: one line, the problems joined.
        lines.append(f"    <error>{_text('; '.join(errors))}</error>")
    if metadata.generator:
        lines.append(f"    <generator>{_text(metadata.generator)}</generator>")
    lines += [
        "  </report_metadata>",
        "  <policy_published>",
        f"    <domain>{_text(policy.domain)}</domain>",
        f"    <p>{_pick(_POLICIES, policy.p, 'none')}</p>",
    ]
    # Optional in RFC 9990: a tag the record did not set, or a value outside
    # the enumeration, is left out, and the consumer applies the default.
    optional = (
        ("sp", _lookup(_POLICIES, policy.sp)),
        ("np", _lookup(_POLICIES, policy.np)),
        ("adkim", _lookup(_ALIGNMENT, policy.adkim)),
        ("aspf", _lookup(_ALIGNMENT, policy.aspf)),
        ("discovery_method", _lookup(_DISCOVERY, policy.discovery_method)),
        ("fo", None if policy.fo is None else _text(policy.fo)),
        ("testing", _lookup(_TESTING, policy.testing)),
    )
    lines += [f"    <{name}>{value}</{name}>" for name, value in optional if value is not None]
    lines.append("  </policy_published>\n")
    return "\n".join(lines)


def _head_7489(metadata: ReportMetadata, policy: PublishedPolicy) -> str:
    # The RFC 7489 schema has no elementFormDefault, so it is "unqualified":
    # only the root is in the namespace, and its children are in none,
    # hence the xmlns="" on each (a prefixed root would keep the children
    # free of it, but consumers that ignore namespaces, parsedmarc among
    # them, look for an element literally named "feedback").
    p = _pick(_POLICIES, policy.p, "none")
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<feedback xmlns="{NAMESPACE_7489}">',
        '  <version xmlns="">1.0</version>',
        *_metadata_lines(metadata, ' xmlns=""'),
        *(f"    <error>{_text(e)}</error>" for e in metadata.errors if e.strip()),
        "  </report_metadata>",
        '  <policy_published xmlns="">',
        f"    <domain>{_text(policy.domain)}</domain>",
    ]
    # Optional here too; sp, pct and fo are required, with the defaults
    # RFC 7489 §6.3 gives the tags.
    for name, value in (
        ("adkim", _lookup(_ALIGNMENT, policy.adkim)),
        ("aspf", _lookup(_ALIGNMENT, policy.aspf)),
    ):
        if value is not None:
            lines.append(f"    <{name}>{value}</{name}>")
    lines += [
        f"    <p>{p}</p>",
        f"    <sp>{_pick(_POLICIES, policy.sp, p)}</sp>",
        f"    <pct>{100 if policy.pct is None else int(policy.pct):d}</pct>",
        f"    <fo>{'0' if policy.fo is None else _text(policy.fo)}</fo>",
        "  </policy_published>\n",
    ]
    return "\n".join(lines)


def _metadata_lines(metadata: ReportMetadata, xmlns: str = "") -> list[str]:
    # RFC 7489 makes report_metadata a sequence, RFC 9990 an "all": this is
    # the order of the former, valid in both.
    lines = [
        f"  <report_metadata{xmlns}>",
        f"    <org_name>{_text(metadata.org_name)}</org_name>",
        f"    <email>{_text(metadata.email)}</email>",
    ]
    if metadata.extra_contact_info is not None:
        lines.append(
            f"    <extra_contact_info>{_text(metadata.extra_contact_info)}</extra_contact_info>"
        )
    lines += [
        f"    <report_id>{_text(metadata.report_id)}</report_id>",
        "    <date_range>",
        f"      <begin>{int(metadata.begin):d}</begin>",
        f"      <end>{int(metadata.end):d}</end>",
        "    </date_range>",
    ]
    return lines


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What a record looks like in one format."""

    legacy: bool  # RFC 7489
    record_open: str
    dispositions: Mapping[str, str]
    reasons: Mapping[str, str]
    spf_results: Mapping[str, str]


_RFC9990 = _Dialect(False, "  <record>\n", _DISPOSITIONS_9990, _REASONS_9990, _SPF_RESULTS_9990)
_RFC7489 = _Dialect(
    True, '  <record xmlns="">\n', _DISPOSITIONS_7489, _REASONS_7489, _SPF_RESULTS_7489
)


# This runs once per record, millions of times a day for a busy receiver:
# it is written out flat, with dictionary lookups for the enumerations (the
# fallback called only on a miss) and for the text.
def _record(r: ReportRecord, d: _Dialect, parts: list[str]) -> None:
    """Append ``r`` as XML text to ``parts``."""
    legacy = d.legacy
    ip = r.source_ip
    header_from = r.header_from
    disposition = d.dispositions.get(r.disposition) or _pick(d.dispositions, r.disposition, "none")
    parts += (
        d.record_open,
        "    <row>\n      <source_ip>",
        _ip_7489(ip) if legacy else (_cached(ip) or _escape(ip)),
        f"</source_ip>\n      <count>{r.count:d}</count>\n      <policy_evaluated>\n"
        f"        <disposition>{disposition}</disposition>\n        <dkim>",
        _ALIGNED.get(r.dkim) or _pick(_ALIGNED, r.dkim, "fail"),
        "</dkim>\n        <spf>",
        _ALIGNED.get(r.spf) or _pick(_ALIGNED, r.spf, "fail"),
        "</spf>\n",
    )
    for reason in r.reasons:
        kind = d.reasons.get(reason.type) or _pick(d.reasons, reason.type, "other")
        comment = reason.comment
        if comment:
            comment = _cached(comment) or _escape(comment)
            parts.append(
                f"        <reason>\n          <type>{kind}</type>\n"
                f"          <comment>{comment}</comment>\n        </reason>\n"
            )
        else:
            parts.append(f"        <reason>\n          <type>{kind}</type>\n        </reason>\n")
    parts += (
        "      </policy_evaluated>\n    </row>\n    <identifiers>\n      <header_from>",
        _cached(header_from) or _escape(header_from),
        "</header_from>\n",
    )
    envelope_from = r.envelope_from
    if envelope_from is not None:
        # "" is the null reverse-path, an empty element in both formats.
        envelope_from = _cached(envelope_from) or _escape(envelope_from)
        parts.append(f"      <envelope_from>{envelope_from}</envelope_from>\n")
    elif legacy:
        # Unknown.  RFC 9990 leaves the element out; RFC 7489 requires it and
        # has no other way to say so.
        parts.append("      <envelope_from></envelope_from>\n")
    envelope_to = r.envelope_to
    if envelope_to is not None:
        envelope_to = _cached(envelope_to) or _escape(envelope_to)
        parts.append(f"      <envelope_to>{envelope_to}</envelope_to>\n")
    parts.append("    </identifiers>\n    <auth_results>\n")
    for dkim in r.dkim_results[:MAX_DKIM_RESULTS]:
        domain, selector = dkim.domain, dkim.selector
        result = _DKIM_RESULTS.get(dkim.result) or _pick(_DKIM_RESULTS, dkim.result, "neutral")
        parts.append(
            f"      <dkim>\n        <domain>{_cached(domain) or _escape(domain)}</domain>\n"
            f"        <selector>{_cached(selector) or _escape(selector)}</selector>\n"
            f"        <result>{result}</result>\n      </dkim>\n"
        )
    spf = r.spf_result
    domain = spf.domain
    if legacy:
        # Required here; an unknown scope is reported as "mfrom", the
        # identity DMARC's SPF alignment uses.
        scope = _SPF_SCOPES_7489.get(spf.scope) or _pick(_SPF_SCOPES_7489, spf.scope, "mfrom")
        scope = f"        <scope>{scope}</scope>\n"
    else:
        # RFC 9990's scope allows "mfrom" alone: a HELO result goes without.
        scope = "        <scope>mfrom</scope>\n" if spf.scope == "mfrom" else ""
    result = d.spf_results.get(spf.result) or _pick(d.spf_results, spf.result, "none")
    parts.append(
        f"      <spf>\n        <domain>{_cached(domain) or _escape(domain)}</domain>\n{scope}"
        f"        <result>{result}</result>\n      </spf>\n    </auth_results>\n  </record>\n"
    )
