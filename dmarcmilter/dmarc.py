"""DMARC evaluation: identifier alignment and the DMARC result.

RFC 9989 §4.4 (identifier alignment), §5.3 (receiver actions, steps 1-5),
§4.10 (policy discovery, through :mod:`dmarcmilter.discovery`) and §4.7 ``t``.
The inputs are the Author Domain and the SPF and DKIM results already
computed; this module never queries SPF or DKIM again.  Its only DNS use is
the policy discovery and the Organizational Domain walks that relaxed
alignment needs, all memoised by one :class:`Discoverer` per message.

Only lookups whose answer could change the verdict may make it temperror
(digest §4.5): :func:`could_align` rules out, with no query, every
identifier whose Organizational Domain cannot equal the Author Domain's, so
an attacker's own DNS failing cannot soften a victim's policy.

What to *do* with the result is the policy step's business
(:mod:`dmarcmilter.policy`): this module reports the policy, nothing more.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .authres.parse import ResInfo, domain_part, same_domain
from .discovery import (
    Discoverer,
    DiscoveryMethod,
    DiscoveryStatus,
    OrgDomainResult,
    PolicyDiscovery,
)
from .domains import DomainError, is_subdomain, normalize_domain
from .record import AlignmentMode, DMARCRecord, Policy
from .results import (
    AuthorResult,
    AuthorStatus,
    DKIMOutcome,
    DKIMResultCode,
    DKIMSignatureResult,
    SPFOutcome,
    SPFResult,
    SPFResultCode,
)


class DMARCResultCode(enum.Enum):
    """RFC 9989 §9.1 (A-R ``dmarc=`` values)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class OverrideReason(enum.Enum):
    """RFC 9990 PolicyOverrideType."""

    LOCAL_POLICY = "local_policy"
    MAILING_LIST = "mailing_list"
    OTHER = "other"
    POLICY_TEST_MODE = "policy_test_mode"
    TRUSTED_FORWARDER = "trusted_forwarder"


@dataclass(frozen=True, slots=True)
class PolicyOverride:
    reason: OverrideReason
    comment: str = ""


class Alignment(enum.Enum):
    """How an authenticated identifier relates to the Author Domain.

    RFC 9990 orders DKIM results in a report row by this: strict-aligned
    passes first, then relaxed-aligned, then the rest.
    """

    STRICT = "strict"  # identical to the Author Domain
    RELAXED = "relaxed"  # same Organizational Domain, and the mode is relaxed
    NONE = "none"


@dataclass(frozen=True, slots=True)
class SPFVerdict:
    spf: SPFResult
    alignment: Alignment = Alignment.NONE

    @property
    def aligned(self) -> bool:
        """An aligned *pass*, the only thing that counts for DMARC."""
        return self.spf.result is SPFResultCode.PASS and self.alignment is not Alignment.NONE


@dataclass(frozen=True, slots=True)
class DKIMVerdict:
    signature: DKIMSignatureResult
    alignment: Alignment = Alignment.NONE

    @property
    def aligned(self) -> bool:
        return self.signature.result is DKIMResultCode.PASS and self.alignment is not Alignment.NONE


@dataclass(frozen=True, slots=True)
class DMARCOutcome:
    result: DMARCResultCode
    author_domain: str | None
    discovery: PolicyDiscovery | None
    # The policy evaluated after sp/np and t processing: A-R policy.dmarc.
    policy: Policy | None
    spf: SPFVerdict
    dkim: tuple[DKIMVerdict, ...]
    reasons: tuple[PolicyOverride, ...] = ()
    reason: str = ""  # why the result is what it is, for A-R reason= and logs
    # The Author Domain's Organizational Domain, when a policy was found.
    organizational_domain: str | None = None
    # Why the From field is out of scope, when author_domain was recovered
    # from it anyway (see evaluate_recovered); "" for an in-scope From.
    malformed_from: str = ""

    @property
    def record(self) -> DMARCRecord | None:
        return self.discovery.record if self.discovery else None

    @property
    def policy_domain(self) -> str | None:
        return self.discovery.policy_domain if self.discovery else None

    @property
    def discovery_method(self) -> DiscoveryMethod | None:
        return self.discovery.method if self.discovery else None

    @property
    def spf_aligned(self) -> bool:
        return self.spf.aligned

    @property
    def dkim_aligned(self) -> bool:
        return any(v.aligned for v in self.dkim)

    @property
    def errors(self) -> tuple[str, ...]:
        record = self.record
        return record.problems if record else ()


def evaluate_dmarc(
    author: AuthorResult,
    spf: SPFOutcome,
    dkim: DKIMOutcome,
    discoverer: Discoverer,
) -> DMARCOutcome:
    """RFC 9989 §5.3 steps 1-5 for one message."""
    unaligned_spf = SPFVerdict(spf.mfrom)
    unaligned_dkim = tuple(DKIMVerdict(s) for s in dkim.signatures)

    if not author.status.in_scope or author.domain is None:
        # §4.2: not exactly one Author Domain; DMARC cannot be applied.
        return DMARCOutcome(
            DMARCResultCode.PERMERROR,
            None,
            None,
            None,
            unaligned_spf,
            unaligned_dkim,
            reason=author.reason or author.status.value.replace("_", " "),
        )
    author_domain = author.domain
    discovery = discoverer.discover_policy(author_domain)

    def outcome(
        result: DMARCResultCode,
        policy: Policy | None = None,
        spf_v: SPFVerdict = unaligned_spf,
        dkim_v: tuple[DKIMVerdict, ...] = unaligned_dkim,
        reasons: tuple[PolicyOverride, ...] = (),
        reason: str = "",
    ) -> DMARCOutcome:
        org = discovery.organizational_domain
        if org is None and discovery.record is not None:
            # The author's own record applied, so discovery stopped early; the
            # Organizational Domain (for reports) comes from memoised answers.
            org = discoverer.organizational_domain(author_domain).domain
        return DMARCOutcome(
            result, author_domain, discovery, policy, spf_v, dkim_v, reasons, reason, org
        )

    if discovery.status is DiscoveryStatus.NONE:
        # §5.3.2: no policy record, so DMARC does not apply.  Alignment is
        # not worked out: there are no modes to align under and no report
        # is ever sent, so the walks would be wasted DNS.
        return outcome(DMARCResultCode.NONE, reason=discovery.detail)
    if discovery.status is DiscoveryStatus.TEMPERROR:
        return outcome(DMARCResultCode.TEMPERROR, reason=discovery.detail or "DNS failure")
    record = discovery.record
    if discovery.status is DiscoveryStatus.PERMERROR or record is None:
        return outcome(
            DMARCResultCode.PERMERROR,
            reason=discovery.detail or "unusable DMARC record",
        )

    aligner = Aligner(author_domain, discovery, discoverer)
    spf_v = SPFVerdict(spf.mfrom, aligner.spf_alignment(spf.mfrom, record.aspf))
    dkim_v = tuple(
        DKIMVerdict(sig, aligner.dkim_alignment(sig, record.adkim)) for sig in dkim.signatures
    )

    requested = discovery.requested_policy or Policy.NONE
    policy = requested
    reasons: tuple[PolicyOverride, ...] = ()
    if record.testing and requested is not Policy.NONE:
        # §4.7 t=y: apply the policy one step lower; it changes no reporting.
        policy = requested.lowered()

    if spf_v.aligned or any(v.aligned for v in dkim_v):
        return outcome(DMARCResultCode.PASS, policy, spf_v, dkim_v)
    if aligner.temperror or _temporary_failure_could_align(spf_v, dkim_v, aligner, record):
        # §5.3.6: a needed lookup failed, so the message neither passes nor
        # fails, and no policy is applied.
        return outcome(
            DMARCResultCode.TEMPERROR,
            policy,
            spf_v,
            dkim_v,
            reason=aligner.detail or "temporary SPF or DKIM failure on an aligned identifier",
        )
    if policy is not requested:
        reasons = (
            PolicyOverride(
                OverrideReason.POLICY_TEST_MODE,
                f"t=y: {requested.value} applied as {policy.value}",
            ),
        )
    return outcome(DMARCResultCode.FAIL, policy, spf_v, dkim_v, reasons)


def _name(domain: str) -> str:
    """``domain`` as alignment compares it: A-label, lower case, no trailing
    dot (RFC 4343); a string that is no domain name is kept, lower-cased, and
    can then only equal itself."""
    try:
        return normalize_domain(domain)
    except DomainError:
        return domain.strip().lower()


def could_align(
    identifier: str,
    author_domain: str,
    author_organizational_domain: str | None,
    mode: AlignmentMode,
) -> bool:
    """Whether ``identifier`` can be aligned with ``author_domain`` at all,
    decided without any DNS query (RFC 9989 §4.4, §4.10.2).

    Strict alignment is equality.  Relaxed alignment compares the two
    Organizational Domains, and the tree walk of §4.10.2 only ever yields a
    name's OD from among that name and its ancestors.  So OD(identifier) can
    equal OD(author) only when the author's OD is the identifier itself or a
    label-wise ancestor of it; for any other identifier no walk is needed and
    none may be made: a lookup whose answer cannot change the verdict must
    not be able to turn it into temperror (digest §4.5).

    ``author_organizational_domain`` is the Author Domain's OD from its own
    walk, or None when that walk failed: the OD is then one of the Author
    Domain's ancestors, so any identifier that shares at least its last label
    with the Author Domain could align, and nothing else can.

    True is necessary, not sufficient, for relaxed alignment: psd=n below the
    author's OD (digest E6) can still split the two, which only the
    identifier's own walk shows (:meth:`Aligner.alignment`).  The PSL method
    (RFC 7489 §3.2) also yields a suffix of the name, so the rule holds there.
    """
    name = _name(identifier)
    author = _name(author_domain)
    if not name:
        return False
    if name == author:
        return True
    if mode is AlignmentMode.STRICT:
        return False
    if author_organizational_domain is None:
        return name.rpartition(".")[2] == author.rpartition(".")[2]
    od = _name(author_organizational_domain)
    return name == od or is_subdomain(name, od)


class Aligner:
    """Identifier alignment (RFC 9989 §4.4) for one Author Domain whose
    policy was found, sharing the message's memoised discovery walks.

    Every check of alignment goes through :meth:`alignment`: the evaluation
    core, the DMARC result, and local policy judging what a trusted ARC
    sealer vouched for.  An identifier that :func:`could_align` rules out
    gets :attr:`Alignment.NONE` with no DNS query; only a walk for an
    identifier that could align can set :attr:`temperror`.
    """

    def __init__(self, author_domain: str, discovery: PolicyDiscovery, discoverer: Discoverer):
        self.author_domain = author_domain
        self.discovery = discovery
        self.discoverer = discoverer
        self.temperror = False
        self.detail = ""
        self._author_od: OrgDomainResult | None = None
        self._author_name = _name(author_domain)

    @property
    def record(self) -> DMARCRecord | None:
        return self.discovery.record

    def author_organizational_domain(self) -> OrgDomainResult:
        """The Author Domain's OD, from its own walk (memoised).  A failed
        walk is not yet a temperror: it becomes one only when an identifier
        that could align needs the OD."""
        if self._author_od is None:
            known = self.discovery.organizational_domain
            if known is not None:
                self._author_od = OrgDomainResult(known)
            else:
                self._author_od = self.discoverer.organizational_domain(self.author_domain)
        return self._author_od

    def could_align(self, identifier: str, mode: AlignmentMode) -> bool:
        """:func:`could_align` against this Author Domain, for ``mode``."""
        if not identifier:
            return False
        if identifier == self.author_domain or _name(identifier) == self._author_name:
            return True
        if mode is AlignmentMode.STRICT:
            return False
        return could_align(
            identifier, self.author_domain, self.author_organizational_domain().domain, mode
        )

    def spf_could_align(self, domain: str) -> bool:
        """Whether the SPF (MAIL FROM) domain could align under the record's aspf."""
        record = self.record
        return record is not None and self.could_align(domain, record.aspf)

    def dkim_could_align(self, domain: str) -> bool:
        """Whether a DKIM ``d=`` could align under the record's adkim."""
        record = self.record
        return record is not None and self.could_align(domain, record.adkim)

    def _fail(self, detail: str) -> None:
        self.temperror = True
        self.detail = self.detail or detail or "DNS failure during the Organizational Domain walk"

    def alignment(self, identifier: str, mode: AlignmentMode) -> Alignment:
        """RFC 9989 §4.4: strict is equality; relaxed compares the two
        Organizational Domains, each found by its own walk (§4.10.2)."""
        if not self.could_align(identifier, mode):
            return Alignment.NONE
        if identifier == self.author_domain or _name(identifier) == self._author_name:
            return Alignment.STRICT
        author_od = self.author_organizational_domain()
        if author_od.temperror:
            # The identifier shares a suffix with the Author Domain, and the
            # author's own walk could not say whether that suffix is its OD.
            self._fail(author_od.detail)
            return Alignment.NONE
        # No string short-cut here: a TLD record without psd=y makes
        # unrelated names share an Organizational Domain (digest E9), and
        # psd=n can split names that share a suffix (E6).  Only the walk knows.
        od = self.discoverer.organizational_domain(identifier)
        if od.temperror:
            self._fail(od.detail)
            return Alignment.NONE
        return Alignment.RELAXED if od.domain == author_od.domain else Alignment.NONE

    def spf_alignment(self, spf: SPFResult, mode: AlignmentMode) -> Alignment:
        # Only a pass yields an Authenticated Identifier (§4.4.2); the
        # alignment of a temperror is looked at separately.
        if spf.result is not SPFResultCode.PASS:
            return Alignment.NONE
        return self.alignment(spf.domain, mode)

    def dkim_alignment(self, sig: DKIMSignatureResult, mode: AlignmentMode) -> Alignment:
        if sig.result is not DKIMResultCode.PASS:
            return Alignment.NONE
        return self.alignment(sig.domain, mode)

    def settle(self, spf: SPFResult | None, signatures: Sequence[DKIMSignatureResult]) -> None:
        """Make now every walk the DMARC result will need for these results
        (passes and temperrors that could align), so that the result itself
        needs no further DNS: the evaluation runs this before any lookup an
        attacker chose, which then cannot starve these walks."""
        record = self.record
        if record is None:
            return
        if spf is not None and spf.result in (SPFResultCode.PASS, SPFResultCode.TEMPERROR):
            self.alignment(spf.domain, record.aspf)
        for sig in signatures:
            if sig.result in (DKIMResultCode.PASS, DKIMResultCode.TEMPERROR):
                self.alignment(sig.domain, record.adkim)


def aligner_for(author: AuthorResult, discoverer: Discoverer) -> Aligner | None:
    """Policy discovery for the message's Author Domain, and its Aligner when
    a usable policy was found (the only case where alignment matters).

    The evaluation calls this first, before any SPF, DKIM or ARC lookup, so
    that the author's policy discovery and OD walk (verdict-relevant DNS) can
    never be starved by lookups an attacker chose.  All answers are memoised
    in ``discoverer``; :func:`evaluate_dmarc` later reuses them.
    """
    if not author.status.in_scope or author.domain is None:
        return None
    discovery = discoverer.discover_policy(author.domain)
    if discovery.status is not DiscoveryStatus.FOUND or discovery.record is None:
        return None
    aligner = Aligner(author.domain, discovery, discoverer)
    # The OD is settled now, while the budget is the author's: reports need
    # it anyway, and relaxed alignment decisions depend on it.
    aligner.author_organizational_domain()
    return aligner


def _temporary_failure_could_align(
    spf_v: SPFVerdict,
    dkim_v: tuple[DKIMVerdict, ...],
    aligner: Aligner,
    record: DMARCRecord,
) -> bool:
    """[impl choice, digest §4.5] A temperror from SPF or DKIM only prevents a
    fail verdict when that identifier could have produced an aligned pass.
    The same rule as for passes decides it: an identifier that cannot align
    is ruled out without a lookup, so its temperror changes nothing."""
    if spf_v.spf.result is SPFResultCode.TEMPERROR and (
        aligner.alignment(spf_v.spf.domain, record.aspf) is not Alignment.NONE
    ):
        return True
    return any(
        v.signature.result is DKIMResultCode.TEMPERROR
        and aligner.alignment(v.signature.domain, record.adkim) is not Alignment.NONE
        for v in dkim_v
    )


# [impl choice, digest §4.1] Strictness of an applied policy, for choosing
# among the recovered Author Domains.
_STRICTNESS = {Policy.NONE: 0, Policy.QUARANTINE: 1, Policy.REJECT: 2}


def evaluate_recovered(
    author: AuthorResult,
    spf: SPFOutcome,
    dkim: DKIMOutcome,
    discoverer: Discoverer,
) -> DMARCOutcome:
    """:func:`evaluate_dmarc`, and for a From field out of scope that still
    names domains a reader would show (``author.recovered``), the strictest
    result of evaluating each of them as the Author Domain.

    RFC 9989 §11.5 (digest §4.1): a receiver that goes ahead with several
    domains evaluates each and applies the strictest policy among the failing
    checks; if not all could be processed the evaluation is incomplete.
    [impl choice] The choice, in order:

    1. a fail under p=reject, else under p=quarantine (the first on a tie);
    2. incomplete (a bound in :func:`dmarcmilter.author.recover_domains`
       stopped the search): a fail under the strictest enforcing policy any
       evaluated domain has, even one that passed, since an unevaluated
       domain may be the one the reader shows (fail closed); with no
       enforcing policy at all, the out-of-scope permerror, which the policy
       step refuses (a p=none domain of the attacker's must not stand in);
    3. a temperror: a domain whose policy is unknown may be the strictest;
    4. a fail under p=none;
    5. a pass, when every other domain has no usable policy;
    6. otherwise (no policy anywhere) the out-of-scope permerror, unchanged.

    The chosen outcome keeps the Author Domain whose policy applies, and
    ``malformed_from`` says why the field was out of scope.
    """
    base = evaluate_dmarc(author, spf, dkim, discoverer)
    if author.status.in_scope or not author.recovered:
        return base
    outcomes = [
        evaluate_dmarc(AuthorResult(AuthorStatus.OK, domain=domain), spf, dkim, discoverer)
        for domain in author.recovered
    ]
    chosen = _strictest(outcomes, author.recovery_incomplete)
    if chosen is None:
        return base
    why = author.reason or author.status.value.replace("_", " ")
    if author.recovery_incomplete:
        reason = f"malformed From ({why}), not every domain evaluated"
        if chosen.result is not DMARCResultCode.FAIL:
            # Not what this domain's own result says: a local choice, which
            # the aggregate report must show (RFC 9990 PolicyOverride).
            chosen = dataclasses.replace(
                chosen,
                result=DMARCResultCode.FAIL,
                reasons=(
                    *chosen.reasons,
                    PolicyOverride(
                        OverrideReason.LOCAL_POLICY,
                        f"{chosen.result.value} treated as fail: "
                        "the From field names more domains than were evaluated",
                    ),
                ),
            )
    else:
        reason = f"malformed From ({why})"
    if chosen.result is DMARCResultCode.TEMPERROR and chosen.reason:
        reason = f"{reason}: {chosen.reason}"
    elif chosen.result is DMARCResultCode.FAIL:
        reason = f"{reason}: policy of {chosen.author_domain} applied"
    return dataclasses.replace(chosen, reason=reason, malformed_from=why)


def _strictest(outcomes: list[DMARCOutcome], incomplete: bool) -> DMARCOutcome | None:
    def strictness(outcome: DMARCOutcome) -> int:
        return _STRICTNESS.get(outcome.policy, 0) if outcome.policy is not None else -1

    def first_strictest(candidates: list[DMARCOutcome]) -> DMARCOutcome | None:
        return max(candidates, key=strictness) if candidates else None

    fails = [o for o in outcomes if o.result is DMARCResultCode.FAIL]
    enforcing = [o for o in fails if strictness(o) > 0]
    if enforcing:
        return first_strictest(enforcing)
    if incomplete:
        # Nothing less than an enforcing policy may stand for the domains
        # not evaluated; without one, the policy step refuses the message.
        return first_strictest([o for o in outcomes if strictness(o) > 0])
    for wanted in (DMARCResultCode.TEMPERROR, DMARCResultCode.FAIL):
        found = [o for o in outcomes if o.result is wanted]
        if found:
            return first_strictest(found)
    return first_strictest([o for o in outcomes if o.result is DMARCResultCode.PASS])


# -- trusted ARC sealers: what their recorded results are worth ------------------------
#
# RFC 8617 §7.2, RFC 9989 §5.3 (local policy): a trusted sealer's ARC-
# Authentication-Results may vouch for a message that fails DMARC after the
# sealer's forwarding.  Whether an identifier it recorded aligns with the
# Author Domain is judged here by the same rule as for our own results (the
# Aligner: equality, or the Organizational Domains found by their walks),
# never by a string suffix: psd=n and TLD records make a suffix lie.

# Distinct identifiers from sealers' results whose alignment is worked out
# per message; past it the rest count as not aligned (no override, which
# only withholds a favour).  Each may cost an Organizational Domain walk.
MAX_SEALER_IDENTIFIERS = 8


def alignment_of(
    outcome: DMARCOutcome, discoverer: Discoverer, identifier: str, mode: AlignmentMode
) -> Alignment:
    """RFC 9989 §4.4 alignment of ``identifier`` (a normalised domain) with
    the Author Domain of ``outcome``, through the message's memoised
    ``discoverer``.  NONE when the outcome has no policy to align under, or
    when a walk fails (this never turns the result into temperror)."""
    if outcome.author_domain is None or outcome.discovery is None:
        return Alignment.NONE
    return Aligner(outcome.author_domain, outcome.discovery, discoverer).alignment(identifier, mode)


def sealer_vouch(
    outcome: DMARCOutcome,
    hops: tuple[tuple[str, tuple[ResInfo, ...]], ...],
    discoverer: Discoverer,
) -> str | None:
    """The first sealer among ``hops`` ((sealer domain, recorded results),
    the trusted ones only, newest first) that recorded, for the Author
    Domain, a DMARC pass or an aligned SPF or DKIM pass; None if none did.

    Only for a failing message: a pass needs no voucher.
    """
    author = outcome.author_domain
    record = outcome.record
    if outcome.result is not DMARCResultCode.FAIL or author is None or record is None:
        return None
    checked: dict[tuple[str, AlignmentMode], bool] = {}

    def aligned(value: str | None, mode: AlignmentMode) -> bool:
        try:
            identifier = normalize_domain(domain_part(value or ""))
        except DomainError:
            return False
        key = (identifier, mode)
        if key not in checked:
            if len(checked) >= MAX_SEALER_IDENTIFIERS:
                return False
            alignment = alignment_of(outcome, discoverer, identifier, mode)
            checked[key] = alignment is not Alignment.NONE
        return checked[key]

    for sealer, results in hops:
        for res in results:
            if res.result != "pass":
                continue
            if res.method == "dmarc" and same_domain(res.get("header.from") or "", author):
                return sealer
            if res.method == "dkim" and aligned(res.get("header.d"), record.adkim):
                return sealer
            if res.method == "spf" and aligned(res.get("smtp.mailfrom"), record.aspf):
                return sealer
    return None
