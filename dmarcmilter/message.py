"""The message as the checks see it: header fields in order, and the raw bytes.

RFC 5322 §2.2 header fields, §2.1 lines.  The milter receives headers and body
separately, ``dmarcmilter evaluate`` reads a stored file; both become one
:class:`Message` so every check works on the same bytes.  Line endings are
normalised to CRLF because DKIM canonicalisation (RFC 6376 §3.4) is defined
over CRLF lines.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from .errors import InputError

# RFC 5322 §3.6.8: field-name = 1*ftext, printable US-ASCII except ":".
_FIELD_LINE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE_SPLIT = re.compile(rb"\r?\n")


@dataclass(frozen=True, slots=True)
class Message:
    """Header fields as (name, value) with the value unfolded as received
    (folding CRLF kept), plus the full message in CRLF form."""

    headers: tuple[tuple[str, str], ...]
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [v for n, v in self.headers if n.lower() == wanted]

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """Parse a stored message.  Raises InputError for something that is
        not an RFC 5322 message (no header section, binary data)."""
        if data.startswith(b"From ") and b"\n" in data:
            # An mbox "From " separator line, as left by many mail stores.
            data = data.split(b"\n", 1)[1]
        head, sep, body = _split_head_body(data)
        if not head.strip():
            raise InputError("not an RFC 5322 message: no header fields")
        if b"\x00" in head:
            raise InputError("not an RFC 5322 message: NUL byte in the header section")
        headers: list[tuple[str, list[bytes]]] = []
        for line in _LINE_SPLIT.split(head):
            if not line:
                continue
            if line[:1] in (b" ", b"\t"):
                if not headers:
                    raise InputError("not an RFC 5322 message: starts with a continuation line")
                headers[-1][1].append(line)
                continue
            match = _FIELD_LINE.match(line)
            if match is None:
                raise InputError(f"not an RFC 5322 message: bad header line {_preview(line)}")
            name = match.group(1).decode("ascii")
            headers.append((name, [line[match.end() :]]))
        parsed = tuple((n, _decode(b"\r\n".join(parts)).lstrip(" \t")) for n, parts in headers)
        raw = b"\r\n".join(_LINE_SPLIT.split(head)) + b"\r\n"
        if sep:
            raw += b"\r\n" + _to_crlf(body)
        return cls(parsed, raw)

    @classmethod
    def from_parts(
        cls, headers: list[tuple[str, str]], body: bytes | bytearray, *, leading_space: bool = False
    ) -> Message:
        """Build from milter callbacks: header (name, value) pairs and the body.

        With ``leading_space`` the values are exactly what followed the colon
        (the milter protocol's SMFIP_HDR_LEADSPC), so the header section is
        rebuilt byte for byte, as DKIM's simple canonicalisation needs;
        otherwise the MTA dropped one space after the colon and one is put
        back.  The milter itself gathers the body with :class:`MessageBuffer`,
        which holds it once.
        """
        buffer = MessageBuffer(headers, leading_space=leading_space)
        buffer.write(body)
        return buffer.message()


class MessageBuffer:
    """A message from milter callbacks, gathered into one buffer: the header
    section (known once the body starts), then each body chunk as it comes.

    :meth:`message` hands the buffer's own bytes object to the Message
    (``io.BytesIO.getvalue`` trims it in place and returns it), so a large
    body is held once, not once as it arrives and again as ``raw``.  Line
    endings are made CRLF chunk by chunk, a CR at the end of a chunk waiting
    for the next one, with the same result as converting the whole body.
    """

    __slots__ = ("_buffer", "_cr", "_fields")

    def __init__(self, headers: list[tuple[str, str]], *, leading_space: bool = False) -> None:
        lines = []
        fields = []
        separator = ":" if leading_space else ": "
        for name, value in headers:
            # The MTA hands us folded values with bare LF; DKIM needs CRLF.
            folded = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}{separator}{folded}".encode("utf-8", "surrogateescape"))
            fields.append((name, value.lstrip(" \t") if leading_space else value))
        self._fields = tuple(fields)
        self._buffer = io.BytesIO()
        self._buffer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self._cr = False

    def write(self, chunk: bytes | bytearray) -> None:
        """Append a body chunk."""
        if not chunk:
            return
        if self._cr:
            self._cr = False
            if chunk.startswith(b"\n"):
                self._buffer.write(b"\r\n")
                chunk = chunk[1:]
            else:
                self._buffer.write(b"\r")
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        self._buffer.write(_to_crlf(chunk))

    def message(self) -> Message:
        """The message, once: the buffer is closed afterwards."""
        if self._cr:
            self._buffer.write(b"\r")
            self._cr = False
        raw = self._buffer.getvalue()
        self._buffer.close()
        return Message(self._fields, raw)


def _split_head_body(data: bytes) -> tuple[bytes, bytes, bytes]:
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        return data, b"", b""
    return data[: match.start()], b"\n", data[match.end() :]


def _to_crlf(data: bytes | bytearray) -> bytes | bytearray:
    # What an MTA hands a milter is CRLF throughout already: two C-speed
    # counts prove it, where splitting and joining every line of a large
    # body cost more than the rest of the evaluation.
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _LINE_SPLIT.sub(b"\r\n", data)


def _decode(value: bytes) -> str:
    # Headers are ASCII, or UTF-8 under SMTPUTF8 (RFC 6532); anything else
    # survives the round trip through surrogateescape.
    return value.decode("utf-8", "surrogateescape")


def _preview(line: bytes) -> str:
    text = line[:40].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(line) > 40 else ""))
