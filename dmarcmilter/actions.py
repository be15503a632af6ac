"""The act step: the header edits and the verdict the milter asks the MTA for.

:func:`forged_fields` finds every incoming Authentication-Results field
that claims our authserv-id, or another one we own: RFC 8601 §5 says an MTA
MUST delete them, since they are forgeries when they arrive from outside.
The milter removes them first, evaluated message or not, before anything
else can fail.

From an evaluation and its decision, :func:`plan` builds the rest of what
the milter does at end-of-message, as plain data, so that the milter only
carries it out and the tests can check it without an MTA:

* add our Authentication-Results at the top (RFC 8601 §5 ordering, like a
  trace field), and optionally a Received-SPF field (RFC 7208 §9.1);
* add the quarantine marker or the monitor-mode note the decision asks for;
* the verdict: accept, quarantine (marked or held), reject or tempfail.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

from .authres.parse import authserv_id_of, claims_authserv_id
from .authres.render import plain_text, render, render_received_spf
from .config import Config, parse_header_line
from .evaluation import Evaluation
from .policy import Action, Decision, QuarantineMethod, SMTPReply
from .upstream import AUTHENTICATION_RESULTS

MONITOR_HEADER = "X-DMARC-Monitor"


@dataclass(frozen=True, slots=True)
class MilterActions:
    # Inserted at the top, topmost first.
    prepend: tuple[tuple[str, str], ...] = ()
    # Added at the end of the header.
    append: tuple[tuple[str, str], ...] = ()
    verdict: Action = Action.ACCEPT
    reply: SMTPReply | None = None
    # For smfi_quarantine (the MTA's hold queue).
    hold_reason: str | None = None


def forged_fields(
    headers: Iterable[tuple[str, str]], owned: Set[str]
) -> tuple[tuple[str, int], ...]:
    """The Authentication-Results fields claiming an authserv-id in
    ``owned`` (keys made with :func:`upstream.norm_id`), as any reader could
    take them (see :func:`authres.parse.claims_authserv_id`): each as the
    field name as received and its 1-based index among fields of that name,
    the numbering smfi_chgheader uses."""
    seen = 0
    forged = []
    for name, value in headers:
        if name.lower() != AUTHENTICATION_RESULTS:
            continue
        seen += 1
        # A field too malformed to parse still names its authserv-id first;
        # one that names none at all cannot be attributed to us.
        authserv_id = authserv_id_of(value)
        if authserv_id is not None and claims_authserv_id(authserv_id, owned):
            forged.append((name, seen))
    return tuple(forged)


def plan(
    evaluation: Evaluation, decision: Decision, config: Config, authserv_id: str
) -> MilterActions:
    """Everything to do for an evaluated message, once forged fields are
    gone (:func:`forged_fields`, removed by the milter before anything else)."""
    if decision.action in (Action.REJECT, Action.TEMPFAIL):
        # The message is refused: there is nothing to edit.
        return MilterActions(verdict=decision.action, reply=decision.reply)
    prepend = [("Authentication-Results", render(evaluation, authserv_id))]
    if config.headers.received_spf:
        prepend.insert(0, ("Received-SPF", render_received_spf(evaluation, authserv_id)))
    append: list[tuple[str, str]] = []
    hold_reason = None
    dmarc = evaluation.dmarc
    if decision.quarantine is QuarantineMethod.HEADER:
        append.append(parse_header_line(config.policy.quarantine_header))
    elif decision.quarantine is QuarantineMethod.HOLD:
        policy = dmarc.policy.value if dmarc.policy else "none"
        domain = plain_text(dmarc.author_domain or "")
        hold_reason = f"DMARC {dmarc.result.value} under policy {policy} of {domain}"
    if decision.monitored is not None:
        append.append((MONITOR_HEADER, monitor_note(evaluation, decision)))
    return MilterActions(
        tuple(prepend), tuple(append), decision.action, decision.reply, hold_reason
    )


def monitor_note(evaluation: Evaluation, decision: Decision) -> str:
    dmarc = evaluation.dmarc
    what = decision.monitored.value if decision.monitored else "accept"
    for reason in decision.reasons:
        # The monitor-mode reason says how a quarantine would be done.
        if reason.comment.startswith("monitor mode: "):
            what = reason.comment.removeprefix("monitor mode: ")
    policy = dmarc.policy.value if dmarc.policy else "none"
    return (
        f"would {plain_text(what)}; dmarc={dmarc.result.value} policy={policy} "
        f"header.from={plain_text(dmarc.author_domain or 'unknown')}"
    )
