"""The MTA side of the Sendmail milter protocol, version 6, as Postfix speaks it.

A small synchronous client for tests: it connects to a milter over a unix or TCP
socket, negotiates, sends the SMTP events of a session one by one, and records
exactly what the milter answered, including the modification requests it sent at
the end of the message.

Wire format: every packet is a 4-byte big-endian length (covering the command byte
and the data), one command byte, then the data.  Integers are 32-bit big-endian
(the connect port is 16-bit), strings are NUL-terminated.

Where the protocol leaves room, this client does what Postfix 3.x does
(``src/milter/milter8.c``, ``src/cleanup/cleanup_milter.c``, ``src/smtpd/smtpd.c``):

* it offers protocol version 6, every action (``ALL_ACTIONS``) and every protocol
  flag (``ALL_PROTOCOL_FLAGS``), and afterwards uses whatever subset the milter
  answered with;
* the macros of an event are sent (``SMFIC_MACRO``) before the event, *even when the
  milter declined the event itself* with a ``SMFIP_NO*`` flag, so that they are
  available in later callbacks;
* a step the milter declined is not sent (``Reply.kind == "skipped-by-negotiation"``);
  a step marked ``SMFIP_NR_*`` is sent without waiting for an answer
  (``Reply.kind == "noreply"``);
* after ``SMFIR_SKIP`` further events of the same type are not sent until another
  event type has been sent (``Reply.kind == "skipped-by-milter"``);
* header values are sent as in the message after the colon, with folded lines joined
  by a bare ``"\\n"`` (Postfix stores header lines without CR) and, unless
  ``SMFIP_HDR_LEADSPC`` was negotiated, without the one space after the colon;
* the body is sent with CRLF line ends in chunks of at most 65535 bytes;
* :meth:`MilterClient.send_message` sends ``SMFIC_ABORT`` after every transaction
  that got past MAIL FROM, including after a completed end of message, because
  Postfix's smtpd ``mail_reset()`` does.

Not emulated: Postfix's own ``Received:`` header (Postfix hides it from the milter,
see :func:`apply_modifications`), the headers Postfix's cleanup adds when they are
missing (``Date``, ``Message-ID``, ...), and the ``SMFIC_MACRO`` packets Postfix
also sends before each header and body chunk (it repeats the end-of-header and
end-of-message macros there; libmilter does not store macros for those commands).

What libmilter (8.17, Debian 12) does, as verified with tests/test_milterclient.py:

* A command that is not a valid next step in libmilter's state table is dropped
  silently, with no reply: the client then raises :class:`MilterTimeout`.  (E.g. a
  body chunk without EOH before it, or SMFIC_QUIT_NC anywhere but after end of
  message or UNKNOWN.)
* The SMFIC_ABORT that Postfix sends after a complete message is such an invalid
  step and is dropped, *unless* some connection of the milter process has
  negotiated SMFIP_NOMAIL: libmilter's fix_stm() marks skipped steps in a
  process-global table and never clears them, after which end of message -> abort
  is valid and xxfi_abort() runs after every complete message of every later
  connection.  A milter must treat abort() after eom as harmless.
* Modification requests are passed on verbatim (indices included); libmilter
  fakes SMFIP_NR_* for an MTA that does not offer them by sending "continue".
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

__all__ = [
    "ALL_ACTIONS",
    "ALL_PROTOCOL_FLAGS",
    "PROTOCOL_VERSION",
    "EndOfMessage",
    "MilterClient",
    "MilterClientError",
    "MilterConnectionClosed",
    "MilterProtocolError",
    "MilterTimeout",
    "Modification",
    "Negotiated",
    "Packet",
    "Reply",
    "apply_modifications",
    "parse_message",
]

PROTOCOL_VERSION = 6

# --- Commands, MTA -> milter (SMFIC_*) -------------------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# --- Replies, milter -> MTA (SMFIR_*) --------------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# --- Action flags (SMFIF_*) ------------------------------------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# --- Protocol flags (SMFIP_*) ----------------------------------------------------
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
ALL_PROTOCOL_FLAGS = 0x1FFFFF  # what Postfix offers with milter_protocol = 6

# --- Macro stages in the SMFIR_OPTNEG symbol lists (SMFIM_*) ---------------------
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

BODY_CHUNK_SIZE = 65535
# Larger packets than this are refused instead of being buffered: libmilter never
# sends more than 64 KiB of data in one packet.
MAX_PACKET = 16 * 1024 * 1024

_SIMPLE_REPLIES = {
    SMFIR_CONTINUE: "continue",
    SMFIR_ACCEPT: "accept",
    SMFIR_REJECT: "reject",
    SMFIR_TEMPFAIL: "tempfail",
    SMFIR_DISCARD: "discard",
    SMFIR_SKIP: "skip",
    SMFIR_SHUTDOWN: "shutdown",
    SMFIR_CONN_FAIL: "connfail",
}

ReplyKind = Literal[
    "continue",
    "accept",
    "reject",
    "tempfail",
    "discard",
    "replycode",
    "skip",
    "shutdown",
    "connfail",
    "noreply",
    "skipped-by-negotiation",
    "skipped-by-milter",
]
#: Replies after which Postfix sends no further events for the message.
FINAL_KINDS = frozenset({"accept", "reject", "tempfail", "discard", "replycode", "shutdown"})

MacroValues = Mapping[str, str | bytes]
Address = str | tuple[str, int]


class MilterClientError(Exception):
    """Base class of everything this module raises about the milter."""


class MilterProtocolError(MilterClientError):
    """The milter sent something the protocol does not allow at this point."""


class MilterConnectionClosed(MilterClientError):
    """The milter closed the connection (or it could not be opened)."""


class MilterTimeout(MilterClientError):
    """The milter did not answer within the client's timeout."""


@dataclass(frozen=True)
class Packet:
    """One packet as it went over the wire: the command byte and the data."""

    command: bytes
    data: bytes

    def encode(self) -> bytes:
        return struct.pack(">I", len(self.data) + 1) + self.command + self.data


@dataclass(frozen=True)
class Negotiated:
    """The milter's answer to SMFIC_OPTNEG."""

    version: int
    actions: int
    protocol: int
    #: SMFIF_SETSYMLIST requests: stage (SMFIM_*) -> macro names, as sent.
    macros: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: What the client offered.
    offered_actions: int = ALL_ACTIONS
    offered_protocol: int = ALL_PROTOCOL_FLAGS

    def has(self, flag: int) -> bool:
        """Whether a protocol flag (SMFIP_*) was negotiated."""
        return bool(self.protocol & flag)


@dataclass(frozen=True)
class Reply:
    """The milter's answer to one event (or what the client did instead of asking)."""

    kind: ReplyKind
    #: For "replycode": the SMTP code ("550"), the enhanced status code ("5.7.1",
    #: or None when the text has none) and the text after them, with "%%" undone
    #: as Postfix does.  Lines of a multi-line reply are joined with "\n".
    code: str | None = None
    xcode: str | None = None
    text: str | None = None
    #: For "replycode": the reply exactly as sent, without the NUL ("550 5.7.1 text";
    #: libmilter doubles '%' here, Postfix undoes that before using it).
    raw: str | None = None
    #: SMFIR_PROGRESS packets received before the reply.
    progress: int = 0

    @property
    def is_final(self) -> bool:
        """Whether Postfix would stop sending events for the message after this."""
        return self.kind in FINAL_KINDS


ModificationKind = Literal[
    "addheader",
    "insheader",
    "chgheader",
    "quarantine",
    "addrcpt",
    "delrcpt",
    "replbody",
    "chgfrom",
]


@dataclass(frozen=True)
class Modification:
    """One modification request sent at the end of the message.

    ``name``/``value``/``index`` for header requests (``value == ""`` in a
    ``chgheader`` deletes the header); ``value`` is the address for ``addrcpt``,
    ``delrcpt`` and ``chgfrom``, with the ESMTP arguments in ``args`` (for
    ``SMFIR_ADDRCPT_PAR``, which is reported as kind ``addrcpt``); ``reason`` for
    ``quarantine``; ``body`` for a ``replbody`` chunk.  Strings are decoded from
    UTF-8 with ``surrogateescape``, so ``value.encode("utf-8", "surrogateescape")``
    gives back the bytes sent.  ``packet`` is the packet as received.
    """

    kind: ModificationKind
    packet: Packet
    name: str | None = None
    value: str | None = None
    index: int | None = None
    reason: str | None = None
    args: str | None = None
    body: bytes | None = None

    @property
    def value_bytes(self) -> bytes | None:
        return None if self.value is None else _encode(self.value)


@dataclass(frozen=True)
class EndOfMessage:
    """The outcome of a message: the modifications and the final reply.

    ``stage`` names the step that produced ``reply`` ("eom", or an earlier step
    whose reply ended the transaction, as in Postfix: "mail", "rcpt", "data",
    "header", "eoh", "body").  ``steps`` lists every step with its reply.
    """

    modifications: list[Modification]
    reply: Reply
    stage: str = "eom"
    steps: list[tuple[str, Reply]] = field(default_factory=list)


def _encode(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _cstrings(data: bytes, count: int | None = None) -> list[bytes]:
    """Split NUL-terminated strings; with ``count``, exactly that many."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"string not NUL-terminated: {data[:60]!r}")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise MilterProtocolError(f"expected {count} strings, got {len(parts)}: {data[:60]!r}")
    return parts


def _encode_macros(command: bytes, macros: MacroValues) -> bytes:
    out = bytearray(command)
    for name, value in macros.items():
        out += _encode(name) + b"\0" + _encode(value) + b"\0"
    return bytes(out)


_XCODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _parse_replycode(data: bytes, progress: int) -> Reply:
    raw = _decode(_cstrings(data, 1)[0])
    lines = raw.split("\r\n")
    code = lines[0][:3]
    if not re.fullmatch(r"[45]\d\d", code) or lines[0][3:4] not in (" ", "-", ""):
        raise MilterProtocolError(f"malformed reply code: {raw!r}")
    xcode: str | None = None
    texts = []
    for line in lines:
        rest = line[4:]
        word, _, after = rest.partition(" ")
        if _XCODE.fullmatch(word):
            xcode = xcode or word
            rest = after
        texts.append(rest)
    # libmilter requires '%' to be doubled (Sendmail uses the text as a format);
    # Postfix undoes that, so ``text`` is what the SMTP client would see.
    text = "\n".join(texts).replace("%%", "%")
    return Reply("replycode", code=code, xcode=xcode, text=text, raw=raw, progress=progress)


def _parse_modification(packet: Packet) -> Modification:
    cmd, data = packet.command, packet.data
    if cmd in (SMFIR_ADDHEADER,):
        name, value = _cstrings(data, 2)
        return Modification("addheader", packet, name=_decode(name), value=_decode(value))
    if cmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError(f"short {cmd!r} packet: {data!r}")
        (index,) = struct.unpack(">I", data[:4])
        name, value = _cstrings(data[4:], 2)
        kind: ModificationKind = "insheader" if cmd == SMFIR_INSHEADER else "chgheader"
        return Modification(kind, packet, name=_decode(name), value=_decode(value), index=index)
    if cmd == SMFIR_QUARANTINE:
        (reason,) = _cstrings(data, 1)
        return Modification("quarantine", packet, reason=_decode(reason))
    if cmd in (SMFIR_ADDRCPT, SMFIR_DELRCPT):
        (addr,) = _cstrings(data, 1)
        kind = "addrcpt" if cmd == SMFIR_ADDRCPT else "delrcpt"
        return Modification(kind, packet, value=_decode(addr))
    if cmd in (SMFIR_ADDRCPT_PAR, SMFIR_CHGFROM):
        parts = _cstrings(data)
        if len(parts) not in (1, 2):
            raise MilterProtocolError(f"bad {cmd!r} packet: {data!r}")
        args = _decode(parts[1]) if len(parts) == 2 else None
        kind = "addrcpt" if cmd == SMFIR_ADDRCPT_PAR else "chgfrom"
        return Modification(kind, packet, value=_decode(parts[0]), args=args)
    if cmd == SMFIR_REPLBODY:
        return Modification("replbody", packet, body=data)
    raise MilterProtocolError(f"unknown reply {cmd!r} at end of message")


_MODIFICATION_COMMANDS = frozenset(
    {
        SMFIR_ADDHEADER,
        SMFIR_INSHEADER,
        SMFIR_CHGHEADER,
        SMFIR_QUARANTINE,
        SMFIR_ADDRCPT,
        SMFIR_DELRCPT,
        SMFIR_ADDRCPT_PAR,
        SMFIR_CHGFROM,
        SMFIR_REPLBODY,
    }
)


class MilterClient:
    """A synchronous MTA-side milter connection.

    ``address`` is a unix socket path or a ``(host, port)`` pair.  Every read and
    write is bounded by ``timeout`` seconds (:class:`MilterTimeout`).  With
    ``leadspc_supported=False`` the client behaves like an MTA that does not know
    ``SMFIP_HDR_LEADSPC`` and never offers it.

    Every packet sent and received is appended to :attr:`transcript` as
    ``("send" | "recv", Packet)``.  Use as a context manager, or call
    :meth:`quit` / :meth:`close`.
    """

    def __init__(
        self,
        address: Address,
        *,
        timeout: float = 10.0,
        leadspc_supported: bool = True,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.leadspc_supported = leadspc_supported
        self.negotiated: Negotiated | None = None
        self.transcript: list[tuple[str, Packet]] = []
        self._skip_event: bytes | None = None
        self._sock: socket.socket | None = None
        try:
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(address)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(address, timeout=timeout)
        except TimeoutError as exc:
            raise MilterTimeout(f"connecting to milter at {address!r} timed out") from exc
        except OSError as exc:
            raise MilterConnectionClosed(f"cannot connect to milter at {address!r}: {exc}") from exc
        self._sock = sock

    # --- context management -------------------------------------------------------

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._sock is not None:
            with contextlib.suppress(MilterClientError):
                self.quit()
        self.close()

    def close(self) -> None:
        """Close the socket without saying goodbye (like a crashed MTA)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    # --- wire ---------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise MilterConnectionClosed("the client connection is closed")
        return self._sock

    def send_packet(self, command: bytes, data: bytes = b"") -> None:
        """Send one raw packet (for tests of odd sequences)."""
        packet = Packet(command, data)
        try:
            self._socket().sendall(packet.encode())
        except TimeoutError as exc:
            raise MilterTimeout(f"timed out sending {command!r}") from exc
        except OSError as exc:
            self.close()
            raise MilterConnectionClosed(f"milter connection lost sending {command!r}") from exc
        self.transcript.append(("send", packet))

    def _recv_exact(self, size: int) -> bytes:
        sock = self._socket()
        buf = bytearray()
        while len(buf) < size:
            try:
                chunk = sock.recv(min(size - len(buf), 1 << 20))
            except TimeoutError as exc:
                raise MilterTimeout(f"no answer from the milter within {self.timeout}s") from exc
            except OSError as exc:
                self.close()
                raise MilterConnectionClosed(f"milter connection lost: {exc}") from exc
            if not chunk:
                self.close()
                raise MilterConnectionClosed("the milter closed the connection")
            buf += chunk
        return bytes(buf)

    def recv_packet(self) -> Packet:
        """Read one raw packet."""
        (length,) = struct.unpack(">I", self._recv_exact(4))
        if length < 1 or length > MAX_PACKET:
            raise MilterProtocolError(f"bad packet length {length}")
        body = self._recv_exact(length)
        packet = Packet(body[:1], body[1:])
        self.transcript.append(("recv", packet))
        return packet

    # --- negotiation --------------------------------------------------------------

    def negotiate(
        self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL_FLAGS
    ) -> Negotiated:
        """Send SMFIC_OPTNEG offering version 6 with ``actions`` and ``protocol``."""
        if not self.leadspc_supported:
            protocol &= ~SMFIP_HDR_LEADSPC
        self.send_packet(SMFIC_OPTNEG, struct.pack(">III", PROTOCOL_VERSION, actions, protocol))
        packet = self.recv_packet()
        if packet.command != SMFIR_OPTNEG:
            raise MilterProtocolError(f"expected an OPTNEG answer, got {packet!r}")
        if len(packet.data) < 12:
            raise MilterProtocolError(f"short OPTNEG answer: {packet.data!r}")
        version, got_actions, got_protocol = struct.unpack(">III", packet.data[:12])
        # Postfix refuses the same two things.
        if version > PROTOCOL_VERSION or version < 2:
            raise MilterProtocolError(f"milter protocol version {version} not supported")
        if got_actions & ~actions:
            raise MilterProtocolError(
                f"milter wants actions {got_actions:#x} beyond those offered {actions:#x}"
            )
        macros: dict[int, tuple[str, ...]] = {}
        rest = packet.data[12:]
        while rest:
            if len(rest) < 5 or b"\0" not in rest[4:]:
                raise MilterProtocolError(f"malformed macro list in OPTNEG: {rest!r}")
            (stage,) = struct.unpack(">I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            macros[stage] = tuple(re.split(r"[\s,]+", _decode(names).strip()))
        self.negotiated = Negotiated(
            version=version,
            actions=got_actions,
            protocol=got_protocol,
            macros=macros,
            offered_actions=actions,
            offered_protocol=protocol,
        )
        return self.negotiated

    def _neg(self) -> Negotiated:
        if self.negotiated is None:
            raise MilterClientError("negotiate() first")
        return self.negotiated

    # --- replies ------------------------------------------------------------------

    def _read_reply(self, *, end_of_message: bool = False) -> tuple[list[Modification], Reply]:
        modifications: list[Modification] = []
        progress = 0
        while True:
            packet = self.recv_packet()
            cmd = packet.command
            if cmd == SMFIR_PROGRESS:
                progress += 1
                continue
            if cmd in _SIMPLE_REPLIES:
                if packet.data:
                    raise MilterProtocolError(f"reply {cmd!r} followed by data {packet.data!r}")
                return modifications, Reply(_SIMPLE_REPLIES[cmd], progress=progress)  # type: ignore[arg-type]
            if cmd == SMFIR_REPLYCODE:
                return modifications, _parse_replycode(packet.data, progress)
            if cmd in _MODIFICATION_COMMANDS:
                if not end_of_message:
                    raise MilterProtocolError(
                        f"modification {cmd!r} is only allowed at end of message"
                    )
                modifications.append(_parse_modification(packet))
                continue
            raise MilterProtocolError(f"unexpected packet from milter: {packet!r}")

    def _event(
        self,
        command: bytes,
        data: bytes,
        *,
        macros: MacroValues | None,
        no_flag: int,
        nr_flag: int,
    ) -> Reply:
        neg = self._neg()
        if self._skip_event is not None:
            if command == self._skip_event:
                return Reply("skipped-by-milter")
            self._skip_event = None
        if macros:
            self.send_packet(SMFIC_MACRO, _encode_macros(command, macros))
        if neg.protocol & no_flag:
            return Reply("skipped-by-negotiation")
        self.send_packet(command, data)
        if neg.protocol & nr_flag:
            return Reply("noreply")
        _, reply = self._read_reply()
        if reply.kind == "skip":
            self._skip_event = command
        return reply

    # --- SMTP events --------------------------------------------------------------

    def connect(
        self,
        hostname: str,
        address: str,
        port: int = 25,
        family: str = "4",
        macros: MacroValues | None = None,
    ) -> Reply:
        """SMFIC_CONNECT; ``family`` is "4", "6", "L" (unix) or "U" (unknown)."""
        if family not in ("4", "6", "L", "U"):
            raise ValueError(f"bad address family {family!r}")
        data = _encode(hostname) + b"\0" + family.encode()
        if family != "U":
            data += struct.pack(">H", port) + _encode(address) + b"\0"
        return self._event(
            SMFIC_CONNECT, data, macros=macros, no_flag=SMFIP_NOCONNECT, nr_flag=SMFIP_NR_CONN
        )

    def helo(self, name: str, macros: MacroValues | None = None) -> Reply:
        return self._event(
            SMFIC_HELO,
            _encode(name) + b"\0",
            macros=macros,
            no_flag=SMFIP_NOHELO,
            nr_flag=SMFIP_NR_HELO,
        )

    @staticmethod
    def _envelope(address: str, args: Iterable[str]) -> bytes:
        if not (address.startswith("<") and address.endswith(">")):
            address = f"<{address}>"
        return b"".join(_encode(a) + b"\0" for a in (address, *args))

    def mail(self, sender: str, *esmtp_args: str, macros: MacroValues | None = None) -> Reply:
        """SMFIC_MAIL with "<sender>" (brackets are added unless present; "" is "<>")."""
        return self._event(
            SMFIC_MAIL,
            self._envelope(sender, esmtp_args),
            macros=macros,
            no_flag=SMFIP_NOMAIL,
            nr_flag=SMFIP_NR_MAIL,
        )

    def rcpt(self, recipient: str, *esmtp_args: str, macros: MacroValues | None = None) -> Reply:
        return self._event(
            SMFIC_RCPT,
            self._envelope(recipient, esmtp_args),
            macros=macros,
            no_flag=SMFIP_NORCPT,
            nr_flag=SMFIP_NR_RCPT,
        )

    def data(self, macros: MacroValues | None = None) -> Reply:
        return self._event(
            SMFIC_DATA, b"", macros=macros, no_flag=SMFIP_NODATA, nr_flag=SMFIP_NR_DATA
        )

    def unknown(self, command: str, macros: MacroValues | None = None) -> Reply:
        return self._event(
            SMFIC_UNKNOWN,
            _encode(command) + b"\0",
            macros=macros,
            no_flag=SMFIP_NOUNKNOWN,
            nr_flag=SMFIP_NR_UNKN,
        )

    def header(self, name: str | bytes, value: str | bytes) -> Reply:
        """SMFIC_HEADER.  ``value`` is as in the message after "Name:": one leading
        space is removed unless HDR_LEADSPC was negotiated, and CRLF in folded
        values is sent as a bare LF, as Postfix does."""
        raw = _encode(value).replace(b"\r\n", b"\n")
        if not self._neg().has(SMFIP_HDR_LEADSPC) and raw.startswith(b" "):
            raw = raw[1:]
        return self._event(
            SMFIC_HEADER,
            _encode(name) + b"\0" + raw + b"\0",
            macros=None,
            no_flag=SMFIP_NOHDRS,
            nr_flag=SMFIP_NR_HDR,
        )

    def eoh(self, macros: MacroValues | None = None) -> Reply:
        return self._event(SMFIC_EOH, b"", macros=macros, no_flag=SMFIP_NOEOH, nr_flag=SMFIP_NR_EOH)

    def body(self, data: bytes) -> Reply:
        """Send ``data`` as SMFIC_BODY packets of at most 65535 bytes.

        Returns the reply to the last chunk sent; stops early (like Postfix) when a
        chunk gets a reply other than continue/noreply, including "skip".  An empty
        ``data`` is sent as one empty chunk (Postfix never does that).
        """
        chunks = [data[i : i + BODY_CHUNK_SIZE] for i in range(0, len(data), BODY_CHUNK_SIZE)]
        reply = Reply("noreply")
        for chunk in chunks or [b""]:
            reply = self._event(
                SMFIC_BODY, chunk, macros=None, no_flag=SMFIP_NOBODY, nr_flag=SMFIP_NR_BODY
            )
            if reply.kind not in ("continue", "noreply"):
                break
        return reply

    def end_of_message(self, macros: MacroValues | None = None) -> EndOfMessage:
        """SMFIC_BODYEOB: collect modification requests up to the final reply."""
        self._neg()
        self._skip_event = None
        if macros:
            self.send_packet(SMFIC_MACRO, _encode_macros(SMFIC_BODYEOB, macros))
        self.send_packet(SMFIC_BODYEOB)
        modifications, reply = self._read_reply(end_of_message=True)
        if reply.kind in ("skip", "noreply"):
            raise MilterProtocolError(f"{reply.kind} is not a valid end-of-message reply")
        return EndOfMessage(modifications, reply, "eom", [("eom", reply)])

    def abort(self) -> None:
        """SMFIC_ABORT: end the current transaction; the milter does not answer.

        After end of message libmilter usually drops it (see the module notes)."""
        self._skip_event = None
        self.send_packet(SMFIC_ABORT)

    def quit(self) -> None:
        """SMFIC_QUIT, then close the socket."""
        if self._sock is not None:
            try:
                self.send_packet(SMFIC_QUIT)
            finally:
                self.close()

    def quit_new_connection(self) -> None:
        """SMFIC_QUIT_NC (Sendmail; Postfix never sends it): end this SMTP session
        and keep the milter connection for the next one, which starts with
        :meth:`connect` (no new negotiation).  libmilter accepts it only right
        after end of message (without an abort in between) or UNKNOWN."""
        self._skip_event = None
        self.send_packet(SMFIC_QUIT_NC)

    # --- a whole message ----------------------------------------------------------

    def send_message(
        self,
        raw_message: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        macros_mail: MacroValues | None = None,
        macros_rcpt: MacroValues | None = None,
        macros_data: MacroValues | None = None,
        macros_eoh: MacroValues | None = None,
        macros_eom: MacroValues | None = None,
        abort_after: bool = True,
    ) -> EndOfMessage:
        """Run one SMTP transaction for ``raw_message`` the way Postfix would.

        MAIL, each RCPT (with ``{rcpt_addr}`` set to the recipient, plus
        ``macros_rcpt``), DATA, the headers, EOH, the body (CRLF line ends, 65535
        byte chunks) and the end of message.  Steps the milter declined are not
        sent, NR_* steps are not waited for.  A final reply (accept, reject,
        tempfail, discard, replycode) ends the transaction early, as it does in
        Postfix; a rejected recipient is only dropped, and when every recipient
        was rejected the transaction ends after RCPT.  Unless ``abort_after`` is
        false, SMFIC_ABORT is sent when the transaction got past MAIL FROM, as
        Postfix's smtpd does (also after a complete end of message).
        """
        headers, body = parse_message(raw_message)
        steps: list[tuple[str, Reply]] = []

        def finish(
            stage: str, reply: Reply, mods: list[Modification] | None = None
        ) -> EndOfMessage:
            if abort_after:
                self.abort()
            return EndOfMessage(mods or [], reply, stage, steps)

        reply = self.mail(sender, macros=macros_mail)
        steps.append(("mail", reply))
        if reply.kind in ("accept", "discard"):
            return finish("mail", reply)
        if reply.is_final:
            # Postfix refuses MAIL FROM; no transaction, so no SMFIC_ABORT either.
            return EndOfMessage([], reply, "mail", steps)

        accepted = 0
        last_rcpt = reply
        for rcpt in recipients:
            macros = {"{rcpt_addr}": rcpt.strip("<>"), **(macros_rcpt or {})}
            last_rcpt = self.rcpt(rcpt, macros=macros)
            steps.append(("rcpt", last_rcpt))
            if last_rcpt.kind in ("accept", "discard"):
                return finish("rcpt", last_rcpt)
            if last_rcpt.kind in ("reject", "tempfail", "replycode", "shutdown"):
                continue
            accepted += 1
        if not accepted:
            return finish("rcpt", last_rcpt)

        reply = self.data(macros=macros_data)
        steps.append(("data", reply))
        if reply.is_final:
            return finish("data", reply)

        for name, value in headers:
            reply = self.header(name, value)
            steps.append(("header", reply))
            if reply.is_final:
                return finish("header", reply)

        reply = self.eoh(macros=macros_eoh)
        steps.append(("eoh", reply))
        if reply.is_final:
            return finish("eoh", reply)

        if body:
            reply = self.body(body)
            steps.append(("body", reply))
            if reply.is_final:
                return finish("body", reply)

        eom = self.end_of_message(macros=macros_eom)
        steps.append(("eom", eom.reply))
        return finish("eom", eom.reply, eom.modifications)


# --- message parsing ---------------------------------------------------------------

_HEADER_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:")


def parse_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a raw RFC 5322 message into header fields and body, as Postfix sends them.

    Each header is ``(name, value)`` with ``value`` exactly as after the colon,
    including its leading whitespace, and folded lines joined with a bare "\\n"
    (the CR of CRLF is dropped), e.g. ``" a;\\n\\tb=c"``.  Values are decoded from
    UTF-8 with ``surrogateescape``.  The header section ends at the first empty
    line (which is not part of the body) or at the first line that is neither a
    header nor a continuation line (which is).  The body has CRLF line ends, and
    a final line without a line end gets one, as it would after SMTP transfer.
    """
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    headers: list[tuple[bytes, bytearray]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == b"":
            i += 1
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1].extend(b"\n" + line)
        else:
            match = _HEADER_LINE.match(line)
            if match is None:
                break
            headers.append((match.group(1), bytearray(line[match.end() :])))
        i += 1
    body = b"".join(line + b"\r\n" for line in lines[i:])
    return [(_decode(n), _decode(bytes(v))) for n, v in headers], body


# --- applying modifications -----------------------------------------------------------


def apply_modifications(
    headers: Sequence[tuple[str, str]],
    modifications: Iterable[Modification],
    *,
    leadspc: bool = False,
    mta_header: tuple[str, str] | None = None,
) -> list[tuple[str, str]]:
    """The header list Postfix would deliver after the milter's header requests.

    ``headers`` are ``(name, value)`` pairs as the milter saw them, with values as
    in the message after the colon (as :func:`parse_message` returns them).  A
    value sent by the milter gets one space in front unless ``leadspc`` (whether
    SMFIP_HDR_LEADSPC was negotiated) is true, as Postfix writes "Name: value".

    Semantics, from Postfix's cleanup_milter.c and milter8.c:

    * Requests are applied one at a time in the order received; every index
      refers to the header list *as it is after the previous requests*, not to
      the original numbering.  Deleting Authentication-Results #1 and then #2
      deletes the original #1 and #3; to delete original #1 and #2 send index 2
      then 1, or 1 twice.
    * ``chgheader``: index 0 is treated as 1; the index counts headers of that
      name (case-insensitively).  A non-empty value replaces the header (with the
      name as sent), an empty value deletes it.  When there is no such header, a
      change appends the header and a delete does nothing.
    * ``insheader``: index N inserts before the (N+1)-th header of the whole
      header list, counting *every* header, including the MTA's own; past the
      end it appends.
    * ``addheader`` appends.

    ``mta_header`` models the ``Received:`` header Postfix puts on top of the
    message and hides from the milter.  When given, the result includes it;
    ``chgheader`` skips the first header of the list (which is it, unless a
    milter inserted above it), while ``insheader`` counts it, so that index 0
    lands *above* Postfix's Received: header and index 1 right below it.  Without
    ``mta_header``, index 0 inserts at the top of ``headers``.
    """
    current = list(headers)
    skip = 0
    if mta_header is not None:
        current.insert(0, mta_header)
        skip = 1

    def rendered(value: str) -> str:
        return value if leadspc else " " + value

    for mod in modifications:
        if mod.kind == "addheader":
            assert mod.name is not None and mod.value is not None
            current.append((mod.name, rendered(mod.value)))
        elif mod.kind == "insheader":
            assert mod.name is not None and mod.value is not None and mod.index is not None
            current.insert(min(mod.index, len(current)), (mod.name, rendered(mod.value)))
        elif mod.kind == "chgheader":
            assert mod.name is not None and mod.value is not None and mod.index is not None
            wanted = max(mod.index, 1)
            position = None
            for pos in range(skip, len(current)):
                if current[pos][0].lower() == mod.name.lower():
                    wanted -= 1
                    if wanted == 0:
                        position = pos
                        break
            if mod.value == "":
                if position is not None:
                    del current[position]
            elif position is None:
                current.append((mod.name, rendered(mod.value)))
            else:
                current[position] = (mod.name, rendered(mod.value))
    return current
