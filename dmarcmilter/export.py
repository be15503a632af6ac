"""Plain-data views of an evaluation, for JSON output and structured logs.

Conversion happens here, at the edge; the core keeps frozen dataclasses.
"""

from __future__ import annotations

from typing import Any

from .dmarc import DKIMVerdict, DMARCOutcome, PolicyOverride
from .evaluation import Evaluation
from .policy import Decision
from .record import DMARCRecord
from .resolver import QueryLogEntry


def record_dict(record: DMARCRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "raw": record.raw,
        "status": record.status.value,
        "p": record.p.value,
        "sp": record.sp.value if record.sp else None,
        "np": record.np.value if record.np else None,
        "adkim": record.adkim.value,
        "aspf": record.aspf.value,
        "t": "y" if record.testing else "n",
        "pct": record.pct,
        "fo": record.fo,
        "psd": record.psd.value,
        "rua": list(record.rua),
        "ruf": list(record.ruf),
        "problems": list(record.problems),
    }


def reasons_list(reasons: tuple[PolicyOverride, ...]) -> list[dict[str, str]]:
    return [{"type": r.reason.value, "comment": r.comment} for r in reasons]


def _dkim(verdict: DKIMVerdict) -> dict[str, Any]:
    sig = verdict.signature
    return {
        "domain": sig.domain,
        "selector": sig.selector,
        "result": sig.result.value,
        "reason": sig.reason,
        "algorithm": sig.algorithm,
        "aligned": verdict.aligned,
        "alignment": verdict.alignment.value,
    }


def _dmarc(dmarc: DMARCOutcome, decision: Decision) -> dict[str, Any]:
    return {
        "result": dmarc.result.value,
        "policy": dmarc.policy.value if dmarc.policy else None,
        "requested_policy": (
            dmarc.discovery.requested_policy.value
            if dmarc.discovery and dmarc.discovery.requested_policy
            else None
        ),
        "policy_tag": dmarc.discovery.policy_tag if dmarc.discovery else None,
        "disposition": decision.disposition.value,
        "action": decision.action.value,
        "reason": dmarc.reason,
    }


def evaluation_dict(
    evaluation: Evaluation, decision: Decision, authentication_results: str
) -> dict[str, Any]:
    dmarc = evaluation.dmarc
    spf = dmarc.spf
    helo = evaluation.spf.helo
    return {
        "dmarc": _dmarc(dmarc, decision),
        "header_from": evaluation.author.domain,
        "author": {
            "status": evaluation.author.status.value,
            "addresses": list(evaluation.author.addresses),
            "reason": evaluation.author.reason,
        },
        "policy_domain": dmarc.policy_domain,
        "org_domain": dmarc.organizational_domain,
        "discovery_method": dmarc.discovery_method.value if dmarc.discovery_method else None,
        "record": record_dict(dmarc.record),
        "spf": {
            "result": spf.spf.result.value,
            "domain": spf.spf.domain,
            "scope": spf.spf.scope.value,
            "aligned": spf.aligned,
            "reason": spf.spf.reason,
        },
        "spf_helo": (
            {"result": helo.result.value, "domain": helo.domain} if helo is not None else None
        ),
        "dkim": [_dkim(v) for v in dmarc.dkim],
        "arc": {
            "result": evaluation.arc.result.value,
            "reason": evaluation.arc.reason,
            "sealers": list(evaluation.arc.sealing_domains),
        },
        "reasons": reasons_list(decision.reasons),
        "smtp_reply": str(decision.reply) if decision.reply else None,
        "authentication_results": authentication_results,
    }


def query_log(entries: list[QueryLogEntry]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        records: list[Any] = []
        for rec in e.records:
            if isinstance(rec, tuple) and all(isinstance(x, bytes) for x in rec):
                records.append(b"".join(rec).decode("utf-8", "replace"))
            elif isinstance(rec, tuple):
                records.append(list(rec))
            else:
                records.append(rec)
        out.append(
            {
                "name": e.qname,
                "type": e.rdtype,
                "status": e.status.value,
                "answers": records,
                "cached": e.cached,
            }
        )
    return out
