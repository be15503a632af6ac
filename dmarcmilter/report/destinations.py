"""Where a report may be sent: the rua (aggregate) and ruf (failure) URIs
and their verification.

Two steps stand between a policy's ``rua`` tag and a report in the mail:

* :func:`parse_rua` turns the tag value into mailbox destinations (digest §1.2
  and §6.3): the obsolete ``!size`` suffix is dropped, only ``mailto:`` is
  supported, malformed URIs are ignored, and at most a local number of URIs
  is kept, in published order.
* :func:`verify_destination` applies RFC 9990 "Verifying External
  Destinations" (digest §6.4): when the destination's Organizational Domain
  differs from the policy domain's, the destination must publish
  ``v=DMARC1`` at ``<policy-domain>._report._dmarc.<destination-host>``, and
  a ``rua`` tag there may replace the address, but only with one on the same
  host.  Without this check, anyone could make every receiver mail reports to
  a third party by naming it in their own record.

Both take ``tag``, "rua" or "ruf" (default "rua"): the two tags have the same
URI rules (RFC 9989 §4.7) and the same verification (RFC 9991 defers to RFC
9990's), but an override in the authorizing record is read from the same tag
the destination came from, and problems name it.

Nothing here raises for bad published data: a URI that cannot be used is a
problem string, and a DNS failure is a :attr:`VerificationStatus.DEFERRED`
result, so the report job can retry that destination on a later run.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from ..discovery import Discoverer
from ..domains import DomainError, normalize_domain
from ..record import is_dmarc_record, parse_record
from ..resolver import DNSStatus
from .mail import normalize_address

# RFC 1035 §2.3.4: 255 octets for a whole name in wire form, 63 per label.
MAX_NAME_WIRE_OCTETS = 255
MAX_LABEL_OCTETS = 63

# Digest §6.4 step 2: the label pair between the policy domain and the host.
REPORT_LABELS = "_report._dmarc"

# The record tag a destination was published in.
ReportTag = Literal["rua", "ruf"]

# The list separator allows WSP around ","; CR and LF are stripped too, in
# case a stored value was folded.
_WSP = " \t\r\n"
# RFC 9989 §4.8 obs-dmarc-report-size.  RFC 9990 obsoletes the size cap, so
# the suffix is dropped and the URI used as if it were absent.
_SIZE_SUFFIX_RE = re.compile(r"![0-9]+[kmgtKMGT]?\Z")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Shown in problem strings and details, which end up in logs and a table
# column; a hostile record must not fill them.
_SHOW_MAX = 60


@dataclass(frozen=True, slots=True)
class Destination:
    """One mailbox a report may go to."""

    uri: str  # the URI as published, e.g. "mailto:dmarc@example.net!10m"
    address: str  # "dmarc@example.net": local part as written, domain an A-label
    host: str  # the destination host: the address's domain, lower-case A-label


class VerificationStatus(enum.Enum):
    AUTHORIZED = "authorized"  # send to Verification.destination
    REFUSED = "refused"  # not authorized, or an override on another host: send nothing
    DEFERRED = "deferred"  # a DNS temporary error: try again on a later run


@dataclass(frozen=True, slots=True)
class Verification:
    status: VerificationStatus
    destination: Destination | None  # where to send when AUTHORIZED (the override if one applies)
    detail: str  # why, for logs and the reports table


# -- rua parsing ---------------------------------------------------------------------------


def parse_rua(
    rua: str, max_uris: int, tag: ReportTag = "rua"
) -> tuple[tuple[Destination, ...], tuple[str, ...]]:
    """The ``rua`` (or, with ``tag="ruf"``, ``ruf``) tag value -> the usable
    destinations, and the problems, which name ``tag``.

    ``rua`` is the comma-separated URI list as published or as stored (it may
    be empty).  The destinations are the usable ``mailto:`` URIs in published
    order (digest §6.3: deliver in listed order), without duplicates (the
    same mailbox, domain compared case-insensitively, would get the report
    twice) and at most ``max_uris`` of them (the local limit §6.3 allows).
    Every URI left out gets one human-readable problem string.
    """
    found: list[Destination] = []
    seen: set[tuple[str, str]] = set()
    problems: list[str] = []
    if not rua.strip(_WSP):
        return (), ()
    # A "," inside a DMARC URI must be percent-encoded (RFC 9989 §4.7), so
    # every element of the split is one URI, and a mailto URI names one
    # address even though RFC 6068 would allow a list.
    for item in rua.split(","):
        uri = item.strip(_WSP)
        dest, error = _parse_uri(uri)
        if dest is None:
            problems.append(f"{tag}: {error}: {_show(uri)} ignored")
            continue
        key = (dest.address.rpartition("@")[0], dest.host)
        if key in seen:
            problems.append(f"{tag}: duplicate address {_show(dest.address)} ignored")
            continue
        if len(found) >= max_uris:
            problems.append(f"{tag}: more than {max(max_uris, 0)} URIs: {_show(uri)} ignored")
            continue
        seen.add(key)
        found.append(dest)
    return tuple(found), tuple(problems)


def _parse_uri(uri: str) -> tuple[Destination | None, str]:
    """One URI -> its destination, or None and why it cannot be used."""
    if not uri:
        return None, "empty URI"
    body = _SIZE_SUFFIX_RE.sub("", uri)
    scheme, colon, rest = body.partition(":")
    if not colon or not _SCHEME_RE.match(scheme):
        return None, "malformed URI (no scheme)"
    if scheme.lower() != "mailto":
        # RFC 9989 §4.7: unsupported schemes MUST be ignored; mailto is the
        # only one a receiver must support, and the only one we deliver to.
        return None, f"unsupported URI scheme {_show(scheme)}"
    if "!" in rest:
        # "!" must be percent-encoded in a DMARC URI; a raw one left after
        # the size suffix is gone is a malformed suffix or a typo.
        return None, "malformed URI (unencoded '!')"
    # RFC 6068: mailto:[to][?hfields].  Header fields (subject, body, even a
    # "to" field) are ignored: the address before "?" is the destination.
    raw_address = rest.partition("?")[0]
    if _BAD_PCT_RE.search(raw_address):
        return None, "malformed URI (bad percent-encoding)"
    try:
        address = unquote(raw_address, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return None, "malformed URI (percent-encoding is not UTF-8)"
    if any(_unsafe(ch) for ch in address):
        # Whitespace, control or format characters, "<", ">" or "," would
        # break or change the meaning of the SMTP RCPT TO command.
        return None, "mailto address with unsafe characters"
    if address.count("@") != 1:
        return None, "mailto URI without exactly one address"
    local, _, domain = address.partition("@")
    if not local:
        return None, "mailto address without a local part"
    try:
        host = normalize_domain(domain)
    except DomainError:
        return None, "mailto address without a valid domain"
    try:
        # What the report mail and SMTP will accept: an ASCII dot-atom local
        # part (no SMTPUTF8) and a host name.  Anything else could only fail
        # at delivery, so it is ignored here like any unusable URI.
        normalize_address(f"{local}@{host}")
    except ValueError:
        return None, "mailto address that report mail cannot be sent to"
    return Destination(uri=uri, address=f"{local}@{host}", host=host), ""


def _unsafe(ch: str) -> bool:
    # Categories C* (control, format, surrogate, private, unassigned) and Z*
    # (separators), and what an SMTP path or a list would read as syntax.
    return ch in "<>," or ch.isspace() or unicodedata.category(ch)[0] in "CZ"


# -- RFC 9990 "Verifying External Destinations" -----------------------------------------


def _verdict(status: VerificationStatus, dest: Destination | None, detail: str) -> Verification:
    return Verification(status, dest if status is VerificationStatus.AUTHORIZED else None, detail)


def verify_destination(
    policy_domain: str, destination: Destination, discoverer: Discoverer, tag: ReportTag = "rua"
) -> Verification:
    """May the report about ``policy_domain`` go to ``destination``?

    ``tag`` is the tag the destination was published in: the override of
    step 7 is read from that tag of the authorizing record, so an aggregate
    override never redirects failure reports, nor the reverse.

    ``policy_domain`` is the name whose ``_dmarc`` record carried the URI
    (digest §6.4: "the domain where the policy record was found").  The
    answer is a result, never an exception: REFUSED means send nothing to
    this URI (final for this report), DEFERRED means a DNS lookup failed
    temporarily and the question should be asked again later (step 4).
    """
    try:
        policy = normalize_domain(policy_domain)
    except DomainError as exc:
        return _verdict(VerificationStatus.REFUSED, None, f"invalid policy domain: {exc}")
    try:
        host = normalize_domain(destination.host)
    except DomainError as exc:
        return _verdict(VerificationStatus.REFUSED, None, f"invalid destination host: {exc}")

    # The trigger is a difference of Organizational Domains.  Identical names
    # have the same OD whatever DNS says, so that case needs no lookup.  No
    # other shortcut is taken: a host below the policy domain can still have
    # an OD of its own (a psd=n record on it, or a policy domain that is a
    # PSD), so only the walks can tell.
    if host == policy:
        return _verdict(
            VerificationStatus.AUTHORIZED, destination, "destination host is the policy domain"
        )
    ods: list[str] = []
    for name in (policy, host):
        od = discoverer.organizational_domain(name)
        if od.temperror or od.domain is None:
            return _verdict(
                VerificationStatus.DEFERRED,
                None,
                f"Organizational Domain of {name} unknown: {od.detail or 'DNS failure'}",
            )
        ods.append(od.domain)
    if ods[0] == ods[1]:
        return _verdict(
            VerificationStatus.AUTHORIZED,
            destination,
            f"same Organizational Domain {ods[0]}: no external verification needed",
        )

    # Steps 1-3: the name to query, within DNS limits.
    qname = f"{policy}.{REPORT_LABELS}.{host}"
    too_long = _name_limit_error(qname)
    if too_long:
        return _verdict(
            VerificationStatus.REFUSED, None, f"{too_long}: authorization cannot be established"
        )

    # Step 4.
    answer = discoverer.session.query(qname, "TXT")
    if answer.status.is_failure:
        suffix = f": {answer.detail}" if answer.detail else ""
        return _verdict(
            VerificationStatus.DEFERRED, None, f"{qname} TXT {answer.status.value}{suffix}"
        )
    if answer.status is not DNSStatus.NOERROR:
        return _verdict(
            VerificationStatus.REFUSED,
            None,
            f"not authorized: {qname} TXT {answer.status.value}",
        )

    # Step 5: keep the v=DMARC1 records (a trailing ";" is optional, which
    # is_dmarc_record allows).
    # [impl choice] A record repeating a tag is dropped: it is not a valid
    # tag-list (RFC 6376 §3.2, digest §1.2, as the record parser treats it),
    # and a repeated rua would leave the override ambiguous.  Other tag
    # errors are ignored as in a policy record; "v=DMARC1" alone suffices.
    records = [t for t in answer.txt() if is_dmarc_record(t) and not _repeats_a_tag(t)]
    if not records:
        # Step 6: MUST ignore the URI.
        return _verdict(
            VerificationStatus.REFUSED, None, f"not authorized: no v=DMARC1 record at {qname}"
        )

    # Step 7: authorized; a rua (ruf) tag in the record may replace the URI, only
    # with one on the same host, else neither URI gets the report.
    # [impl choice] One destination stays one destination: only the first
    # usable mailto URI of an override counts, so a DNS answer can redirect
    # the report but never multiply the mail sent.
    # [impl choice] A rua tag without a usable mailto URI (only other
    # schemes, malformed, or empty) is no override: malformed URIs are
    # ignored (digest §1.2) and the record still authorizes (step 7).
    # [impl choice] With several v=DMARC1 records (TXT answer order is not
    # stable), every one is looked at: if any points to another host the
    # report goes nowhere (the MUST NOT of step 7 must not depend on record
    # order); if several name addresses on this host, the smallest address
    # is taken, so the choice is the same on every run.
    overrides: list[Destination] = []
    for text in records:
        record = parse_record(text)
        uris = record.ruf if tag == "ruf" else record.rua
        chosen, _ = parse_rua(",".join(uris), 1, tag)
        if not chosen:
            continue
        override = chosen[0]
        if override.host != host:
            return _verdict(
                VerificationStatus.REFUSED,
                None,
                f"{qname} overrides {tag} with {_show(override.uri)} on another host: "
                "sending to neither",
            )
        overrides.append(override)
    if not overrides:
        return _verdict(VerificationStatus.AUTHORIZED, destination, f"authorized by {qname}")
    # The override is on the verified host, so the same _report._dmarc name
    # authorizes it: no second lookup is needed (and none could loop).
    override = min(overrides, key=lambda d: (d.address, d.uri))
    if override.address == destination.address:
        return _verdict(VerificationStatus.AUTHORIZED, destination, f"authorized by {qname}")
    return _verdict(
        VerificationStatus.AUTHORIZED,
        override,
        f"authorized by {qname}, which replaces {_show(destination.address)} "
        f"with {_show(override.address)}",
    )


def _name_limit_error(name: str) -> str:
    """Why ``name`` cannot be queried (RFC 1035 §2.3.4 limits), or ""."""
    labels = name.split(".")
    for label in labels:
        # Both parts are normalised A-labels: one character is one octet.
        if len(label) > MAX_LABEL_OCTETS:
            return f"a label of {_show(name)} is longer than {MAX_LABEL_OCTETS} octets"
    # Wire form: a length octet before each label, and the root's zero octet.
    octets = sum(len(label) + 1 for label in labels) + 1
    if octets > MAX_NAME_WIRE_OCTETS:
        return f"{_show(name)} is {octets} octets, over the {MAX_NAME_WIRE_OCTETS}-octet limit"
    return ""


def _repeats_a_tag(text: str) -> bool:
    names: set[str] = set()
    for piece in text.split(";"):
        name, eq, _ = piece.partition("=")
        name = name.strip(" \t").lower()
        if not eq or not name:
            continue
        if name in names:
            return True
        names.add(name)
    return False


def _show(value: str) -> str:
    """A value for a problem or detail text: quoted, and cut short."""
    return repr(value if len(value) <= _SHOW_MAX else value[: _SHOW_MAX - 3] + "...")
