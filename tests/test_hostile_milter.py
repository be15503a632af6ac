"""Hostile mail against the milter itself: oversized headers we write,
header sections past our bounds, internal errors, SMTP reply texts built from
attacker data, client names that are not UTF-8, transactions the MTA gives up
on, and body memory.

Every case goes through the real daemon over the milter protocol, and its
outcome (what the MTA is told) is compared with a golden file
``tests/golden/hostile/milter_*.txt``.  The renderer's bounds and the reply
escaping also have unit tests here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.actions import monitor_note
from dmarcmilter.author import AuthorResult, AuthorStatus
from dmarcmilter.authres.parse import parse
from dmarcmilter.authres.render import (
    MAX_LISTED_SIGNATURES,
    MAX_RENDERED_CHARS,
    MILTER_MAX_DATA,
    render,
    render_received_spf,
)
from dmarcmilter.config import PolicyConfig, config_from_mapping
from dmarcmilter.dmarc import DMARCOutcome, DMARCResultCode, SPFVerdict
from dmarcmilter.evaluation import Envelope, Evaluation
from dmarcmilter.policy import (
    Action,
    Decision,
    Disposition,
    LocalContext,
    decide,
    incomplete_header,
    safe_reply_text,
    skip_reason,
)
from dmarcmilter.record import Policy
from dmarcmilter.results import (
    ARCOutcome,
    DKIMOutcome,
    DKIMResultCode,
    DKIMSignatureResult,
    SPFOutcome,
    SPFResult,
    SPFResultCode,
    SPFScope,
)
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.hostile import Start, check_golden, daemons, outcome_text
from tests.milterclient import (
    ALL_ACTIONS,
    SMFIF_ADDHDRS,
    SMFIF_CHGHDRS,
    SMFIF_QUARANTINE,
    EndOfMessage,
    MilterClient,
)
from tests.postfixserver import (
    PostfixInstances,
    PostfixServer,
    milter_for_postfix,
)
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

ATTACKER_IP = "203.0.113.66"
ZONE: dict[str, Any] = {
    "victim.example": [("A", "192.0.2.80")],
    "_dmarc.victim.example": [("TXT", "v=DMARC1; p=reject")],
    # The attacker's own domain: SPF passes from his address, p=reject.
    "attacker.example": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    "_dmarc.attacker.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.slow.example": "TIMEOUT",
}
FORGED_AR = "mx.receiver.example; spf=pass smtp.mailfrom=victim.example; dmarc=pass"


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    yield from daemons(tmp_path, dns_server, ZONE)


def session(
    daemon: MilterDaemon,
    ip: str = ATTACKER_IP,
    *,
    hostname: str | bytes = "mx.attacker.example",
    actions: int = ALL_ACTIONS,
    macros: dict[str, str | bytes] | None = None,
) -> MilterClient:
    client = MilterClient(daemon.socket)
    client.negotiate(actions=actions)
    client.connect(hostname, ip, macros=macros)  # type: ignore[arg-type]
    client.helo("mx.attacker.example")
    return client


def send(client: MilterClient, message: bytes, sender: str = "x@attacker.example") -> EndOfMessage:
    return client.send_message(
        message,
        sender=sender,
        recipients=["user@receiver.example"],
        macros_mail={"i": "4QID1"},
        macros_eom={"i": "4QID1"},
    )


def one(daemon: MilterDaemon, message: bytes, **kw: Any) -> EndOfMessage:
    sender = kw.pop("sender", "x@attacker.example")
    client = session(daemon, **kw)
    try:
        return send(client, message, sender)
    finally:
        client.quit()
        client.close()


def history_rows(daemon: MilterDaemon) -> list[tuple[Any, ...]]:
    path = daemon.state_dir / "history.sqlite3"
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT queue_id, dmarc_result FROM messages").fetchall()


def victim(**kw: Any) -> bytes:
    return make_message(from_="CEO <ceo@victim.example>", **kw)


# -- 3: our Authentication-Results must fit the milter protocol ------------------------------


def junk_signatures(count: int) -> list[tuple[str, str]]:
    label = "x" * 63
    return [
        (
            "DKIM-Signature",
            f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={label}.{label}.{label}.j{i}.example;"
            f" s={label}{i}; h=from; bh=AAAA; b=QUJD{'x' * 40}",
        )
        for i in range(count)
    ]


def test_250_junk_signatures_keep_the_verdict(start: Start) -> None:
    daemon = start({"dkim": {"max_signatures": 1000}, "dns": {"budget": 30.0}})
    eom = one(daemon, victim(extra_headers=junk_signatures(250)))
    (ar,) = [m for m in eom.modifications if m.name == "Authentication-Results"]
    assert ar.value is not None and len(ar.value) < MILTER_MAX_DATA // 2
    assert "(242 more signatures not listed)" in ar.value
    parse(ar.value)  # still a valid field
    # The verdict: p=reject handled as quarantine by a header.
    assert ("addheader", "X-Spam-Flag") in [(m.kind, m.name) for m in eom.modifications]
    check_golden("milter_250_junk_signatures", outcome_text(eom))


def test_refused_header_write_keeps_the_hold(start: Start) -> None:
    # An MTA that does not let the milter add header fields: the hold
    # quarantine and the reply still apply.
    daemon = start({"policy": {"quarantine_action": "hold"}})
    eom = one(daemon, victim(), actions=ALL_ACTIONS & ~SMFIF_ADDHDRS)
    assert [m.kind for m in eom.modifications] == ["quarantine"]
    check_golden("milter_no_addheader_hold", outcome_text(eom))


def test_refused_header_write_keeps_the_reject(start: Start) -> None:
    daemon = start({"policy": {"enforce_reject": True}})
    eom = one(daemon, victim(), actions=ALL_ACTIONS & ~SMFIF_ADDHDRS)
    assert eom.reply.code == "550"
    check_golden("milter_no_addheader_reject", outcome_text(eom))


def test_header_quarantine_the_mta_refuses_becomes_a_hold(start: Start) -> None:
    # The default quarantine is a header field: an MTA that will not take it
    # must not get the failing message unmarked.  It is held instead.
    daemon = start()
    eom = one(daemon, victim(), actions=ALL_ACTIONS & ~SMFIF_ADDHDRS)
    assert [m.kind for m in eom.modifications] == ["quarantine"]
    assert eom.reply.kind == "continue"
    check_golden("milter_no_addheader_quarantine_header", outcome_text(eom))


def test_header_quarantine_with_neither_headers_nor_hold_is_tempfailed(start: Start) -> None:
    daemon = start()
    eom = one(daemon, victim(), actions=ALL_ACTIONS & ~SMFIF_ADDHDRS & ~SMFIF_QUARANTINE)
    assert eom.reply.code == "451"
    check_golden("milter_no_addheader_no_hold", outcome_text(eom))


def _worst_evaluation(signatures: int) -> Evaluation:
    """Every value the renderer writes at its longest, of characters that
    each need escaping, and more signatures than are listed."""
    big = '"\\' * 5000
    mfrom = SPFResult(SPFResultCode.TEMPERROR, big, SPFScope.MFROM, big, big)
    helo = SPFResult(SPFResultCode.PERMERROR, big, SPFScope.HELO, big, big)
    sig = DKIMSignatureResult(big, big, DKIMResultCode.TEMPERROR, big, big, big, big)
    dmarc = DMARCOutcome(
        DMARCResultCode.PERMERROR, big, None, None, SPFVerdict(mfrom), (), reason=big
    )
    return Evaluation(
        envelope=Envelope("192.0.2.1", big, big),
        author=AuthorResult(AuthorStatus.OK, big, (big,)),
        spf=SPFOutcome(mfrom, helo),
        dkim=DKIMOutcome((sig,) * signatures),
        arc=ARCOutcome(),
        dmarc=dmarc,
        evaluated_at=dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
    )


def test_rendered_field_has_a_worst_case_under_the_milter_limit() -> None:
    worst = _worst_evaluation(10_000)
    value = render(worst, '"\\' * 5000)
    assert len(value) <= MAX_RENDERED_CHARS < MILTER_MAX_DATA // 2
    # Close to the computed bound: the test does reach the worst case.
    assert len(value) > MAX_RENDERED_CHARS * 0.8
    parsed = parse(value)
    dkim = [r for r in parsed.results if r.method == "dkim"]
    assert len(dkim) == MAX_LISTED_SIGNATURES
    assert "(9992 more signatures not listed)" in value
    assert len(render_received_spf(worst, "mx.receiver.example")) < 2000
    monitored = Decision(Disposition.NONE, Action.ACCEPT, monitored=Action.REJECT)
    assert len(monitor_note(worst, monitored)) < 400
    # Few signatures: all listed, no comment.
    few = render(_worst_evaluation(3), "mx.receiver.example")
    assert "not listed" not in few
    assert len([r for r in parse(few).results if r.method == "dkim"]) == 3


# -- 4: header sections past the bounds ------------------------------------------------------


def cut_header_message(**kw: Any) -> bytes:
    """From the attacker's domain (SPF passes), 10,000 filler fields, then a
    forged Authentication-Results with our id and a second From."""
    filler = [(f"X-Filler-{i}", "x") for i in range(10_000)]
    late = [("Authentication-Results", FORGED_AR), ("From", "CEO <ceo@victim.example>")]
    return make_message(from_="ceo@attacker.example", extra_headers=filler + late, **kw)


def test_cut_header_is_refused_and_forged_field_removed(start: Start) -> None:
    daemon = start()
    eom = one(daemon, cut_header_message())
    assert eom.reply.code == "552"
    check_golden("milter_cut_header_fields", outcome_text(eom))
    # The From past the cut was seen: no pass for the attacker's domain.
    (line,) = daemon.wait_log("message")
    # (With out_of_scope = "evaluate" each From domain was evaluated.)
    assert line["dmarc"] == "fail" and line["headers_cut"] == "true"


def test_huge_forged_field_within_the_bounds_is_removed(start: Start) -> None:
    # 60 KB (libmilter takes at most 64 KiB per field): its authserv-id is
    # found after a long comment and the field goes.
    forged = f"({'c' * 30_000}) mx.receiver.example; dmarc=pass ({'d' * 30_000})"
    daemon = start()
    message = victim(extra_headers=[("Authentication-Results", forged)])
    eom = one(daemon, message)
    assert "delete Authentication-Results #1" in outcome_text(eom)
    check_golden("milter_huge_forged_field", outcome_text(eom))


def test_cut_header_tempfail_option(start: Start) -> None:
    daemon = start({"policy": {"oversized_header_action": "tempfail", "monitor": True}})
    eom = one(daemon, cut_header_message())
    # Monitor mode does not let partial data through either.
    assert eom.reply.code == "452"
    check_golden("milter_cut_header_tempfail", outcome_text(eom))


def test_cut_header_by_bytes(start: Start) -> None:
    # 300 fields of 60,000 bytes: past MAX_HEADER_BYTES (16 MiB) well
    # before MAX_HEADER_FIELDS.
    big = [(f"X-Big-{i}", "y" * 60_000) for i in range(300)]
    late = [("Authentication-Results", FORGED_AR), ("From", "CEO <ceo@victim.example>")]
    daemon = start()
    message = make_message(from_="ceo@attacker.example", extra_headers=big + late)
    eom = one(daemon, message)
    assert eom.reply.code == "552"
    check_golden("milter_cut_header_bytes", outcome_text(eom))


def test_cut_header_from_a_trusted_client(start: Start) -> None:
    # Not evaluated (trusted network), but not let through on a cut header.
    daemon = start()
    eom = one(daemon, cut_header_message(), ip="127.0.0.1")
    assert eom.reply.code == "552"
    check_golden("milter_cut_header_trusted", outcome_text(eom))


# -- 5: internal errors and SMTP reply texts -------------------------------------------------


def test_percent_and_non_ascii_reach_the_reply_safely(start: Start) -> None:
    # The reason put into the 550 text quotes the From field: a lone "%"
    # there made libmilter refuse the reply, and the message was accepted.
    daemon = start({"policy": {"out_of_scope": "reject"}})
    eom = one(daemon, make_message(from_="Ч <%\u00e9@>, 100%@x"))
    assert eom.reply.code == "550"
    text = eom.reply.text or ""
    assert text.isascii() and "%" not in text
    check_golden("milter_percent_reply", outcome_text(eom))


def _internal_error(start: Start, action: str | None) -> tuple[MilterDaemon, EndOfMessage]:
    # A real trigger: an MTA that does not allow removing header fields, and
    # a forged field that must be removed.
    config = {"milter": {"internal_error_action": action}} if action else {}
    daemon = start(config)
    message = victim(extra_headers=[("Authentication-Results", FORGED_AR)])
    eom = one(daemon, message, actions=ALL_ACTIONS & ~SMFIF_CHGHDRS)
    return daemon, eom


def test_internal_error_tempfails_by_default_with_an_error_id(start: Start) -> None:
    daemon, eom = _internal_error(start, None)
    assert (eom.reply.code, eom.reply.xcode) == ("451", "4.3.0")
    check_golden("milter_internal_error_tempfail", outcome_text(eom))
    (line,) = daemon.wait_log("message")
    error_id = line["error_id"]
    assert re.fullmatch(r"[0-9a-f]{12}", error_id)
    traceback = [entry for entry in daemon.log_lines() if error_id in entry.get("msg", "")]
    assert traceback and "Traceback" in traceback[0]["error"]


def test_internal_error_reject(start: Start) -> None:
    _, eom = _internal_error(start, "reject")
    assert (eom.reply.code, eom.reply.xcode) == ("550", "5.3.0")
    check_golden("milter_internal_error_reject", outcome_text(eom))


def test_internal_error_accept_never_keeps_forged_fields(start: Start) -> None:
    # "accept" would deliver the forged field: it is answered with tempfail.
    _, eom = _internal_error(start, "accept")
    assert eom.reply.code == "451"


def test_safe_reply_text() -> None:
    assert safe_reply_text("for 100% of vic%tim.example") == "for 100? of vic?tim.example"
    assert safe_reply_text("a\r\nb\x00c\u00e9") == "a??b?c?"
    assert len(safe_reply_text("x" * 5000)) == 400
    policy = PolicyConfig(enforce_reject=True)
    evaluation = _worst_evaluation(1)
    failed = dataclasses.replace(
        evaluation,
        dmarc=dataclasses.replace(
            evaluation.dmarc,
            result=DMARCResultCode.FAIL,
            author_domain="b%d\u00e9\r\n.example",
            policy=Policy.REJECT,
        ),
    )
    reply = decide(failed, policy).reply
    assert reply is not None and reply.text.endswith("b?d???.example")


def test_local_policy_is_in_the_policy_step() -> None:
    config = config_from_mapping({})
    assert skip_reason(LocalContext("127.0.0.1"), config) == "trusted_network"
    assert skip_reason(LocalContext(ATTACKER_IP, "alice"), config) == "authenticated"
    assert skip_reason(LocalContext(None), config) == "local"
    assert skip_reason(LocalContext(ATTACKER_IP), config) is None
    cut = decide(_worst_evaluation(1), config.policy, LocalContext(ATTACKER_IP, "", False))
    assert cut == incomplete_header(config.policy)
    assert cut.action is Action.REJECT


# -- 7: client host names that are not UTF-8 -------------------------------------------------

BAD_NAME = b"\xff\xfe.attacker.example"


def test_non_utf8_host_name_with_client_addr(start: Start) -> None:
    # No configured authserv-id: it comes from the j macro, at end of message.
    daemon = start({"authserv_id": ""})
    macros: dict[str, str | bytes] = {
        "j": "mx.receiver.example",
        "_": BAD_NAME + b" [203.0.113.66]",
        "{client_addr}": ATTACKER_IP,
    }
    message = victim(extra_headers=[("Authentication-Results", FORGED_AR)])
    eom = one(daemon, message, hostname=BAD_NAME, macros=macros)
    text = outcome_text(eom)
    assert "Authentication-Results: mx.receiver.example;" in text
    assert "delete Authentication-Results #1" in text
    check_golden("milter_non_utf8_host_client_addr", text)


def test_non_utf8_host_name_without_address_is_not_accepted(start: Start) -> None:
    # Sendmail's defaults: only "_", which cannot be read.  The message
    # cannot be evaluated: the internal-error action, never "local".
    daemon = start()
    macros: dict[str, str | bytes] = {"_": BAD_NAME + b" [203.0.113.66]"}
    message = victim(extra_headers=[("Authentication-Results", FORGED_AR)])
    eom = one(daemon, message, hostname=BAD_NAME, macros=macros)
    assert eom.reply.code == "451"
    check_golden("milter_non_utf8_host_no_address", outcome_text(eom))


def test_non_utf8_j_macro(start: Start) -> None:
    # The j macro cannot be read either: our host name is used.
    daemon = start({"authserv_id": ""})
    macros: dict[str, str | bytes] = {"j": BAD_NAME, "{client_addr}": ATTACKER_IP}
    eom = one(daemon, victim(), hostname=BAD_NAME, macros=macros)
    (ar,) = [m for m in eom.modifications if m.name == "Authentication-Results"]
    assert ar.value is not None
    assert parse(ar.value).authserv_id  # not empty
    assert eom.reply.kind == "continue"


# -- 10b: transactions the MTA gives up on ---------------------------------------------------


def test_abort_before_end_of_message_is_not_recorded(start: Start) -> None:
    daemon = start()
    client = session(daemon)
    try:
        client.mail("x@attacker.example", macros={"i": "4QABORT"})
        client.rcpt("user@receiver.example")
        client.header("From", "ceo@victim.example")
        client.eoh()
        client.abort()
        eom = send(client, victim())
    finally:
        client.quit()
        client.close()
    assert eom.reply.kind == "continue"
    daemon.wait_log("message")
    daemon.stop()
    assert [q for q, _ in history_rows(daemon)] == ["4QID1"]
    assert "Traceback" not in daemon.log_text()


def test_connection_lost_during_end_of_message_is_not_recorded(start: Start) -> None:
    # The policy lookup times out (0.5 s); the MTA has given up by then.
    daemon = start()
    client = session(daemon)
    client.mail("x@attacker.example", macros={"i": "4QGONE"})
    client.rcpt("user@receiver.example")
    for name, value in [("From", "ceo@slow.example"), ("Subject", "hi")]:
        client.header(name, value)
    client.eoh()
    client.body(b"hello\r\n")
    client.send_packet(b"E")  # SMFIC_BODYEOB; hang up while it is evaluated
    time.sleep(0.2)
    client.close()
    (line,) = daemon.wait_log("message", timeout=20)
    assert line.get("aborted") == "true"
    daemon.stop()
    assert history_rows(daemon) == []
    assert "Traceback" not in daemon.log_text()


# -- 9c: body memory -------------------------------------------------------------------------


def _peak_rss_kib(daemon: MilterDaemon) -> int:
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


# A body whose relaxed canonical form differs from it on every line (a tab,
# a double space, trailing whitespace), so each rule rewrites text.
_LARGE_LINE = b"lorem ipsum\tdolor  sit amet, consectetur adipiscing elit, sed do eiusmod  \r\n"


def _large_message(kind: str, size: int) -> bytes:
    body = _LARGE_LINE * (size // len(_LARGE_LINE))
    message = victim(body=body)
    if kind == "unsigned":
        return message
    canonicalize = ("simple", "simple") if kind == "dkim-simple" else ("relaxed", "relaxed")
    message = dkim_sign(message, "victim.example", "big", canonicalize=canonicalize)
    if kind == "arc":
        message = arc_seal(message, "forwarder.example", "arc", authserv_id="mx.forwarder.example")
    return message


@pytest.mark.parametrize("kind", ["unsigned", "dkim-relaxed", "dkim-simple", "arc"])
def test_large_body_costs_about_its_size(
    start: Start, dns_server: TestDNSServer, kind: str
) -> None:
    dns_server.add_zone(dkim_zone("victim.example", "big"))
    dns_server.add_zone(dkim_zone("forwarder.example", "arc"))
    daemon = start()
    one(daemon, victim())
    before = _peak_rss_kib(daemon)
    message = _large_message(kind, 60 * 1024 * 1024)
    body = len(message) - message.index(b"\r\n\r\n")
    started = time.monotonic()
    eom = one(daemon, message)
    elapsed = time.monotonic() - started
    grown = (_peak_rss_kib(daemon) - before) * 1024
    (results,) = [m.value for m in eom.modifications if m.name == "Authentication-Results"]
    assert eom.reply.kind == "continue"
    # The whole body was checked, not skipped: the signatures verify.
    if kind == "unsigned":
        assert "dkim=none" in results
    else:
        assert "dkim=pass header.d=victim.example" in results
    if kind == "arc":
        assert "arc=pass" in results
    # The message is gathered into one buffer that becomes its bytes, and
    # the body is canonicalised and hashed window by window in place.
    print(f"{kind}: peak grew by {grown / body:.2f} x the body in {elapsed:.1f} s")
    assert grown < 1.3 * body


def test_a_body_past_the_limit_is_let_go(start: Start, dns_server: TestDNSServer) -> None:
    dns_server.add_zone(dkim_zone("victim.example", "big"))
    limit = 4 * 1024 * 1024
    daemon = start({"milter": {"max_body_bytes": limit}})
    one(daemon, victim())
    before = _peak_rss_kib(daemon)
    message = _large_message("dkim-relaxed", 60 * 1024 * 1024)
    body = len(message) - message.index(b"\r\n\r\n")
    eom = one(daemon, message)
    grown = (_peak_rss_kib(daemon) - before) * 1024
    (results,) = [m.value for m in eom.modifications if m.name == "Authentication-Results"]
    assert f'dkim=permerror reason="body larger than {limit} bytes was not verified"' in results
    # What was kept up to the limit is freed; nothing after it is kept.
    print(f"cut: peak grew by {grown / body:.2f} x the body")
    assert grown < 2 * limit


def test_evaluate_command_shows_the_local_skip_decisions(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(victim())

    def evaluate(*args: str) -> str:
        base = ["evaluate", str(path), "--helo", "h.example", "--mail-from", "a@b.example"]
        proc = subprocess.run(
            [sys.executable, "-m", "dmarcmilter", *base, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "Not evaluated: trusted_network" in evaluate("--client-ip", "127.0.0.1")
    out = evaluate("--client-ip", ATTACKER_IP, "--auth", "alice", "--json")
    assert json.loads(out) == {"skipped": "authenticated"}


# -- behind a real Postfix -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pf_milter(dns_server_session: TestDNSServer) -> Iterator[MilterDaemon]:
    with milter_for_postfix(dns_server_session.port) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def pf(postfix_instances: PostfixInstances, pf_milter: MilterDaemon) -> PostfixServer:
    return postfix_instances.start(
        milter=f"unix:{pf_milter.socket}", milter_default_action="accept"
    )


@pytest.mark.parametrize(
    ("action", "reply"),
    [
        ("reject", (552, "5.3.4 Message header too large to be checked")),
        ("tempfail", (452, "4.3.4 Message header too large to be checked")),
    ],
)
def test_postfix_refuses_a_cut_header(
    pf: PostfixServer,
    pf_milter: MilterDaemon,
    dns_server: TestDNSServer,
    action: str,
    reply: tuple[int, str],
) -> None:
    # Postfix's default milter_default_action is "tempfail"; this instance
    # says "accept", so the refusal is the milter's own verdict.
    dns_server.set_zone(ZONE)
    pf_milter.reload({"policy": {"oversized_header_action": action}})
    pf.clear_queue()
    sent = pf.send("x@attacker.example", "user@receiver.example", cut_header_message())
    assert (sent.code, sent.text) == reply
    assert pf.queue() == []
