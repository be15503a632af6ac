"""Results recorded upstream, by a host we trust (RFC 8601 §5, §7.1).

An internal relay that already checked SPF and DKIM records its results in an
Authentication-Results field under its own authserv-id.  The milter uses
those results instead of checking again (the relay saw the real client; this
host only sees the relay) only when all of these hold:

* the field's authserv-id is configured as trusted
  (``headers.trusted_authserv_ids``), compared strictly: exact ASCII,
  case-insensitive (:func:`~dmarcmilter.authres.parse.trusted_id_key`);
* the SMTP client that handed us the message is in
  ``headers.trusted_upstream_networks``.  RFC 8601 §7.1 warns that any
  sender can write such a field; the id alone is a string anyone can type.
  Only a connection from the relay itself proves the field came through it
  (and the relay, per RFC 8601 §5, removed forgeries of its id);
* the id is not one of ours (configured, owned, the MTA's ``j`` name, the
  host name), checked per message: a field claiming our id is a forgery and
  is removed, never trusted, whatever the configuration says;
* for SPF, the ``smtp.mailfrom`` it records is the envelope MAIL FROM we
  received: a relay passes the reverse-path on unchanged, so a different
  one means the result is about another transaction, and SPF is checked
  here instead.

Anything else claiming to be a result is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

from .authres.parse import (
    AuthResSyntaxError,
    ResInfo,
    authserv_id_key,
    authserv_id_of,
    claims_authserv_id,
    parse,
    same_domain,
    trusted_id_key,
)
from .config import HeadersConfig
from .evaluation import Envelope, UpstreamResults
from .policy import client_in_networks
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
    """The key under which an authserv-id is compared with ours, to find
    fields to remove: broad, every spelling a consumer may read as the same
    id (:func:`~dmarcmilter.authres.parse.authserv_id_key`)."""
    return authserv_id_key(authserv_id)


def own_ids(*names: str | None) -> frozenset[str]:
    """The :func:`norm_id` keys of our authserv-ids, empty names left out."""
    return frozenset(key for key in (norm_id(n) for n in names if n) if key)


@dataclass(frozen=True, slots=True)
class UpstreamTrust:
    """Who may hand us results to use: the trusted authserv-ids (strict
    keys) and the client networks they must arrive from."""

    ids: frozenset[str] = frozenset()
    networks: tuple[str, ...] = ()  # CIDR

    @classmethod
    def from_config(cls, headers: HeadersConfig) -> UpstreamTrust:
        ids = (trusted_id_key(i) for i in headers.trusted_authserv_ids)
        return cls(
            frozenset(i for i in ids if i),
            headers.trusted_upstream_networks,
        )

    def client_trusted(self, client_ip: str) -> bool:
        return client_in_networks(client_ip, self.networks) is True


def upstream_results(
    headers: Iterable[tuple[str, str]],
    trust: UpstreamTrust,
    envelope: Envelope,
    owned: Set[str],
) -> UpstreamResults | None:
    """The results of the topmost Authentication-Results field that
    ``trust`` lets us use for this ``envelope`` (see the module docstring);
    None when there is none or it records neither SPF nor DKIM.  ``owned``
    holds the :func:`norm_id` keys of our own ids for this message."""
    if not trust.ids or not trust.client_trusted(envelope.client_ip):
        return None
    null_reverse_path = envelope.mail_from == ""
    for name, value in headers:
        if name.lower() != AUTHENTICATION_RESULTS:
            continue
        authserv_id = authserv_id_of(value)
        if authserv_id is None or trusted_id_key(authserv_id) not in trust.ids:
            continue
        if claims_authserv_id(authserv_id, owned):
            # Ours as well as trusted (say, the MTA's j name is listed): a
            # forgery of our results, removed by the act step.
            continue
        try:
            parsed = parse(value)
        except AuthResSyntaxError:
            continue
        if parsed.version not in (None, 1):
            continue  # RFC 8601 defines version 1 only; a later one may mean otherwise
        spf = _spf(parsed.results, envelope.mail_from, null_reverse_path)
        dkim = _dkim(parsed.results)
        if spf is None and dkim is None:
            continue
        return UpstreamResults(parsed.authserv_id, spf, dkim)
    return None


def _result(res: ResInfo) -> str:
    return _ALIASES.get(res.result, res.result)


def _spf(
    results: Iterable[ResInfo], envelope_from: str, null_reverse_path: bool
) -> SPFOutcome | None:
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
            if not same_reverse_path(mailfrom, envelope_from):
                # About another transaction's MAIL FROM: none of this
                # field's SPF results describe ours.
                return None
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


def same_reverse_path(recorded: str, envelope_from: str) -> bool:
    """Whether an A-R ``smtp.mailfrom`` names the envelope MAIL FROM.

    RFC 8601 §2.7.2 lets it be the whole address or only its domain.  The
    domain is compared as a domain name; a local-part, when recorded, exactly
    (RFC 5321 §2.4: it is case-sensitive).  The null reverse-path matches no
    recorded address (its SPF identity is the HELO name, RFC 7208 §2.4).
    """
    recorded = recorded.strip()
    if recorded.startswith("<") and recorded.endswith(">"):
        recorded = recorded[1:-1]
    if not envelope_from or not recorded:
        return False
    local, at, domain = recorded.rpartition("@")
    env_local, _, env_domain = envelope_from.rpartition("@")
    if at and local != env_local:
        return False
    return same_domain(domain, env_domain)
