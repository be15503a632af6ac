"""The failure report message (RFC 9991 §4; RFC 6591 AFRF; RFC 5965 ARF;
digest §7.2, privacy §7.3).

One report is a ``multipart/report; report-type=feedback-report`` message
(RFC 6522) with three parts:

1. ``text/plain``: what happened, for a human;
2. ``message/feedback-report``: the machine-readable fields,
   ``Feedback-Type: auth-failure``, ``User-Agent``, ``Version: 1``,
   ``Auth-Failure``, ``Authentication-Results``, ``Identity-Alignment``
   (RFC 9991: the mechanisms that *failed* to authenticate an aligned
   identity, or ``none``), ``Original-Mail-From``, ``Original-Rcpt-To``,
   ``Arrival-Date``, ``Source-IP``, ``Reported-Domain``, ``Delivery-Result``,
   ``Incidents``; ``DKIM-Domain``/``DKIM-Identity``/``DKIM-Selector`` for a
   failed aligned DKIM identifier, ``SPF-DNS`` for a failed aligned SPF one;
3. the original: its header fields as ``text/rfc822-headers``, or the
   message as ``message/rfc822`` only when the operator asks for bodies.

Privacy (RFC 9991 §7, RFC 9989 §10.2):

- **Redaction** (RFC 6590), on unless turned off: every local-part, in the
  fields and in the included original, becomes ``redacted-`` and 16 hex
  digits of an HMAC-SHA256 under a key made for this one report, so the same
  address gives the same token within a report (a reader can still tell
  that From and Reply-To are one mailbox) and nothing links two reports.
  The domain is kept: it is what the report is about.  A local-part that
  also stands alone (a display name, a Subject word) is replaced there too.
- **No body** by default; with bodies, only the text parts are kept, redacted
  and defanged, and every other part (attachments) is left out and counted.
- **URLs defanged** in all included text: ``hxxp[://]host[.]example``.

The input is one :class:`FailureIncident`: what one failure (or several
merged ones, ``incidents`` > 1) looked like.  It is plain data so the
sender can build it from a history row.

The report mail's From, Message-ID (``<report-id@submitter>``) and address
checks come from :mod:`dmarcmilter.report.mail`, so the loop guard
(:mod:`dmarcmilter.report.guard`) recognises failure reports too.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.headerregistry
import email.message
import email.policy
import email.utils
import enum
import hashlib
import hmac
import ipaddress
import os
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field

from .. import __version__
from ..authres.render import plain_text
from ..dmarc import could_align
from ..evaluation import Evaluation
from ..policy import Action, Decision
from ..results import DKIMResultCode, SPFResultCode
from .failure import FailureKind
from .mail import (
    FOLD_AT,
    MAX_LINE,
    _check_text,
    _domain_name,
    _fold,
    normalize_address,
    report_message_id,
)

# -- bounds ------------------------------------------------------------------------
# A field of the feedback report (an Authentication-Results value, a DKIM
# identity): longer is cut with "...".  Render's worst case A-R is ~30 KB.
MAX_FIELD_CHARS = 8192
# Original-Rcpt-To fields per report; the rest are counted in the text part.
MAX_RCPT_TO = 20
# Header fields of the original, and their total size; past either the
# rest are left out and counted in the text part.
MAX_SAMPLE_FIELDS = 200
MAX_SAMPLE_HEADER_CHARS = 65536
# Body text kept with include_body, after redaction; cut with a note.
MAX_SAMPLE_BODY_CHARS = 65536
# The original's body read for its text parts; past it the rest is not read.
MAX_ORIGINAL_BODY_BYTES = 1 << 20
# Distinct local-parts also searched for as stand-alone words (display
# names, Subject).  Past it an address is still redacted wherever it
# appears as an address; only the stand-alone search stops growing.
MAX_REDACTED_WORDS = 256
# RFC 5321 §4.5.3.1.1: a local-part has at most 64 octets.  A longer one is
# redacted as an address but not searched for as a word.
MAX_LOCAL_PART = 64
# Local-parts shorter than this are not searched for as stand-alone words:
# "jo" would replace every "jo" in a Subject.  As addresses they are redacted.
MIN_WORD_LOCAL_PART = 3

USER_AGENT = f"dmarcmilter/{__version__}"
TOKEN_PREFIX = "redacted-"

# Headers whose values are identifiers, not addresses: a domain owner finds
# the message by them, so their "local@domain" shape is kept (a local-part
# that is also an address's still goes, by the stand-alone word search).
_IDENTIFIER_FIELDS = frozenset({"message-id", "in-reply-to", "references", "resent-message-id"})


class DeliveryResult(enum.Enum):
    """RFC 6591 §3.1 Delivery-Result."""

    DELIVERED = "delivered"
    SPAM = "spam"
    POLICY = "policy"
    REJECT = "reject"
    OTHER = "other"


def delivery_result(action: Action) -> DeliveryResult:
    """What was done with the message, as Delivery-Result says it."""
    return {
        Action.ACCEPT: DeliveryResult.DELIVERED,
        Action.QUARANTINE: DeliveryResult.SPAM,
        Action.REJECT: DeliveryResult.REJECT,
    }.get(action, DeliveryResult.OTHER)


@dataclass(frozen=True, slots=True)
class FailedSignature:
    """A DKIM signature that did not verify."""

    domain: str  # d=
    selector: str  # s=
    result: str  # the RFC 8601 result, e.g. "fail"
    identity: str = ""  # i=; "" means the RFC 6376 default "@" d=
    aligned: bool = False  # d= aligned with the reported domain under adkim
    reason: str = ""  # the verifier's reason, e.g. "body hash mismatch"


@dataclass(frozen=True, slots=True)
class FailureIncident:
    """One failure (or ``incidents`` alike ones merged) to report.

    Everything a report says, as plain values.  ``headers`` are the
    original's header fields in order, values as received (folds kept).
    ``authentication_results`` is the A-R value as rendered for the message.
    """

    kind: FailureKind
    reported_domain: str  # the Author Domain
    source_ip: str
    arrival_date: datetime.datetime  # timezone-aware
    mail_from: str  # the envelope sender, "" for the null reverse-path
    rcpt_to: tuple[str, ...]
    authentication_results: str
    delivery_result: DeliveryResult
    headers: tuple[tuple[str, str], ...]
    dkim_failed: tuple[FailedSignature, ...] = ()
    spf_domain: str = ""
    spf_result: str = ""  # RFC 8601 SPF result
    spf_aligned: bool = False  # spf_domain aligned with the reported domain under aspf
    spf_record: str = ""  # the SPF TXT record evaluated, when known
    body: bytes | None = None  # the original's body, when kept
    incidents: int = 1

    @property
    def failed_aligned_dkim(self) -> FailedSignature | None:
        """The first failed signature whose d= is aligned."""
        return next((s for s in self.dkim_failed if s.aligned), None)

    @property
    def spf_failed_aligned(self) -> bool:
        return self.spf_aligned and self.spf_result not in ("", "pass", "none")

    @property
    def identity_alignment(self) -> str:
        """RFC 9991 Identity-Alignment: the mechanisms that failed to
        authenticate an aligned identity, or ``none``."""
        failed = [
            name
            for name, yes in (
                ("dkim", self.failed_aligned_dkim is not None),
                ("spf", self.spf_failed_aligned),
            )
            if yes
        ]
        return ", ".join(failed) or "none"


def incident_from_evaluation(
    evaluation: Evaluation,
    decision: Decision,
    kind: FailureKind,
    *,
    headers: Iterable[tuple[str, str]],
    authentication_results: str,
    body: bytes | None = None,
) -> FailureIncident:
    """The incident for one evaluated message.

    A failed identifier is "aligned" when it could align with the Author
    Domain (:func:`dmarcmilter.dmarc.could_align`, no DNS): equality for
    strict mode; for relaxed mode, being the Author Domain's Organizational
    Domain or below it.  [impl choice] The DMARC core works out alignment for
    passes only and a report is built after the message, with no DNS budget;
    the rare psd=n split below an Organizational Domain (digest E6) is then
    reported as aligned, which names the owner's own subdomain to the owner.
    """
    dmarc = evaluation.dmarc
    record = dmarc.record
    author = dmarc.author_domain or ""

    def aligned(identifier: str, *, dkim: bool) -> bool:
        if record is None or not author or not identifier:
            return False
        mode = record.adkim if dkim else record.aspf
        return could_align(identifier, author, dmarc.organizational_domain, mode)

    failed = tuple(
        FailedSignature(
            v.signature.domain,
            v.signature.selector,
            v.signature.result.value,
            v.signature.identity,
            aligned(v.signature.domain, dkim=True),
            v.signature.reason,
        )
        for v in dmarc.dkim
        if v.signature.result is not DKIMResultCode.PASS
    )
    spf = dmarc.spf.spf
    env = evaluation.envelope
    return FailureIncident(
        kind=kind,
        reported_domain=author,
        source_ip=env.client_ip.partition("%")[0],
        arrival_date=evaluation.evaluated_at,
        mail_from=env.mail_from,
        rcpt_to=env.rcpt_to,
        authentication_results=authentication_results,
        delivery_result=delivery_result(decision.action),
        headers=tuple(headers),
        dkim_failed=failed,
        spf_domain=spf.domain,
        spf_result=spf.result.value,
        spf_aligned=spf.result is not SPFResultCode.PASS and aligned(spf.domain, dkim=False),
        body=body,
    )


# -- redaction and defanging (RFC 6590; digest §7.3) -----------------------------------

# An addr-spec inside any text: a dot-atom or quoted-string local-part, "@",
# and a host name.  "=" is taken as a separator although RFC 5322 atext
# allows it: in "smtp.mailfrom=user@example" (Authentication-Results),
# "i=user@example" (DKIM-Signature) or "?to=user@example" (a URL) the
# local-part starts after it, and the name before it must stay readable.
# An SRS address ("SRS0=...=user@forwarder") keeps its prefix, not its user.
_ATEXT = r"A-Za-z0-9!#$%&'*+/?^_`{|}~-"
_ATOM = rf"[{_ATEXT}]+"
_LOCAL = rf'(?:"(?:[^"\\\r\n]|\\.)*"|{_ATOM}(?:\.{_ATOM})*)'
# A match starts only where a local-part can start, never inside a run of
# atom characters: each run is then scanned once, not once per character.
_ADDRESS = re.compile(
    rf"(?<![.{_ATEXT}])(?P<local>{_LOCAL})@(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
)
# A URL's scheme and host (RFC 3986), the parts that make it clickable.
_URL = re.compile(r"(?i)\b(?P<scheme>https?|ftp)://(?P<host>[^\s/?#<>\"'\[\]]*)")
_MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
_DEFANGED_SCHEME = {"http": "hxxp", "https": "hxxps", "ftp": "fxp"}


class Redactor:
    """Local-part redaction for one report (RFC 6590).

    ``key`` is the report's secret: the token of a local-part is an HMAC
    under it, so tokens are consistent within the report and say nothing
    across reports.  Disabled, it only defangs.
    """

    def __init__(self, key: bytes, *, enabled: bool = True) -> None:
        self._key = key
        self.enabled = enabled
        self._words: dict[str, str] = {}
        self._word_re: re.Pattern[str] | None = None
        self._words_re: re.Pattern[str] | None = None

    def token(self, local: str) -> str:
        bare = local[1:-1] if local.startswith('"') and local.endswith('"') else local
        digest = hmac.new(self._key, bare.lower().encode("utf-8", "replace"), hashlib.sha256)
        return TOKEN_PREFIX + digest.hexdigest()[:16]

    def learn(self, text: str) -> None:
        """Note the local-parts of the addresses in ``text``, to be replaced
        also where they stand alone."""
        for match in _ADDRESS.finditer(text):
            self._learn_local(match.group("local"))

    def learn_address(self, address: str) -> None:
        local, at, _domain = address.rpartition("@")
        if at and local:
            self._learn_local(local)

    def _learn_local(self, local: str) -> None:
        bare = local.strip('"')
        if (
            len(self._words) >= MAX_REDACTED_WORDS
            or not MIN_WORD_LOCAL_PART <= len(bare) <= MAX_LOCAL_PART
            or bare.lower() in self._words
        ):
            return
        self._words[bare.lower()] = self.token(local)
        self._word_re = None

    def _pattern(self, *, words_only: bool = False) -> re.Pattern[str]:
        if self._word_re is None:
            words = sorted(self._words, key=len, reverse=True)
            joined = "|".join(re.escape(w) for w in words) or "(?!)"
            word = rf"(?<![\w.+-])(?P<word>{joined})(?![\w+-])"
            self._word_re = re.compile(rf"(?P<address>{_ADDRESS.pattern})|{word}", re.IGNORECASE)
            self._words_re = re.compile(rf"(?P<address>(?!))|{word}", re.IGNORECASE)
        if words_only and self._words_re is not None:
            return self._words_re
        return self._word_re

    def redact(self, text: str, *, addresses: bool = True) -> str:
        """``text`` with every local-part replaced by its token; with
        ``addresses`` False (identifier fields), only the stand-alone words."""
        if not self.enabled:
            return text

        def replace(match: re.Match[str]) -> str:
            if match.group("address") is None:
                return self._words[match.group("word").lower()]
            if addresses:
                return f"{self.token(match.group('local'))}@{match.group('domain')}"
            # An identifier shaped like an address: only the known words go.
            local = match.group("local")
            if not self._words:
                return match.group(0)
            return self._pattern(words_only=True).sub(replace, local) + match.group(0)[len(local) :]

        return self._pattern().sub(replace, text)

    def address(self, address: str) -> str:
        """An envelope address, redacted: ``token@domain``; "" stays ""."""
        if not self.enabled or not address:
            return address
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return self.redact(address)
        return f"{self.token(local)}@{domain}"


def defang(text: str) -> str:
    """URLs made unclickable: ``hxxp[://]host[.]example/path``."""

    def replace(match: re.Match[str]) -> str:
        scheme = _DEFANGED_SCHEME[match.group("scheme").lower()]
        return f"{scheme}[://]{match.group('host').replace('.', '[.]')}"

    return _URL.sub(replace, text)


# -- the report --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailureReportSettings:
    """The reporter's side of every failure report."""

    from_address: str  # report.from_address: the report mail passes DMARC for it
    submitter: str  # the reporting host's name, for the Message-ID
    org_name: str = ""
    redact: bool = True  # RFC 6590 local-part redaction
    include_body: bool = False  # message/rfc822 (text parts only) instead of headers
    user_agent: str = field(default=USER_AGENT)


@dataclass(frozen=True, slots=True)
class _Sample:
    media_type: str  # text/rfc822-headers or message/rfc822
    text: str  # CRLF line ends, ASCII
    left_out: tuple[str, ...]  # what was not included, for the text part


def build_failure_report(
    incident: FailureIncident,
    *,
    to_address: str,
    report_id: str,
    date: datetime.datetime,
    settings: FailureReportSettings,
    redaction_key: bytes | None = None,
    message_token: str = "",
) -> email.message.EmailMessage:
    """The report message for ``incident``, to ``to_address``.

    ``report_id`` is letters and digits (as for aggregate reports) and makes
    the Message-ID ``<report-id@submitter>``, or with the delivery's random
    ``message_token`` ``<report-id.token@submitter>``.  ``redaction_key`` is the
    report's secret (random when None; given, the same inputs build the
    same message).  Raises ValueError for any unusable value.
    """
    sender = normalize_address(settings.from_address, "From address")
    recipient = normalize_address(to_address, "To address")
    message_id = report_message_id(settings.submitter, report_id, message_token)
    reported = _domain_name(incident.reported_domain, "reported domain")
    _check_text(settings.org_name, "org name")
    _check_text(settings.user_agent, "user agent")
    if date.tzinfo is None or incident.arrival_date.tzinfo is None:
        raise ValueError("date and arrival date must be timezone-aware")
    if incident.incidents < 1:
        raise ValueError(f"incidents must be at least 1, got {incident.incidents}")
    source_ip = str(ipaddress.ip_address(incident.source_ip))
    key = redaction_key if redaction_key is not None else os.urandom(32)
    redactor = Redactor(key, enabled=settings.redact)
    for address in (incident.mail_from, *incident.rcpt_to):
        redactor.learn_address(address)
    for name, value in incident.headers[:MAX_SAMPLE_FIELDS]:
        if name.lower() not in _IDENTIFIER_FIELDS:
            redactor.learn(value[:MAX_SAMPLE_HEADER_CHARS])

    fields = _feedback_fields(incident, redactor, reported, source_ip, settings.user_agent)
    sample = _sample(incident, redactor, settings.include_body)
    boundary = "=_failure_" + hmac.new(key, report_id.encode(), hashlib.sha256).hexdigest()[:32]
    text = _text_part(incident, reported, source_ip, settings, sample, message_id)
    for content in (fields, sample.text, text):
        if f"--{boundary}" in content:  # unreachable: the boundary is an HMAC
            raise ValueError("a part contains the MIME boundary")

    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = email.headerregistry.Address(
        display_name=settings.org_name.strip(), addr_spec=sender
    )
    msg["To"] = recipient
    msg["Subject"] = f"DMARC failure report for {reported} from {source_ip}"
    msg["Date"] = email.utils.format_datetime(date.astimezone(datetime.UTC))
    msg["Message-ID"] = message_id
    msg["MIME-Version"] = "1.0"
    msg["Auto-Submitted"] = "auto-generated"
    msg["Content-Type"] = f'multipart/report; report-type=feedback-report; boundary="{boundary}"'
    msg.preamble = "This is a multi-part message in MIME format.\r\n"

    human = email.message.EmailMessage(policy=email.policy.SMTP)
    human.set_content(text, charset="us-ascii", cte="7bit")
    del human["MIME-Version"]  # set_content adds it; it belongs to the message only
    msg.attach(human)
    msg.attach(_part("message/feedback-report", fields))
    msg.attach(_part(sample.media_type, sample.text))
    return msg


def failure_report_bytes(msg: email.message.EmailMessage) -> bytes:
    """The message as sent: CRLF line ends."""
    return msg.as_bytes(policy=email.policy.SMTP)


def _part(media_type: str, text: str) -> email.message.EmailMessage:
    # message/* parts carry their text as is: the stdlib would otherwise
    # parse and refold the feedback fields as if they were a message.
    part = email.message.EmailMessage(policy=email.policy.SMTP)
    part["Content-Type"] = media_type
    part["Content-Transfer-Encoding"] = "7bit"
    part.set_payload(text)
    return part


def _feedback_fields(
    incident: FailureIncident,
    redactor: Redactor,
    reported: str,
    source_ip: str,
    user_agent: str,
) -> str:
    mail_from = redactor.address(incident.mail_from)
    rcpt_to = [("Original-Rcpt-To", f"<{redactor.address(r)}>") for r in incident.rcpt_to]
    fields: list[tuple[str, str]] = [
        ("Feedback-Type", "auth-failure"),
        ("User-Agent", user_agent),
        ("Version", "1"),
        ("Auth-Failure", _auth_failure(incident)),
        (
            "Authentication-Results",
            redactor.redact(incident.authentication_results[:MAX_FIELD_CHARS]),
        ),
        ("Identity-Alignment", incident.identity_alignment),
        ("Original-Mail-From", f"<{mail_from}>"),
        *rcpt_to[:MAX_RCPT_TO],
        (
            "Arrival-Date",
            email.utils.format_datetime(incident.arrival_date.astimezone(datetime.UTC)),
        ),
        ("Source-IP", source_ip),
        ("Reported-Domain", reported),
        ("Delivery-Result", incident.delivery_result.value),
        ("Incidents", str(incident.incidents)),
    ]
    dkim = incident.failed_aligned_dkim
    if dkim is not None:
        identity = dkim.identity or f"@{dkim.domain}"
        fields += [
            ("DKIM-Domain", dkim.domain),
            ("DKIM-Identity", redactor.redact(identity)),
            ("DKIM-Selector", dkim.selector),
        ]
    if incident.spf_failed_aligned:
        record = incident.spf_record or "(record not kept)"
        fields.append(("SPF-DNS", f"txt : {incident.spf_domain} : {record}"))
    lines: list[str] = []
    for name, value in fields:
        lines += _field_lines(name, value)
    return "\r\n".join(lines) + "\r\n"


def _auth_failure(incident: FailureIncident) -> str:
    """RFC 6591 Auth-Failure: ``dmarc`` and ``spf`` as is; for a DKIM
    report, the RFC 6591 DKIM type the first failed signature shows."""
    if incident.kind is not FailureKind.DKIM:
        return str(incident.kind.value)
    first = incident.dkim_failed[0] if incident.dkim_failed else None
    reason = first.reason.lower() if first is not None else ""
    if "body hash" in reason:
        return "bodyhash"
    if "revoked" in reason:
        return "revoked"
    return "signature"


def _field_lines(name: str, value: str) -> list[str]:
    """One field, unfolded when it fits one line (consumers such as
    parsedmarc read a field per line), else folded at spaces."""
    clean = plain_text(re.sub(r"\s*[\r\n]+\s*", " ", value), MAX_FIELD_CHARS)
    line = f"{name}: {clean}"
    if len(line) <= MAX_LINE:
        return [line]
    return _fold(line)


def _sample(incident: FailureIncident, redactor: Redactor, include_body: bool) -> _Sample:
    left_out: list[str] = []
    lines: list[str] = []
    size = 0
    with_body = include_body and incident.body is not None
    for n, (name, value) in enumerate(incident.headers):
        if with_body and name.strip().lower() in _MIME_FIELDS:
            # The original's MIME structure is not kept: only its text, as one part.
            continue
        if n >= MAX_SAMPLE_FIELDS:
            left_out.append(f"{len(incident.headers) - n} more header fields")
            break
        text = _included(
            value[:MAX_SAMPLE_HEADER_CHARS],
            redactor,
            addresses=name.lower() not in _IDENTIFIER_FIELDS,
        )
        field_lines = _header_lines(_ascii(name.strip()), text)
        size += sum(len(line) + 2 for line in field_lines)
        if size > MAX_SAMPLE_HEADER_CHARS:
            left_out.append(f"{len(incident.headers) - n} more header fields (size)")
            break
        lines += field_lines
    if not with_body:
        return _Sample("text/rfc822-headers", "\r\n".join(lines) + "\r\n", tuple(left_out))
    body, dropped = _body_text(incident, redactor)
    left_out += dropped
    lines += [
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: base64",
    ]
    encoded = base64.encodebytes(body.encode("utf-8")).decode("ascii").splitlines()
    return _Sample("message/rfc822", "\r\n".join([*lines, "", *encoded]) + "\r\n", tuple(left_out))


def _included(text: str, redactor: Redactor, *, addresses: bool = True) -> str:
    return defang(redactor.redact(text, addresses=addresses))


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" or c == "\t" else "?" for c in text)


def _header_lines(name: str, value: str) -> list[str]:
    """A header field as CRLF-free lines; every line after the first starts
    with white space, so no value can start a field or a MIME boundary."""
    physical = re.split(r"\r\n|\r|\n", value)
    first = _ascii(f"{name}: {physical[0].lstrip()}")
    rest = [_ascii(line if line[:1] in (" ", "\t") else " " + line) for line in physical[1:]]
    lines = [first, *(line for line in rest if line.strip())]
    out: list[str] = []
    for line in lines:
        out += [line] if len(line) <= MAX_LINE else _fold(line)
    return [line[:MAX_LINE] for line in out]


def _body_text(incident: FailureIncident, redactor: Redactor) -> tuple[str, list[str]]:
    """The text parts of the original, redacted and defanged; the other
    parts (attachments) left out and named."""
    head = "".join(f"{n}: {v}\r\n" for n, v in incident.headers[:MAX_SAMPLE_FIELDS])
    raw_body = (incident.body or b"")[:MAX_ORIGINAL_BODY_BYTES]
    original = email.message_from_bytes(
        head.encode("utf-8", "replace") + b"\r\n" + raw_body,
        policy=email.policy.default,
    )
    texts: list[str] = []
    dropped: list[str] = []
    for part in original.walk():
        if part.is_multipart():
            continue
        media = part.get_content_type()
        if part.get_content_maintype() == "text" and not part.get_filename():
            try:
                texts.append(str(part.get_content()))
            except (LookupError, ValueError):
                payload = part.get_payload(decode=True)
                raw = payload if isinstance(payload, bytes) else b""
                texts.append(raw.decode("utf-8", "replace"))
        else:
            dropped.append(f"a {_ascii(media)} part")
    body = _included("\n\n".join(texts), redactor)
    if len(body) > MAX_SAMPLE_BODY_CHARS:
        body = body[:MAX_SAMPLE_BODY_CHARS] + "\n[body cut]\n"
        dropped.append(f"body text past {MAX_SAMPLE_BODY_CHARS} characters")
    return body.replace("\r\n", "\n").replace("\n", "\r\n"), dropped


def _text_part(
    incident: FailureIncident,
    reported: str,
    source_ip: str,
    settings: FailureReportSettings,
    sample: _Sample,
    message_id: str,
) -> str:
    sender = settings.org_name.strip() or settings.submitter
    what = {
        FailureKind.DMARC: "failed DMARC authentication",
        FailureKind.DKIM: "carried a DKIM signature that did not verify",
        FailureKind.SPF: "failed SPF authentication",
    }[incident.kind]
    count = "A message" if incident.incidents == 1 else f"{incident.incidents} messages"
    paragraphs = [
        f"This is a DMARC failure report (RFC 9991) from {sender}. {count} with an "
        f"author in the domain {reported}, sent from {source_ip}, {what}.",
        "The fields above the original describe the failure; the original "
        + (
            "message's text is attached, without attachments."
            if sample.media_type == "message/rfc822"
            else "message's header fields are attached, without the body."
        ),
        (
            "Local-parts of addresses are replaced by tokens (RFC 6590), the same "
            "token for the same address within this report. "
            if settings.redact
            else ""
        )
        + "Links are defanged.",
    ]
    if len(incident.rcpt_to) > MAX_RCPT_TO:
        paragraphs.append(f"Recipients not listed: {len(incident.rcpt_to) - MAX_RCPT_TO}.")
    if sample.left_out:
        paragraphs.append("Left out of the original: " + "; ".join(sample.left_out) + ".")
    paragraphs += [
        f"Report-ID: {message_id}",
        "This message was generated automatically; replies are not read.",
    ]
    wrapped = [
        textwrap.fill(_ascii(p), width=FOLD_AT - 6, break_long_words=False, break_on_hyphens=False)
        for p in paragraphs
    ]
    return "\n\n".join(wrapped) + "\n"
