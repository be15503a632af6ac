"""Hostile mail: trust that is too easy to claim, through the real daemon.

Each case sends the attacker's message over the milter protocol and compares
what the MTA is told with a golden file (tests/hostile.py):

* an upstream Authentication-Results field is trusted only from a client in
  ``headers.trusted_upstream_networks``, its SPF only for our MAIL FROM;
* an id that is ours at run time (the MTA's ``j`` name) is never trusted,
  even when listed in ``headers.trusted_authserv_ids``;
* every spelling of our id that a reader may normalise to it is removed;
* a trusted ARC sealer's pass counts only when no untrusted hop came after
  it, and its alignment is DMARC's (psd=n), not a string suffix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.hostile import Start, check_golden, daemons, one_message, outcome_text
from tests.milterclient import EndOfMessage
from tests.postfixserver import (
    MYHOSTNAME,
    PostfixInstances,
    PostfixServer,
    milter_for_postfix,
)
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    # psd=n: team.example.com is an Organizational Domain of its own.
    "_dmarc.team.example.com": [("TXT", "v=DMARC1; p=none; psd=n")],
    **dkim_zone("example.com", "s1"),
    **dkim_zone("lists.example.net", "arc"),
    **dkim_zone("reseal.example", "arc"),
}
ATTACKER_IP = "203.0.113.66"
RELAY_IP = "10.1.2.3"
RELAY_ID = "relay.internal.example"
UPSTREAM = {
    "headers": {
        "trusted_authserv_ids": [RELAY_ID],
        "trusted_upstream_networks": ["10.1.0.0/16"],
    }
}


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    yield from daemons(tmp_path, dns_server, ZONE)


def one(
    daemon: MilterDaemon,
    message: bytes,
    *,
    ip: str = ATTACKER_IP,
    sender: str = "x@elsewhere.example",
    j: str = "mx.receiver.example",
) -> EndOfMessage:
    return one_message(
        daemon, message, ip=ip, sender=sender, helo="mx.sender.example", connect_macros={"j": j}
    )


def victim(*fields: tuple[str, str]) -> bytes:
    """Mail claiming to be from example.com (p=reject), with no pass of its own."""
    return make_message(from_="CEO <ceo@example.com>", extra_headers=list(fields))


def ar(text: str) -> tuple[str, str]:
    return ("Authentication-Results", text)


# -- 8a: upstream results are tied to the relay's connection -------------------------


FORGED_RELAY = ar(
    f"{RELAY_ID}; spf=pass smtp.mailfrom=ceo@example.com; dkim=pass header.d=example.com"
)


def test_upstream_results_from_an_untrusted_client_are_ignored(start: Start) -> None:
    # Anyone can type the relay's id; the attacker connects from the internet.
    daemon = start(UPSTREAM)
    eom = one(daemon, victim(FORGED_RELAY), sender="ceo@example.com")
    check_golden("trust_upstream_untrusted_client", outcome_text(eom))


def test_upstream_results_from_the_relay_are_used(start: Start) -> None:
    # The same field from the relay's own connection: used (the control case).
    daemon = start(UPSTREAM)
    eom = one(daemon, victim(FORGED_RELAY), ip=RELAY_IP, sender="ceo@example.com")
    check_golden("trust_upstream_relay_client", outcome_text(eom))


def test_upstream_spf_for_another_mail_from_is_ignored(start: Start) -> None:
    # Through the relay, but the relay's SPF pass was for another reverse-path
    # (an old field replayed in a new message): SPF is checked here instead.
    daemon = start(UPSTREAM)
    replayed = ar(f"{RELAY_ID}; spf=pass smtp.mailfrom=news@example.com; dkim=none")
    eom = one(daemon, victim(replayed), ip=RELAY_IP, sender="spoof@evil.example")
    check_golden("trust_upstream_mailfrom_mismatch", outcome_text(eom))


# -- 8b: an id of ours is never trusted, whatever the list says ----------------------


@pytest.mark.parametrize(
    ("case", "written"),
    [
        ("exact", "mx.receiver.example"),
        ("spelled", "MX\uff0eReceiver.Example."),
    ],
)
def test_the_mta_j_name_in_the_trusted_list_is_not_trusted(
    start: Start, case: str, written: str
) -> None:
    # No authserv_id configured: ours is the MTA's j name, which the
    # operator also listed as trusted; the attacker sends from a relay address.
    daemon = start(
        {
            "authserv_id": "",
            "headers": {
                "trusted_authserv_ids": ["mx.receiver.example"],
                "trusted_upstream_networks": ["10.1.0.0/16"],
            },
        }
    )
    forged = ar(
        f"{written}; spf=pass smtp.mailfrom=ceo@example.com; dkim=pass header.d=example.com"
    )
    eom = one(daemon, victim(forged), ip=RELAY_IP, sender="ceo@example.com")
    check_golden(f"trust_j_is_trusted_id_{case}", outcome_text(eom))


# -- 8c: every spelling of our id that a reader may normalise is removed -------------

SPELLINGS = {
    "kelvin": "mx.\u212aiosk.example",  # KELVIN SIGN, lowered to "k"
    "fullwidth_dots": "mx\uff0ereceiver\uff0eexample",
    "fullwidth_letters": "\uff2d\uff38.receiver.example",
    "ideographic_dot": "mx.receiver.example\u3002",
    "trailing_dot": "MX.Receiver.Example.",
    "soft_hyphen": "mx.re\u00adceiver.example",
    "zwj": "mx.rece\u200diver.example",
    "zwnj": "mx\u200c.receiver.example",
    "ulabel": "b\u00fccher.example",  # we own the A-label xn--bcher-kva.example
    "alabel": "XN--BCHER-KVA.example",
    "quoted": '"mx.receiver.example"',
    "padded": "mx.receiver.example" + "\u00ad" * 1100,  # too long to examine
}


@pytest.mark.parametrize("case", sorted(SPELLINGS))
def test_spellings_of_our_id_are_removed(start: Start, case: str) -> None:
    daemon = start(
        {"headers": {"owned_authserv_ids": ["mx.kiosk.example", "xn--bcher-kva.example"]}}
    )
    forged = ar(f"{SPELLINGS[case]}; dmarc=pass header.from=example.com")
    kept = ar("mx.kiosk-example.net; dmarc=pass header.from=example.com")
    eom = one(daemon, victim(kept, forged))
    text = outcome_text(eom)
    # Only the forgery (the second A-R) goes; the look-alike of another name stays.
    assert "delete Authentication-Results #2" in text
    assert "#1" not in text
    check_golden(f"trust_strip_{case}", text)


# -- 8d, 8e: trusted ARC sealers ----------------------------------------------------


def forwarded(results: str = "dmarc=pass header.from=example.com") -> bytes:
    # A list saw the author's valid signature, added a footer (breaking DKIM)
    # and sealed what it saw.
    signed = dkim_sign(make_message(from_="CEO <ceo@example.com>"), "example.com", "s1")
    with_footer = signed + b"-- \r\nlist footer\r\n"
    return arc_seal(
        with_footer, "lists.example.net", "arc", authserv_id="lists.example.net", results=results
    )


SEALERS = {"policy": {"trusted_arc_sealers": ["lists.example.net"]}}


def test_a_trusted_sealer_vouches_for_the_newest_hop(start: Start) -> None:
    # The control case: the trusted list sealed last; its pass is honoured.
    daemon = start(SEALERS)
    check_golden("trust_arc_trusted_newest", outcome_text(one(daemon, forwarded())))


def test_a_trusted_sealer_then_an_untrusted_resealer(start: Start) -> None:
    # After the trusted list, the attacker's hop rewrote the body and sealed
    # again: the chain validates (cv=pass), the list's old pass is worthless.
    daemon = start(SEALERS)
    rewritten = forwarded().replace(b"list footer", b"wire the money to account 666")
    resealed = arc_seal(
        rewritten, "reseal.example", "arc", authserv_id="reseal.example", results="arc=pass"
    )
    check_golden("trust_arc_untrusted_resealer", outcome_text(one(daemon, resealed)))


@pytest.mark.parametrize(
    ("case", "results"),
    [
        ("dkim", "dkim=pass header.d=team.example.com"),
        ("spf", "spf=pass smtp.mailfrom=bounce@team.example.com"),
    ],
)
def test_a_sealer_pass_split_off_by_psd_n_does_not_align(
    start: Start, case: str, results: str
) -> None:
    # team.example.com ends in ".example.com", but psd=n makes it its own
    # Organizational Domain: not aligned with example.com.
    daemon = start(SEALERS)
    eom = one(daemon, forwarded(results))
    check_golden(f"trust_arc_psd_n_{case}", outcome_text(eom))


# -- 8b behind a real Postfix: the j macro is Postfix's myhostname --------------------


@pytest.fixture
def postfix_milter(
    postfix_instances: PostfixInstances, dns_server: TestDNSServer
) -> Iterator[tuple[PostfixServer, MilterDaemon]]:
    dns_server.set_zone(ZONE)
    # No authserv_id: ours is Postfix's j, which is also listed as trusted,
    # and the attacker's address is in the upstream networks.
    config = {
        "authserv_id": "",
        "headers": {
            "trusted_authserv_ids": [MYHOSTNAME],
            "trusted_upstream_networks": ["203.0.113.0/24"],
        },
    }
    with milter_for_postfix(dns_server.port, config) as daemon:
        server = postfix_instances.start(
            milter=f"unix:{daemon.socket}", milter_default_action="tempfail"
        )
        try:
            yield server, daemon
        finally:
            postfix_instances.remove(server)


def test_postfix_j_name_listed_as_trusted_is_not_trusted(
    postfix_milter: tuple[PostfixServer, MilterDaemon],
) -> None:
    mta, _ = postfix_milter
    forged = ar(
        f"{MYHOSTNAME}; spf=pass smtp.mailfrom=ceo@example.com; dkim=pass header.d=example.com"
    )
    sent = mta.send(
        "ceo@example.com", "user@receiver.example", victim(forged), client_ip=ATTACKER_IP
    )
    assert sent.accepted, sent.reply
    delivered = mta.wait_for_delivery(sent)
    (ours,) = delivered.header_values("Authentication-Results")
    assert ours.startswith(f"{MYHOSTNAME};")
    assert "dmarc=fail" in ours and "spf=pass" not in ours
    assert delivered.header("X-Spam-Flag") == "YES"
