"""When a failure report is due (RFC 9991 §3; RFC 9989 §4.7 ``fo``; digest §7.1).

A pure decision on one message's DMARC facts: which failure reports its
policy record asks for.  It queries nothing and sends nothing; the milter
only records the answer, and the sender builds the reports later
(:mod:`dmarcmilter.report.failure_mail`).

The rules, in the order they are applied:

1. No record, an unusable one, or no usable ``ruf`` URI: nothing is due
   (RFC 9989 §4.7: without ``ruf`` receivers MUST NOT send failure reports,
   and ``fo`` MUST be ignored).  "Usable" is what the report job can mail
   to: a well-formed ``mailto:`` URI (:func:`destinations.parse_rua`, the
   same rule as for ``rua``).  Whether an external destination has
   authorized the reports is checked by the sender, with
   :func:`destinations.verify_destination`, as for aggregate reports.
2. A record with ``psd=y``: nothing is due (RFC 9991: a receiver MUST NOT
   use ``ruf`` from a Public Suffix Domain's record).
3. ``fo`` (colon-separated, each option at most once, ``0`` and ``1`` not
   together; the record parser has already turned a malformed value into
   ``0``):

   - ``0`` (also when absent): a DMARC report when DMARC fails, i.e. no
     mechanism produced an aligned pass.
   - ``1``: a DMARC report when *any* mechanism did not produce an aligned
     pass; this fires on a DMARC pass when SPF or DKIM gave none.
   - ``d``: a DKIM report when any signature failed verification, aligned
     or not (RFC 6651).
   - ``s``: an SPF report when SPF failed, aligned or not (RFC 6652).

[impl choice] The digest leaves three things open:

- Each option stands alone: ``fo=d`` asks for DKIM reports only, with no
  DMARC report on a DMARC fail; ``0`` applies when it is listed, or when
  ``fo`` is absent or malformed (its default).
- ``0`` and ``1`` need a DMARC verdict: a temperror or permerror is neither
  pass nor fail, so it gives no DMARC report (it may still give ``d``/``s``).
- A DKIM signature "failed verification" when its result is ``fail`` or
  ``permerror`` (a broken signature, a revoked or missing key); ``temperror``
  is our DNS, not the sender's failure, and ``policy``/``neutral`` are
  signatures that verified or were not judged.  A signature we left
  unverified at a limit of our own (a body larger than
  ``milter.max_body_bytes``, signatures past ``dkim.max_signatures``) is
  recorded as permerror but marked ``unverified``: it did not fail, and
  reporting it would blame the signer for our limit.
- SPF "failed" when the result is ``fail``, ``softfail`` or ``permerror``:
  the domain's published policy did not authorize the client, or could not
  be evaluated for a fault of its own.  ``none`` and ``neutral`` assert
  nothing, and ``temperror`` is not the sender's failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..authres.render import plain_text
from ..dmarc import DMARCOutcome, DMARCResultCode
from ..record import DMARCRecord, PSDFlag
from ..results import DKIMResultCode, SPFResultCode
from .destinations import Destination, parse_rua

# ruf URIs considered per record, in published order, as for rua (RFC 9990
# lets a receiver limit the number of URIs it delivers to).  Past it the
# remaining URIs are ignored; the decision only needs to know one is usable.
MAX_RUF_URIS = 4

# Results that count as a failed verification (``fo=d``) or a failed SPF
# evaluation (``fo=s``); see the module docstring.
DKIM_FAILED = frozenset({DKIMResultCode.FAIL, DKIMResultCode.PERMERROR})
SPF_FAILED = frozenset({SPFResultCode.FAIL, SPFResultCode.SOFTFAIL, SPFResultCode.PERMERROR})


class FailureKind(enum.Enum):
    """The kind of one failure report, named by the ``fo`` option that asks
    for it; ``.value`` is the RFC 6591 ``Auth-Failure`` family."""

    DMARC = "dmarc"  # fo=0 or fo=1
    DKIM = "dkim"  # fo=d
    SPF = "spf"  # fo=s


class NotDue(enum.Enum):
    """Why no failure report at all is due."""

    NO_RECORD = "no usable DMARC record"
    NO_RUF = "no usable ruf URI"
    PSD = "ruf of a psd=y record is never used"
    NO_FAILURE = "no failure the fo options ask to report"


@dataclass(frozen=True, slots=True)
class FailureOptions:
    """A record's ``fo`` value as flags."""

    all_failed: bool  # "0"
    any_failed: bool  # "1"
    dkim: bool  # "d"
    spf: bool  # "s"

    @classmethod
    def parse(cls, fo: str) -> FailureOptions:
        """``fo`` as :class:`DMARCRecord` keeps it (normalised, "0" when
        absent or malformed).  A value the parser would not have kept is
        read as "0"."""
        items = fo.lower().split(":")
        if not all(i in ("0", "1", "d", "s") for i in items) or ("0" in items and "1" in items):
            items = ["0"]
        return cls("0" in items, "1" in items, "d" in items, "s" in items)


@dataclass(frozen=True, slots=True)
class FailureReportDue:
    """The failure reports one message's record asks for.

    ``kinds`` is empty when none is due, and ``not_due`` then says why;
    ``reasons`` has one line per kind, for the log and the history.
    ``destinations`` are the usable ruf mailboxes (before external
    verification, which the sender does).
    """

    kinds: tuple[FailureKind, ...] = ()
    reasons: tuple[str, ...] = ()
    destinations: tuple[Destination, ...] = ()
    not_due: NotDue | None = None

    @property
    def due(self) -> bool:
        return bool(self.kinds)


def usable_ruf(record: DMARCRecord) -> tuple[Destination, ...]:
    """The ``mailto:`` destinations of the record's ``ruf``, by the rua rule.

    The milter asks this for every message whose record has a ``ruf``, and
    parsing the URIs costs more than the rest of the decision: the answer
    is kept per record text (records of an honest size only, and at most
    _RUF_CACHE_SIZE of them; the cache is emptied when full)."""
    if not record.ruf:
        return ()
    cached = _ruf_cache.get(record.raw)
    if cached is not None:
        return cached
    destinations, _problems = parse_rua(",".join(record.ruf), MAX_RUF_URIS, "ruf")
    if len(record.raw) <= _RUF_CACHE_RECORD_CHARS:
        if len(_ruf_cache) >= _RUF_CACHE_SIZE:
            _ruf_cache.clear()
        _ruf_cache[record.raw] = destinations
    return destinations


_ruf_cache: dict[str, tuple[Destination, ...]] = {}
_RUF_CACHE_SIZE = 10_000
_RUF_CACHE_RECORD_CHARS = 1024


def failure_reports_due(outcome: DMARCOutcome) -> FailureReportDue:
    """Which failure reports the policy record of ``outcome`` asks for."""
    record = outcome.record
    if record is None or not record.usable:
        return FailureReportDue(not_due=NotDue.NO_RECORD)
    destinations = usable_ruf(record)
    if not destinations:
        return FailureReportDue(not_due=NotDue.NO_RUF)
    if record.psd is PSDFlag.YES:
        return FailureReportDue(not_due=NotDue.PSD)
    fo = FailureOptions.parse(record.fo)
    kinds: list[FailureKind] = []
    reasons: list[str] = []

    verdict = outcome.result in (DMARCResultCode.PASS, DMARCResultCode.FAIL)
    if fo.any_failed:
        missing = [
            name
            for name, aligned in (("dkim", outcome.dkim_aligned), ("spf", outcome.spf_aligned))
            if not aligned
        ]
        if verdict and missing:
            kinds.append(FailureKind.DMARC)
            reasons.append(f"fo=1: no aligned pass from {' or '.join(missing)}")
    elif fo.all_failed and outcome.result is DMARCResultCode.FAIL:
        kinds.append(FailureKind.DMARC)
        reasons.append("fo=0: DMARC fail (no aligned pass)")

    if fo.dkim:
        failed = [
            v.signature
            for v in outcome.dkim
            if v.signature.result in DKIM_FAILED and not v.signature.unverified
        ]
        if failed:
            kinds.append(FailureKind.DKIM)
            first = failed[0]
            reasons.append(
                f"fo=d: {len(failed)} DKIM signature(s) failed, first d={_shown(first.domain)} "
                f"s={_shown(first.selector)} ({first.result.value})"
            )
    if fo.spf:
        spf = outcome.spf.spf
        if spf.result in SPF_FAILED:
            kinds.append(FailureKind.SPF)
            reasons.append(f"fo=s: SPF {spf.result.value} for {_shown(spf.domain)}")

    if not kinds:
        return FailureReportDue(destinations=destinations, not_due=NotDue.NO_FAILURE)
    return FailureReportDue(tuple(kinds), tuple(reasons), destinations)


def _shown(value: str) -> str:
    # The sender chooses d=, s= and the MAIL FROM domain: printable and short
    # in a reason line.
    return plain_text(value, 80)
