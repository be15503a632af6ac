"""SPF (RFC 7208) evaluation of the MAIL FROM and HELO identities.

DMARC uses the MAIL FROM result only (RFC 9989 §4.4); for a null
reverse-path that identity is postmaster@<HELO> (RFC 7208 §2.4).  The HELO
identity (RFC 7208 §2.3) is evaluated too, for Authentication-Results.

pyspf evaluates the policy language.  Its DNS goes through the message's
:class:`~dmarcmilter.resolver.DNSSession`, so SPF shares the process-wide cache,
the per-message time budget and the query log with every other check.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from dataclasses import dataclass, replace

import spf

from .domains import DomainError, normalize_domain
from .errors import DNSBudgetExceeded
from .resolver import DNSFailure, DNSSession, DNSStatus
from .results import SPFOutcome, SPFResult, SPFResultCode, SPFScope

__all__ = ["check_spf", "mail_from_domain"]

_REASON_MAX = 200
# The evaluated record kept on the result (RFC 6652 SPF-DNS in a failure
# report); a longer one is cut here (a TXT record may be 64 KB of the
# sender's choosing), and the history stores at most rows.MAX_TEXT_BYTES.
MAX_RECORD_CHARS = 2048
_RESULT_CODES = {code.value: code for code in SPFResultCode}
# pyspf prefixes its error texts; the result code already says as much.
_PYSPF_PREFIXES = ("SPF Permanent Error: ", "SPF Temporary Error: ")

# pyspf looks up the module-level spf.DNSLookup for every query and has no way
# to pass a resolver through, while the milter checks messages on several
# threads at once.  The hook therefore reads the session of the calling thread.
_local = threading.local()


class _BudgetSpent(spf.TempError):  # type: ignore[misc]
    """The message's DNS budget is spent.

    A DNS error for one name can legitimately be skipped (RFC 7208 §5.5); a
    spent budget must end the evaluation as temperror (RFC 7208 §4.6.4).
    """


def _dns_lookup(
    name: str, qtype: str, strict: object = True, timeout: object = None
) -> list[tuple[tuple[str, str], object]]:
    """Replacement for pyspf's DNS driver, returning what its dnspython driver
    returns: ``[((name, qtype), value), ...]`` with A/AAAA address text, MX
    ``(preference, exchange)``, PTR target and TXT a tuple of bytes strings.
    """
    # pyspf's per-query timeout is ignored: the session's per-query timeout
    # and per-message budget govern, so the two limits cannot disagree.
    del strict, timeout
    session: DNSSession | None = getattr(_local, "session", None)
    if session is None:
        # Never fall back to pyspf's own resolver behind the session's back.
        raise spf.TempError(f"no DNS session for {name}/{qtype}")
    if qtype == "SPF":
        # RFC 7208 §3.1 retired the SPF RR type; pyspf asks for it only in its
        # "harsh" mode, which is not used here.
        return []
    try:
        answer = session.query(name, qtype)
    except DNSBudgetExceeded as exc:
        raise _BudgetSpent(str(exc)) from exc
    except DNSFailure as exc:
        raise spf.TempError(str(exc)) from exc
    status = answer.status
    if status is DNSStatus.NOERROR:
        key = (name, qtype)
        return [(key, record) for record in answer.records]
    if status is DNSStatus.NODATA or status is DNSStatus.NXDOMAIN:
        return []
    if session.remaining() <= 0:
        raise _BudgetSpent(f"DNS time budget spent before {name}/{qtype}")
    detail = f" ({answer.detail})" if answer.detail else ""
    raise spf.TempError(f"DNS {status.value} for {name}/{qtype}{detail}")


spf.DNSLookup = _dns_lookup


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's evaluator with two departures that RFC 7208 asks for."""

    # The check_host() domain's own record, as found: the first record
    # pyspf looks up (include: and redirect= lookups come after it).
    top_record: str | None = None

    def dns_spf(self, domain: str) -> str | None:
        record: str | None = super().dns_spf(domain)
        if self.top_record is None:
            # A reference to pyspf's own string; only an oversized one is cut.
            self.top_record = record[:MAX_RECORD_CHARS] if record else ""
        return record

    def get_explanation(self, spec: str) -> None:
        # exp= only supplies the SMTP reply text of a fail (RFC 7208 §6.2),
        # which this milter never sends.  pyspf would fetch it on every
        # evaluation, pass included, spending a query and possibly a timeout
        # of the message's budget.  The exp= domain-spec is still
        # syntax-checked by pyspf before this is called, so results are the
        # same.
        del spec

    def validated_ptrs(self) -> list[str]:
        # RFC 7208 §5.5: a DNS error on the PTR lookup makes "ptr" not match,
        # and one on the A/AAAA lookup of a PTR name skips that name (§7.3:
        # the p macro becomes "unknown").  pyspf turns both into temperror.
        #
        # The PTR answer and the names in it belong to whoever controls the
        # client's reverse DNS, an attacker included: left alone, eleven
        # unanswered lookups here would spend the message's budget inside a
        # victim's SPF check and make it temperror.  So this work gets at most
        # one query timeout of the budget; past that, names are skipped as
        # if their lookups had failed.
        session: DNSSession = _local.session
        capped = session.capped(session.resolver.settings.query_timeout)
        _local.session = capped
        try:
            return self._validated_ptrs(capped)
        finally:
            _local.session = session

    def _validated_ptrs(self, capped: DNSSession) -> list[str]:
        try:
            names: list[str] = self.dns_ptr(self.i)
        except _BudgetSpent:
            if capped.spent_by_cap():
                return []
            raise
        except spf.TempError:
            return []
        validated = []
        for ptr_name in names[: spf.MAX_PTR]:
            try:
                addresses = self.dns_a(ptr_name, self.A)
            except _BudgetSpent:
                if capped.spent_by_cap():
                    break
                raise
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(ptr_name)
        return validated


@dataclass(frozen=True, slots=True)
class _Identity:
    """An identity ready for check_host(): ``problem`` set means result none."""

    sender: str  # <sender> of check_host(), local-part@domain
    local: str
    domain: str  # normalised; "" when there is none usable
    problem: str = ""


def mail_from_domain(helo: str, mail_from: str) -> str:
    """The domain check_host() is run on for the MAIL FROM identity (RFC 7208
    §2.4: the HELO name for a null reverse-path), normalised; "" when there
    is none.  No DNS: the evaluation uses it to tell whether this SPF result
    could matter to DMARC before any query is made."""
    return _mfrom_identity(helo.strip(), _reverse_path(mail_from))[0].domain


def _mfrom_identity(helo: str, reverse_path: str) -> tuple[_Identity, _Identity | None]:
    """The MAIL FROM identity and the HELO identity (None: no domain)."""
    helo_identity = _helo_identity(helo)
    if reverse_path:
        return _mail_from_identity(reverse_path), helo_identity
    # RFC 7208 §2.4: the MAIL FROM identity becomes postmaster@HELO.
    if helo_identity is None:
        return (
            _Identity(
                f"postmaster@{helo}" if helo else "",
                "postmaster",
                "",
                "null reverse-path and the HELO name is not a domain name",
            ),
            None,
        )
    return helo_identity, helo_identity


def check_spf(
    session: DNSSession,
    client_ip: str,
    helo: str,
    mail_from: str,
    *,
    check_helo: bool = True,
    mfrom: SPFResult | None = None,
) -> SPFOutcome:
    """Evaluate SPF for the MAIL FROM identity and, optionally, the HELO one.

    ``mail_from`` is the reverse-path as given by the MTA, with or without
    angle brackets; ``""`` or ``"<>"`` is the null reverse-path.  ``mfrom``
    is the MAIL FROM result when it was already evaluated (the evaluation
    checks a MAIL FROM that could align first, and HELO later).  Never raises
    for odd input: every problem is a result with a reason.  Raises
    ValueError only when ``client_ip`` is not an IP address.
    """
    ip = _client_ip(client_ip)
    helo = helo.strip()
    reverse_path = _reverse_path(mail_from)
    null_path = not reverse_path
    mfrom_identity, helo_identity = _mfrom_identity(helo, reverse_path)

    previous = getattr(_local, "session", None)
    _local.session = session
    try:
        if mfrom is None:
            mfrom = _evaluate(ip, helo, mfrom_identity, SPFScope.MFROM)
        helo_result = None
        if check_helo and helo_identity is not None:
            if null_path:
                # The same check_host() arguments: evaluate once.
                helo_result = replace(mfrom, scope=SPFScope.HELO)
            else:
                helo_result = _evaluate(ip, helo, helo_identity, SPFScope.HELO)
    finally:
        _local.session = previous
    return SPFOutcome(mfrom=mfrom, helo=helo_result, null_reverse_path=null_path)


def _client_ip(client_ip: str) -> str:
    if len(client_ip) <= _CACHEABLE_IP_CHARS:
        return _client_ip_cached(client_ip)
    return _parse_client_ip(client_ip)


# Clients come back, and one message checks two identities: the parsed
# address is kept for a few thousand of them (short texts only).
_CACHEABLE_IP_CHARS = 64


def _parse_client_ip(client_ip: str) -> str:
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid client IP address: {client_ip!r}") from None
    if isinstance(address, ipaddress.IPv6Address):
        # RFC 7208 §5: an IPv4-mapped IPv6 address is an IPv4 client.
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.scope_id:
            # A zone index is local to this host and means nothing to a policy.
            return str(ipaddress.IPv6Address(int(address)))
    return str(address)


_client_ip_cached = functools.lru_cache(maxsize=4096)(_parse_client_ip)


def _reverse_path(mail_from: str) -> str:
    text = mail_from.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.startswith("@") and ":" in text:
        # An obsolete source route, "@relay,@relay:mailbox" (RFC 5321 §4.1.2,
        # which says to ignore it).
        text = text.split(":", 1)[1]
    return text


def _mail_from_identity(reverse_path: str) -> _Identity:
    local, at, domain_text = reverse_path.rpartition("@")
    if not at:
        return _Identity(reverse_path, "", "", "MAIL FROM has no domain part")
    # RFC 7208 §4.3: an empty local-part is taken as "postmaster".
    local = local or "postmaster"
    domain, problem = _domain(domain_text)
    return _Identity(f"{local}@{domain or domain_text}", local, domain, problem)


def _helo_identity(helo: str) -> _Identity | None:
    """The HELO identity, or None when the HELO is not a domain name at all
    (empty, an address literal such as ``[192.0.2.1]``, or a bare address)."""
    if not helo or helo.startswith("["):
        return None
    if helo[0].isdigit() or ":" in helo:
        try:
            ipaddress.ip_address(helo)
        except ValueError:
            pass
        else:
            return None
    domain, problem = _domain(helo)
    return _Identity(f"postmaster@{domain or helo}", "postmaster", domain, problem)


def _domain(text: str) -> tuple[str, str]:
    """The normalised domain and, when check_host() must return none for it
    (RFC 7208 §4.3), why."""
    try:
        domain = normalize_domain(text)
    except DomainError as exc:
        return "", _clean(str(exc))
    if "." not in domain:
        return domain, f"{domain!r} is not a multi-label domain name"
    return domain, ""


def _evaluate(ip: str, helo: str, identity: _Identity, scope: SPFScope) -> SPFResult:
    if identity.problem:
        return SPFResult(
            SPFResultCode.NONE, identity.domain, scope, identity.problem, identity.sender
        )
    try:
        # strict=True is RFC 7208 processing (not pyspf's lax or "harsh" modes);
        # querytime=0 keeps pyspf's own overall clock off, the session's budget
        # being the one time limit.
        query = _Query(i=ip, s=identity.sender, h=helo, strict=True, querytime=0)
        # pyspf splits the sender at the first "@"; a quoted local-part may
        # contain one, so set the macro values from our own parse.
        query.l = identity.local
        query.o = query.d = identity.domain
        # check() itself turns TempError and PermError into results.
        result, _code, text = query.check()
    except Exception as exc:
        # An oddity pyspf does not handle itself: a broken policy, not a
        # transient condition, so retrying would not help.
        return SPFResult(
            SPFResultCode.PERMERROR,
            identity.domain,
            scope,
            _clean(f"SPF evaluation failed: {type(exc).__name__}: {exc}"),
            identity.sender,
        )
    code = _RESULT_CODES.get(result)
    if code is None:
        return SPFResult(
            SPFResultCode.PERMERROR,
            identity.domain,
            scope,
            _clean(f"unexpected SPF result {result!r}"),
            identity.sender,
        )
    return SPFResult(
        code,
        identity.domain,
        scope,
        _reason(code, query, text, identity),
        identity.sender,
        _clean_record(query.top_record or ""),
    )


def _reason(code: SPFResultCode, query: _Query, text: str, identity: _Identity) -> str:
    if code is SPFResultCode.TEMPERROR or code is SPFResultCode.PERMERROR:
        for prefix in _PYSPF_PREFIXES:
            if text.startswith(prefix):
                text = text[len(prefix) :]
                break
        return _clean(text)
    if code is SPFResultCode.NONE:
        return f"no SPF record for {identity.domain}"
    mechanism = query.mechanism
    if mechanism:
        return _clean(f"matched {mechanism}")
    return "no mechanism matched"


def _clean_record(record: str) -> str:
    # pyspf hands an SPF record over only when it is ASCII; control
    # characters are still possible and must not reach a report header.
    if record.isprintable():
        return record
    return "".join(ch if " " <= ch <= "~" else "?" for ch in record)


def _clean(text: str) -> str:
    """Printable ASCII, bounded: policy text is third-party input and reasons
    end up in logs and header comments."""
    if not (text.isascii() and text.isprintable()):
        text = "".join(
            ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in text
        )
    if len(text) > _REASON_MAX:
        text = text[: _REASON_MAX - 3] + "..."
    return text
