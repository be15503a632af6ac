"""DKIM verification of every DKIM-Signature of a message (RFC 6376 §6).

RFC 6376 §6.1 lets a verifier check any number of signatures; DMARC (RFC 9989
§4.4.1) needs all of them, because any one aligned pass is enough.  So every
signature is verified, up to a bound that keeps the work per message finite
(RFC 6376 §8.4: signatures are cheap to add and expensive to check).  The
evaluation verifies those whose d= could align with the Author Domain first
(:class:`DKIMVerifier`), so junk signatures placed above them can neither push
them past the bound nor spend the DNS budget before them; results are always
listed in header order.

The steps follow RFC 6376 §6.1: §6.1.1 validates the signature header field
(tags, version, algorithm, i=/d= relation, From signed, expiry), §6.1.2 gets
the public key (the key record of §3.6.1 and its tags), §6.1.3 computes the
hashes and checks the signature.  RFC 8301 adds the algorithm and key size
rules (§3.1: no rsa-sha1; §3.2: RSA keys of at least 1024 bits), RFC 8463 the
ed25519-sha256 algorithm.  The signature framework is dkimpy's; canonicalisation
(§3.4) is done here, result for result the same as dkimpy's, so that a large
body is hashed in place, window by window, and never copied whole.  Every
decision about the outcome is made here, so each one gets its RFC 8601 §2.7.1
result code and a reason a postmaster can read.

Result codes (RFC 8601 §2.7.1).  ``fail`` is kept for a signature that could
be checked and did not match; a signature that could not be checked at all is
``permerror`` (or ``temperror`` when retrying later may help):

======================================================  ==========  =======================
condition                                               result      RFC
======================================================  ==========  =======================
signature verified                                      pass        6376 §6.1.3
b= does not verify (signed header fields changed,       fail        6376 §6.1.3
wrong key published)
bh= does not match the body                             fail        6376 §6.1.3
x= is in the past                                       fail        6376 §3.5, §6.1.1
l= larger than the canonicalised body                   fail        6376 §3.5
l= leaves body content unsigned (appended after         policy      6376 §8.2, 8601 §2.7.1
signing; ``pass`` when accept_partial_body is set)
tag-list syntax, duplicate tag, missing required tag,   permerror   6376 §3.2, §6.1.1
v= not 1, bad base64, bad d=/s=/c=/q=/l=/t=/x=,
i= not within d=, From not signed, x= before t=
unsupported a=; rsa-sha1                                permerror   6376 §6.1.1, 8301 §3.1
key record missing (NXDOMAIN or no TXT record)          permerror   6376 §6.1.2 step 3
key record malformed or over 8 KiB; v= not DKIM1;       permerror   6376 §3.6.1, §6.1.2
k= unknown or not matching a=; h= excludes the hash; s= not email;
t=s with i= in a subdomain
key revoked (empty p=)                                  permerror   6376 §3.6.1, §6.1.2
RSA key smaller than min_key_bits (or absurdly large)   permerror   8301 §3.2
key query SERVFAIL, timeout, or DNS budget spent        temperror   6376 §6.1.2 step 2
signature beyond max_signatures                         permerror   6376 §8.4 (local bound)
message header section unparseable                      permerror   6376 §6.1.1
======================================================  ==========  =======================

A message with no DKIM-Signature gives an empty outcome; the
Authentication-Results renderer writes ``dkim=none`` for it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
import dkim.util
import nacl.exceptions
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.canonicalization import Relaxed as RelaxedCanonicalization
from dkim.crypto import DigestTooLargeError

from .domains import DomainError, normalize_domain
from .resolver import DNSFailure, DNSSession, DNSStatus
from .results import DKIMOutcome, DKIMResultCode, DKIMSignatureResult
from .taglist import domain_or_empty, header_text, loose_tags

__all__ = [
    "BODY_WINDOW",
    "ENGINE_LOGGER",
    "FastVerifyMixin",
    "KeyRecord",
    "canonical_body_chunks",
    "load_key",
    "verify_dkim",
]

# dkimpy logs every failed check at ERROR level (and formats debug text
# eagerly).  The milter writes one summary line per message, so dkimpy gets a
# logger of its own that records nothing unless an operator lowers its level
# for debugging; it never propagates to the root logger.
ENGINE_LOGGER = logging.getLogger("dmarcmilter.engine.dkimpy")
ENGINE_LOGGER.addHandler(logging.NullHandler())
ENGINE_LOGGER.propagate = False
ENGINE_LOGGER.setLevel(logging.CRITICAL + 1)

# a= value -> (key type the k= tag must name, hash name for the key's h= tag).
_ALGORITHMS: dict[bytes, tuple[bytes, bytes]] = {
    b"rsa-sha256": (b"rsa", b"sha256"),
    b"ed25519-sha256": (b"ed25519", b"sha256"),  # RFC 8463
}
_REQUIRED_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")

# Clock skew tolerated before x= counts as past: the signer's clock and ours
# rarely agree to the second.
CLOCK_SKEW = 300
# RFC 8301 §3.2 asks verifiers to handle 1024 to 4096 bits.  Much larger
# moduli (and huge public exponents) only serve to make the modular
# exponentiation slow, so they are refused.
MAX_KEY_BITS = 8192
# A key record (RFC 6376 §3.6.1) longer than this is a permerror.  The
# largest key accepted (MAX_KEY_BITS RSA) is a 1.1 KB SubjectPublicKeyInfo,
# 1.5 KB in base64 with its tags; 8 KiB leaves room for notes (n=) and
# folding whitespace, and nothing usable is ever larger.  DNS itself allows
# a TXT answer up to 64 KiB, which an attacker would use to make every key
# lookup cost memory.
MAX_KEY_RECORD_BYTES = 8192
MAX_EXPONENT_BITS = 64

_HEADER_B_LEN = 8  # RFC 6008 §4: at least 8 characters of b=
_WSP = re.compile(rb"\s+")
_B64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_HAS_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:")
_DIGITS = re.compile(rb"^[0-9]{1,76}$")  # RFC 6376 §3.5: at most 76 digits
_HEADER_SEPARATOR = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"\r?\n")


class FastVerifyMixin:
    """Replaces two steps of dkimpy's ``DomainSigner`` so that a message with
    several signatures (DKIM, or the AMS and seals of an ARC chain) is
    parsed and canonicalised once.

    ``set_message`` parses with :func:`split_message` (dkimpy's parser splits
    and rejoins the whole body line by line) and leaves the body in place in
    the message's bytes: dkimpy's ``body`` attribute stays empty, and nothing
    here copies a large body whole.  ``verify_sig_process`` (RFC 6376
    §6.1.3) keeps the canonicalised headers per algorithm and the body hash
    per (algorithm, hash, l=), uses :func:`relaxed_headers` and
    :func:`relaxed_body` (:func:`canonical_body_chunks` for a large body),
    and does the RSA public-key step with
    ``int.from_bytes``/``pow`` instead of byte-at-a-time loops.  Its contract
    is dkimpy's: same arguments, ValidationError for a body hash mismatch,
    False for a signature that does not verify, KeyFormatError for an
    unusable key, so dkimpy's ARC code calls it unchanged.  Results are
    checked equal to dkimpy's own functions by the tests.
    """

    headers: list[list[bytes]]
    # The body is _data[_body_at:], read in place.
    _data: bytes = b""
    _body_at: int = 0
    pk: Any
    ktag: bytes | None
    keysize: int
    minkey: int
    tlsrpt: bool | str
    seqtlsrpt: bool
    signed_headers: list[Any]

    def set_message(self, message: bytes | None) -> None:
        # dkimpy's parser splits and rejoins the whole body line by line;
        # parse_message gives the same result in a fraction of the time.
        super().set_message(None)  # type: ignore[misc]
        self.__dict__.pop("_header_cache", None)
        self.__dict__.pop("_body_cache", None)
        self.__dict__.pop("_wanted_hashes", None)
        self._data, self._body_at = b"", 0
        if message:
            self.headers, self._data, self._body_at = split_message(message)

    def _canonical_headers(self, algorithm: Any) -> list[Any]:
        cache: dict[Any, list[Any]] = self.__dict__.setdefault("_header_cache", {})
        found = cache.get(algorithm)
        if found is None:
            if algorithm is RelaxedCanonicalization:
                found = relaxed_headers(self.headers)
            else:
                found = algorithm.canonicalize_headers(self.headers)
            cache[algorithm] = found
        return found

    def _body_digest(self, algorithm: Any, hash_name: str, length: int | None) -> bytes:
        cache: dict[Any, Any] = self.__dict__.setdefault("_body_cache", {})
        key = (algorithm, hash_name, length)
        digest = cache.get(key)
        if digest is not None:
            return bytes(digest)
        relaxed = algorithm is RelaxedCanonicalization
        data, start = self._data, self._body_at
        if self.body_size <= BODY_WINDOW:
            # A small body is canonicalised once and kept for every hash.
            body = cache.get(algorithm)
            if body is None:
                body = data[start:]
                body = relaxed_body(body) if relaxed else algorithm.canonicalize_body(body)
                cache[algorithm] = body
                cache[(algorithm, "length")] = len(body)
            if length is not None:
                body = body[:length]
            digest = cache[key] = hashlib.new(hash_name, body).digest()
            return bytes(digest)
        # A large body is hashed as it is canonicalised, window by window,
        # never held canonicalised whole.  Every hash expected with this
        # canonicalisation is computed in the same pass, so the body is
        # canonicalised once per algorithm, however many l= values the
        # signatures carry.
        wanted: set[Any] = self.__dict__.get("_wanted_hashes", set())
        keys = {key} | {k for k in wanted if k[0] is algorithm and k not in cache}
        hashers = [(k, hashlib.new(k[1]), k[2]) for k in keys]
        size = 0
        for chunk in canonical_body_chunks(data, start, relaxed=relaxed):
            for _, hasher, limit in hashers:
                if limit is None:
                    hasher.update(chunk)
                elif size < limit:
                    hasher.update(chunk[: limit - size])
            size += len(chunk)
        cache[(algorithm, "length")] = size
        for k, hasher, _ in hashers:
            cache[k] = hasher.digest()
        return bytes(cache[key])

    def expect_body_hash(self, sig: dict[bytes, bytes]) -> None:
        """Note the body hash a checked signature (tags as verified) will
        need, so that a large body is canonicalised once for all of them."""
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            hash_name = dkim.crypto.HASH_ALGORITHMS[sig[b"a"]]().name
        except (InvalidCanonicalizationPolicyError, KeyError):
            return
        length = int(sig[b"l"]) if b"l" in sig else None
        wanted: set[Any] = self.__dict__.setdefault("_wanted_hashes", set())
        wanted.add((policy.body_algorithm, hash_name, length))

    @property
    def body_size(self) -> int:
        return len(self._data) - self._body_at

    def canonical_body_length(self, c_value: bytes) -> int:
        algorithm = CanonicalizationPolicy.from_c_value(c_value).body_algorithm
        cache: dict[Any, Any] = self.__dict__.setdefault("_body_cache", {})
        if (algorithm, "length") not in cache:
            self._body_digest(algorithm, "sha256", None)  # records the length
        length: int = cache[(algorithm, "length")]
        return length

    def verify_sig_process(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: Sequence[bytes],
        dnsfunc: object,
    ) -> bool:
        del dnsfunc  # the key is already loaded
        if not self.tlsrpt and self.seqtlsrpt:
            # RFC 8460 §3: a tlsrpt-only key does not sign mail.
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]!r}") from None
        hasher: Callable[[], Any] = dkim.crypto.HASH_ALGORITHMS[sig[b"a"]]
        hash_name = hasher().name
        if b"bh" in sig:
            length = int(sig[b"l"]) if b"l" in sig else None
            expected = _b64_decode(sig[b"bh"])
            if self._body_digest(policy.body_algorithm, hash_name, length) != expected:
                raise dkim.ValidationError("body hash mismatch")
        # As dkimpy does: one extra "from" so a second, unsigned From field
        # (prepended to impersonate) breaks the signature.
        if b"from" in include_headers:
            include_headers.append(b"from")
        h = hasher()
        self.signed_headers = dkim.hash_headers(
            h,
            policy,
            self._canonical_headers(policy.header_algorithm),
            include_headers,
            sig_header,
            sig,
        )
        signature = _b64_decode(sig[b"b"]) or b""
        if self.ktag == b"rsa":
            ok = _rsa_verify(h, signature, self.pk)
            if ok and self.keysize < self.minkey:
                raise dkim.KeyFormatError(f"public key too small: {self.keysize}")
            return ok
        if self.ktag == b"ed25519":
            try:
                # RFC 8463 §3: ed25519 signs the SHA-256 digest, not the data.
                self.pk.verify(h.digest(), signature)
            except (nacl.exceptions.BadSignatureError, ValueError):
                return False
            return True
        raise dkim.UnknownKeyTypeError(self.ktag)


_BLANK_LINE = re.compile(rb"\n\r?\n")
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def parse_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """Header fields and body exactly as ``dkim.rfc822_parse`` returns them
    (names and values as sent, values with their CRLF; the body with every
    line ending made CRLF), raising MessageFormatError where it does."""
    headers, data, start = split_message(message)
    return headers, data[start:]


def split_message(message: bytes) -> tuple[list[list[bytes]], bytes, int]:
    """:func:`parse_message` with the body left where it is: the header
    fields, and the bytes holding the body with the offset where it starts
    (``message`` itself, unless the body has bare LFs and is rewritten).
    Only the header section is split into lines."""
    rest: int | None
    if message.startswith((b"\n", b"\r\n")):
        head, rest = b"", message.index(b"\n") + 1
    else:
        match = _BLANK_LINE.search(message)
        if match is None:
            head, rest = message, None
        else:
            # The CR before the first LF belongs to that line's ending.
            head = message[: match.start()].removesuffix(b"\r")
            rest = match.end()
    headers: list[list[bytes]] = []
    for line in _LINE_BREAK.split(head) if head else []:
        if not line:
            break
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"  # IndexError for a leading one, as dkimpy
            continue
        found = _HEADER_NAME.match(line)
        if found is not None:
            headers.append([found.group(1), line[found.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    if rest is None:
        return headers, b"", 0
    if message.count(b"\n", rest) != message.count(b"\r\n", rest):
        return headers, _LINE_BREAK.sub(b"\r\n", message[rest:]), 0
    return headers, message, rest


# Relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4), result for result the
# same as dkimpy's, which rewrites every single space too ("[\t ]+" -> " "):
# on ordinary text that is one substitution per word.  Only runs that change
# are matched here.
_WSP_RUN = re.compile(rb"[\t ]*\t[\t ]*| {2,}")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_LINE_BREAK = re.compile(rb"\r?\n")


def relaxed_headers(headers: Sequence[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 6376 §3.4.2 for (name, value) pairs as dkimpy holds them."""
    out = []
    for name, value in headers:
        if b"\n" in value:
            value = _LINE_BREAK.sub(b"", value)
        if b"\t" in value or b"  " in value:
            value = _WSP_RUN.sub(b" ", value)
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 for a CRLF body."""
    body = _relaxed_lines(body)
    # RFC 6376 §3.4.3/§3.4.4: no trailing empty lines; a non-empty body ends
    # in CRLF; an empty body stays empty.
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end and end + 2 == len(body):
        # Already ends in exactly one CRLF (the usual case): no copy of a
        # large body.
        return body
    return body[:end] + b"\r\n" if end else b""


def _relaxed_lines(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 rules a and b: WSP at line ends removed, other WSP
    runs made one space."""
    # The substring tests are much cheaper than a regex scan that finds
    # nothing, which is the usual case.
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    return body


# A body longer than this is canonicalised and hashed in windows of this
# size (a few transient copies of one window, whatever the body's size);
# a shorter one is canonicalised whole, once per message.
BODY_WINDOW = 1 << 16
_CRLF_BLOCK = b"\r\n" * 2048


def canonical_body_chunks(
    data: bytes, start: int, *, relaxed: bool, window: int = BODY_WINDOW
) -> Iterator[bytes | memoryview]:
    """The canonical body of ``data[start:]`` (CRLF line endings), RFC 6376
    §3.4.3 simple or §3.4.4 relaxed, in pieces of at most about ``window``
    bytes: joined, the same bytes as dkimpy's canonicalisation (tests check
    it), without a copy of the whole body."""
    stop = len(data)
    if not relaxed:
        # Simple changes nothing but the empty lines at the end: the body is
        # hashed in place up to them, then one CRLF.
        end = _content_end(data, start, stop)
        view = memoryview(data)
        for at in range(start, end, window):
            yield view[at : min(at + window, end)]
        yield b"\r\n"
        return
    pending = 0  # CRLFs held back: they end the body if nothing follows
    content = False
    carry = b""
    at = start
    while at < stop:
        cut = min(at + window, stop)
        piece = carry + data[at:cut]
        at = cut
        carry = b""
        if at < stop:
            piece, carry = _split_wsp_tail(piece)
        out = _relaxed_lines(piece)
        end = _content_end(out, 0, len(out))
        if end:
            while pending:
                count = min(pending, len(_CRLF_BLOCK) // 2)
                yield _CRLF_BLOCK[: 2 * count]
                pending -= count
            yield out if end == len(out) else memoryview(out)[:end]
            content = True
        pending += (len(out) - end) // 2
    if content:
        yield b"\r\n"


def _split_wsp_tail(piece: bytes) -> tuple[bytes, bytes]:
    """``piece`` less its trailing WSP and a final CR, which the next window
    may turn into trailing whitespace or a line ending; they are carried
    over with the run of WSP made one space, which both relaxed rules treat
    alike.  So the carry is at most two bytes, and no rule spans a cut."""
    keep = len(piece)
    cr = piece.endswith(b"\r")
    if cr:
        keep -= 1
    head = keep
    if keep and piece[keep - 1] in (0x09, 0x20):
        head = len((piece[:keep] if cr else piece).rstrip(b" \t"))
    if head == len(piece):
        return piece, b""
    return piece[:head], (b" " if head < keep else b"") + (b"\r" if cr else b"")


def _content_end(data: bytes, start: int, end: int) -> int:
    """Where the run of CRLFs that ends ``data[start:end]`` begins (RFC 6376
    §3.4.3: empty lines at the end of the body are ignored)."""
    # Blocks first, so a body of a million empty lines costs few steps.
    while data.endswith(_CRLF_BLOCK, start, end):
        end -= len(_CRLF_BLOCK)
    while data.endswith(b"\r\n", start, end):
        end -= 2
    return end


def _rsa_verify(digest: Any, signature: bytes, pk: dict[str, int]) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 §8.2.2)."""
    modulus, exponent = pk["modulus"], pk["publicExponent"]
    size = (modulus.bit_length() + 7) // 8
    # A signature shorter than the modulus is accepted, as dkimpy does: some
    # signers drop leading zero octets.
    if len(signature) > size:
        return False
    value = int.from_bytes(signature, "big")
    if value >= modulus:
        return False
    try:
        expected = bytes(dkim.crypto.EMSA_PKCS1_v1_5_encode(digest, size))
    except DigestTooLargeError:
        raise dkim.KeyFormatError("digest too large for modulus") from None
    return pow(value, exponent, modulus).to_bytes(size, "big") == expected


class _Engine(FastVerifyMixin, dkim.DKIM):  # type: ignore[misc]
    """dkimpy's message holder with our verification step."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A parsed key record (RFC 6376 §3.6.1), or why it is unusable."""

    error: str = ""
    key_type: bytes = b""
    key: Any = None
    bits: int = 0
    hashes: tuple[bytes, ...] | None = None  # h=, None when absent (any)
    email: bool = True  # s= allows email
    testing: bool = False  # t=y
    strict: bool = False  # t=s


class _Verdict(Exception):
    """A final result for the signature being checked, raised from deep in the
    steps so each step can stop the check with one line."""

    def __init__(self, result: DKIMResultCode, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _permerror(reason: str) -> _Verdict:
    return _Verdict(DKIMResultCode.PERMERROR, reason)


def verify_dkim(
    message: bytes,
    session: DNSSession,
    *,
    max_signatures: int = 20,
    min_key_bits: int = 1024,
    accept_partial_body: bool = False,
    now: float | None = None,
) -> DKIMOutcome:
    """Verify every DKIM-Signature of ``message``, top to bottom.

    ``message`` is the whole message in CRLF form.  Keys are fetched through
    ``session`` (so its budget and query log apply).  Signatures past
    ``max_signatures`` are reported as permerror without any work.
    ``accept_partial_body`` lets an l= signature that leaves appended content
    unsigned pass (RFC 6376 §8.2 describes why that is risky); ``now`` is the
    verification time for x=, defaulting to the clock.  Never raises.
    """
    verifier = DKIMVerifier(
        message,
        max_signatures=max_signatures,
        min_key_bits=min_key_bits,
        accept_partial_body=accept_partial_body,
        now=now,
    )
    verifier.verify(session)
    return verifier.outcome()


# The first d= tag of a signature (as loose_tags reads it: the first spec
# whose name, stripped, is "d"), without parsing the whole tag list.
_D_TAG = re.compile(rb"(?:^|;)\s*d\s*=([^;]*)")


def _signing_domain(value: bytes) -> str:
    found = _D_TAG.search(value)
    return domain_or_empty(found.group(1)) if found else ""


class DKIMVerifier:
    """The signatures of one message, verified in as many rounds as the
    caller wants: the evaluation first verifies the signatures whose ``d=``
    could align with the Author Domain, and the others (whose keys an
    attacker chooses, and may never answer) only after everything the DMARC
    result needs.

    ``max_signatures`` bounds the signatures verified in all rounds together,
    in the order they are verified; so signatures that could align are never
    pushed past the bound by others put above them.  The outcome lists every
    signature in header order, whatever the order of verification; one never
    verified is permerror ("too many signatures" past the bound, or "not
    verified" if no round selected it).
    """

    def __init__(
        self,
        message: bytes,
        *,
        max_signatures: int = 20,
        min_key_bits: int = 1024,
        accept_partial_body: bool = False,
        now: float | None = None,
    ) -> None:
        self._max = max_signatures
        self._min_key_bits = min_key_bits
        self._accept_partial_body = accept_partial_body
        self._now = time.time() if now is None else now
        self._engine: _Engine | None = None
        self._headers: list[Sequence[bytes]] = []
        self._results: list[DKIMSignatureResult | None] = []
        self._domains: list[str] = []
        self._verified = 0
        # Only the header section can hold a signature; a case-insensitive
        # regex over a large body costs more than the rest of an unsigned
        # message's evaluation.
        end = message.find(b"\r\n\r\n")
        if _HAS_SIGNATURE.search(message, 0, len(message) if end < 0 else end + 2) is None:
            return
        try:
            engine = _Engine(message, logger=ENGINE_LOGGER, minkey=min_key_bits)
        except Exception:
            # The header section follows dkimpy's parsing rules, which refuse a
            # line that is neither a field nor a continuation (MessageFormatError)
            # and trip over a leading continuation line (IndexError).  The
            # signatures are still reported, each as permerror, so the A-R header
            # shows they were there.
            self._results = [
                _unverifiable(value, "message header section is malformed")
                for value in _scan_signature_values(message)
            ]
            return
        self._engine = engine
        self._headers = [h for h in engine.headers if h[0].lower() == b"dkim-signature"]
        self._results = [None] * len(self._headers)
        self._domains = [_signing_domain(header[1]) for header in self._headers]
        if engine.body_size > BODY_WINDOW:
            # A large body is hashed in one pass per canonicalisation for
            # every signature that may need it (FastVerifyMixin._body_digest);
            # a signature verified later without this costs a pass of its own,
            # and at most max_signatures are verified.
            for header in self._headers[:max_signatures]:
                try:
                    engine.expect_body_hash(_parse_signature(header[1]))
                except Exception:
                    continue  # reported when the signature is checked

    def verify(self, session: DNSSession, select: Callable[[str], bool] | None = None) -> None:
        """Verify, top to bottom, the signatures not yet verified whose
        ``d=`` ``select`` accepts (all when None)."""
        engine = self._engine
        if engine is None:
            return
        for index, header in enumerate(self._headers):
            if self._results[index] is not None:
                continue
            if select is not None and not select(self._domains[index]):
                continue
            if self._verified >= self._max:
                self._results[index] = _unverifiable(
                    header[1], "too many signatures", unverified=True
                )
                continue
            self._verified += 1
            self._results[index] = _verify_one(
                engine,
                header,
                session,
                self._min_key_bits,
                self._accept_partial_body,
                self._now,
            )

    def outcome(self) -> DKIMOutcome:
        return DKIMOutcome(
            tuple(
                result
                if result is not None
                else _unverifiable(self._headers[index][1], "not verified", unverified=True)
                for index, result in enumerate(self._results)
            )
        )


def unverified(message: bytes, reason: str) -> DKIMOutcome:
    """Every signature of ``message`` as permerror with ``reason``, without
    verifying: for a message whose body was too large to keep.  Each is
    marked ``unverified``: our limit, not the signer's failure."""
    return DKIMOutcome(
        tuple(_unverifiable(v, reason, unverified=True) for v in _scan_signature_values(message))
    )


def _verify_one(
    engine: _Engine,
    header: Sequence[bytes],
    session: DNSSession,
    min_key_bits: int,
    accept_partial_body: bool,
    now: float,
) -> DKIMSignatureResult:
    shell = _unverifiable(header[1], "")

    def result(code: DKIMResultCode, reason: str = "") -> DKIMSignatureResult:
        return dataclasses.replace(shell, result=code, reason=reason)

    try:
        code, reason = _check(engine, header, session, min_key_bits, accept_partial_body, now)
    except _Verdict as verdict:
        return result(verdict.result, verdict.reason)
    except DNSFailure as exc:
        # Not reached through our own lookups (they return a status), but a
        # dnsfunc adapter raising inside dkimpy must still become temperror.
        return result(DKIMResultCode.TEMPERROR, f"key lookup failed: {exc}")
    except Exception as exc:  # the never-raise guarantee: any input bytes
        return result(DKIMResultCode.PERMERROR, f"unverifiable signature: {type(exc).__name__}")
    return result(code, reason)


def _check(
    engine: _Engine,
    header: Sequence[bytes],
    session: DNSSession,
    min_key_bits: int,
    accept_partial_body: bool,
    now: float,
) -> tuple[DKIMResultCode, str]:
    """RFC 6376 §6.1.1 to §6.1.3 for one signature.  Raises _Verdict for
    any result other than the one returned."""
    tags = _parse_signature(header[1])
    key_type, hash_name = _ALGORITHMS[tags[b"a"]]
    _check_times(tags, now)
    key = _fetch_key(session, tags, key_type, hash_name, min_key_bits)
    engine.pk, engine.ktag, engine.keysize = key.key, key.key_type, key.bits
    engine.seqtlsrpt = False

    if key_type == b"ed25519" and len(_b64_decode(tags[b"b"]) or b"") != 64:
        raise _Verdict(DKIMResultCode.FAIL, "signature mismatch (b= has the wrong length)")
    unsigned = 0
    if b"l" in tags:
        # RFC 6376 §3.5: an l= larger than the body makes the signature
        # invalid (dkimpy would hash body[:l] and let it pass).
        body_len = engine.canonical_body_length(tags.get(b"c", b"simple/simple"))
        signed_len = int(tags[b"l"])
        if signed_len > body_len:
            raise _Verdict(
                DKIMResultCode.FAIL, f"l={signed_len} exceeds the body length ({body_len})"
            )
        unsigned = body_len - signed_len

    include_headers = [h.strip().lower() for h in tags[b"h"].split(b":")]
    try:
        ok = engine.verify_sig_process(tags, include_headers, header, None)
    except dkim.ValidationError:
        # After _parse_signature, the body hash is the only check left that
        # raises ValidationError.
        raise _Verdict(DKIMResultCode.FAIL, "body hash mismatch") from None
    except dkim.DKIMException as exc:
        # KeyFormatError: an RSA key too short to hold the digest.
        raise _permerror(f"unusable key or signature: {_short(exc)}") from None
    if not ok:
        raise _Verdict(
            DKIMResultCode.FAIL, "signature mismatch (signed header fields changed or wrong key)"
        )
    notes = []
    if key.testing:
        notes.append("key in testing mode (t=y)")
    if unsigned:
        notes.append(f"l= leaves {unsigned} body octets unsigned")
        if not accept_partial_body:
            return DKIMResultCode.POLICY, "; ".join(notes)
    return DKIMResultCode.PASS, "; ".join(notes)


def _parse_signature(value: bytes) -> dict[bytes, bytes]:
    """RFC 6376 §3.5 / §6.1.1: the tag list and the checks that need no DNS."""
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
    except dkim.util.DuplicateTag as exc:
        raise _permerror(f"duplicate tag {header_text(exc.args[0])}=") from None
    except dkim.util.InvalidTagValueList:
        raise _permerror("malformed tag list") from None
    for tag in _REQUIRED_TAGS:
        if tag not in tags:
            raise _permerror(f"signature missing required tag {tag.decode()}=")
    if tags[b"v"] != b"1":
        raise _permerror(f"incompatible version v={header_text(tags[b'v'])}")
    alg = tags[b"a"].lower()
    if alg == b"rsa-sha1":
        raise _permerror("rsa-sha1 is not acceptable (RFC 8301)")
    if alg not in _ALGORITHMS:
        raise _permerror(f"unsupported algorithm a={header_text(tags[b'a'])}")
    tags[b"a"] = alg
    for tag in (b"b", b"bh"):
        if not _b64_decode(tags[tag]):
            raise _permerror(f"{tag.decode()}= is empty or not valid base64")
    domain = domain_or_empty(tags[b"d"])
    if not domain:
        raise _permerror(f"invalid d={header_text(tags[b'd'])}")
    try:
        normalize_domain(header_text(tags[b"s"]))
    except DomainError:
        raise _permerror(f"invalid s={header_text(tags[b's'])}") from None
    try:
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        raise _permerror(f"invalid c={header_text(tags[b'c'])}") from None
    if b"q" in tags and b"dns/txt" not in [q.strip() for q in tags[b"q"].split(b":")]:
        raise _permerror(f"unsupported query method q={header_text(tags[b'q'])}")
    if b"i" in tags:
        _check_identity(tags[b"i"], domain)
    signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
    if not all(signed):
        raise _permerror("empty header field name in h=")
    if b"from" not in signed:
        raise _permerror("From field not signed")
    for tag in (b"l", b"t", b"x"):
        if tag in tags and not _DIGITS.match(tags[tag]):
            raise _permerror(f"{tag.decode()}= is not a decimal number")
    return tags


def _check_identity(value: bytes, domain: str) -> None:
    """RFC 6376 §3.5 i=: the AUID's domain is d= or a subdomain of it."""
    local, at, host = value.rpartition(b"@")
    del local
    if not at:
        raise _permerror("i= has no @")
    try:
        auid_domain = normalize_domain(header_text(host))
    except DomainError:
        raise _permerror(f"invalid i={header_text(value)}") from None
    if auid_domain != domain and not auid_domain.endswith("." + domain):
        raise _permerror("i= domain is not within d=")


def _check_times(tags: dict[bytes, bytes], now: float) -> None:
    """RFC 6376 §3.5 t= and x=.  A t= in the future is tolerated (the RFC says
    MAY ignore; skewed clocks are common and it proves nothing)."""
    if b"x" not in tags:
        return
    expires = int(tags[b"x"])
    if b"t" in tags and expires < int(tags[b"t"]):
        raise _permerror("x= is before t=")
    if expires + CLOCK_SKEW < now:
        raise _Verdict(DKIMResultCode.FAIL, "signature expired")


def _fetch_key(
    session: DNSSession,
    tags: dict[bytes, bytes],
    key_type: bytes,
    hash_name: bytes,
    min_key_bits: int,
) -> KeyRecord:
    """RFC 6376 §6.1.2: the key record, checked against the signature."""
    domain = domain_or_empty(tags[b"d"])
    try:
        qname = normalize_domain(f"{header_text(tags[b's'])}._domainkey.{domain}")
    except DomainError:
        raise _permerror("key name too long") from None
    # The session is queried directly rather than through the dkimpy dnsfunc
    # adapter: the status keeps NXDOMAIN, no record and failure apart with no
    # exception to unwind.
    answer = session.query(qname, "TXT")
    if answer.status.is_failure:
        detail = "DNS budget spent" if "budget" in answer.detail else answer.status.value
        raise _Verdict(DKIMResultCode.TEMPERROR, f"key lookup failed ({detail})")
    if answer.status is DNSStatus.NXDOMAIN:
        raise _permerror("no key for signature (NXDOMAIN)")
    if not answer.records:
        raise _permerror("no key for signature (no TXT record)")
    # RFC 6376 §3.6.2.2 leaves several records undefined; the first is used,
    # as everywhere else in the DNS layer.
    first = answer.records[0]
    key = load_key(b"".join(first) if isinstance(first, tuple) else b"")
    if key.error:
        raise _permerror(key.error)
    if key.hashes is not None and hash_name not in key.hashes:
        raise _permerror("inappropriate hash algorithm for key (h=)")
    if key.key_type != key_type:
        raise _permerror(
            f"key type k={header_text(key.key_type)} does not match a={header_text(tags[b'a'])}"
        )
    if not key.email:
        raise _permerror("key not for email (s=)")
    if key.strict and b"i" in tags:
        auid_domain = domain_or_empty(tags[b"i"].rpartition(b"@")[2])
        if auid_domain != domain:
            raise _permerror("key requires i= domain to equal d= (t=s)")
    if key.key_type == b"rsa" and key.bits < min_key_bits:
        raise _permerror(f"key too small ({key.bits} bits)")
    return key


def load_key(record: bytes) -> KeyRecord:
    """Parse a key record (RFC 6376 §3.6.1), for DKIM and ARC alike.

    A record over MAX_KEY_RECORD_BYTES is refused before parsing, and so
    never enters the parse cache: that cache holds at most
    1024 x 8 KiB whatever keys an attacker publishes."""
    if len(record) > MAX_KEY_RECORD_BYTES:
        return KeyRecord(f"key record too large ({len(record)} bytes)")
    return _parse_key(record)


@functools.lru_cache(maxsize=1024)
def _parse_key(record: bytes) -> KeyRecord:
    """Cached by record text: with a warm DNS cache the same few keys sign
    most mail, and parsing the ASN.1 each time would cost more than the DNS
    cache saves."""
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList:
        return KeyRecord("key syntax error")
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return KeyRecord("key syntax error: v= is not DKIM1")
    hashes = None
    if b"h" in tags:
        hashes = tuple(h.strip().lower() for h in tags[b"h"].split(b":"))
    key_type = tags.get(b"k", b"rsa").strip().lower()
    if key_type not in (b"rsa", b"ed25519"):
        return KeyRecord(f"unknown key type k={header_text(key_type)}")
    services = [v.strip().lower() for v in tags.get(b"s", b"*").split(b":")]
    flags = [f.strip().lower() for f in tags.get(b"t", b"").split(b":")]
    if b"p" not in tags:
        return KeyRecord("key syntax error: no p=")
    raw = _b64_decode(tags[b"p"])
    if raw is None:
        return KeyRecord("key syntax error: p= is not valid base64")
    if not raw:
        return KeyRecord("key revoked")
    common: dict[str, Any] = {
        "key_type": key_type,
        "hashes": hashes,
        "email": b"*" in services or b"email" in services,
        "testing": b"y" in flags,
        "strict": b"s" in flags,
    }
    if key_type == b"ed25519":
        if len(raw) != 32:
            return KeyRecord("malformed ed25519 key")
        try:
            return KeyRecord(key=nacl.signing.VerifyKey(raw), bits=256, **common)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return KeyRecord("malformed ed25519 key")
    try:
        pk = dkim.crypto.parse_public_key(raw)
        modulus, exponent = int(pk["modulus"]), int(pk["publicExponent"])
    except Exception:
        # UnparsableKeyError, or the asn1 errors dkimpy does not wrap.
        return KeyRecord("malformed RSA key")
    bits = modulus.bit_length()
    if bits > MAX_KEY_BITS or exponent.bit_length() > MAX_EXPONENT_BITS or exponent < 3:
        return KeyRecord("unusable RSA key (size or exponent out of range)")
    return KeyRecord(key={"modulus": modulus, "publicExponent": exponent}, bits=bits, **common)


def _b64_decode(value: bytes) -> bytes | None:
    """Base64 with folding whitespace removed (RFC 6376 §2.4); None if invalid,
    b"" for an empty value."""
    compact = _WSP.sub(b"", value)
    if not _B64.match(compact) or len(compact) % 4:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _unverifiable(value: bytes, reason: str, *, unverified: bool = False) -> DKIMSignatureResult:
    info = loose_tags(value)
    return DKIMSignatureResult(
        domain=domain_or_empty(info.get(b"d", b"")),
        selector=header_text(info.get(b"s", b"")),
        result=DKIMResultCode.PERMERROR,
        reason=reason,
        algorithm=header_text(info.get(b"a", b"")),
        identity=header_text(info.get(b"i", b"")),
        header_b=header_text(_WSP.sub(b"", info.get(b"b", b""))[:_HEADER_B_LEN]),
        unverified=unverified,
    )


def _scan_signature_values(message: bytes) -> list[bytes]:
    """DKIM-Signature values from a header section dkimpy cannot parse:
    fields and their continuation lines, anything else skipped."""
    match = _HEADER_SEPARATOR.search(message)
    head = message[: match.start()] if match else message
    values: list[bytes] = []
    current: list[bytes] | None = None
    for line in _LINE.split(head):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            values.append(b"\r\n".join(current))
            current = None
        name, colon, rest = line.partition(b":")
        if colon and name.strip().lower() == b"dkim-signature":
            current = [rest]
    if current is not None:
        values.append(b"\r\n".join(current))
    return values


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
