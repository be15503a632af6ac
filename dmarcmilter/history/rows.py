"""Conversion at the edge: an evaluation and its decision → one history row.

:func:`message_row` returns a plain, JSON-serialisable dict: the exact shape
the writer spools as one JSON line and later inserts, so a spooled line and a
stored row can never disagree.  :func:`message_from_row` turns such a dict
back into ORM objects for insertion.  No other module converts.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from ..dmarc import Alignment, DKIMVerdict
from ..evaluation import Evaluation
from ..policy import Decision
from ..results import DKIMResultCode
from .models import DKIMResultRow, MessageRow, OverrideReasonRow

# The keys of a row dict that are not columns of ``messages``.
CHILD_KEYS = ("dkim_results", "override_reasons")


def new_idempotency_key() -> str:
    """A fresh row key: 32 hex digits, unique without coordination."""
    return uuid.uuid4().hex


def message_row(
    evaluation: Evaluation, decision: Decision, *, key: str | None = None
) -> dict[str, Any]:
    """The history row for one evaluated message.

    ``key`` is the idempotency key; a new one is made when it is None.  The
    timestamp is ISO 8601 in UTC so the dict survives a JSON round trip.
    """
    env = evaluation.envelope
    dmarc = evaluation.dmarc
    record = dmarc.record
    spf = dmarc.spf.spf
    dkim = [_dkim(v) for v in _report_order(dmarc.dkim)]
    reasons = [{"type": r.reason.value, "comment": r.comment} for r in decision.reasons]
    method = dmarc.discovery_method
    return {
        "idempotency_key": key or new_idempotency_key(),
        "arrived_at": evaluation.evaluated_at.astimezone(dt.UTC).isoformat(),
        "queue_id": env.queue_id,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "envelope_from_domain": _address_domain(env.mail_from),
        # Only the first recipient: see the column's comment in models.py.
        "envelope_to_domain": _address_domain(env.rcpt_to[0]) if env.rcpt_to else None,
        "header_from_domain": evaluation.author.domain,
        "policy_domain": dmarc.policy_domain,
        "org_domain": dmarc.organizational_domain,
        "p": record.p.value if record else None,
        "sp": record.sp.value if record and record.sp else None,
        "np": record.np.value if record and record.np else None,
        "adkim": record.adkim.value if record else None,
        "aspf": record.aspf.value if record else None,
        "testing": ("y" if record.testing else "n") if record else None,
        "pct": record.pct if record else None,
        "fo": record.fo if record else None,
        "psd": record.psd.value if record else None,
        "discovery_method": method.value if method else None,
        "rua": ",".join(record.rua) if record else None,
        "ruf": ",".join(record.ruf) if record else None,
        "record_errors": "\n".join(record.problems) if record and record.problems else None,
        "dmarc_result": dmarc.result.value,
        "policy_evaluated": dmarc.policy.value if dmarc.policy else None,
        "disposition": decision.disposition.value,
        "dkim_aligned": dmarc.dkim_aligned,
        "spf_aligned": dmarc.spf_aligned,
        "spf_domain": spf.domain,
        "spf_scope": spf.scope.value,
        "spf_result": spf.result.value,
        "arc_result": evaluation.arc.result.value,
        "dkim_summary": _summary([d["domain"], d["selector"], d["result"]] for d in dkim),
        "reasons_summary": _summary([r["type"], r["comment"]] for r in reasons),
        "dkim_results": dkim,
        "override_reasons": reasons,
    }


def message_from_row(row: dict[str, Any]) -> MessageRow:
    """ORM objects (the message and its children) for a row dict."""
    columns = {k: v for k, v in row.items() if k not in CHILD_KEYS}
    arrived = columns["arrived_at"]
    if isinstance(arrived, str):
        arrived = dt.datetime.fromisoformat(arrived)
    # SQLite keeps the wall-clock text and drops the offset: store UTC only.
    columns["arrived_at"] = arrived.astimezone(dt.UTC)
    message = MessageRow(**columns)
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
        "domain": sig.domain,
        "selector": sig.selector,
        "result": sig.result.value,
        "human_result": sig.reason,
    }


def _report_order(verdicts: tuple[DKIMVerdict, ...]) -> list[DKIMVerdict]:
    """RFC 9990's order: strict-aligned passes, relaxed-aligned passes, other
    passes, then the rest; stable, so ties keep the message's order."""

    def rank(v: DKIMVerdict) -> int:
        if v.signature.result is not DKIMResultCode.PASS:
            return 3
        return {Alignment.STRICT: 0, Alignment.RELAXED: 1}.get(v.alignment, 2)

    return sorted(verdicts, key=rank)


def _summary(items: Any) -> str:
    # JSON of a list of lists: unambiguous whatever a selector or comment
    # contains, and byte-identical for identical results, so equal result
    # sets GROUP BY together.
    return json.dumps(list(items), separators=(",", ":"), ensure_ascii=False)


def _address_domain(address: str) -> str | None:
    """The domain of an envelope address; "" for the null reverse-path."""
    if not address:
        return ""
    _local, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    return domain.rstrip(".").lower()
