"""ARC chain validation (RFC 8617 §5.2) and the ARC sets, for logging and for
the trusted-sealer override of RFC 9989 §5.3 / RFC 8617 §7.2.

The chain is validated by dkimpy (RFC 8617 §5.2 steps 2 to 6: structure, the
newest ARC-Message-Signature, every ARC-Seal, the cv= sequence), with keys
fetched through our DNS session.  The outcome uses the RFC 8617 §4.4
vocabulary only: ``none`` (no ARC sets), ``pass`` or ``fail``.  Anything that
stops validation, a malformed set, more than 50 sets (§4.2.1), a sealer that
recorded cv=fail (§5.2 step 3), or a temporary DNS failure, is ``fail``: ARC
only ever grants an override, so failing closed withholds it and costs nothing
else.

Each ARC set is also read here into an :class:`ARCHop` (§4.1: the ARC-Seal's
d=, s= and cv=, the ARC-Message-Signature's d=, and the
ARC-Authentication-Results payload), even when the chain fails, so the log can
show who sealed what.  Only a ``pass`` chain is ever trusted by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import dkim
from dkim.canonicalization import Relaxed as RelaxedCanonicalization

from .authres.parse import AuthResSyntaxError, ResInfo, parse

# ARC uses DKIM's keys and signature algorithms (RFC 8617 §5.1, §5.2), so the
# crypto engine is DKIM's; tag lists are read by the shared taglist module.
from .dkim import ENGINE_LOGGER, FastVerifyMixin, load_key
from .domains import ascii_casefold
from .resolver import DNSFailure, DNSSession
from .results import ARCHop, ARCOutcome, ARCResultCode
from .taglist import domain_or_empty, header_text, loose_tags, unfold

__all__ = ["MAX_ARC_SETS", "hop_results", "trusted_hops", "verify_arc"]

# RFC 8617 §4.2.1: instance values run from 1 to 50.
MAX_ARC_SETS = 50

_SEAL = b"arc-seal"
_AMS = b"arc-message-signature"
_AAR = b"arc-authentication-results"
_ARC_FIELDS = (_SEAL, _AMS, _AAR)

_HAS_ARC = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:")
_HEADER_SEPARATOR = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"\r?\n")
# RFC 8617 §4.1.1: the AAR value starts with the instance tag.
_AAR_INSTANCE = re.compile(rb"^\s*i\s*=\s*([0-9]+)\s*;\s*")


class _Engine(FastVerifyMixin, dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC chain validation, with two steps replaced.

    ``verify_sig_process`` is the shared, cached one (the header section is
    canonicalised once for all the ARC signatures).  ``verify_sig`` loads keys
    through the parsed-key cache, and skips the ARC-Message-Signatures of
    older instances: dkimpy checks every AMS but only uses the newest one's
    result, as RFC 8617 §5.2 step 3 prescribes (older AMSs are expected to
    break as the message travels).  Skipping them saves a key lookup and an
    RSA operation per hop, and a DNS failure on a key that does not matter
    can no longer fail the chain.
    """

    newest = 0

    def sorted_arc_headers(self) -> tuple[int, list[tuple[int, tuple[bytes, bytes]]]]:
        # dkimpy's own version canonicalises the header section again; this
        # one reads the cached relaxed form.  Same contract: the ARC fields
        # with their instance, ordered by (instance, name, value) descending.
        found = []
        for name, value in self._canonical_headers(RelaxedCanonicalization):
            if name in _ARC_FIELDS:
                match = self.INSTANCE_RE.search(value)
                if match is not None:
                    found.append((int(match.group(1)), (name, value)))
        if not found:
            return 0, []
        found.sort(key=lambda item: (item[0], item[1][0], item[1][1].lower()))
        found.reverse()  # not sort(reverse=True): equal keys keep dkimpy's order
        return found[0][0], found

    def verify_sig(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: Sequence[bytes],
        dnsfunc: Callable[..., bytes | None],
    ) -> bool:
        if sig_header[0].lower() == b"arc-message-signature" and sig.get(b"i") != str(
            self.newest
        ).encode("ascii"):
            return False  # not used by the chain decision; see the class doc
        record = dnsfunc(sig[b"s"] + b"._domainkey." + sig[b"d"] + b".")
        key = load_key(record or b"")
        # RFC 8617 §4.1.2 allows rsa-sha256 only (dkimpy enforces the a=).
        if key.error or key.key_type != b"rsa" or not key.email:
            return False
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = key.key, key.bits, key.key_type, False
        return bool(self.verify_sig_process(sig, include_headers, sig_header, dnsfunc))


def verify_arc(message: bytes, session: DNSSession, *, min_key_bits: int = 1024) -> ARCOutcome:
    """Validate the ARC chain of ``message`` (CRLF form).  Never raises."""
    head = _header_section(message)
    if _HAS_ARC.search(head) is None:
        return ARCOutcome()
    engine: _Engine | None
    try:
        engine = _Engine(message, logger=ENGINE_LOGGER, minkey=min_key_bits)
        fields = [(n.lower(), v) for n, v in engine.headers]
    except Exception:
        # A header section dkimpy cannot parse: the chain fails below, but the
        # hops are still read, leniently, for the log.
        engine = None
        fields = _header_fields(head)
    try:
        sets, problem = _read_sets(fields)
        hops = tuple(_hop(n, sets[n]) for n in sorted(sets))
    except Exception:  # the never-raise guarantee: any input bytes
        return ARCOutcome(ARCResultCode.FAIL, "unreadable ARC header fields")
    if engine is None or problem:
        return ARCOutcome(ARCResultCode.FAIL, problem or "malformed header section", hops)
    try:
        engine.newest = max(sets, default=0)
        cv, _, reason = engine.verify(dnsfunc=session.txt_for_dkim)
    except DNSFailure as exc:
        return ARCOutcome(ARCResultCode.FAIL, f"temporary DNS failure: {_short(str(exc))}", hops)
    except dkim.DKIMException as exc:
        return ARCOutcome(ARCResultCode.FAIL, _short(str(exc)), hops)
    except Exception as exc:
        # dkimpy trips over some malformed sets with a plain IndexError or
        # KeyError (e.g. an AMS whose i= is not written " i=N;").
        return ARCOutcome(ARCResultCode.FAIL, f"malformed ARC set ({type(exc).__name__})", hops)
    if cv == dkim.CV_Pass:
        return ARCOutcome(ARCResultCode.PASS, "", hops)
    if cv == dkim.CV_None:
        return ARCOutcome(ARCResultCode.NONE, _short(str(reason)), hops)
    # CV_Fail, or None for a chain a sealer already declared failed.
    return ARCOutcome(ARCResultCode.FAIL, _short(str(reason)), hops)


def _header_section(message: bytes) -> bytes:
    match = _HEADER_SEPARATOR.search(message)
    return message[: match.start()] if match else message


def _read_sets(
    fields: list[tuple[bytes, bytes]],
) -> tuple[dict[int, dict[bytes, dict[bytes, bytes] | bytes]], str]:
    """The ARC fields by instance (tags of the seal and the AMS, the unfolded
    AAR value), and the structural problem found before any cryptography
    (RFC 8617 §5.2 step 2), if any."""
    sets: dict[int, dict[bytes, dict[bytes, bytes] | bytes]] = {}
    problem = ""
    for name, value in fields:
        if name not in _ARC_FIELDS:
            continue
        parsed: dict[bytes, bytes] | bytes
        if name == _AAR:
            parsed = unfold(value)
            match = _AAR_INSTANCE.match(parsed)
            text = match.group(1) if match else b""
        else:
            parsed = loose_tags(value)
            text = parsed.get(b"i", b"")
        instance = int(text) if text.isdigit() and len(text) <= 4 else 0
        if instance < 1:
            problem = problem or f"{_name(name)} without a valid instance tag"
            continue
        if instance > MAX_ARC_SETS:
            problem = problem or f"more than {MAX_ARC_SETS} ARC sets"
            continue
        found = sets.setdefault(instance, {})
        if name in found:
            problem = problem or f"duplicate {_name(name)} for instance {instance}"
            continue
        found[name] = parsed
    return sets, problem


def _header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, folded value) for each field of a header section;
    lines that are neither a field nor a continuation are skipped."""
    fields: list[tuple[bytes, bytes]] = []
    for line in _LINE.split(head):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
            continue
        name, colon, rest = line.partition(b":")
        if colon:
            fields.append((name.strip().lower(), rest))
    return fields


def _hop(instance: int, found: dict[bytes, dict[bytes, bytes] | bytes]) -> ARCHop:
    seal = found.get(_SEAL, {})
    ams = found.get(_AMS, {})
    aar = found.get(_AAR, b"")
    assert isinstance(seal, dict) and isinstance(ams, dict) and isinstance(aar, bytes)
    match = _AAR_INSTANCE.match(aar)
    payload = aar[match.end() :] if match else aar
    return ARCHop(
        instance=instance,
        sealer_domain=domain_or_empty(seal.get(b"d", b"")),
        sealer_selector=header_text(seal.get(b"s", b"")),
        cv=header_text(seal.get(b"cv", b"")).lower(),
        ams_domain=domain_or_empty(ams.get(b"d", b"")),
        authentication_results=header_text(payload),
    )


def _name(name: bytes) -> str:
    return {_SEAL: "ARC-Seal", _AMS: "ARC-Message-Signature"}.get(
        name, "ARC-Authentication-Results"
    )


def _short(text: str) -> str:
    return text if len(text) <= 160 else text[:157] + "..."


def trusted_hops(outcome: ARCOutcome, trusted: Sequence[str]) -> tuple[ARCHop, ...]:
    """The hops whose results may vouch for the message, newest first: with
    a validated chain (cv=pass), the newest hop and each older one down to
    the first not sealed by a ``trusted`` sealer (RFC 8617 §7.2 leaves whom
    to trust to local policy).

    A trusted sealer's results describe the message as it reached that
    sealer.  An untrusted hop after it may have rewritten the message and
    sealed it again with a valid chain (cv=pass only says each sealer
    signed what it received), so an older trusted hop vouches only when
    every later hop is trusted too.  Sealer names compare as DNS names
    (ASCII case-insensitive, trailing dot ignored), never more loosely.
    """
    if outcome.result is not ARCResultCode.PASS or not trusted:
        return ()
    names = {ascii_casefold(name) for name in trusted}
    hops: list[ARCHop] = []
    for hop in reversed(outcome.hops):
        if not hop.sealer_domain or ascii_casefold(hop.sealer_domain) not in names:
            break
        hops.append(hop)
    return tuple(hops)


def hop_results(hop: ARCHop) -> tuple[ResInfo, ...]:
    """The results a hop recorded in its ARC-Authentication-Results (RFC 8617
    §4.1.1: the A-R syntax after ``i=N;``); none when they do not parse."""
    try:
        return parse(hop.authentication_results).results
    except AuthResSyntaxError:
        return ()
