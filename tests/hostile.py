"""Golden outcomes for hostile mail, as the MTA sees them.

A hostile case goes through the real daemon over the milter protocol (the
findings live in the milter as much as in the core), and what the MTA is
told is written as text: every header modification, a quarantine, and the
final reply.  :func:`check_golden` compares that text byte for byte with
``tests/golden/hostile/NAME.txt``; DMARCMILTER_UPDATE_GOLDEN=1 rewrites the
file, for review in the diff.

The test modules ``tests/test_hostile_*.py`` each hold one class of attack.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.name

from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.milterclient import ALL_ACTIONS, EndOfMessage, MacroValues, MilterClient
from tests.signing import dkim_zone

GOLDEN_HOSTILE = Path(__file__).resolve().parent / "golden" / "hostile"

Start = Callable[..., MilterDaemon]

ATTACKER_IP = "203.0.113.66"
# A victim with p=reject (bank.example, and bank.net under the same TLD as
# attacker.net), and an attacker whose SPF and DKIM pass for his own names.
VICTIM_ZONE: dict[str, Any] = {
    "bank.example": [("A", "192.0.2.80")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject")],
    "bank.net": [("A", "192.0.2.81")],
    "_dmarc.bank.net": [("TXT", "v=DMARC1; p=reject")],
    "attacker.example": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    "attacker.net": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    **dkim_zone("attacker.example", "a1"),
    **dkim_zone("attacker.net", "a1"),
    **dkim_zone("bank.example", "s1"),
}


def daemons(tmp_path: Path, dns_server: TestDNSServer, zone: dict[str, Any]) -> Iterator[Start]:
    """For a module's ``start`` fixture: the zone served, and a function that
    starts ``dmarcmilter run`` processes (each with ``config`` changes),
    stopped at the end of the test."""
    dns_server.set_zone(zone)
    started: list[MilterDaemon] = []

    def start_daemon(config: dict[str, Any] | None = None) -> MilterDaemon:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        daemon = MilterDaemon(directory, dns_server.port, config)
        started.append(daemon)
        return daemon.start()

    try:
        yield start_daemon
    finally:
        for daemon in started:
            daemon.stop()


def send(client: MilterClient, message: bytes, sender: str, queue_id: str) -> EndOfMessage:
    """One message on a session already past HELO, with its queue id."""
    return client.send_message(
        message,
        sender=sender,
        recipients=["user@receiver.example"],
        macros_mail={"i": queue_id},
        macros_eom={"i": queue_id},
    )


def named_in(domain: str, text: str) -> bool:
    """Whether every label of ``domain`` (an A-label name) appears in
    ``text``, as written or as its U-label, up to case and compatibility
    mapping (what IDNA's UTS #46 mapping may do to it)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    try:
        unicode_labels = dns.name.from_text(domain).to_unicode(omit_final_dot=True).split(".")
    except dns.name.IDNAException:
        # An "xn--" label that is not valid Punycode passes as plain LDH.
        unicode_labels = domain.split(".")
    return all(
        a in folded or unicodedata.normalize("NFKC", u).casefold() in folded
        for a, u in zip(domain.split("."), unicode_labels, strict=True)
    )


def one_message(
    daemon: MilterDaemon,
    message: bytes,
    *,
    ip: str,
    sender: str,
    helo: str = "mx.attacker.example",
    hostname: str | bytes | None = None,
    actions: int = ALL_ACTIONS,
    connect_macros: MacroValues | None = None,
    queue_id: str = "4QID1",
) -> EndOfMessage:
    """One SMTP session with one message, as Postfix drives the milter."""
    client = MilterClient(daemon.socket)
    try:
        client.negotiate(actions=actions)
        client.connect(hostname if hostname is not None else helo, ip, macros=connect_macros)
        client.helo(helo)
        return send(client, message, sender, queue_id)
    finally:
        client.quit()
        client.close()


# Header values longer than this are shown as their start, their length and
# their end: a golden file stays readable when an attacker's header is huge.
_SHOW = 600


def _show(value: str) -> str:
    value = value.replace("\r\n", "\n")
    if len(value) <= _SHOW:
        return value
    return f"{value[:400]} [... {len(value)} characters ...] {value[-120:]}"


def outcome_text(eom: EndOfMessage) -> str:
    """What the milter asked of the MTA, one line (or folded block) each."""
    lines = []
    for mod in eom.modifications:
        if mod.kind in ("insheader", "addheader"):
            where = f" at {mod.index}" if mod.kind == "insheader" else ""
            lines.append(f"{mod.kind}{where}: {mod.name}:{_show(mod.value or '')}")
        elif mod.kind == "chgheader":
            verb = "delete" if not mod.value else "change"
            change = f": {mod.value}" if mod.value else ""
            lines.append(f"{verb} {mod.name} #{mod.index}{change}")
        elif mod.kind == "quarantine":
            lines.append(f"quarantine: {mod.reason}")
        else:
            lines.append(f"{mod.kind}: {mod.value}")
    reply = eom.reply
    if reply.kind == "replycode":
        final = f"{reply.code} {reply.xcode or ''} {reply.text or ''}".replace("  ", " ").strip()
    else:
        final = reply.kind
    lines.append(f"reply at {eom.stage}: {final}")
    return "\n".join(lines) + "\n"


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with the golden file ``NAME.txt`` (or write it)."""
    path = GOLDEN_HOSTILE / f"{name}.txt"
    if os.environ.get("DMARCMILTER_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with DMARCMILTER_UPDATE_GOLDEN=1"
    assert text == path.read_text()
