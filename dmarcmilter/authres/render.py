"""Authentication-Results rendering (RFC 8601; DMARC registrations RFC 9989
§9.1-9.2; header.b from RFC 6008).

One function turns an :class:`Evaluation` into the header field *value*:
``authserv-id; spf=...; dkim=... (one per signature); arc=...; dmarc=...``.
Property values are written as RFC 2045 tokens when they can be, and as
quoted-strings otherwise, so any parser can read them back.
"""

from __future__ import annotations

import re

from ..dmarc import DMARCResultCode
from ..evaluation import Evaluation
from ..results import SPFResult

# RFC 2045 token: any CHAR except SPACE, CTLs and tspecials.
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
# RFC 8601 pvalue also admits [local-part "@"] domain-name unquoted.
_ADDRESS = re.compile(r"^[!#$%&'*+\-/=?^_`{|}~.0-9A-Za-z]*@[0-9A-Za-z._-]+$")
_MAX_REASON = 200


def quote_value(value: str) -> str:
    """``value`` as an RFC 8601 pvalue.  Values come from the SMTP client
    (HELO, MAIL FROM) and from message headers (DKIM s=): anything outside
    printable ASCII (or tab) becomes "?", so the field is 7-bit clean whatever was
    sent, and never holds bytes that are not UTF-8 (which the milter library
    cannot send)."""
    value = "".join(c if " " <= c <= "~" or c == "\t" else "?" for c in value)
    if _TOKEN.match(value) or _ADDRESS.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _reason(text: str) -> str:
    # Reasons come from DNS data and senders' headers: keep them printable
    # ASCII on one line, and short.
    clean = "".join(c if " " <= c <= "~" else "?" for c in text.replace("\r\n", " "))
    if len(clean) > _MAX_REASON:
        clean = clean[: _MAX_REASON - 3] + "..."
    return f"reason={quote_value(clean)}"


def _resinfo(method: str, result: str, reason: str = "", **props: str) -> str:
    parts = [f"{method}={result}"]
    if reason:
        parts.append(_reason(reason))
    parts.extend(f"{key.replace('_', '.')}={quote_value(val)}" for key, val in props.items() if val)
    return " ".join(parts)


def _spf_mfrom(spf: SPFResult, null_path: bool) -> str:
    # For the null reverse-path the checked identity is postmaster@HELO
    # (RFC 7208 §2.4); say so rather than invent a MAIL FROM domain.
    identity = spf.identity if null_path and spf.identity else spf.domain
    return _resinfo("spf", spf.result.value, "", smtp_mailfrom=identity)


def render(evaluation: Evaluation, authserv_id: str, fold: str = "\n\t") -> str:
    """The header value; ``fold`` joins the results (a line break plus WSP)."""
    results: list[str] = []
    spf = evaluation.spf
    if spf.mfrom.domain:
        results.append(_spf_mfrom(spf.mfrom, spf.null_reverse_path))
    else:
        results.append(_resinfo("spf", spf.mfrom.result.value, spf.mfrom.reason))
    if spf.helo is not None and not spf.null_reverse_path:
        results.append(_resinfo("spf", spf.helo.result.value, "", smtp_helo=spf.helo.domain))

    signatures = evaluation.dkim.signatures
    if not signatures:
        results.append("dkim=none")
    for sig in signatures:
        results.append(
            _resinfo(
                "dkim",
                sig.result.value,
                "" if sig.result.value == "pass" else sig.reason,
                header_d=sig.domain,
                header_s=sig.selector,
                header_a=sig.algorithm,
                header_b=sig.header_b,
            )
        )

    arc = evaluation.arc
    results.append(_resinfo("arc", arc.result.value))

    dmarc = evaluation.dmarc
    explain = (
        dmarc.result in (DMARCResultCode.TEMPERROR, DMARCResultCode.PERMERROR)
        or dmarc.malformed_from != ""
    )
    # policy.dmarc is the policy evaluated; with no verdict none was.
    verdict = dmarc.result in (DMARCResultCode.PASS, DMARCResultCode.FAIL)
    results.append(
        _resinfo(
            "dmarc",
            dmarc.result.value,
            dmarc.reason if explain else "",
            policy_dmarc=dmarc.policy.value if verdict and dmarc.policy is not None else "",
            header_from=dmarc.author_domain or "",
        )
    )
    return f"{authserv_id};{fold}" + f";{fold}".join(results)


def render_received_spf(evaluation: Evaluation, receiver: str) -> str:
    """A Received-SPF field value (RFC 7208 §9.1) for the MAIL FROM check
    (for a null reverse-path: the HELO identity, RFC 7208 §2.4)."""
    env = evaluation.envelope
    spf = evaluation.spf.mfrom
    comment = _comment(spf.reason or f"{receiver}: SPF {spf.result.value} for {spf.domain}")
    identity = "helo" if evaluation.spf.null_reverse_path else "mailfrom"
    pairs = [
        f"client-ip={env.client_ip}",
        f"envelope-from={quote_value(env.mail_from or spf.identity)}",
        f"helo={quote_value(env.helo)}" if env.helo else "",
        f"receiver={quote_value(receiver)}",
        f"identity={identity}",
    ]
    return f"{spf.result.value} ({comment}) " + "; ".join(p for p in pairs if p)


def _comment(text: str) -> str:
    # A comment may hold anything but unbalanced parentheses and
    # backslashes; keep it printable ASCII on one line, and short.
    clean = "".join(c if " " <= c <= "~" and c not in "()\\" else " " for c in text)
    return clean[:_MAX_REASON].strip()
