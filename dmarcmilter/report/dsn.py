"""Delivery status notifications (RFC 3464, RFC 3462 multipart/report).

A bounce of our report mail names the recipient that failed, what happened
(``Action``, ``Status``, RFC 3463 status codes) and, in its returned
``message/rfc822`` or ``text/rfc822-headers`` part, the Message-ID of the
report.  :func:`parse_dsn` reads exactly that, and nothing else: it is pure
(no DNS, no database) and never raises; whatever is not a usable DSN is a
:class:`DeliveryReport` whose ``not_dsn`` says why.

A recipient bounced hard when its ``Action`` is ``failed`` and its
``Status`` is permanent (5.x.x).  ``delayed`` with 4.x.x is a warning, and
``failed`` with 4.x.x (a message that timed out in a queue) is not hard
either: the destination may work tomorrow.

Anyone can send us something that looks like a DSN, so the work is bounded
and ambiguity is refused rather than guessed:

* only the first MAX_DSN_BYTES of the message are read.  The delivery-status
  part comes before the returned message (RFC 3462 §2), so a bounce that
  returns a large report is still read; but if the delivery-status part does
  not end within the limit, the message is not a DSN;
* at most MAX_PARTS parts of the top-level multipart/report are looked at;
* at most MAX_RECIPIENTS per-recipient groups are kept (``truncated`` says
  some were left out); at most MAX_FIELDS fields are read per group;
* a per-recipient group without Final-Recipient, Action or a valid Status,
  or with any of them twice, is skipped: it cannot say which address failed;
* field values are cut at MAX_VALUE_CHARS, addresses over MAX_ADDRESS_CHARS
  make their group unusable, a Content-Type over MAX_CONTENT_TYPE_CHARS is
  not parsed (its part has no known type), a boundary over
  MAX_BOUNDARY_CHARS makes the message not a DSN.

Postfix, Sendmail, Exim, Microsoft and Gmail DSNs differ in field order,
case, folding, blank lines, boundary quoting and which part returns the
original; all of that is accepted.  The UTF-8 forms of RFC 6533
(message/global-delivery-status, message/global, message/global-headers)
are read like their ASCII ones.
"""

from __future__ import annotations

import base64
import binascii
import enum
import quopri
import re
from dataclasses import dataclass

from .. import message as message_module

# Bytes of a message read.  A bounce returning one of our reports in full
# can be as large as the report; only its headers matter, and they come
# right after the delivery-status part.
MAX_DSN_BYTES = 1024 * 1024
# Top-level parts examined (a DSN has two or three).
MAX_PARTS = 32
# Per-recipient groups kept; more are ignored and the result is truncated.
MAX_RECIPIENTS = 100
# Fields read per group of the delivery-status part (RFC 3464 defines 11).
MAX_FIELDS = 50
# Characters kept of a field value such as Diagnostic-Code.
MAX_VALUE_CHARS = 500
# An address longer than this makes its per-recipient group unusable
# (RFC 5321 §4.5.3.1.3: a path is at most 256 octets).
MAX_ADDRESS_CHARS = 320
# RFC 2046 §5.1.1 allows 70 characters; some MTAs' are longer (Postfix
# puts its host name in the boundary).
MAX_BOUNDARY_CHARS = 200
# A longer Content-Type value is not parsed: its part has no known type.
MAX_CONTENT_TYPE_CHARS = 4096
# RFC 5322 §2.1.1: a line, so a Message-ID, is at most 998 characters.
MAX_MESSAGE_ID_CHARS = 998

STATUS_PARTS = {"message/delivery-status", "message/global-delivery-status"}
ORIGINAL_PARTS = {
    "message/rfc822",
    "text/rfc822-headers",
    "message/global",
    "message/global-headers",
}
REPORT_TYPES = {"delivery-status", "global-delivery-status"}

_LINE_END = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)", re.DOTALL)
# RFC 3464 §2.3.4 / RFC 3463 §2: class.subject.detail, maybe a comment after.
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.])")
_MSG_ID = re.compile(r"<[^<>\s]{1,996}>")
_WORD = re.compile(r"[A-Za-z-]+")
# One or more lines that are empty or white space: group separators.
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


class Action(enum.Enum):
    """RFC 3464 §2.3.3."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One per-recipient group of a DSN."""

    final_recipient: str  # the address, without address-type and brackets
    original_recipient: str | None  # the ORCPT the sender gave, when returned
    action: Action
    status: str  # "5.1.1"
    diagnostic: str  # Diagnostic-Code, one line, cut at MAX_VALUE_CHARS
    remote_mta: str

    @property
    def address(self) -> str:
        """The address our mail was sent to: the original recipient when
        the DSN returns it (aliasing may have changed the final one)."""
        return self.original_recipient or self.final_recipient

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5.")

    @property
    def hard_bounce(self) -> bool:
        return self.action is Action.FAILED and self.permanent


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a DSN says, or, with ``not_dsn`` set, why the message is not one."""

    recipients: tuple[RecipientStatus, ...] = ()
    # The returned original's Message-ID with its angle brackets; None when
    # no original part, no Message-ID or more than one.
    original_message_id: str | None = None
    reporting_mta: str = ""
    # Some per-recipient groups were left out: over MAX_RECIPIENTS, or
    # unusable (see skipped).
    truncated: bool = False
    skipped: int = 0  # per-recipient groups that were unusable
    not_dsn: str = ""

    @property
    def is_dsn(self) -> bool:
        return not self.not_dsn

    @property
    def hard_bounces(self) -> tuple[RecipientStatus, ...]:
        return tuple(r for r in self.recipients if r.hard_bounce)


def _not_dsn(why: str) -> DeliveryReport:
    return DeliveryReport(not_dsn=why)


def parse_dsn(message: message_module.Message | bytes) -> DeliveryReport:
    """Read a delivery status notification.  Never raises."""
    raw = message.raw if isinstance(message, message_module.Message) else bytes(message)
    data = raw[:MAX_DSN_BYTES]
    if data.startswith(b"From "):
        # An mbox separator line.
        data = data.partition(b"\n")[2]
    head, body, complete = _split_entity(data)
    if not complete:
        return _not_dsn("no header section")
    fields = _fields(head, limit=None)
    ctype, params = _content_type(fields)
    if ctype != "multipart/report":
        return _not_dsn(f"not multipart/report ({_show(ctype or 'no Content-Type')})")
    if params.get("report-type", "").lower() not in REPORT_TYPES:
        return _not_dsn(
            f"report-type is {_show(params.get('report-type', '')) or 'missing'}, "
            "not delivery-status"
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        return _not_dsn("no usable multipart boundary")
    parts, closed_parts = _parts(body, boundary.encode("utf-8", "replace"))
    status_part: bytes | None = None
    original: tuple[str, bytes, bool] | None = None
    status_index = -1
    for index, (part_fields, part_body) in enumerate(parts):
        part_type, _ = _content_type(part_fields)
        if part_type in STATUS_PARTS and status_part is None:
            status_part = _decode_body(part_fields, part_body)
            status_index = index
        elif part_type in ORIGINAL_PARTS and original is None and status_part is not None:
            original = (part_type, _decode_body(part_fields, part_body), index < closed_parts)
    if status_part is None:
        return _not_dsn("no message/delivery-status part")
    if status_index >= closed_parts:
        # Its end was not within MAX_DSN_BYTES: the last group could be cut
        # in the middle of a Status.
        return _not_dsn(f"the delivery-status part does not end within {MAX_DSN_BYTES} bytes")
    return _delivery_report(status_part, original)


def _delivery_report(
    status_part: bytes, original: tuple[str, bytes, bool] | None
) -> DeliveryReport:
    groups, truncated = _groups(status_part.decode("utf-8", "replace"))
    reporting_mta = ""
    recipients: list[RecipientStatus] = []
    skipped = 0
    seen_message_fields = False
    for group in groups:
        names = [name for name, _ in group]
        if "final-recipient" not in names:
            # The per-message group (RFC 3464 §2.2); whatever comes later
            # without a Final-Recipient is not a recipient either.
            if not seen_message_fields:
                seen_message_fields = True
                reporting_mta = _one(group, "reporting-mta") or ""
            continue
        if len(recipients) >= MAX_RECIPIENTS:
            truncated = True
            break
        recipient = _recipient(group)
        if recipient is None:
            skipped += 1
            continue
        recipients.append(recipient)
    if not recipients:
        why = "no usable per-recipient fields"
        return DeliveryReport(skipped=skipped, truncated=bool(skipped), not_dsn=why)
    return DeliveryReport(
        recipients=tuple(recipients),
        original_message_id=_original_message_id(original),
        reporting_mta=_clip(_after_type(reporting_mta)),
        truncated=truncated or bool(skipped),
        skipped=skipped,
    )


def _recipient(group: list[tuple[str, str]]) -> RecipientStatus | None:
    names = [name for name, _ in group]
    if any(names.count(n) != 1 for n in ("final-recipient", "action", "status")):
        return None
    if names.count("original-recipient") > 1:
        return None
    final = _address(_one(group, "final-recipient") or "")
    if final is None:
        return None
    original_text = _one(group, "original-recipient")
    original = _address(original_text) if original_text is not None else None
    if original_text is not None and original is None:
        return None
    action_word = _WORD.match((_one(group, "action") or "").strip())
    try:
        action = Action(action_word.group(0).lower() if action_word else "")
    except ValueError:
        return None
    status = _STATUS.match((_one(group, "status") or "").strip())
    if status is None:
        return None
    code = ".".join(str(int(g)) for g in status.groups())
    return RecipientStatus(
        final_recipient=final,
        original_recipient=original,
        action=action,
        status=code,
        diagnostic=_clip(_one(group, "diagnostic-code") or ""),
        remote_mta=_clip(_after_type(_one(group, "remote-mta") or "")),
    )


def _original_message_id(original: tuple[str, bytes, bool] | None) -> str | None:
    """The Message-ID of the returned original: ``(part type, content,
    whether the part ended within MAX_DSN_BYTES)``."""
    if original is None:
        return None
    _, content, ended = original
    # The header section ends at a blank line, or with the part (a
    # text/rfc822-headers part, or a message/rfc822 one returned without
    # its body, needs no blank line).
    head, _, complete = _split_entity(content)
    if not complete and not ended:
        # Cut by MAX_DSN_BYTES within the header section: a Message-ID
        # line there may be cut too.
        return None
    ids = [v for n, v in _fields(head, limit=None) if n == "message-id"]
    if len(ids) != 1:
        return None
    found = _MSG_ID.search(ids[0])
    return found.group(0) if found and len(found.group(0)) <= MAX_MESSAGE_ID_CHARS else None


# -- MIME, just enough and bounded ----------------------------------------------------------


def _split_entity(data: bytes) -> tuple[bytes, bytes, bool]:
    """(header section, body, whether the header section ended).  An
    entity that starts with a blank line has no header fields."""
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return b"", data.partition(b"\n")[2], True
    found = _HEAD_END.search(data)
    if found is None:
        return data, b"", False
    return data[: found.start()], data[found.end() :], True


def _fields(head: bytes, limit: int | None) -> list[tuple[str, str]]:
    """Header fields as (lower-case name, unfolded value); lines that are
    not fields are skipped."""
    fields: list[tuple[str, str]] = []
    current: list[str] | None = None
    for line in _LINE_END.split(head):
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t"):
            if current is not None:
                current.append(text)
            continue
        if current is not None:
            fields[-1] = (fields[-1][0], " ".join(s.strip() for s in current))
            current = None
        if limit is not None and len(fields) >= limit:
            break
        match = _FIELD.fullmatch(text)
        if match is None:
            continue
        fields.append((match.group(1).lower(), ""))
        current = [match.group(2)]
    if current is not None:
        fields[-1] = (fields[-1][0], " ".join(s.strip() for s in current))
    return fields


def _content_type(fields: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """(lower-case type/subtype, parameters with lower-case names) of the
    first Content-Type field; ("", {}) without one."""
    for name, value in fields:
        if name == "content-type":
            if len(value) > MAX_CONTENT_TYPE_CHARS:
                return "", {}
            return _parse_content_type(value)
    return "", {}


def _parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    items = _split_params(value)
    ctype = items[0].strip().lower() if items else ""
    params: dict[str, str] = {}
    for item in items[1:]:
        key, eq, val = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or key in params:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[key] = val
    return ctype, params


def _split_params(value: str) -> list[str]:
    """Split on ";" outside quoted strings; comments are not removed."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return items


def _parts(body: bytes, boundary: bytes) -> tuple[list[tuple[list[tuple[str, str]], bytes]], int]:
    """The body parts (fields, body) of a multipart body, at most MAX_PARTS,
    and how many of them ended with a delimiter line within the data."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    starts: list[tuple[int, int, bool]] = []  # (line start, content start, closing)
    for match in delimiter.finditer(body):
        end = match.end()
        if body[end : end + 1] == b"\n":
            end += 1
        starts.append((match.start(), end, match.group(1) is not None))
        if match.group(1) is not None or len(starts) > MAX_PARTS:
            break
    parts: list[tuple[list[tuple[str, str]], bytes]] = []
    closed = 0
    for index, (_, content_start, closing) in enumerate(starts):
        if closing or len(parts) >= MAX_PARTS:
            break
        if index + 1 < len(starts):
            # The CRLF before the next delimiter belongs to the delimiter.
            content = body[content_start : starts[index + 1][0]]
            content = content[:-2] if content.endswith(b"\r\n") else content.removesuffix(b"\n")
            closed += 1
        else:
            content = body[content_start:]
        head, part_body, _ = _split_entity(content)
        parts.append((_fields(head, limit=MAX_FIELDS), part_body))
    return parts, closed


def _decode_body(fields: list[tuple[str, str]], body: bytes) -> bytes:
    encoding = next((v.strip().lower() for n, v in fields if n == "content-transfer-encoding"), "")
    if encoding == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==", validate=False)
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _groups(text: str) -> tuple[list[list[tuple[str, str]]], bool]:
    """The groups of fields of a delivery-status body, split at blank lines
    (RFC 3464 §2.1), each at most MAX_FIELDS fields; and whether groups
    were left out (more than MAX_RECIPIENTS + 1)."""
    limit = MAX_RECIPIENTS + 1
    chunks = _BLANK_LINES.split(text.strip("\r\n"), maxsplit=limit)
    cut = len(chunks) > limit
    groups = [_fields(chunk.encode("utf-8"), limit=MAX_FIELDS) for chunk in chunks[:limit]]
    return [g for g in groups if g], cut


def _one(group: list[tuple[str, str]], name: str) -> str | None:
    return next((value for n, value in group if n == name), None)


def _after_type(value: str) -> str:
    """``dns; mx.example.net`` -> ``mx.example.net`` (RFC 3464 §2.1.2:
    address-type or MTA-name-type, ";", the value)."""
    _, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon else value.strip()


def _address(value: str) -> str | None:
    """The address of ``rfc822; <user@example.com>`` (or ``utf-8;``), or
    None when there is none that could be a mailbox."""
    address = _after_type(value)
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if (
        not address
        or len(address) > MAX_ADDRESS_CHARS
        or "@" not in address
        or any(c.isspace() or c in "<>" or not c.isprintable() for c in address)
    ):
        return None
    return address


def _clip(value: str) -> str:
    value = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 3] + "..."


def _show(value: str) -> str:
    value = _clip(value)
    return value if len(value) <= 60 else value[:57] + "..."
