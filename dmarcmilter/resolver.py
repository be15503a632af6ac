"""The DNS layer every check goes through.

RFC 9989 needs four outcomes kept apart: an answer, NOERROR with no data
(the name exists), NXDOMAIN (the name does not exist, §4.10.1 and RFC 8020,
which decides ``np``) and a failure (SERVFAIL or timeout), which makes the
DMARC result temperror (§5.3.6).  :class:`DNSStatus` carries exactly that.

A :class:`Resolver` is shared by the whole process: it holds the upstream
nameservers and a bounded, TTL-honouring, thread-safe cache.  Each message gets
a :class:`DNSSession` from :meth:`Resolver.session`; the session enforces the
per-message time budget and records every query it made, so ``dmarcmilter
check`` can show them and tests can assert the exact query sequence.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from .errors import DmarcMilterError

# Upper bound on how long any answer is cached, whatever its TTL says: a
# record changed by its owner should be seen within the hour.
MAX_CACHE_TTL = 3600


class DNSStatus(enum.Enum):
    NOERROR = "noerror"  # at least one record of the type asked for
    NODATA = "nodata"  # the name exists, with no record of that type
    NXDOMAIN = "nxdomain"  # the name does not exist
    SERVFAIL = "servfail"  # the server failed or refused
    TIMEOUT = "timeout"  # no answer in time, or the message's DNS budget is spent

    @property
    def is_failure(self) -> bool:
        """A temporary failure: the name may or may not exist."""
        return self in (DNSStatus.SERVFAIL, DNSStatus.TIMEOUT)


@dataclass(frozen=True, slots=True)
class DNSAnswer:
    """One query and its outcome.

    ``records`` holds, by type: TXT, a tuple of character-strings (bytes) per
    record; A/AAAA, the address text; MX, ``(preference, exchange)``; PTR and
    CNAME, the target without trailing dot.
    """

    qname: str
    rdtype: str
    status: DNSStatus
    records: tuple[object, ...] = ()
    ttl: int = 0
    detail: str = ""

    def txt(self) -> list[str]:
        """TXT records with their character-strings concatenated (RFC 7208 §3.3,
        RFC 9989 §4.5: no separator), decoded leniently so a stray byte cannot
        raise; such a record simply fails to parse later."""
        out = []
        for rec in self.records:
            assert isinstance(rec, tuple)
            out.append(b"".join(rec).decode("utf-8", "replace"))
        return out


@dataclass(frozen=True, slots=True)
class QueryLogEntry:
    qname: str
    rdtype: str
    status: DNSStatus
    records: tuple[object, ...]
    cached: bool
    elapsed_ms: float
    # Not sent: the message's DNS budget was spent (status TIMEOUT).
    budget_spent: bool = False


class DNSFailure(DmarcMilterError):
    """A DNS query failed temporarily (SERVFAIL, timeout, spent budget).

    Raised only by the adapters that let third-party libraries (dkimpy) query
    through us, so the failure crosses their code unchanged and is turned into
    a temperror result by the check that called them.
    """

    def __init__(self, answer: DNSAnswer) -> None:
        super().__init__(f"{answer.qname}/{answer.rdtype}: {answer.status.value} {answer.detail}")
        self.answer = answer


# An answer larger than this is used for the message that asked but never
# cached: no record DMARC, SPF or DKIM needs comes near it (a DKIM key record
# over 8 KiB is a permerror anyway, dkim.MAX_KEY_RECORD_BYTES), while a DNS
# answer can be 64 KiB, and an attacker publishing such answers under many
# names would otherwise fill the cache with them.  It is not refused, since a
# large answer is no failure (RFC 1035 permits it), and refusing a real one
# would change a result; the cost of using it is one message's, not the cache's.
MAX_CACHED_ANSWER_BYTES = 16 * 1024
# What one cache entry costs beyond its record data: the key, the answer
# object and the dictionary slot (measured on CPython 3.11+, rounded up).
ENTRY_OVERHEAD_BYTES = 400


def answer_size(answer: DNSAnswer) -> int:
    """The bytes an answer is charged in the cache: its names and record data
    plus a fixed overhead per entry and per record."""
    size = ENTRY_OVERHEAD_BYTES + len(answer.qname) + len(answer.detail)
    for rec in answer.records:
        size += 64  # the record's tuple or string object and its slot
        if isinstance(rec, tuple):
            # Each character-string is a bytes object of its own (33 bytes
            # of header on CPython) in a tuple slot.
            size += sum(48 + (len(x) if isinstance(x, (bytes, str)) else 0) for x in rec)
        elif isinstance(rec, str):
            size += len(rec)
        else:
            size += 32
    return size


class _Cache:
    """LRU cache of answers with per-entry expiry, bounded both in entries and
    in bytes (:func:`answer_size`); the least recently used entries go first."""

    def __init__(self, max_entries: int, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._data: OrderedDict[tuple[str, str], tuple[float, DNSAnswer, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], now: float) -> DNSAnswer | None:
        # No lock on the hot path: every milter thread reads the cache for
        # every message, and a lock held across a thread switch made them
        # queue.  Each OrderedDict call is atomic under the interpreter
        # lock; a key that disappears between two of them (put evicting it)
        # is simply a miss or an un-refreshed entry.  An expired entry is
        # left for put to drop, which keeps the byte count exact.
        item = self._data.get(key)
        if item is None:
            return None
        expires, answer, _size = item
        if expires <= now:
            return None
        with contextlib.suppress(KeyError):
            self._data.move_to_end(key)
        return answer

    def put(self, key: tuple[str, str], answer: DNSAnswer, now: float) -> None:
        if self._max <= 0 or self._max_bytes <= 0 or answer.ttl <= 0:
            return
        size = answer_size(answer)
        if size > min(MAX_CACHED_ANSWER_BYTES, self._max_bytes):
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._data[key] = (now + min(answer.ttl, MAX_CACHE_TTL), answer, size)
            self._bytes += size
            while len(self._data) > self._max or self._bytes > self._max_bytes:
                _key, (_expires, _answer, dropped) = self._data.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        """The bytes charged for the entries held (expired ones included)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class ResolverSettings:
    nameservers: tuple[str, ...] = ()  # empty: take them from /etc/resolv.conf
    port: int = 53
    query_timeout: float = 2.0
    message_budget: float = 8.0
    cache_entries: int = 50_000
    cache_bytes: int = 32 * 1024 * 1024


class Resolver:
    """Process-wide DNS resolver with a shared cache."""

    def __init__(self, settings: ResolverSettings | None = None) -> None:
        self.settings = settings or ResolverSettings()
        if self.settings.nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = list(self.settings.nameservers)
        else:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration as exc:
                raise DmarcMilterError(
                    "no nameservers configured and /etc/resolv.conf has none"
                ) from exc
        self._resolver.port = self.settings.port
        # Let a SERVFAIL be an answer, not a reason to retry until the timeout:
        # we want to tell failures apart quickly.
        self._resolver.retry_servfail = False
        self._resolver.cache = None
        self._cache = _Cache(self.settings.cache_entries, self.settings.cache_bytes)

    def session(self, budget: float | None = None) -> DNSSession:
        return DNSSession(self, self.settings.message_budget if budget is None else budget)

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_size(self) -> tuple[int, int]:
        """Entries and bytes (as :func:`answer_size` counts them) in the cache."""
        return len(self._cache), self._cache.bytes

    def cached(self, qname: str, rdtype: str) -> DNSAnswer | None:
        return self._cache.get((qname, rdtype), time.monotonic())

    def lookup(self, qname: str, rdtype: str, timeout: float) -> DNSAnswer:
        """Query upstream (no cache) and classify the outcome."""
        answer = self._query(qname, rdtype, timeout)
        self._cache.put((qname, rdtype), answer, time.monotonic())
        return answer

    def _query(self, qname: str, rdtype: str, timeout: float) -> DNSAnswer:
        try:
            name = dns.name.from_text(qname)
        except dns.exception.DNSException as exc:
            # A name we cannot even put on the wire cannot exist.
            return DNSAnswer(qname, rdtype, DNSStatus.NXDOMAIN, detail=f"invalid name: {exc}")
        try:
            ans = self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, lifetime=timeout, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return DNSAnswer(
                qname,
                rdtype,
                DNSStatus.NXDOMAIN,
                ttl=_negative_ttl(list(exc.kwargs["responses"].values())),
            )
        except dns.resolver.LifetimeTimeout:
            return DNSAnswer(qname, rdtype, DNSStatus.TIMEOUT, detail="query timed out")
        except dns.resolver.NoNameservers:
            # dnspython's text names our resolvers' addresses and ports, which
            # must not reach headers of delivered mail (reason= in A-R); the
            # status says what happened.
            return DNSAnswer(qname, rdtype, DNSStatus.SERVFAIL, detail="server failure")
        except dns.exception.Timeout:
            return DNSAnswer(qname, rdtype, DNSStatus.TIMEOUT, detail="query timed out")
        except dns.exception.DNSException as exc:
            return DNSAnswer(qname, rdtype, DNSStatus.SERVFAIL, detail=_short(exc))
        except OSError as exc:
            # e.g. the nameserver address is unreachable: a failure, not an answer.
            return DNSAnswer(qname, rdtype, DNSStatus.SERVFAIL, detail=str(exc))
        if ans.rrset is None:
            return DNSAnswer(qname, rdtype, DNSStatus.NODATA, ttl=_negative_ttl([ans.response]))
        return DNSAnswer(
            qname,
            rdtype,
            DNSStatus.NOERROR,
            records=tuple(_rdata_value(r) for r in ans.rrset),
            ttl=ans.rrset.ttl,
        )


# A query sent with less time than this left in the message's budget could
# not be answered by any real resolver; it counts as the budget spent.  (It
# also makes "timeout" and "budget spent" a stable distinction: the query
# that ran into the deadline is the last one sent.)
MIN_QUERY_SECONDS = 0.05


@dataclass
class DNSSession:
    """The DNS view of one message: a time budget and a log of queries.

    Not shared between threads; the resolver behind it is.
    """

    resolver: Resolver
    budget: float
    log: list[QueryLogEntry] = field(default_factory=list)
    # The session a capped() view was made from; None for a message's own.
    parent: DNSSession | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def capped(self, seconds: float) -> DNSSession:
        """A view of this session that may spend at most ``seconds`` more
        (and never past this session's own deadline), logging into the same
        query log.

        For lookups an attacker chooses inside a check that matters: the
        names the connecting client's reverse DNS returns to an SPF ``ptr``
        mechanism, whose failures RFC 7208 §5.5 lets us skip.  When the cap
        is spent, :meth:`spent_by_cap` tells that apart from the message's
        own budget running out.
        """
        return DNSSession(
            self.resolver, max(0.0, min(seconds, self.remaining())), self.log, parent=self
        )

    def spent_by_cap(self) -> bool:
        """True when this capped view is spent but the message's budget is not."""
        parent = self.parent
        return parent is not None and self.remaining() <= 0 < parent.remaining()

    def query(self, qname: str, rdtype: str) -> DNSAnswer:
        qname = qname.rstrip(".").lower()
        start = time.monotonic()
        answer = self.resolver.cached(qname, rdtype)
        cached = answer is not None
        spent = False
        if answer is None:
            left = self.deadline - start
            if left < MIN_QUERY_SECONDS:
                spent = True
                answer = DNSAnswer(
                    qname, rdtype, DNSStatus.TIMEOUT, detail="per-message DNS budget spent"
                )
            else:
                answer = self.resolver.lookup(
                    qname, rdtype, min(self.resolver.settings.query_timeout, left)
                )
        records = answer.records
        if not cached and records:
            size = answer_size(answer)
            if size > MAX_CACHED_ANSWER_BYTES:
                # The log lives as long as the message; an answer too large
                # to cache is not kept in it either, so one message holds
                # at most one such answer at a time, however many it asks.
                records = (f"[{size} bytes, not kept]",)
        self.log.append(
            QueryLogEntry(
                qname,
                rdtype,
                answer.status,
                records,
                cached,
                (time.monotonic() - start) * 1000.0,
                spent,
            )
        )
        return answer

    def txt_for_dkim(self, name: bytes | str, timeout: float = 5.0) -> bytes | None:
        """dkimpy ``dnsfunc``: the first TXT record, strings concatenated.

        A failure raises DNSFailure so it passes through dkimpy (which would
        otherwise turn it into a plain verification failure) and becomes a
        temperror in our DKIM check.
        """
        del timeout  # our session's budget and per-query timeout govern
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = self.query(text, "TXT")
        if answer.status.is_failure:
            raise DNSFailure(answer)
        if not answer.records:
            return None
        first = answer.records[0]
        assert isinstance(first, tuple)
        return b"".join(first)


def _rdata_value(rdata: object) -> object:
    rdtype = rdata.rdtype  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.TXT:
        return tuple(rdata.strings)  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        return (
            rdata.preference,  # type: ignore[attr-defined]
            rdata.exchange.to_text(omit_final_dot=True),  # type: ignore[attr-defined]
        )
    if rdtype == dns.rdatatype.SPF:
        return tuple(rdata.strings)  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return rdata.target.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
    return rdata.to_text()  # type: ignore[attr-defined]


def _negative_ttl(responses: Sequence[dns.message.Message]) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); with no
    SOA in the authority section it must not be cached."""
    best: int | None = None
    for resp in responses:
        for rrset in getattr(resp, "authority", []):
            if rrset.rdtype == dns.rdatatype.SOA:
                ttl = min(rrset.ttl, rrset[0].minimum)
                best = ttl if best is None else min(best, ttl)
    return best or 0


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def parse_hostport(spec: str, default_port: int = 53) -> tuple[str, int]:
    """Parse ``HOST[:PORT]`` or ``[V6]:PORT`` as given to ``--dns``."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
    else:
        host, port_text = spec, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError as exc:
        raise ValueError(f"invalid DNS server port in {spec!r}") from exc
    if not 0 < port < 65536:
        raise ValueError(f"DNS server port out of range in {spec!r}")
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"DNS server must be an IP address, got {host!r}") from exc
    return host, port
