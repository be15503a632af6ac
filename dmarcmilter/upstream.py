"""Results recorded upstream, by a host we trust (RFC 8601 §5, §7.1).

An internal relay that already checked SPF and DKIM records its results in an
Authentication-Results field under its own authserv-id.  When that id is
configured as trusted, the milter uses those results instead of checking
again (the relay saw the real client; this host only sees the relay).
Anything else claiming to be a result is ignored: RFC 8601 §7.1 warns that
any sender can write such a field, which is why the trusted relay must remove
fields carrying its own id (as this milter does for ours).
"""

from __future__ import annotations

from collections.abc import Iterable, Set

from .authres.parse import AuthResSyntaxError, ResInfo, authserv_id_of, parse
from .domains import ascii_casefold
from .evaluation import UpstreamResults
from .results import (
    DKIMOutcome,
    DKIMResultCode,
    DKIMSignatureResult,
    SPFOutcome,
    SPFResult,
    SPFResultCode,
    SPFScope,
)

AUTHENTICATION_RESULTS = "authentication-results"

# Result names seen in the wild for the registered ones (OpenDMARC writes
# "tempfail" for temperror; old software "hardfail" for fail).
_ALIASES = {"tempfail": "temperror", "hardfail": "fail", "permfail": "permerror"}


def norm_id(authserv_id: str) -> str:
    """An authserv-id for comparison: case-insensitive in ASCII only."""
    return ascii_casefold(authserv_id)


def upstream_results(
    headers: Iterable[tuple[str, str]], trusted: Set[str], null_reverse_path: bool
) -> UpstreamResults | None:
    """The results of the topmost Authentication-Results field whose
    authserv-id is in ``trusted`` (normalised with :func:`norm_id`); None
    when there is none or it records neither SPF nor DKIM."""
    if not trusted:
        return None
    for name, value in headers:
        if name.lower() != AUTHENTICATION_RESULTS:
            continue
        authserv_id = authserv_id_of(value)
        if authserv_id is None or norm_id(authserv_id) not in trusted:
            continue
        try:
            parsed = parse(value)
        except AuthResSyntaxError:
            continue
        if parsed.version not in (None, 1):
            continue  # RFC 8601 defines version 1 only; a later one may mean otherwise
        spf = _spf(parsed.results, null_reverse_path)
        dkim = _dkim(parsed.results)
        if spf is None and dkim is None:
            continue
        return UpstreamResults(parsed.authserv_id, spf, dkim)
    return None


def _result(res: ResInfo) -> str:
    return _ALIASES.get(res.result, res.result)


def _spf(results: Iterable[ResInfo], null_reverse_path: bool) -> SPFOutcome | None:
    mfrom: SPFResult | None = None
    helo: SPFResult | None = None
    for res in results:
        if res.method != "spf":
            continue
        try:
            code = SPFResultCode(_result(res))
        except ValueError:
            continue  # "policy" or unknown: check ourselves instead
        mailfrom = res.get("smtp.mailfrom")
        helo_name = res.get("smtp.helo")
        if mailfrom and mfrom is None:
            domain = mailfrom.rpartition("@")[2].rstrip(".").lower()
            mfrom = SPFResult(code, domain, SPFScope.MFROM, res.reason or "", mailfrom)
        elif helo_name and helo is None:
            name = helo_name.rstrip(".").lower()
            helo = SPFResult(code, name, SPFScope.HELO, res.reason or "", f"postmaster@{name}")
    if mfrom is None:
        if helo is not None and null_reverse_path:
            # RFC 7208 §2.4: for the null reverse-path, the HELO identity is
            # the MAIL FROM identity.
            return SPFOutcome(helo, None, null_reverse_path=True)
        return None
    return SPFOutcome(mfrom, helo, null_reverse_path=null_reverse_path)


def _dkim(results: Iterable[ResInfo]) -> DKIMOutcome | None:
    signatures: list[DKIMSignatureResult] = []
    seen = False
    for res in results:
        if res.method != "dkim":
            continue
        try:
            code = DKIMResultCode(_result(res))
        except ValueError:
            continue
        seen = True
        if code is DKIMResultCode.NONE:
            continue  # checked, no signature
        signatures.append(
            DKIMSignatureResult(
                domain=(res.get("header.d") or "").rstrip(".").lower(),
                selector=res.get("header.s") or "",
                result=code,
                reason=res.reason or "",
                algorithm=res.get("header.a") or "",
                identity=res.get("header.i") or "",
                header_b=res.get("header.b") or "",
            )
        )
    return DKIMOutcome(tuple(signatures)) if seen else None
