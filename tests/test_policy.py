"""The policy step (RFC 9989 §7-8, digest §4.3) and the act step's plan,
on real evaluations against the loopback DNS server."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from dmarcmilter.actions import MONITOR_HEADER, forged_fields, plan
from dmarcmilter.config import Config, DNSConfig, HeadersConfig, PolicyConfig
from dmarcmilter.dmarc import OverrideReason
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate
from dmarcmilter.message import Message
from dmarcmilter.policy import Action, Decision, Disposition, QuarantineMethod, decide
from dmarcmilter.resolver import Resolver
from dmarcmilter.upstream import norm_id, own_ids
from tests.dnsserver import TestDNSServer
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@example.com")],
    "example.org": [("A", "192.0.2.90")],
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine")],
    "testing.example": [("A", "192.0.2.91")],
    "_dmarc.testing.example": [("TXT", "v=DMARC1; p=quarantine; t=y")],
    "relaxed.example": [("A", "192.0.2.92")],
    "_dmarc.relaxed.example": [("TXT", "v=DMARC1; p=none")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "lists.example.net": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    "_dmarc.slow.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
    **dkim_zone("lists.example.net", "arc"),
    **dkim_zone("reseal.example", "arc"),
    **dkim_zone("edge.example", "arc"),
    # E6: psd=n makes team.example.com its own Organizational Domain, though
    # the name ends in ".example.com".
    "_dmarc.team.example.com": [("TXT", "v=DMARC1; p=none; psd=n")],
}
GOOD = ("192.0.2.1", "mx.example.com", "bounce@bounce.example.com")
BAD = ("203.0.113.66", "evil.example", "x@elsewhere.example")

Evaluator = Callable[..., Evaluation]


@pytest.fixture
def run(dns_server: TestDNSServer, resolver: Resolver) -> Evaluator:
    dns_server.set_zone(ZONE)

    def evaluate_message(
        message: bytes,
        envelope: tuple[str, str, str] = BAD,
        policy: PolicyConfig | None = None,
        sealers: tuple[str, ...] = (),
    ) -> Evaluation:
        policy = policy or PolicyConfig()
        if sealers:
            policy = dataclasses.replace(policy, trusted_arc_sealers=sealers)
        config = Config(
            dns=DNSConfig(nameservers=("127.0.0.1",), port=dns_server.port, timeout=0.3),
            policy=policy,
        )
        env = Envelope.create(*envelope, ["user@receiver.example"], "4QID")
        return evaluate(env, Message.from_bytes(message), resolver.session(), config, now=NOW)

    return evaluate_message


def signed() -> bytes:
    return dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")


def reasons(decision: Decision) -> list[str]:
    return [r.reason.value for r in decision.reasons]


def test_pass_under_an_enforcing_policy(run: Evaluator) -> None:
    decision = decide(run(signed(), GOOD), PolicyConfig())
    assert decision == Decision(Disposition.PASS, Action.ACCEPT)


def test_p_reject_failure_is_quarantined_by_default(run: Evaluator) -> None:
    decision = decide(run(make_message(from_="ceo@example.com")), PolicyConfig())
    assert (decision.disposition, decision.action, decision.quarantine) == (
        Disposition.QUARANTINE,
        Action.QUARANTINE,
        QuarantineMethod.HEADER,
    )
    assert reasons(decision) == ["local_policy"]
    assert decision.reply is None


def test_enforced_rejection_names_the_domain(run: Evaluator) -> None:
    decision = decide(run(make_message(from_="ceo@example.com")), PolicyConfig(enforce_reject=True))
    assert (decision.disposition, decision.action) == (Disposition.REJECT, Action.REJECT)
    assert str(decision.reply) == "550 5.7.1 Message rejected per DMARC policy for example.com"
    assert decision.reasons == ()


@pytest.mark.parametrize(
    ("domains", "rejected"),
    [(("example.com",), True), (("EXAMPLE.com.",), True), (("other.example",), False)],
)
def test_rejection_for_listed_domains(
    run: Evaluator, domains: tuple[str, ...], rejected: bool
) -> None:
    config = PolicyConfig(enforce_reject_domains=domains, reject_text="No ({domain})")
    decision = decide(run(make_message(from_="ceo@example.com")), config)
    assert (decision.action is Action.REJECT) is rejected
    if rejected:
        assert str(decision.reply) == "550 5.7.1 No (example.com)"


def test_mailing_list_mail_is_downgraded(run: Evaluator) -> None:
    listed = make_message(
        from_="ceo@example.com", extra_headers={"List-Id": "<team.lists.example.net>"}
    )
    decision = decide(run(listed), PolicyConfig(enforce_reject=True))
    assert (decision.disposition, decision.action) == (Disposition.QUARANTINE, Action.QUARANTINE)
    assert reasons(decision) == ["mailing_list"]
    posted = make_message(
        from_="ceo@example.com", extra_headers={"List-Post": "<mailto:x@l.example>"}
    )
    assert reasons(decide(run(posted), PolicyConfig())) == ["mailing_list"]
    off = PolicyConfig(enforce_reject=True, mailing_list_downgrade=False)
    assert decide(run(listed), off).action is Action.REJECT


@pytest.mark.parametrize(
    ("action", "disposition", "verdict", "method", "why"),
    [
        ("header", Disposition.QUARANTINE, Action.QUARANTINE, QuarantineMethod.HEADER, []),
        ("hold", Disposition.QUARANTINE, Action.QUARANTINE, QuarantineMethod.HOLD, []),
        ("reject", Disposition.REJECT, Action.REJECT, None, ["local_policy"]),
        ("accept", Disposition.NONE, Action.ACCEPT, None, ["local_policy"]),
    ],
)
def test_quarantine_actions(
    run: Evaluator,
    action: str,
    disposition: Disposition,
    verdict: Action,
    method: QuarantineMethod | None,
    why: list[str],
) -> None:
    decision = decide(
        run(make_message(from_="bob@example.org")), PolicyConfig(quarantine_action=action)
    )
    assert (decision.disposition, decision.action, decision.quarantine) == (
        disposition,
        verdict,
        method,
    )
    assert reasons(decision) == why


def test_testing_mode_lowers_quarantine_to_none(run: Evaluator) -> None:
    decision = decide(run(make_message(from_="a@testing.example")), PolicyConfig())
    assert (decision.disposition, decision.action) == (Disposition.NONE, Action.ACCEPT)
    assert reasons(decision) == ["policy_test_mode"]


def test_p_none_failure_changes_nothing(run: Evaluator) -> None:
    decision = decide(
        run(make_message(from_="a@relaxed.example")), PolicyConfig(enforce_reject=True)
    )
    assert decision == Decision(Disposition.NONE, Action.ACCEPT)


def test_temperror_accepts_or_tempfails(run: Evaluator) -> None:
    evaluation = run(make_message(from_="a@slow.example"))
    assert evaluation.dmarc.result.value == "temperror"
    assert decide(evaluation, PolicyConfig()) == Decision(Disposition.NONE, Action.ACCEPT)
    decision = decide(evaluation, PolicyConfig(temperror_action="tempfail"))
    assert decision.action is Action.TEMPFAIL
    assert str(decision.reply) == (
        "451 4.7.0 DMARC policy for slow.example could not be checked; try again later"
    )


def test_out_of_scope_from(run: Evaluator) -> None:
    two = b"From: a@example.com\r\nFrom: b@example.org\r\n\r\nhi\r\n"
    accept = PolicyConfig(out_of_scope="accept")
    decision = decide(run(two, policy=accept), accept)
    assert decision.action is Action.ACCEPT
    reject = PolicyConfig(out_of_scope="reject")
    decision = decide(run(two, policy=reject), reject)
    assert decision.action is Action.REJECT and decision.reply is not None
    assert decision.reply.code == "550"


@pytest.mark.parametrize(
    ("message", "domain", "action"),
    [
        # Two From fields: example.com's p=reject is stricter than
        # example.org's p=quarantine, and is handled as quarantine (section 8).
        (b"From: a@example.org\r\nFrom: b@example.com\r\n\r\nhi\r\n", "example.com", "quarantine"),
        # The same field twice: the one domain is clear.
        (
            b"From: <ceo@example.org>\r\nFrom: <ceo@example.org>\r\n\r\nhi\r\n",
            "example.org",
            "quarantine",
        ),
        # Unparseable fields that still show the victim.
        (b"From: CEO <ceo@example.org> (\r\n\r\nhi\r\n", "example.org", "quarantine"),
        (b"From: CEO <ceo@example.org>>\r\n\r\nhi\r\n", "example.org", "quarantine"),
        # p=none plus p=quarantine: quarantine applies.
        (b"From: a@relaxed.example, b@example.org\r\n\r\nhi\r\n", "example.org", "quarantine"),
        # Only p=none: handling does not change.
        (b"From: a@relaxed.example>\r\n\r\nhi\r\n", "relaxed.example", "accept"),
    ],
)
def test_out_of_scope_from_is_evaluated_for_each_recovered_domain(
    run: Evaluator, message: bytes, domain: str, action: str
) -> None:
    evaluation = run(message)
    assert not evaluation.author.status.in_scope
    assert evaluation.dmarc.result.value == "fail"
    assert evaluation.dmarc.author_domain == domain
    assert evaluation.dmarc.malformed_from == evaluation.author.reason
    assert decide(evaluation, PolicyConfig()).action.value == action


def test_out_of_scope_from_that_passes_for_its_one_domain(run: Evaluator) -> None:
    message = signed().replace(b"From: ", b"From: alice@example.com\r\nFrom: ", 1)
    evaluation = run(message, GOOD)
    assert evaluation.author.status.value == "multiple_from"
    assert (evaluation.dmarc.result.value, evaluation.dmarc.author_domain) == (
        "pass",
        "example.com",
    )
    assert decide(evaluation, PolicyConfig()) == Decision(Disposition.PASS, Action.ACCEPT)


def test_out_of_scope_from_passing_for_one_domain_fails_for_the_other(run: Evaluator) -> None:
    # The attacker's own domain passes; the victim's still fails, and wins.
    message = signed().replace(b"From: ", b"From: ceo@example.org\r\nFrom: ", 1)
    evaluation = run(message, GOOD)
    assert (evaluation.dmarc.result.value, evaluation.dmarc.author_domain) == (
        "fail",
        "example.org",
    )
    assert decide(evaluation, PolicyConfig()).action is Action.QUARANTINE


def test_out_of_scope_from_with_a_temperror_domain(run: Evaluator) -> None:
    evaluation = run(b"From: a@slow.example, b@relaxed.example\r\n\r\nhi\r\n")
    assert (evaluation.dmarc.result.value, evaluation.dmarc.author_domain) == (
        "temperror",
        "slow.example",
    )
    # Deferred even with temperror_action = "accept": the unchecked domain
    # may be the one a reader sees.
    decision = decide(evaluation, PolicyConfig())
    assert decision.action is Action.TEMPFAIL and decision.reply is not None
    assert decision.reply.code == "451"
    # ...but a certain p=quarantine failure is not softened by it.
    evaluation = run(b"From: a@slow.example, b@example.org\r\n\r\nhi\r\n")
    assert (evaluation.dmarc.result.value, evaluation.dmarc.author_domain) == (
        "fail",
        "example.org",
    )


def test_out_of_scope_from_past_the_domain_cap_fails_closed(run: Evaluator) -> None:
    # Five domains without a policy, then passing ones with p=reject: the
    # search stops at five, and what was found is enforced as a failure.
    message = signed().replace(
        b"From: ",
        b"From: " + b", ".join(b"u@n%d.example" % i for i in range(6)) + b"\r\nFrom: ",
        1,
    )
    evaluation = run(message, GOOD)
    assert evaluation.author.recovery_incomplete
    assert evaluation.dmarc.result.value == "permerror"  # nothing with a policy was seen
    decision = decide(evaluation, PolicyConfig())  # but the victim may be unevaluated
    assert decision.action is Action.REJECT and decision.reply is not None
    assert decision.reply.code == "550"
    message = signed().replace(
        b"From: ",
        b"From: alice@example.com, "
        + b", ".join(b"u@n%d.example" % i for i in range(6))
        + b"\r\nFrom: ",
        1,
    )
    evaluation = run(message, GOOD)
    assert evaluation.author.recovery_incomplete
    assert (evaluation.dmarc.result.value, evaluation.dmarc.author_domain) == (
        "fail",
        "example.com",
    )
    assert "not every domain evaluated" in evaluation.dmarc.reason
    decision = decide(evaluation, PolicyConfig())
    assert decision.action is Action.QUARANTINE
    # example.com itself passed: treating it as a failure is reported.
    assert (decision.reasons[0].reason.value, decision.reasons[0].comment) == (
        "local_policy",
        "pass treated as fail: the From field names more domains than were evaluated",
    )


def test_out_of_scope_from_without_a_recoverable_domain(run: Evaluator) -> None:
    evaluation = run(b"From: undisclosed-recipients:;\r\nFrom: nobody\r\n\r\nhi\r\n")
    assert evaluation.dmarc.result.value == "permerror"
    assert evaluation.dmarc.author_domain is None
    assert decide(evaluation, PolicyConfig()).action is Action.ACCEPT


def test_monitor_mode_never_acts(run: Evaluator) -> None:
    evaluation = run(make_message(from_="ceo@example.com"))
    decision = decide(evaluation, PolicyConfig(monitor=True, quarantine_action="hold"))
    assert (decision.disposition, decision.action, decision.monitored) == (
        Disposition.NONE,
        Action.ACCEPT,
        Action.QUARANTINE,
    )
    assert [(r.reason.value, r.comment) for r in decision.reasons][-1] == (
        "local_policy",
        "monitor mode: quarantine (hold)",
    )
    monitored = decide(evaluation, PolicyConfig(monitor=True, enforce_reject=True))
    assert monitored.monitored is Action.REJECT and monitored.reply is None
    # A pass is not an action: nothing to note.
    assert decide(run(signed(), GOOD), PolicyConfig(monitor=True)).monitored is None


def arc_forwarded(results: str) -> bytes:
    # A list saw a valid signature, then added a footer (breaking DKIM) and
    # sealed the message with what it saw.
    with_footer = signed() + b"-- \r\nlist footer\r\n"
    return arc_seal(
        with_footer, "lists.example.net", "arc", authserv_id="lists.example.net", results=results
    )


@pytest.mark.parametrize(
    ("results", "trusted", "vouched"),
    [
        ("dkim=pass header.d=example.com; dmarc=pass header.from=example.com", True, True),
        ("dmarc=pass header.from=example.com", True, True),
        ("dkim=pass header.d=mail.example.com", True, True),  # relaxed alignment
        ("spf=pass smtp.mailfrom=bounce@example.com", True, True),
        ("dkim=pass header.d=example.net; dmarc=fail header.from=example.com", True, False),
        ("dmarc=pass header.from=example.com", False, False),
    ],
)
def test_trusted_arc_sealer(run: Evaluator, results: str, trusted: bool, vouched: bool) -> None:
    sealers = ("Lists.Example.Net",) if trusted else ("other.example",)
    evaluation = run(arc_forwarded(results), sealers=sealers)
    assert (evaluation.dmarc.result.value, evaluation.arc.result.value) == ("fail", "pass")
    decision = decide(evaluation, PolicyConfig(trusted_arc_sealers=sealers))
    if vouched:
        assert (decision.disposition, decision.action) == (Disposition.NONE, Action.ACCEPT)
        assert reasons(decision) == ["trusted_forwarder"]
        assert "lists.example.net" in decision.reasons[0].comment
    else:
        assert decision.action is Action.QUARANTINE


def test_a_broken_arc_chain_vouches_for_nothing(run: Evaluator) -> None:
    sealed = arc_forwarded("dmarc=pass header.from=example.com")
    tampered = sealed.replace(b"list footer", b"list f00ter")
    evaluation = run(tampered, sealers=("lists.example.net",))
    assert evaluation.arc.result.value == "fail"
    decision = decide(evaluation, PolicyConfig(trusted_arc_sealers=("lists.example.net",)))
    assert decision.action is Action.QUARANTINE


def test_a_vouch_needs_this_configuration_to_trust_the_sealer(run: Evaluator) -> None:
    evaluation = run(
        arc_forwarded("dmarc=pass header.from=example.com"), sealers=("lists.example.net",)
    )
    assert evaluation.arc_vouch == "lists.example.net"
    assert decide(evaluation, PolicyConfig()).action is Action.QUARANTINE
    other = PolicyConfig(trusted_arc_sealers=("other.example",))
    assert decide(evaluation, other).action is Action.QUARANTINE


def resealed(by: str) -> bytes:
    # After the trusted list, another hop rewrote the body and sealed what
    # it had made: the chain still validates (each sealer signed what it
    # received), but the list's old verdict is about another message.
    sealed = arc_forwarded("dmarc=pass header.from=example.com")
    rewritten = sealed.replace(b"list footer", b"pay to account 666")
    return arc_seal(rewritten, by, "arc", authserv_id=by, results="arc=pass; dmarc=fail")


@pytest.mark.parametrize(
    ("sealers", "vouch"),
    [
        # A later untrusted hop: the trusted sealer's old pass counts for nothing.
        (("lists.example.net",), None),
        # Every later hop trusted too: the older trusted pass may vouch.
        (("lists.example.net", "reseal.example"), "lists.example.net"),
        # Only the newest hop trusted: it saw no pass, and nothing older counts.
        (("reseal.example",), None),
    ],
)
def test_a_trusted_sealer_vouches_only_if_no_untrusted_hop_came_after(
    run: Evaluator, sealers: tuple[str, ...], vouch: str | None
) -> None:
    evaluation = run(resealed("reseal.example"), sealers=sealers)
    assert (evaluation.dmarc.result.value, evaluation.arc.result.value) == ("fail", "pass")
    assert [h.sealer_domain for h in evaluation.arc.hops] == ["lists.example.net", "reseal.example"]
    assert evaluation.arc_vouch == vouch
    decision = decide(evaluation, PolicyConfig(trusted_arc_sealers=sealers))
    assert decision.action is (Action.ACCEPT if vouch else Action.QUARANTINE)


@pytest.mark.parametrize(
    ("results", "vouched"),
    [
        # psd=n: team.example.com is its own Organizational Domain, so its
        # DKIM or SPF pass is not aligned with example.com, though a string
        # suffix test says it is.
        ("dkim=pass header.d=team.example.com", False),
        ("spf=pass smtp.mailfrom=bounce@team.example.com", False),
        ("dkim=pass header.d=x.team.example.com", False),
        # Without a psd=n record on the way, the walk agrees with relaxed alignment.
        ("dkim=pass header.d=mail.example.com", True),
        ("spf=pass smtp.mailfrom=example.com", True),
        # Neither a look-alike suffix nor a string that is not a domain.
        ("dkim=pass header.d=evilexample.com", False),
        ("dkim=pass header.d=example.com.evil.example", False),
        ("dkim=pass header.d=..example.com", False),
        ("dmarc=pass header.from=team.example.com", False),
        ("dmarc=pass header.from=EXAMPLE.com.", True),
        ("dkim=fail header.d=example.com; dmarc=fail header.from=example.com", False),
    ],
)
def test_sealer_alignment_is_dmarc_alignment(run: Evaluator, results: str, vouched: bool) -> None:
    evaluation = run(arc_forwarded(results), sealers=("lists.example.net",))
    assert evaluation.dmarc.result.value == "fail"
    assert (evaluation.arc_vouch == "lists.example.net") is vouched


# -- the act step's plan -----------------------------------------------------------

OWNED = frozenset({"mx.receiver.example", "mx2.receiver.example"})


def config(**headers: Any) -> Config:
    return Config(authserv_id="mx.receiver.example", headers=HeadersConfig(**headers))


def test_forged_authentication_results_are_found_by_index() -> None:
    headers = [
        ("Received", "from a by b"),
        ("Authentication-Results", "upstream.example; spf=pass smtp.mailfrom=a@b.example"),
        ("authentication-results", " MX.Receiver.Example.; dmarc=pass header.from=x.example"),
        ("Authentication-Results", "mx2.receiver.example; garbage (((("),
        ("Authentication-Results", "(only a comment"),
        ("X-Other", "mx.receiver.example; dmarc=pass"),
    ]
    assert forged_fields(headers, OWNED) == (
        ("authentication-results", 2),
        ("Authentication-Results", 3),
    )


def test_forged_fields_in_every_spelling_are_found() -> None:
    headers = [
        ("Authentication-Results", "mx.receiver.e\u0445ample; dmarc=pass"),  # Cyrillic: kept
        ("Authentication-Results", "\uff4dx.receiver.example; dmarc=pass"),
        ("Authentication-Results", '"MX2\uff0eRECEIVER\uff0eEXAMPLE\u3002"; dmarc=pass'),
        ("Authentication-Results", "mx.rece\u00adiver.example; dmarc=pass"),
        ("Authentication-Results", "x" * 2000 + "; dmarc=pass"),
    ]
    owned = own_ids("mx.receiver.example", "mx2.receiver.example")
    assert forged_fields(headers, owned) == tuple(
        ("Authentication-Results", n) for n in (2, 3, 4, 5)
    )


def test_plan_for_a_quarantined_message(run: Evaluator) -> None:
    evaluation = run(make_message(from_="ceo@example.com"))
    decision = decide(evaluation, PolicyConfig())
    forged = [("Authentication-Results", "mx.receiver.example; dmarc=pass header.from=example.com")]
    assert forged_fields(forged, OWNED) == (("Authentication-Results", 1),)
    actions = plan(evaluation, decision, config(received_spf=True), "mx.receiver.example")
    assert [name for name, _ in actions.prepend] == ["Received-SPF", "Authentication-Results"]
    received_spf = actions.prepend[0][1]
    assert received_spf.startswith("none (") and "client-ip=203.0.113.66;" in received_spf
    assert "envelope-from=x@elsewhere.example;" in received_spf and received_spf.endswith(
        "identity=mailfrom"
    )
    assert actions.prepend[1][1].startswith("mx.receiver.example;")
    assert "dmarc=fail" in actions.prepend[1][1]
    assert actions.append == (("X-Spam-Flag", "YES"),)
    assert (actions.verdict, actions.hold_reason, actions.reply) == (Action.QUARANTINE, None, None)


def test_plan_for_held_and_monitored_messages(run: Evaluator) -> None:
    evaluation = run(make_message(from_="ceo@example.com"))
    held = plan(
        evaluation,
        decide(evaluation, PolicyConfig(quarantine_action="hold")),
        config(),
        "mx.receiver.example",
    )
    assert held.append == ()
    assert held.hold_reason == "DMARC fail under policy reject of example.com"
    monitored = plan(
        evaluation,
        decide(evaluation, PolicyConfig(monitor=True, enforce_reject=True)),
        config(),
        "mx.receiver.example",
    )
    assert monitored.verdict is Action.ACCEPT and monitored.hold_reason is None
    assert monitored.append == (
        (MONITOR_HEADER, "would reject; dmarc=fail policy=reject header.from=example.com"),
    )


def test_plan_for_a_rejected_message_edits_nothing(run: Evaluator) -> None:
    evaluation = run(make_message(from_="ceo@example.com"))
    decision = decide(evaluation, PolicyConfig(enforce_reject=True))
    actions = plan(evaluation, decision, config(), "mx.receiver.example")
    assert (actions.prepend, actions.append, actions.verdict) == ((), (), Action.REJECT)
    assert actions.reply == decision.reply


def test_norm_id() -> None:
    assert norm_id(" MX.Example. ") == "mx.example"


def test_reasons_vocabulary_is_rfc_9990() -> None:
    assert {r.value for r in OverrideReason} == {
        "local_policy",
        "mailing_list",
        "other",
        "policy_test_mode",
        "trusted_forwarder",
    }


def test_decisions_are_immutable(run: Evaluator) -> None:
    decision = decide(run(signed(), GOOD), PolicyConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.action = Action.REJECT  # type: ignore[misc]
