"""A small authoritative DNS server for the tests, on loopback, UDP and TCP.

It serves whatever zone data a test declares and answers the way a real
authoritative server does, which dnslib's stock zone resolver does not:

* NXDOMAIN only for names that do not exist.  A name that has records of other
  types, or has names below it (an empty non-terminal), gets NOERROR/NODATA.
* Negative answers carry an SOA in the authority section (RFC 2308).
* TXT records may have several character-strings.
* CNAMEs are followed inside the zone; ``*`` wildcards follow RFC 4592 closely
  enough for test data (the closest encloser's ``*`` child).
* A name can be told to time out (never answered) or to SERVFAIL.

Zone data: ``{name: [(type, value), ...]}``, or the strings ``"TIMEOUT"`` or
``"SERVFAIL"`` as a name's whole entry (or as an entry in its list).  TXT
values are a string or a list of strings; MX values are ``(preference, host)``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.dns import RD

ZoneData = Mapping[str, Any]

_ZONE_APEX = "test."
SPF_TYPE = 99


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _chunks(text: str | bytes) -> list[bytes]:
    raw = text.encode() if isinstance(text, str) else text
    # A single character-string holds at most 255 octets.
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


class _SPFRecord(RD):
    """RR type 99 (SPF), wire-identical to TXT."""

    def __init__(self, data: list[bytes]) -> None:
        self.data = data

    def pack(self, buffer: Any) -> None:
        for ditem in self.data:
            buffer.append(struct.pack("!B", len(ditem)))
            buffer.append(ditem)


class TestDNSServer:
    """Authoritative test server.  Use :meth:`start` / :meth:`stop`."""

    __test__ = False  # not a pytest test class

    def __init__(self, host: str = "127.0.0.1", ttl: int = 300) -> None:
        self.host = host
        self.ttl = ttl
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._records: dict[str, list[tuple[str, Any]]] = {}
        self._special: dict[str, str] = {}
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None

    # -- zone management -------------------------------------------------
    def set_zone(self, zone: ZoneData) -> None:
        with self._lock:
            self._records = {}
            self._special = {}
        self.add_zone(zone)

    def add_zone(self, zone: ZoneData) -> None:
        for name, entries in zone.items():
            if isinstance(entries, str):
                self.set_special(name, entries)
                continue
            for entry in entries:
                if isinstance(entry, str):
                    self.set_special(name, entry)
                else:
                    self.add(name, entry[0], entry[1])

    def add(self, name: str, rtype: str, value: Any) -> None:
        with self._lock:
            self._records.setdefault(_norm(name), []).append((rtype.upper(), value))

    def set_special(self, name: str, behaviour: str) -> None:
        behaviour = behaviour.upper()
        if behaviour not in ("TIMEOUT", "SERVFAIL"):
            raise ValueError(f"unknown special behaviour {behaviour!r}")
        with self._lock:
            self._special[_norm(name)] = behaviour

    def clear_log(self) -> None:
        with self._lock:
            self.queries.clear()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> TestDNSServer:
        handler = _make_handler(self)
        for _ in range(20):
            udp = socketserver.ThreadingUDPServer((self.host, 0), handler)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), handler)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover - the kernel keeps handing out busy ports
            raise RuntimeError("no free port for the test DNS server")
        udp.daemon_threads = tcp.daemon_threads = True
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv in (udp, tcp):
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        self._udp = self._tcp = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- answering ---------------------------------------------------------
    def _exists(self, name: str) -> bool:
        if name in self._records or name in self._special:
            return True
        suffix = "." + name
        return any(n.endswith(suffix) for n in self._records)

    def _wildcard_for(self, name: str) -> str | None:
        """RFC 4592: the ``*`` child of the closest encloser, if any."""
        probe = name
        while "." in probe:
            probe = probe.split(".", 1)[1]
            if self._exists(probe):
                star = "*." + probe
                return star if star in self._records else None
        return None

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """Build the reply, or None to stay silent (a timeout)."""
        qname = _norm(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self.queries.append((qname, qtype))
            reply = request.reply()
            reply.header.aa = 1
            return self._fill(reply, qname, qtype, depth=0)

    def _fill(self, reply: DNSRecord, qname: str, qtype: str, depth: int) -> DNSRecord | None:
        special = self._special.get(qname)
        if special == "TIMEOUT":
            return None
        if special == "SERVFAIL":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        owner = qname
        if not self._exists(qname):
            wild = self._wildcard_for(qname)
            if wild is None:
                reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply)
                return reply
            owner = wild
        entries = self._records.get(owner, [])
        cname = [v for t, v in entries if t == "CNAME"]
        if cname and qtype != "CNAME":
            target = _norm(cname[0])
            reply.add_answer(RR(qname, QTYPE.CNAME, ttl=self.ttl, rdata=CNAME(target + ".")))
            if depth < 8:
                return self._fill(reply, target, qtype, depth + 1)
            return reply
        matched = [(t, v) for t, v in entries if t == qtype or qtype == "ANY"]
        if not matched:
            self._add_soa(reply)
            return reply
        for rtype, value in matched:
            reply.add_answer(self._rr(qname, rtype, value))
        return reply

    def _add_soa(self, reply: DNSRecord) -> None:
        reply.add_auth(
            RR(
                _ZONE_APEX,
                QTYPE.SOA,
                ttl=self.ttl,
                rdata=SOA(
                    "ns." + _ZONE_APEX, "hostmaster." + _ZONE_APEX, (1, 3600, 600, 86400, 60)
                ),
            )
        )

    def _rr(self, name: str, rtype: str, value: Any) -> RR:
        if rtype == "A":
            return RR(name, QTYPE.A, ttl=self.ttl, rdata=A(value))
        if rtype == "AAAA":
            return RR(name, QTYPE.AAAA, ttl=self.ttl, rdata=AAAA(value))
        if rtype == "MX":
            pref, host = value
            return RR(name, QTYPE.MX, ttl=self.ttl, rdata=MX(_norm(host) + ".", pref))
        if rtype == "PTR":
            return RR(name, QTYPE.PTR, ttl=self.ttl, rdata=PTR(_norm(value) + "."))
        if rtype in ("TXT", "SPF"):
            parts: list[bytes] = []
            for piece in [value] if isinstance(value, (str, bytes)) else value:
                parts.extend(_chunks(piece) if len(piece) > 255 else [_as_bytes(piece)])
            if rtype == "TXT":
                return RR(name, QTYPE.TXT, ttl=self.ttl, rdata=TXT(parts))
            return RR(name, SPF_TYPE, ttl=self.ttl, rdata=_SPFRecord(parts))
        raise ValueError(f"unsupported record type {rtype}")


def _as_bytes(piece: str | bytes) -> bytes:
    return piece.encode() if isinstance(piece, str) else piece


def _make_handler(server: TestDNSServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            if isinstance(self.request, socket.socket):  # TCP
                sock = self.request
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                data = _recv_exact(sock, struct.unpack("!H", head)[0])
                if data is None:
                    return
                reply = self._reply(data, tcp=True)
                if reply is not None:
                    sock.sendall(struct.pack("!H", len(reply)) + reply)
            else:
                data, sock = self.request
                reply = self._reply(data, tcp=False)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        def _reply(self, data: bytes, tcp: bool) -> bytes | None:
            try:
                request = DNSRecord.parse(data)
            except Exception:
                return None
            reply = server.answer(request)
            if reply is None:
                return None
            packed = reply.pack()
            limit = max(
                [512] + [getattr(rr, "edns_len", 512) for rr in request.ar if rr.rtype == QTYPE.OPT]
            )
            if not tcp and len(packed) > limit:
                # Set TC so the client retries over TCP, as a real server would.
                truncated = request.reply()
                truncated.header.tc = 1
                truncated.header.aa = 1
                packed = truncated.pack()
            return bytes(packed)

    return Handler


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve(zone: ZoneData, host: str = "127.0.0.1") -> TestDNSServer:
    server = TestDNSServer(host)
    server.set_zone(zone)
    return server.start()


def names(entries: Iterable[tuple[str, str]]) -> list[str]:
    return [n for n, _ in entries]
