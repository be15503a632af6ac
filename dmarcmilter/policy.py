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

Local policy that does not depend on the evaluation lives here too, so that
``dmarcmilter evaluate`` reproduces what the milter does: which clients are
not evaluated (:func:`skip_reason`), which messages are not recorded for
reports (:func:`recorded`, the report loop guard), and what a header section
too large to be seen whole gets (:class:`LocalContext`).

Every SMTP reply text is made safe here (:func:`safe_reply_text`): values
from the message or DNS are put into it, and libmilter refuses a text with
a lone "%" or a line break.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .authres.render import plain_text
from .config import Config, PolicyConfig
from .dmarc import DMARCResultCode, OverrideReason, PolicyOverride
from .domains import ascii_casefold
from .evaluation import Evaluation
from .record import Policy
from .report.guard import is_own_report

# An SMTP reply line is at most 512 octets (RFC 5321 §4.5.3.1.5), with the
# codes; the text is cut to this many characters.
MAX_REPLY_TEXT = 400


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


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What the MTA told us about the transaction besides the message."""

    # The connecting client's address; None for a connection that is not
    # over IP (local submission through Postfix's non_smtpd_milters).
    client_ip: str | None = None
    # The SASL login name (the MTA's {auth_authen} macro), "" if none.
    authenticated: str = ""
    # False when the header section went past the milter's bounds: every
    # From and Authentication-Results field was still kept, others were not.
    header_complete: bool = True


def skip_reason(context: LocalContext, config: Config) -> str | None:
    """Why a message is not evaluated, or None: a SASL-authenticated client,
    a local submission, a client in a trusted network."""
    if config.clients.skip_authenticated and context.authenticated:
        return "authenticated"
    if context.client_ip is None:
        return "local"
    trusted = client_in_networks(context.client_ip, config.clients.trusted_networks)
    if trusted is None:
        return "no_client_address"
    return "trusted_network" if trusted else None


def client_in_networks(client_ip: str, networks: tuple[str, ...]) -> bool | None:
    """Whether ``client_ip`` (an IPv6 zone index ignored) is in one of
    ``networks`` (CIDR texts from the configuration, checked when it was
    loaded); None when it is not an IP address."""
    try:
        address = ipaddress.ip_address(client_ip.partition("%")[0])
    except ValueError:
        return None
    return any(address in network for network in _networks(networks))


@functools.lru_cache(maxsize=16)
def _networks(
    networks: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def recorded(headers: Sequence[tuple[str, str]], config: Config) -> bool:
    """Whether an evaluated message goes into the history: not our own
    aggregate report mail (the report loop guard)."""
    return not is_own_report(headers, config)


def incomplete_header(config: PolicyConfig) -> Decision:
    """A header section that was not seen whole.  [impl choice] A message is
    never delivered on partial data, and monitor mode does not soften this:
    such a header is far past any MTA's defaults (Postfix keeps at most
    header_size_limit per field and refuses larger messages), so only an
    attacker or a broken client sends one.  Rejecting is the default because
    retrying sends the same header again."""
    text = "Message header too large to be checked"
    if config.oversized_header_action == "tempfail":
        return Decision(Disposition.NONE, Action.TEMPFAIL, reply=SMTPReply("452", "4.3.4", text))
    # Reports show what was applied: a rejection by local policy.
    return Decision(
        Disposition.REJECT,
        Action.REJECT,
        (PolicyOverride(OverrideReason.LOCAL_POLICY, "header too large to be checked"),),
        reply=SMTPReply("552", "5.3.4", text),
    )


def safe_reply_text(text: str) -> str:
    """``text`` fit for smfi_setreply: printable ASCII on one line, no "%"
    (libmilter treats it as a format character and refuses the reply), at
    most :data:`MAX_REPLY_TEXT` characters.  Anything else becomes "?"."""
    return plain_text(text.replace("%", "?"), MAX_REPLY_TEXT)


def _reply(code: str, enhanced: str, template: str, domain: str) -> SMTPReply:
    return SMTPReply(code, enhanced, safe_reply_text(template.format(domain=domain)))


def _unevaluable(text: str) -> Decision:
    """A rejection of a From field DMARC cannot be evaluated for: no
    disposition, since no policy was applied."""
    return Decision(
        Disposition.NONE, Action.REJECT, reply=SMTPReply("550", "5.7.1", safe_reply_text(text))
    )


def decide(
    evaluation: Evaluation, config: PolicyConfig, context: LocalContext | None = None
) -> Decision:
    if context is not None and not context.header_complete:
        return incomplete_header(config)
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
        return _unevaluable(
            f"Message rejected: DMARC cannot be evaluated ({reason}); "
            "the From field must name exactly one author domain"
        )
    if domain is None:
        if evaluation.author.recovery_incomplete and config.out_of_scope == "evaluate":
            # More author domains than are evaluated, none of them with an
            # enforcing policy: an unevaluated one may be the victim's, and
            # there is no policy to apply in its place (fail closed).
            return _unevaluable(
                "Message rejected: the From field names more author domains "
                "than DMARC is evaluated for"
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
                reply=_reply("451", "4.7.0", config.tempfail_text, domain),
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
                reply=_reply("550", "5.7.1", config.reject_text, domain),
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
            reply=_reply("550", "5.7.1", config.reject_text, domain),
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

    RFC 8617 §7.2 leaves it to local policy.  The core works out the fact
    (:attr:`Evaluation.arc_vouch`): the chain validates, the sealer sealed
    the newest hop or only trusted sealers came after it, and its
    ARC-Authentication-Results show, for the Author Domain, a DMARC pass or
    an SPF or DKIM pass aligned by DMARC's own rule
    (:func:`dmarcmilter.dmarc.sealer_vouch`).  Here it is honoured only for
    a sealer this configuration trusts.
    """
    sealer = evaluation.arc_vouch
    if sealer is None or _norm(sealer) not in {_norm(t) for t in trusted}:
        return None
    return sealer


def _local(comment: str) -> PolicyOverride:
    return PolicyOverride(OverrideReason.LOCAL_POLICY, comment)


def _norm(name: str | None) -> str:
    return ascii_casefold(name or "")
