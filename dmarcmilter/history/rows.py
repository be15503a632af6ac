"""Conversion at the edge: an evaluation and its decision → one history row.

:func:`message_row` returns a plain, JSON-serialisable dict: the exact shape
the writer journals as one JSON line and inserts, so a journal line and a
stored row can never disagree.  :func:`message_from_row` turns such a dict
back into ORM objects for insertion.  No other module converts.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import operator
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from ..authres.render import render
from ..config import FailureReportsConfig
from ..dmarc import Alignment, DKIMVerdict
from ..evaluation import Evaluation
from ..policy import Action, Decision
from ..record import DMARCRecord, PSDFlag
from ..report.failure import FailureKind, failure_reports_due
from ..report.failure_mail import (
    DeliveryResult,
    FailedSignature,
    FailureIncident,
    incident_from_evaluation,
)
from ..results import DKIMResultCode
from .models import DKIMResultRow, MessageRow, OverrideReasonRow

# What a row stores of a value an attacker chooses (his DNS, his SMTP
# dialogue, his headers), in UTF-8 bytes.  A value past its cap is cut and
# ends with TRUNCATED; a list is cut between items and says how many were
# left out.  Honest values are far below every cap; without them one 60 KB
# DMARC record or HELO name would be copied into every row of the history.
MAX_NAME_BYTES = 255  # helo, queue_id, envelope and SPF domains, DKIM d= and s=
MAX_TEXT_BYTES = 512  # free text: a DKIM result's reason, an override comment
MAX_URI_LIST_BYTES = 2048  # rua and ruf: whole URIs only, never a cut address
MAX_ERRORS_BYTES = 2048  # record_errors: whole problem lines
MAX_DKIM_RESULTS = 20  # DKIM results per row, in report order (aligned passes first)
TRUNCATED = " [truncated]"

# The keys of a row dict that are columns of ``messages``; the rest
# (dkim_results, override_reasons) are its child rows.
MESSAGE_COLUMNS = tuple(c.name for c in MessageRow.__table__.columns if c.name != "id")
# Columns added after rows were first journaled, with the value a line
# written before them stands for: a journal left by an earlier version
# replays whole.
LATER_COLUMNS: dict[str, Any] = {"mailing_list": False}


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
    This runs once per message on the milter's thread (the writer's
    enqueue journals the row before the message is answered), so it avoids rework:
    the columns that come from the DMARC record are built once per record.
    """
    env = evaluation.envelope
    dmarc = evaluation.dmarc
    spf = dmarc.spf.spf
    dkim = _dkim_results(_report_order(dmarc.dkim))
    reasons = [
        {"type": r.reason.value, "comment": _stored(r.comment, MAX_TEXT_BYTES)}
        for r in decision.reasons
    ]
    method = dmarc.discovery_method
    policy = dmarc.policy
    row = {
        "idempotency_key": key or new_idempotency_key(),
        "arrived_at": evaluation.evaluated_at.astimezone(dt.UTC).isoformat(),
        "queue_id": _stored(env.queue_id, MAX_NAME_BYTES),
        # A link-local zone ("fe80::1%eth0") is local detail, and RFC 9990
        # source_ip is an RFC 3986 address, which has no zone.
        "client_ip": env.client_ip.partition("%")[0],
        "helo": _stored(env.helo, MAX_NAME_BYTES),
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
        "spf_domain": _stored(spf.domain, MAX_NAME_BYTES),
        "spf_scope": spf.scope.value,
        "spf_result": spf.result.value,
        "arc_result": evaluation.arc.result.value,
        "mailing_list": evaluation.mailing_list,
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
# Records are parsed once per text and shared; so are their columns.  Only
# records of an honest size are kept: the cache is keyed by the record's
# text, and 10,000 keys of 60 KB would be 600 MB an attacker chose.
_record_cache: dict[str, dict[str, Any]] = {}
_RECORD_CACHE_SIZE = 10_000
# A record longer than this is not cached (honest records are < 300).
LARGE_RECORD_CHARS = 1024


def _record_columns(record: DMARCRecord | None) -> dict[str, Any]:
    if record is None:
        return _NO_RECORD
    columns = _record_cache.get(record.raw)
    if columns is None:
        rua, rua_left = _uri_list(record.rua)
        ruf, ruf_left = _uri_list(record.ruf)
        problems = list(record.problems)
        # Said where a reader of the history (and of the report's errors) sees it.
        if rua_left:
            problems.insert(0, f"rua: {rua_left} more URIs not stored")
        if ruf_left:
            problems.insert(0, f"ruf: {ruf_left} more URIs not stored")
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
            "rua": rua,
            "ruf": ruf,
            "record_errors": _lines(problems, MAX_ERRORS_BYTES) if problems else None,
        }
        if len(record.raw) <= LARGE_RECORD_CHARS:
            if len(_record_cache) >= _RECORD_CACHE_SIZE:
                _record_cache.clear()
            _record_cache[record.raw] = columns
    return columns


def _uri_list(uris: tuple[str, ...]) -> tuple[str, int]:
    """The comma-joined URIs that fit MAX_URI_LIST_BYTES, in published
    order, and how many were left out.  A URI is kept whole or not at all:
    a cut ``mailto:`` could name another mailbox, and the report job would
    send to it."""
    kept: list[str] = []
    size = 0
    for n, uri in enumerate(uris):
        uri = _text(uri)
        size += len(uri.encode("utf-8")) + (1 if kept else 0)
        if size > MAX_URI_LIST_BYTES:
            return ",".join(kept), len(uris) - n
        kept.append(uri)
    return ",".join(kept), 0


def _lines(lines: list[str], limit: int) -> str:
    """Newline-joined ``lines``, each capped, cut between lines to ``limit``
    bytes with a last line saying how many were left out."""
    kept: list[str] = []
    size = 0
    room = limit - 40  # for the closing line
    for n, line in enumerate(lines):
        line = _stored(line, MAX_TEXT_BYTES)
        size += len(line.encode("utf-8")) + (1 if kept else 0)
        if size > room:
            kept.append(f"[{len(lines) - n} more not stored]")
            break
        kept.append(line)
    return "\n".join(kept)


def message_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The ``messages`` columns of a row dict, ready for an INSERT.

    Raises KeyError, TypeError or ValueError for a dict that is not a row
    (a damaged journal line), so the writer can set it aside.
    """
    columns = {k: row[k] if k in row else LATER_COLUMNS[k] for k in MESSAGE_COLUMNS}
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


def _dkim_results(verdicts: list[DKIMVerdict]) -> list[dict[str, str]]:
    """The DKIM child rows: at most MAX_DKIM_RESULTS; the last one kept says
    how many more there were."""
    results = [_dkim(v) for v in verdicts[:MAX_DKIM_RESULTS]]
    left = len(verdicts) - MAX_DKIM_RESULTS
    if left > 0:
        last = results[-1]
        last["human_result"] = _stored(
            f"[{left} more signatures not stored] {last['human_result']}", MAX_TEXT_BYTES
        )
    return results


def _dkim(verdict: DKIMVerdict) -> dict[str, str]:
    sig = verdict.signature
    return {
        "domain": _stored(sig.domain, MAX_NAME_BYTES),
        "selector": _stored(sig.selector, MAX_NAME_BYTES),
        "result": sig.result.value,
        "human_result": _stored(sig.reason, MAX_TEXT_BYTES),
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


def _stored(value: str, limit: int) -> str:
    """``value`` as a row stores it: database-safe (see _text) and at most
    ``limit`` UTF-8 bytes, ending with TRUNCATED when it was cut."""
    value = _text(value)
    if len(value) <= limit // 4:
        return value  # no character is more than four bytes
    data = value.encode("utf-8")
    if len(data) <= limit:
        return value
    return data[: limit - len(TRUNCATED)].decode("utf-8", "ignore") + TRUNCATED


def _address_domain(address: str) -> str | None:
    """The domain of an envelope address; "" for the null reverse-path."""
    if not address:
        return ""
    _local, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    return _stored(domain.rstrip(".").lower(), MAX_NAME_BYTES)


# -- failure-report samples -------------------------------------------------------------

# What a failure incident stores of the message, in bytes or count; past a
# cap the rest is left out, and the stored sample says so (``cut``), which
# the report's text part repeats.  The header cap is the milter's own
# (milter.MAX_HEADER_BYTES is larger; honest headers are far below this).
MAX_SAMPLE_HEADER_BYTES = 65_536
MAX_SAMPLE_RECIPIENTS = 100
MAX_SAMPLE_BODY_BYTES = 65_536
MAX_SAMPLE_AR_BYTES = 8192
MAX_SAMPLE_SIGNATURES = MAX_DKIM_RESULTS


def failure_sample(incident: FailureIncident) -> dict[str, Any]:
    """The JSON-serialisable sample of one failure incident, capped.

    ``kind`` and ``incidents`` are not part of it: a sample is one message,
    reported under each kind due and merged with others by the sender.
    """
    cut: list[str] = []
    headers: list[list[str]] = []
    size = 0
    for name, value in incident.headers:
        name, value = _text(name), _text(value)
        size += len(name.encode("utf-8")) + len(value.encode("utf-8")) + 4
        if size > MAX_SAMPLE_HEADER_BYTES:
            cut.append(f"{len(incident.headers) - len(headers)} header fields")
            break
        headers.append([name, value])
    rcpt = [_stored(r, MAX_NAME_BYTES * 2) for r in incident.rcpt_to[:MAX_SAMPLE_RECIPIENTS]]
    if len(incident.rcpt_to) > MAX_SAMPLE_RECIPIENTS:
        cut.append(f"{len(incident.rcpt_to) - MAX_SAMPLE_RECIPIENTS} recipients")
    body = incident.body
    if body is not None and len(body) > MAX_SAMPLE_BODY_BYTES:
        cut.append(f"{len(body) - MAX_SAMPLE_BODY_BYTES} bytes of the body")
        body = body[:MAX_SAMPLE_BODY_BYTES]
    signatures = incident.dkim_failed[:MAX_SAMPLE_SIGNATURES]
    if len(incident.dkim_failed) > MAX_SAMPLE_SIGNATURES:
        cut.append(f"{len(incident.dkim_failed) - MAX_SAMPLE_SIGNATURES} DKIM signatures")
    return {
        "reported_domain": incident.reported_domain,
        "source_ip": incident.source_ip,
        "arrival_date": incident.arrival_date.astimezone(dt.UTC).isoformat(),
        "mail_from": _stored(incident.mail_from, MAX_NAME_BYTES * 2),
        "rcpt_to": rcpt,
        "authentication_results": _stored(incident.authentication_results, MAX_SAMPLE_AR_BYTES),
        "delivery_result": incident.delivery_result.value,
        "headers": headers,
        "dkim_failed": [
            {
                "domain": _stored(s.domain, MAX_NAME_BYTES),
                "selector": _stored(s.selector, MAX_NAME_BYTES),
                "result": s.result,
                "identity": _stored(s.identity, MAX_NAME_BYTES * 2),
                "aligned": s.aligned,
                "reason": _stored(s.reason, MAX_TEXT_BYTES),
            }
            for s in signatures
        ],
        "spf_domain": _stored(incident.spf_domain, MAX_NAME_BYTES),
        "spf_result": incident.spf_result,
        "spf_aligned": incident.spf_aligned,
        "spf_record": _stored(incident.spf_record, MAX_TEXT_BYTES),
        "body": None if body is None else base64.b64encode(body).decode("ascii"),
        "cut": cut,
    }


def incident_from_sample(
    sample: dict[str, Any], kind: FailureKind, incidents: int = 1
) -> FailureIncident:
    """The incident a stored sample describes, reported as ``kind`` for
    ``incidents`` merged failures.  Raises KeyError, TypeError or ValueError
    for a sample that is not one (the sender sets it aside)."""
    body = sample["body"]
    return FailureIncident(
        kind=kind,
        reported_domain=str(sample["reported_domain"]),
        source_ip=str(sample["source_ip"]),
        arrival_date=utc_timestamp(sample["arrival_date"]),
        mail_from=str(sample["mail_from"]),
        rcpt_to=tuple(str(r) for r in sample["rcpt_to"]),
        authentication_results=str(sample["authentication_results"]),
        delivery_result=DeliveryResult(sample["delivery_result"]),
        headers=tuple((str(n), str(v)) for n, v in sample["headers"]),
        dkim_failed=tuple(
            FailedSignature(
                str(s["domain"]),
                str(s["selector"]),
                str(s["result"]),
                str(s["identity"]),
                bool(s["aligned"]),
                str(s["reason"]),
            )
            for s in sample["dkim_failed"]
        ),
        spf_domain=str(sample["spf_domain"]),
        spf_result=str(sample["spf_result"]),
        spf_aligned=bool(sample["spf_aligned"]),
        spf_record=str(sample["spf_record"]),
        body=None if body is None else base64.b64decode(body, validate=True),
        incidents=incidents,
    )


# -- failure incidents: what the milter records ------------------------------------------


class FailureMaterial(NamedTuple):
    """What only the milter has for a failure report, handed to the writer
    by reference: the milter neither parses nor decides anything for it.

    ``headers`` is the header field list the milter holds, values as
    received; ``authentication_results`` the value it added ("" when the
    message was refused and none was added: it is then rendered for the
    report, under ``authserv_id``, only when a report is due).  With
    ``failure_reports.include_body``, ``message`` is the message's bytes as
    the milter rebuilt them (None otherwise, or when the milter did not keep
    the body); the writer's enqueue cuts its body to MAX_SAMPLE_BODY_BYTES
    (``body``; ``body_left`` counts the rest) when a report may be due, so
    that a waiting incident does not hold a whole message.
    """

    settings: FailureReportsConfig
    headers: Sequence[tuple[str, str]]
    authentication_results: str
    authserv_id: str
    message: bytes | None = None
    body: bytes | None = None
    body_left: int = 0
    # The size of ``headers`` as the milter counted it while receiving them,
    # so the writer can bound what waits in bytes without walking the list.
    header_bytes: int = 0

    @property
    def held_bytes(self) -> int:
        """About what a waiting incident keeps alive: its header fields and
        the body cut for the sample (see kept_material)."""
        return self.header_bytes + (len(self.body) if self.body is not None else 0)


def failure_candidate(evaluation: Evaluation) -> bool:
    """Whether a failure report could be due at all: the policy record has
    a ``ruf`` and is not a public suffix's (psd=y).  Three attribute reads,
    on the mail path; everything else is the writer thread's."""
    record = evaluation.dmarc.record
    return record is not None and bool(record.ruf) and record.psd is not PSDFlag.YES


def kept_material(material: FailureMaterial) -> FailureMaterial:
    """``material`` as a waiting incident keeps it: the message's body cut
    to what a sample stores (a copy of at most MAX_SAMPLE_BODY_BYTES), the
    message itself let go."""
    raw = material.message
    if raw is None:
        return material
    # The header section the milter rebuilt ends at its first empty line.
    start = raw.find(b"\r\n\r\n")
    body = raw[start + 4 : start + 4 + MAX_SAMPLE_BODY_BYTES] if start >= 0 else b""
    left = max(0, len(raw) - start - 4 - MAX_SAMPLE_BODY_BYTES) if start >= 0 else 0
    return material._replace(message=None, body=body, body_left=left)


def domain_selected(domain: str, settings: FailureReportsConfig) -> bool:
    """Whether failure reports about author domain ``domain`` may be made:
    it is ``failure_reports.domains`` or under one of them (every domain
    when the list is empty), and neither is nor is under any of
    ``skip_domains`` (a skip wins).  Names compare case-insensitively, by
    whole labels: "notexample.com" is not under "example.com"."""
    name = domain.lower().rstrip(".")
    if not name:
        return False
    if settings.skip_domains and _under_any(name, settings.skip_domains):
        return False
    return not settings.domains or _under_any(name, settings.domains)


def _under_any(name: str, domains: tuple[str, ...]) -> bool:
    for domain in domains:
        domain = domain.lower().rstrip(".")
        if name == domain or name.endswith("." + domain):
            return True
    return False


def failure_entry(
    evaluation: Evaluation, decision: Decision, material: FailureMaterial
) -> dict[str, Any] | None:
    """The failure incident of a message when its policy record asks for a
    failure report and the operator reports on its author domain; None
    otherwise.  Runs on the writer thread.

    The decision is :func:`failure_reports_due`; the incident is built by
    :func:`incident_from_evaluation` and stored as :func:`failure_sample`
    (capped).
    """
    if not failure_candidate(evaluation) or decision.action is Action.TEMPFAIL:
        # A tempfailed message comes back, and is reported when answered.
        return None
    dmarc = evaluation.dmarc
    # The Author Domain whose record was evaluated (for a malformed From,
    # the recovered one whose policy applied), as the incident names it.
    author = dmarc.author_domain or ""
    if not dmarc.policy_domain or not domain_selected(author, material.settings):
        return None
    due = failure_reports_due(dmarc)
    if not due.due:
        return None
    ar = material.authentication_results
    if not ar:
        ar = render(evaluation, material.authserv_id)
    material = kept_material(material)
    incident = incident_from_evaluation(
        evaluation,
        decision,
        due.kinds[0],
        headers=material.headers,
        authentication_results=ar,
        body=material.body,
    )
    unverified = {
        (v.signature.domain, v.signature.selector, v.signature.reason)
        for v in dmarc.dkim
        if v.signature.unverified
    }
    if unverified:
        # Left unverified at our own limit: not a failed signature, so not
        # named as one (nor counted in Identity-Alignment).
        failed = tuple(
            s for s in incident.dkim_failed if (s.domain, s.selector, s.reason) not in unverified
        )
        incident = dataclasses.replace(incident, dkim_failed=failed)
    spf_record = dmarc.spf.spf.record
    if spf_record:
        incident = dataclasses.replace(incident, spf_record=spf_record)
    sample = failure_sample(incident)
    if material.body_left:
        sample["cut"].append(f"{material.body_left} bytes of the body")
    ruf, _left = _uri_list(tuple(d.uri for d in due.destinations))
    return {
        "policy_domain": dmarc.policy_domain,
        "reported_domain": author,
        "source_ip": evaluation.envelope.client_ip.partition("%")[0],
        "kinds": ",".join(k.value for k in due.kinds),
        "ruf": ruf,
        "sample": sample,
    }


# The key of a failure line: the idempotency key of the message whose
# incident it carries.
FAILURE_OF = "failure_of"


def failure_line(message: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The journal line of a message's failure incident.  It follows the
    message's own line, and is stored once the message is (the incident
    goes with the message's id; a replay stores it at most once per
    message)."""
    return {
        "idempotency_key": new_idempotency_key(),
        FAILURE_OF: message["idempotency_key"],
        "arrived_at": message["arrived_at"],
        "failure": entry,
    }


def failure_incident_values(row: dict[str, Any], message_id: int) -> dict[str, Any] | None:
    """The ``failure_incidents`` row of a failure line (:func:`failure_line`)
    for the message stored as ``message_id``; None without an entry.
    Raises KeyError, TypeError or ValueError for a damaged entry."""
    failure = row.get("failure")
    if failure is None:
        return None
    return {
        "message_pk": message_id,
        "arrived_at": utc_timestamp(row["arrived_at"]),
        "policy_domain": str(failure["policy_domain"]),
        "reported_domain": str(failure["reported_domain"]),
        "source_ip": str(failure["source_ip"]),
        "kinds": str(failure["kinds"]),
        "ruf": str(failure["ruf"]),
        "sample": _encode_sample(failure["sample"]),
        "status": "pending",
        "handled_at": None,
    }


def _encode_sample(sample: Any) -> str:
    if not isinstance(sample, dict):
        raise TypeError("a failure sample must be an object")
    return orjson.dumps(sample).decode("utf-8")


# -- late rows -------------------------------------------------------------------------


def is_late(arrived_at: dt.datetime, written_at: dt.datetime) -> bool:
    """Whether a message row written at ``written_at`` (the writer's clock)
    is late: written at or after the end of the UTC day it arrived in.

    A day's aggregate report may already be made by then (the report job
    makes it once, after midnight), so the row would never be counted.
    The writer marks such a row in ``late_messages`` in the same transaction
    as the row itself, and the report job reports late rows by claim, each
    exactly once, in a supplementary report.  The writer's clock is used,
    not the database's: a skew of either only moves the boundary by that
    skew, and a row written just before midnight is not late but is in the
    database before the report job (which waits past midnight) reads it.
    """
    day = arrived_at.astimezone(dt.UTC).date()
    end_of_day = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    return written_at >= end_of_day


# -- bounces of report mail ------------------------------------------------------------

# Hard bounces taken from one delivery status notification; past it the
# rest are ignored (logged).  A bounce of one report mail names one
# recipient; dsn.MAX_RECIPIENTS bounds the parse itself.
MAX_BOUNCES_PER_MESSAGE = 50
# The key of a bounce-only journal line (no message row): it carries
# report_bounces rows only.
BOUNCES = "report_bounces"


def bounce_row(
    received_at: dt.datetime,
    original_message_id: str,
    address: str,
    status: str,
    diagnostic: str,
    reporting_mta: str,
) -> dict[str, Any]:
    """One hard bounce as the journal and ``report_bounces`` keep it,
    every value capped (they come from whoever sent the DSN)."""
    return {
        "received_at": received_at.astimezone(dt.UTC).isoformat(),
        "original_message_id": _stored(original_message_id, MAX_MESSAGE_ID_BYTES),
        "address": _stored(address, MAX_NAME_BYTES * 2),
        "status": _stored(status, STATUS_BYTES),
        "diagnostic": _stored(diagnostic, MAX_TEXT_BYTES),
        "reporting_mta": _stored(reporting_mta, MAX_NAME_BYTES),
    }


MAX_MESSAGE_ID_BYTES = 998
STATUS_BYTES = 32  # the column's length; an RFC 3463 status is at most 11


def bounces_line(bounces: list[dict[str, Any]], *, key: str | None = None) -> dict[str, Any]:
    """A bounce-only journal line: bounces of a message that has no history
    row (a relayed DSN from a trusted client is not evaluated)."""
    return {"idempotency_key": key or new_idempotency_key(), BOUNCES: bounces}


def bounce_values(bounce: dict[str, Any]) -> dict[str, Any]:
    """The ``report_bounces`` columns of one journaled bounce; raises
    KeyError, TypeError or ValueError for a damaged one."""
    values = {
        "received_at": utc_timestamp(bounce["received_at"]),
        "original_message_id": str(bounce["original_message_id"]),
        "address": str(bounce["address"]),
        "status": str(bounce["status"])[:STATUS_BYTES],
        "diagnostic": str(bounce["diagnostic"]),
        "reporting_mta": str(bounce["reporting_mta"]),
        "processed_at": None,
        "outcome": None,
    }
    return values
