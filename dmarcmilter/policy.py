"""The policy step: from the evaluated facts to a disposition and an action.

RFC 9989 §5.3 step 6 ("apply policy per local policy"), §7.4 and §8.  The
final disposition is always local policy.  Two rules are fixed:

* ``p=none`` never changes handling.
* A receiver MUST NOT reject solely because of ``p=reject``; such a failure is
  handled as quarantine and reported with reason ``local_policy`` (digest
  §4.3).

The milter applies the :class:`Decision`; ``dmarcmilter evaluate`` prints it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import PolicyConfig
from .dmarc import DMARCResultCode, OverrideReason, PolicyOverride
from .evaluation import Evaluation
from .record import Policy


class Disposition(enum.Enum):
    """RFC 9990 DispositionType: what the receiver applied."""

    NONE = "none"
    PASS = "pass"  # passed DMARC under an enforcing policy
    QUARANTINE = "quarantine"
    REJECT = "reject"


class Action(enum.Enum):
    """What the MTA is asked to do with the message."""

    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


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


def decide(evaluation: Evaluation, config: PolicyConfig) -> Decision:
    dmarc = evaluation.dmarc
    if dmarc.author_domain is None:
        # RFC 9989 §4.2: no single Author Domain.  [impl choice, digest §4.1]
        # accept with dmarc=permerror by default; rejecting is a setting.
        if config.out_of_scope == "reject":
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
        return Decision(Disposition.NONE, Action.ACCEPT)

    policy = dmarc.policy
    if dmarc.result is DMARCResultCode.PASS:
        enforcing = policy in (Policy.QUARANTINE, Policy.REJECT)
        return Decision(Disposition.PASS if enforcing else Disposition.NONE, Action.ACCEPT)
    if dmarc.result is not DMARCResultCode.FAIL or policy is None or policy is Policy.NONE:
        # none, temperror, permerror, or p=none: handling must not change.
        return Decision(Disposition.NONE, Action.ACCEPT, dmarc.reasons)

    if policy is Policy.REJECT:
        # RFC 9989 §8: MUST NOT reject solely on p=reject; treat as quarantine.
        return Decision(
            Disposition.QUARANTINE,
            Action.QUARANTINE,
            (
                *dmarc.reasons,
                PolicyOverride(
                    OverrideReason.LOCAL_POLICY,
                    "p=reject failure handled as quarantine (RFC 9989 section 8)",
                ),
            ),
        )
    return Decision(Disposition.QUARANTINE, Action.QUARANTINE, dmarc.reasons)
