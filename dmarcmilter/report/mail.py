"""The aggregate report e-mail (RFC 9990 §3 report delivery; digest §6.3).

One report is one RFC 5322 message with MIME (RFC 2045/2046) structure:
``multipart/mixed`` holding a short ``text/plain`` part for a human and the
report itself as an attachment, ``application/gzip`` when compressed (the
``.xml.gz`` filename) or ``text/xml`` otherwise, as RFC 9990 requires.

- **Filename**: ``receiver!policy-domain!begin!end!unique-id.xml.gz``; the
  report id is the unique-id, since RFC 9990 wants the Subject's Report-ID and
  the filename's unique-id identical when both are given.
- **Subject**: ``Report Domain: D Submitter: S Report-ID: <id@S>`` with the
  case-sensitive keywords of the ABNF; ``Message-ID`` repeats the same
  ``<id@S>``, which the RFC suggests for duplicate detection: a re-sent report
  is recognisably the same message.
- Domains appear as lower-case A-labels everywhere (RFC 6376 ``domain-name``).
- ``Auto-Submitted: auto-generated`` (RFC 3834) keeps vacation responders and
  other robots from answering the report.
- The message is built by hand rather than with :class:`email.message.EmailMessage`:
  the stdlib folder turns an unbreakable long token (the Report-ID) into an
  RFC 2047 encoded-word, which would break the Subject ABNF, and it picks a
  random MIME boundary.  Here the same inputs give the same bytes, with CRLF
  line ends, so a re-sent report is byte-identical.  Only the From display
  name goes through the stdlib, for its RFC 2047 encoding.

RFC 9990 also requires the report mail itself to pass DMARC aligned with its
From domain.  That is a matter of the outgoing MTA's DKIM signing for the
configured From address; nothing here signs.
"""

from __future__ import annotations

import base64
import datetime
import email.policy
import email.utils
import hashlib
import quopri
import re
import textwrap
import unicodedata
from dataclasses import dataclass
from email.headerregistry import Address

from ..domains import DomainError, normalize_domain, to_unicode

# RFC 5322 §2.1.1: 998 octets is the hard limit, 78 the recommendation.
MAX_LINE = 998
FOLD_AT = 78
# Keeps the filename and the Message-ID line well under MAX_LINE even with
# two 253-octet domains; real ids are a few dozen characters.
MAX_REPORT_ID = 128
MAX_ORG_NAME = 256

_UNIQUE_ID = re.compile(r"[A-Za-z0-9]+\Z")
# RFC 6376 domain-name: sub-domain 1*("." sub-domain), sub-domain = Let-dig [Ldh-str].
# Underscore labels, which normalize_domain tolerates for DNS names, do not match.
_LDH = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_DOMAIN_NAME = re.compile(rf"{_LDH}(?:\.{_LDH})+\Z")
# RFC 5322 §3.2.3 dot-atom-text; quoted-string local parts are not accepted.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_TEXT = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_FILENAME = re.compile(
    r"(?P<receiver>[^!]+)!(?P<policy>[^!]+)!(?P<begin>[0-9]+)!(?P<end>[0-9]+)"
    r"!(?P<uid>[A-Za-z0-9]+)\.(?P<ext>xml\.gz|xml)\Z"
)
_MEDIA_TYPES = {"xml.gz": "application/gzip", "xml": "text/xml"}


@dataclass(frozen=True, slots=True)
class ReportMessage:
    """A built report message and the addresses it goes between."""

    sender: str  # the From address (also the default envelope sender)
    recipient: str  # the To address
    message: bytes  # the whole RFC 5322 message, CRLF line endings


def report_filename(
    receiver: str,
    policy_domain: str,
    begin: int,
    end: int,
    unique_id: str,
    *,
    compressed: bool = True,
) -> str:
    """The attachment's filename, ``receiver!policy-domain!begin!end!unique-id.xml.gz``
    (``.xml`` when not ``compressed``).

    Raises ValueError for a domain that is not an RFC 6376 domain-name, a
    negative or reversed period, or a unique-id that is not ``1*(ALPHA / DIGIT)``.
    """
    receiver_a = _domain_name(receiver, "receiver")
    policy_a = _domain_name(policy_domain, "policy domain")
    _check_period(begin, end)
    _check_report_id(unique_id)
    extension = "xml.gz" if compressed else "xml"
    return f"{receiver_a}!{policy_a}!{begin}!{end}!{unique_id}.{extension}"


def report_subject(policy_domain: str, submitter: str, report_id: str) -> str:
    """The Subject value (unfolded): ``Report Domain: D Submitter: S Report-ID: <id@S>``."""
    policy_a = _domain_name(policy_domain, "policy domain")
    submitter_a = _domain_name(submitter, "submitter")
    _check_report_id(report_id)
    return (
        f"Report Domain: {policy_a} Submitter: {submitter_a} Report-ID: <{report_id}@{submitter_a}>"
    )


def report_message_id(submitter: str, report_id: str, token: str = "") -> str:
    """The Message-ID: ``<report-id.token@submitter>``, or
    ``<report-id@submitter>`` without a token.

    The token is the delivery's random ``message_token``.  The report id
    alone can be worked out from public data (digest §6.1: it is stable), so
    a bounce that names it proves nothing; one that names the token was made
    by someone who saw the mail, which only its destination did.
    """
    submitter_a = _domain_name(submitter, "submitter")
    _check_report_id(report_id)
    if not token:
        return f"<{report_id}@{submitter_a}>"
    if not (token.isascii() and token.isalnum()):
        raise ValueError(f"message token must be alphanumeric, got {token!r}")
    return f"<{report_id}.{token}@{submitter_a}>"


def normalize_address(address: str, what: str = "address") -> str:
    """``address`` as ``local@domain`` with the domain a lower-case A-label.

    Only a dot-atom local part in ASCII is accepted: no display name, no
    angle brackets, no quoted-string, no SMTPUTF8 local part.
    Raises ValueError naming ``what``.
    """
    _check_text(address, what)
    local, sep, domain = address.strip().rpartition("@")
    if not sep or not local or not domain:
        raise ValueError(f"{what} is not an e-mail address (local@domain): {address!r}")
    if not _DOT_ATOM_TEXT.match(local):
        raise ValueError(f"{what} has an unsupported local part: {address!r}")
    try:
        domain_a = normalize_domain(domain)
    except DomainError as exc:
        raise ValueError(f"{what} has an invalid domain: {address!r} ({exc})") from None
    if not _DOMAIN_NAME.match(domain_a):
        raise ValueError(f"{what} has an invalid domain: {address!r}")
    return f"{local}@{domain_a}"


def build_report_message(
    *,
    from_address: str,
    to_address: str,
    receiver: str,
    submitter: str,
    org_name: str,
    policy_domain: str,
    begin: int,
    end: int,
    report_id: str,
    attachment: bytes,
    filename: str,
    date: datetime.datetime,
    message_token: str = "",
) -> bytes:
    """The whole report message as bytes with CRLF line ends.

    ``filename`` must be :func:`report_filename` of the same receiver, policy
    domain, period and report id (compressed or not; the media type follows
    from the extension), so that the Subject's Report-ID and the filename's
    unique-id cannot disagree.  ``date`` must be timezone-aware; it is written
    in UTC.  ``message_token`` is the delivery's secret token, carried in the
    Message-ID (:func:`report_message_id`).  Raises ValueError for any
    unusable value.
    """
    sender = normalize_address(from_address, "From address")
    recipient = normalize_address(to_address, "To address")
    _check_text(org_name, "org name")
    if len(org_name) > MAX_ORG_NAME:
        raise ValueError(f"org name longer than {MAX_ORG_NAME} characters")
    _check_text(filename, "filename")
    subject = report_subject(policy_domain, submitter, report_id)
    message_id = report_message_id(submitter, report_id, message_token)
    policy_a = _domain_name(policy_domain, "policy domain")
    submitter_a = _domain_name(submitter, "submitter")
    extension = _check_filename(filename, receiver, policy_domain, begin, end, report_id)
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    utc_date = date.astimezone(datetime.UTC)

    boundary = "=_dmarc_" + hashlib.sha256(report_id.encode("ascii")).hexdigest()[:32]
    text = _text_part(org_name, policy_a, submitter_a, begin, end, filename, message_id)

    lines: list[str] = [
        _from_header(org_name.strip(), sender),
        *_fold(f"To: {recipient}"),
        *_fold(f"Subject: {subject}"),
        # "+0000" rather than the obsolete "GMT" (RFC 5322 §4.3).
        *_fold(f"Date: {email.utils.format_datetime(utc_date)}"),
        *_fold(f"Message-ID: {message_id}"),
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-generated",
        *_fold(f'Content-Type: multipart/mixed; boundary="{boundary}"'),
        "",
        "This is a multi-part message in MIME format.",
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "",
        *_quoted_printable(text),
        # The CRLF before a boundary belongs to the delimiter (RFC 2046 §5.1.1):
        # without this empty line the text would lose its final line break.
        "",
        f"--{boundary}",
        *_fold(f'Content-Type: {_MEDIA_TYPES[extension]}; name="{filename}"'),
        *_fold(f'Content-Disposition: attachment; filename="{filename}"'),
        "Content-Transfer-Encoding: base64",
        "",
        *base64.encodebytes(attachment).decode("ascii").splitlines(),
        f"--{boundary}--",
        "",
    ]
    data = "\r\n".join(lines).encode("ascii")
    for line in data.split(b"\r\n"):
        if len(line) > MAX_LINE:
            # Unreachable with the limits above; a guard against a future change.
            raise ValueError(f"a message line would exceed {MAX_LINE} octets")
    return data


# -- validation --------------------------------------------------------------------


def _check_text(value: str, what: str) -> None:
    """No CR, LF or other control character: each would let a value inject header
    fields or break the message structure."""
    for char in value:
        if char in "\r\n":
            raise ValueError(f"{what} contains CR or LF: {value!r}")
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"{what} contains a control character: {value!r}")


def _domain_name(name: str, what: str) -> str:
    _check_text(name, what)
    try:
        domain = normalize_domain(name)
    except DomainError as exc:
        raise ValueError(f"{what} is not a valid domain name: {exc}") from None
    if not _DOMAIN_NAME.match(domain):
        raise ValueError(
            f"{what} is not a domain-name of at least two letter-digit-hyphen labels: {name!r}"
        )
    return domain


def _check_report_id(report_id: str) -> None:
    if not _UNIQUE_ID.match(report_id):
        raise ValueError(
            f"report id must be letters and digits only (1*(ALPHA / DIGIT)): {report_id!r}"
        )
    if len(report_id) > MAX_REPORT_ID:
        raise ValueError(f"report id longer than {MAX_REPORT_ID} characters")


def _check_period(begin: int, end: int) -> None:
    if isinstance(begin, bool) or isinstance(end, bool):
        raise ValueError("begin and end must be integers")
    if begin < 0 or end < begin:
        raise ValueError(f"invalid report period: begin {begin}, end {end}")


def _check_filename(
    filename: str, receiver: str, policy_domain: str, begin: int, end: int, report_id: str
) -> str:
    """The extension of ``filename``, after checking it names this very report."""
    match = _FILENAME.match(filename)
    if match is None:
        raise ValueError(f"filename does not have the RFC 9990 form: {filename!r}")
    extension = match.group("ext")
    expected = report_filename(
        receiver, policy_domain, begin, end, report_id, compressed=extension == "xml.gz"
    )
    if filename != expected:
        raise ValueError(f"filename {filename!r} does not match this report ({expected!r})")
    return extension


# -- formatting --------------------------------------------------------------------


def _fold(line: str) -> list[str]:
    """``line`` folded at its spaces so that each line keeps to 78 characters
    where a space allows it.

    Each fold turns one space into CRLF + space, so unfolding (RFC 5322 §2.2.3:
    removing the CRLFs) gives back ``line`` exactly.  A token longer than the
    limit stays whole on its own line: splitting the Report-ID or a filename
    would change it.
    """
    tokens = line.split(" ")
    lines = [tokens[0]]
    for token in tokens[1:]:
        if len(lines[-1]) + 1 + len(token) <= FOLD_AT:
            lines[-1] += " " + token
        else:
            lines.append(" " + token)
    return lines


def _from_header(org_name: str, sender: str) -> str:
    """The From field with the org name as display name.  The stdlib writes the
    phrase: quoting specials and RFC 2047-encoding non-ASCII names."""
    policy = email.policy.SMTP
    header = policy.header_factory("From", Address(display_name=org_name, addr_spec=sender))
    folded: str = header.fold(policy=policy)
    return folded.removesuffix("\r\n")


def _iso(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(domain: str) -> str:
    """The A-label, with the U-label beside it for a reader when they differ."""
    unicode = to_unicode(domain)
    return domain if unicode == domain else f"{domain} ({unicode})"


def _text_part(
    org_name: str,
    policy_domain: str,
    submitter: str,
    begin: int,
    end: int,
    filename: str,
    message_id: str,
) -> str:
    sender = org_name.strip() or submitter
    paragraphs = [
        f"This is a DMARC aggregate report (RFC 9990) from {sender} for the domain "
        f"{_shown(policy_domain)}, covering {_iso(begin)} to {_iso(end)} (UTC).",
        f"The report is attached as {filename} (XML"
        + (", gzip-compressed)." if filename.endswith(".gz") else ")."),
        f"Submitter: {submitter}\nReport-ID: {message_id}",
        "This message was generated automatically; replies are not read.",
    ]
    wrapped = [
        "\n".join(
            textwrap.fill(line, width=72, break_long_words=False, break_on_hyphens=False)
            for line in paragraph.split("\n")
        )
        for paragraph in paragraphs
    ]
    return "\n\n".join(wrapped) + "\n"


def _quoted_printable(text: str) -> list[str]:
    """``text`` (LF line ends) as quoted-printable lines of at most 76 characters
    (RFC 2045 §6.7); its ASCII lines come out as written."""
    encoded = quopri.encodestring(text.encode("utf-8"), quotetabs=False)
    return encoded.decode("ascii").splitlines()
