"""Conversion at the edge: an evaluation and its decision → one history row.

:func:`message_row` returns a plain, JSON-serialisable dict: the exact shape
the writer spools as one JSON line and later inserts, so a spooled line and a
stored row can never disagree.  :func:`message_from_row` turns such a dict
back into ORM objects for insertion.  No other module converts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import operator
import os
import time
from typing import Any

from ..dmarc import Alignment, DKIMVerdict
from ..evaluation import Evaluation
from ..policy import Decision
from ..record import DMARCRecord
from ..results import DKIMResultCode
from .models import DKIMResultRow, MessageRow, OverrideReasonRow

# The keys of a row dict that are columns of ``messages``; the rest
# (dkim_results, override_reasons) are its child rows.
MESSAGE_COLUMNS = tuple(c.name for c in MessageRow.__table__.columns if c.name != "id")


def new_idempotency_key() -> str:
    """A fresh row key: 32 hex digits, unique without coordination.

    The first 12 digits are the time in milliseconds and the other 20 are
    random (80 bits), as in a UUIDv7: new keys sort after old ones, so the
    unique index grows at its end instead of being written all over, which
    keeps inserts fast in a table of many millions of rows.
    """
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def message_row(
    evaluation: Evaluation, decision: Decision, *, key: str | None = None
) -> dict[str, Any]:
    """The history row for one evaluated message.

    ``key`` is the idempotency key; a new one is made when it is None.  The
    timestamp is ISO 8601 in UTC so the dict survives a JSON round trip.
    This runs once per message on the writer thread, so it avoids rework:
    the columns that come from the DMARC record are built once per record.
    """
    env = evaluation.envelope
    dmarc = evaluation.dmarc
    spf = dmarc.spf.spf
    dkim = [_dkim(v) for v in _report_order(dmarc.dkim)]
    reasons = [{"type": r.reason.value, "comment": _text(r.comment)} for r in decision.reasons]
    method = dmarc.discovery_method
    policy = dmarc.policy
    row = {
        "idempotency_key": key or new_idempotency_key(),
        "arrived_at": evaluation.evaluated_at.astimezone(dt.UTC).isoformat(),
        "queue_id": _text(env.queue_id),
        # A link-local zone ("fe80::1%eth0") is local detail, and RFC 9990
        # source_ip is an RFC 3986 address, which has no zone.
        "client_ip": env.client_ip.partition("%")[0],
        "helo": _text(env.helo),
        "envelope_from_domain": _address_domain(env.mail_from),
        # Only the first recipient: see the column's comment in models.py.
        "envelope_to_domain": _address_domain(env.rcpt_to[0]) if env.rcpt_to else None,
        # For a malformed From, the recovered domain whose policy applied.
        "header_from_domain": evaluation.author.domain or dmarc.author_domain,
        "policy_domain": dmarc.policy_domain,
        "org_domain": dmarc.organizational_domain,
        **_record_columns(dmarc.record),
        "discovery_method": method.value if method else None,
        "dmarc_result": dmarc.result.value,
        "policy_evaluated": policy.value if policy else None,
        "disposition": decision.disposition.value,
        "dkim_aligned": dmarc.dkim_aligned,
        "spf_aligned": dmarc.spf_aligned,
        "spf_domain": _text(spf.domain),
        "spf_scope": spf.scope.value,
        "spf_result": spf.result.value,
        "arc_result": evaluation.arc.result.value,
        "dkim_summary": _summary([[d["domain"], d["selector"], d["result"]] for d in dkim]),
        "reasons_summary": _summary([[r["type"], r["comment"]] for r in reasons]),
        "dkim_results": dkim,
        "override_reasons": reasons,
    }
    row["record_key"] = record_key(row)
    return row


# What makes two messages one RFC 9990 <record>: the row, the identifiers
# except envelope_to (optional in reports, so grouped by only on request),
# the auth_results and the published policy they were evaluated under.
RECORD_KEY_COLUMNS = (
    "client_ip",
    "disposition",
    "dkim_aligned",
    "spf_aligned",
    "reasons_summary",
    "header_from_domain",
    "envelope_from_domain",
    "dkim_summary",
    "spf_domain",
    "spf_scope",
    "spf_result",
    "discovery_method",
    "p",
    "sp",
    "np",
    "adkim",
    "aspf",
    "testing",
    "fo",
    "psd",
    "pct",
    "rua",
)


def record_key(row: dict[str, Any]) -> str:
    """A 128-bit digest of the columns that make a report record.

    Grouping a day's messages by these twenty-two columns makes the
    database sort every message by all of them; grouping by one short key
    is several times faster (measured: 6.3 s against 2 s for a million
    messages on SQLite).  The values are strings, integers, booleans and
    None, whose repr is unambiguous and the cheapest serialisation.
    """
    data = repr(_record_key_values(row)).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_record_key_values = operator.itemgetter(*RECORD_KEY_COLUMNS)


_NO_RECORD: dict[str, Any] = dict.fromkeys(
    ("p", "sp", "np", "adkim", "aspf", "testing", "pct", "fo", "psd", "rua", "ruf", "record_errors")
)
# Records are parsed once per text and shared; so are their columns.
_record_cache: dict[str, dict[str, Any]] = {}
_RECORD_CACHE_SIZE = 10_000


def _record_columns(record: DMARCRecord | None) -> dict[str, Any]:
    if record is None:
        return _NO_RECORD
    columns = _record_cache.get(record.raw)
    if columns is None:
        columns = {
            "p": record.p.value,
            "sp": record.sp.value if record.sp else None,
            "np": record.np.value if record.np else None,
            "adkim": record.adkim.value,
            "aspf": record.aspf.value,
            "testing": "y" if record.testing else "n",
            "pct": record.pct,
            "fo": record.fo,
            "psd": record.psd.value,
            # From DNS, so possibly not UTF-8: see _text.
            "rua": _text(",".join(record.rua)),
            "ruf": _text(",".join(record.ruf)),
            "record_errors": _text("\n".join(record.problems)) if record.problems else None,
        }
        if len(_record_cache) >= _RECORD_CACHE_SIZE:
            _record_cache.clear()
        _record_cache[record.raw] = columns
    return columns


def message_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The ``messages`` columns of a row dict, ready for an INSERT.

    Raises KeyError, TypeError or ValueError for a dict that is not a row
    (a damaged spool line), so the writer can set it aside.
    """
    columns = {k: row[k] for k in MESSAGE_COLUMNS}
    columns["arrived_at"] = utc_timestamp(columns["arrived_at"])
    return columns


def utc_timestamp(value: Any) -> dt.datetime:
    """A row's ``arrived_at`` (ISO 8601 text or datetime) as an aware UTC
    datetime; ValueError for anything else."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise ValueError(f"arrived_at must be an aware timestamp, got {value!r}")
    # SQLite keeps the wall-clock text and drops the offset: store UTC only.
    return value.astimezone(dt.UTC)


def message_from_row(row: dict[str, Any]) -> MessageRow:
    """ORM objects (the message and its children) for a row dict."""
    message = MessageRow(**message_columns(row))
    message.dkim_results = [
        DKIMResultRow(position=i, **d) for i, d in enumerate(row.get("dkim_results", ()))
    ]
    message.override_reasons = [
        OverrideReasonRow(position=i, **r) for i, r in enumerate(row.get("override_reasons", ()))
    ]
    return message


def _dkim(verdict: DKIMVerdict) -> dict[str, str]:
    sig = verdict.signature
    return {
        "domain": _text(sig.domain),
        "selector": _text(sig.selector),
        "result": sig.result.value,
        "human_result": _text(sig.reason),
    }


def _report_order(verdicts: tuple[DKIMVerdict, ...]) -> list[DKIMVerdict]:
    """RFC 9990's order: strict-aligned passes, relaxed-aligned passes, other
    passes, then the rest; stable, so ties keep the message's order."""

    def rank(v: DKIMVerdict) -> int:
        if v.signature.result is not DKIMResultCode.PASS:
            return 3
        return {Alignment.STRICT: 0, Alignment.RELAXED: 1}.get(v.alignment, 2)

    return sorted(verdicts, key=rank) if len(verdicts) > 1 else list(verdicts)


# JSON of a list of lists: unambiguous whatever a selector or comment
# contains, and byte-identical for identical results, so equal result sets
# GROUP BY together.
_encode_summary = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _summary(items: list[list[str]]) -> str:
    return _encode_summary(items) if items else "[]"


def _text(value: str) -> str:
    """Text that came from the SMTP client or a message header, made safe
    for any database: bytes that were not UTF-8 reach us as lone surrogates
    (surrogateescape), which no driver can encode; they become U+FFFD."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _address_domain(address: str) -> str | None:
    """The domain of an envelope address; "" for the null reverse-path."""
    if not address:
        return ""
    _local, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    return _text(domain.rstrip(".").lower())
