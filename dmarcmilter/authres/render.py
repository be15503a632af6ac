"""Authentication-Results rendering (RFC 8601; DMARC registrations RFC 9989
§9.1-9.2; header.b from RFC 6008).

One function turns an :class:`Evaluation` into the header field *value*:
``authserv-id; spf=...; dkim=... (one per signature); arc=...; dmarc=...``.
Property values are written as RFC 2045 tokens when they can be, and as
quoted-strings otherwise, so any parser can read them back.

Bounds: what one message can put into our header fields is capped, because
libmilter refuses a header field value of 64 KiB or more (its packet limit)
and the sender chooses most of what is written (DKIM d= and s=, HELO, MAIL
FROM, reasons taken from DNS).  At most :data:`MAX_LISTED_SIGNATURES`
signatures are listed, the rest summarised in a comment; every property
value is cut to :data:`MAX_VALUE_CHARS` and every reason to
:data:`MAX_REASON_CHARS` (before quoting).  :data:`MAX_RENDERED_CHARS` is
the resulting worst case, checked by a test against an evaluation built to
reach it.
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
# Signatures listed one by one; the others are counted in a comment.
MAX_LISTED_SIGNATURES = 8
# A property value (domain, selector, address, HELO, authserv-id): a domain
# name has at most 253 characters; longer is cut, with "..." at the end.
MAX_VALUE_CHARS = 256
# reason= text and comments.
MAX_REASON_CHARS = 200
# The longest Authentication-Results value render() can produce: quoting
# at most doubles a value (every character escaped) and adds two quotes.
_QUOTED_VALUE = 2 * MAX_VALUE_CHARS + 2
_REASON = len(" reason=") + 2 * MAX_REASON_CHARS + 2
_PROPERTY = len(" smtp.mailfrom=") + _QUOTED_VALUE
_METHOD = len(";\n\tdkim=temperror")
MAX_RENDERED_CHARS = (
    _QUOTED_VALUE  # authserv-id
    + 2 * (_METHOD + _REASON + _PROPERTY)  # spf: mfrom, helo
    + MAX_LISTED_SIGNATURES * (_METHOD + _REASON + 4 * _PROPERTY)  # dkim: d, s, a, b
    + len(" (99999999 more signatures not listed)")
    + _METHOD  # arc
    + _METHOD
    + _REASON
    + 2 * _PROPERTY  # dmarc: policy, header.from
)
# libmilter's limit on one packet (MILTER_MAX_DATA_SIZE), which must hold
# the field name and value.
MILTER_MAX_DATA = 65535
assert MAX_RENDERED_CHARS < MILTER_MAX_DATA // 2


# Anything outside printable ASCII (with or without tab), one character at
# a time, to be written as "?".
_NOT_PRINTABLE = re.compile(r"[^ -~]")
_NOT_PRINTABLE_OR_TAB = re.compile(r"[^ -~\t]")


def quote_value(value: str) -> str:
    """``value`` as an RFC 8601 pvalue.  Values come from the SMTP client
    (HELO, MAIL FROM) and from message headers (DKIM s=): anything outside
    printable ASCII (or tab) becomes "?", so the field is 7-bit clean whatever was
    sent, and never holds bytes that are not UTF-8 (which the milter library
    cannot send)."""
    value = _cut(_NOT_PRINTABLE_OR_TAB.sub("?", value))
    if _TOKEN.match(value) or _ADDRESS.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _reason(text: str) -> str:
    # Reasons come from DNS data and senders' headers: keep them printable
    # ASCII on one line, and short.
    clean = _NOT_PRINTABLE.sub("?", text.replace("\r\n", " "))
    return f"reason={quote_value(_cut(clean, MAX_REASON_CHARS))}"


def plain_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` as printable ASCII on one line, at most ``limit`` characters:
    for a value from the message or DNS put into free text (a header
    field, a quarantine reason)."""
    return _cut(_NOT_PRINTABLE.sub("?", text), limit)


def _cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(text) > limit:
        return text[: limit - 3] + "..."
    return text


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
    for sig in signatures[:MAX_LISTED_SIGNATURES]:
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
    if len(signatures) > MAX_LISTED_SIGNATURES:
        # A comment may follow any resinfo (RFC 8601 CFWS): the field stays
        # valid, and a reader still learns that there were more.
        unlisted = len(signatures) - MAX_LISTED_SIGNATURES
        results[-1] += f" ({unlisted} more signatures not listed)"

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
    return f"{quote_value(authserv_id)};{fold}" + f";{fold}".join(results)


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
    return clean[:MAX_REASON_CHARS].strip()
