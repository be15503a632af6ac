"""The policy step: from the evaluated facts to a disposition and an action.

RFC 9989 §5.3 step 6 ("apply policy per local policy"), §7.4 and §8, and
the digest's §4.3.  The final disposition is always local policy.  Fixed
rules:

* ``p=none`` never changes handling.
* A receiver MUST NOT reject solely because of ``p=reject``: unless rejection
  is enabled (for every domain or for listed ones), such a failure is handled
  as quarantine and reported with reason ``local_policy``.
* A message that neither passes nor fails (temperror, permerror, none) gets
  no DMARC policy applied.

Local choices, all from :class:`~dmarcmilter.config.PolicyConfig`: how
quarantine is carried out, the mailing-list downgrade, trusted ARC sealers,
what a temperror does, and monitor mode, which turns every action into a
note of what would have happened.

Every deviation from the published policy is recorded as an RFC 9990
override reason.  The milter applies the :class:`Decision`;
``dmarcmilter evaluate`` prints it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .authres.parse import AuthResSyntaxError, parse
from .config import PolicyConfig
from .dmarc import DMARCResultCode, OverrideReason, PolicyOverride
from .domains import ascii_casefold
from .evaluation import Evaluation
from .record import AlignmentMode, Policy
from .results import ARCResultCode


class Disposition(enum.Enum):
    """RFC 9990 DispositionType: what the receiver applied."""

    NONE = "none"
    PASS = "pass"  # passed DMARC under an enforcing policy
    QUARANTINE = "quarantine"
    REJECT = "reject"


class Action(enum.Enum):
    """What the MTA is asked to do with the message."""

    ACCEPT = "accept"
    QUARANTINE = "quarantine"  # how: Decision.quarantine
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class QuarantineMethod(enum.Enum):
    HEADER = "header"  # add PolicyConfig.quarantine_header
    HOLD = "hold"  # the MTA's hold queue (smfi_quarantine)


@dataclass(frozen=True, slots=True)
class SMTPReply:
    code: str  # e.g. "550"
    enhanced: str  # e.g. "5.7.1"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True, slots=True)
class Decision:
    disposition: Disposition
    action: Action
    reasons: tuple[PolicyOverride, ...] = ()
    reply: SMTPReply | None = None
    quarantine: QuarantineMethod | None = None
    # Monitor mode: the action that was not taken.
    monitored: Action | None = None


ACCEPT = Decision(Disposition.NONE, Action.ACCEPT)


def decide(evaluation: Evaluation, config: PolicyConfig) -> Decision:
    decision = _enforce(evaluation, config)
    if config.monitor and decision.action is not Action.ACCEPT:
        what = decision.action.value
        if decision.quarantine is not None:
            what = f"{what} ({decision.quarantine.value})"
        return Decision(
            Disposition.NONE,
            Action.ACCEPT,
            (
                *decision.reasons,
                PolicyOverride(OverrideReason.LOCAL_POLICY, f"monitor mode: {what}"),
            ),
            monitored=decision.action,
        )
    return decision


def _enforce(evaluation: Evaluation, config: PolicyConfig) -> Decision:
    dmarc = evaluation.dmarc
    domain = dmarc.author_domain
    # RFC 9989 §4.2: no single Author Domain.  [impl choice, digest §4.1] by
    # default ("evaluate") each domain a reader would still see was evaluated
    # (dmarc.evaluate_recovered) and the strictest result is enforced below;
    # "reject" refuses the message, "accept" delivers it with dmarc=permerror.
    if not evaluation.author.status.in_scope and config.out_of_scope == "reject":
        reason = evaluation.author.reason or "the From field is not usable"
        return Decision(
            Disposition.NONE,
            Action.REJECT,
            reply=SMTPReply(
                "550",
                "5.7.1",
                f"Message rejected: DMARC cannot be evaluated ({reason}); "
                "the From field must name exactly one author domain",
            ),
        )
    if domain is None:
        if evaluation.author.recovery_incomplete and config.out_of_scope == "evaluate":
            # More author domains than are evaluated, none of them with an
            # enforcing policy: an unevaluated one may be the victim's, and
            # there is no policy to apply in its place (fail closed).
            return Decision(
                Disposition.NONE,
                Action.REJECT,
                reply=SMTPReply(
                    "550",
                    "5.7.1",
                    "Message rejected: the From field names more author domains "
                    "than DMARC is evaluated for",
                ),
            )
        return ACCEPT

    policy = dmarc.policy
    if dmarc.result is DMARCResultCode.PASS:
        enforcing = policy in (Policy.QUARANTINE, Policy.REJECT)
        return Decision(Disposition.PASS if enforcing else Disposition.NONE, Action.ACCEPT)
    if dmarc.result is DMARCResultCode.TEMPERROR:
        # §5.3.6: no policy is applied.  §7.2 suggests deferring, which a
        # setting enables, unless the policy is known to change nothing.
        # A malformed From whose domains could not all be checked is always
        # deferred: its sender is not owed delivery on partial results, and
        # the unchecked domain may be the one a reader sees (fail closed).
        if dmarc.malformed_from or (
            config.temperror_action == "tempfail" and policy is not Policy.NONE
        ):
            return Decision(
                Disposition.NONE,
                Action.TEMPFAIL,
                reply=SMTPReply("451", "4.7.0", config.tempfail_text.format(domain=domain)),
            )
        return ACCEPT
    if dmarc.result is not DMARCResultCode.FAIL or policy is None or policy is Policy.NONE:
        # none, permerror, p=none, or t=y lowering quarantine to none:
        # handling must not change (the t=y reason is in dmarc.reasons).
        return Decision(Disposition.NONE, Action.ACCEPT, dmarc.reasons)

    reasons = list(dmarc.reasons)
    sealer = trusted_arc_sealer(evaluation, config.trusted_arc_sealers)
    if sealer is not None:
        reasons.append(
            PolicyOverride(
                OverrideReason.TRUSTED_FORWARDER, f"ARC sealed by {sealer}, which saw a pass"
            )
        )
        return Decision(Disposition.NONE, Action.ACCEPT, tuple(reasons))

    if policy is Policy.REJECT:
        if evaluation.mailing_list and config.mailing_list_downgrade:
            policy = Policy.QUARANTINE
            reasons.append(
                PolicyOverride(
                    OverrideReason.MAILING_LIST, "list mail: reject handled as quarantine"
                )
            )
        elif _reject_enforced(evaluation, config):
            return Decision(
                Disposition.REJECT,
                Action.REJECT,
                tuple(reasons),
                reply=SMTPReply("550", "5.7.1", config.reject_text.format(domain=domain)),
            )
        else:
            # RFC 9989 §8: MUST NOT reject solely on p=reject.
            policy = Policy.QUARANTINE
            reasons.append(_local("p=reject failure handled as quarantine (RFC 9989 section 8)"))

    # Quarantine, as the operator chose to carry it out.
    action = config.quarantine_action
    if action == "accept":
        reasons.append(_local("quarantine not applied"))
        return Decision(Disposition.NONE, Action.ACCEPT, tuple(reasons))
    if action == "reject":
        reasons.append(_local("quarantine applied as reject"))
        return Decision(
            Disposition.REJECT,
            Action.REJECT,
            tuple(reasons),
            reply=SMTPReply("550", "5.7.1", config.reject_text.format(domain=domain)),
        )
    return Decision(
        Disposition.QUARANTINE,
        Action.QUARANTINE,
        tuple(reasons),
        quarantine=QuarantineMethod(action),
    )


def _reject_enforced(evaluation: Evaluation, config: PolicyConfig) -> bool:
    if config.enforce_reject:
        return True
    listed = {_norm(d) for d in config.enforce_reject_domains}
    dmarc = evaluation.dmarc
    return _norm(dmarc.author_domain) in listed or _norm(dmarc.policy_domain) in listed


def trusted_arc_sealer(evaluation: Evaluation, trusted: tuple[str, ...]) -> str | None:
    """The trusted ARC sealer that vouches for the message, if any.

    RFC 8617 §7.2 leaves it to local policy.  All must hold: the chain
    validates (cv=pass), the hop was sealed by a configured sealer, and that
    sealer's ARC-Authentication-Results show, for the Author Domain, a DMARC
    pass or an aligned SPF or DKIM pass.

    [impl choice] Alignment of the sealer's identifiers is judged without
    new DNS queries (DMARC never queries again): strict is equality; relaxed
    accepts the Author Domain's Organizational Domain and names under it.
    """
    arc = evaluation.arc
    dmarc = evaluation.dmarc
    author = dmarc.author_domain
    if arc.result is not ARCResultCode.PASS or not trusted or author is None:
        return None
    organizational = dmarc.organizational_domain or author
    record = dmarc.record
    adkim = record.adkim if record else AlignmentMode.RELAXED
    aspf = record.aspf if record else AlignmentMode.RELAXED
    sealers = {_norm(t) for t in trusted}
    for hop in reversed(arc.hops):  # the newest first
        if _norm(hop.sealer_domain) not in sealers:
            continue
        try:
            results = parse(hop.authentication_results).results
        except AuthResSyntaxError:
            continue
        for res in results:
            if res.result != "pass":
                continue
            if res.method == "dmarc" and _norm(res.get("header.from")) == author:
                return hop.sealer_domain
            if res.method == "dkim" and _aligned(
                res.get("header.d"), author, organizational, adkim
            ):
                return hop.sealer_domain
            if res.method == "spf":
                mailfrom = (res.get("smtp.mailfrom") or "").rpartition("@")[2]
                if _aligned(mailfrom, author, organizational, aspf):
                    return hop.sealer_domain
    return None


def _aligned(identifier: str | None, author: str, organizational: str, mode: AlignmentMode) -> bool:
    name = _norm(identifier)
    if not name:
        return False
    if name == author:
        return True
    if mode is AlignmentMode.STRICT:
        return False
    return name == organizational or name.endswith("." + organizational)


def _local(comment: str) -> PolicyOverride:
    return PolicyOverride(OverrideReason.LOCAL_POLICY, comment)


def _norm(name: str | None) -> str:
    return ascii_casefold(name or "")
