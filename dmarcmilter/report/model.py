"""One aggregate report as data (RFC 9990 §2.1, the ``feedback`` element).

The records and the published policy come from the history reader
(:mod:`dmarcmilter.history.reader`), one report per policy domain, period
and published-policy configuration.  Converting to XML happens in
:mod:`dmarcmilter.report.xml`, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..history.reader import PublishedPolicy, ReportRecord


@dataclass(frozen=True, slots=True)
class ReportMetadata:
    """RFC 9990 ``report_metadata``."""

    org_name: str  # the reporting organization
    email: str  # its contact address
    report_id: str  # alphanumeric; stable for one domain, period and policy
    begin: int  # the period, epoch seconds UTC, inclusive
    end: int  # the end of the period, epoch seconds UTC (begin + 86399 for a day)
    generator: str  # software name and version, e.g. "dmarcmilter/0.1.0"
    extra_contact_info: str | None = None
    errors: tuple[str, ...] = ()  # problems found in the published record


@dataclass(frozen=True, slots=True)
class AggregateReport:
    metadata: ReportMetadata
    policy: PublishedPolicy  # policy_published; policy.domain is the policy domain
    records: tuple[ReportRecord, ...]

    @property
    def policy_domain(self) -> str:
        return self.policy.domain

    @property
    def message_count(self) -> int:
        return sum(r.count for r in self.records)
