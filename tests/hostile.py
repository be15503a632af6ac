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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.milterclient import ALL_ACTIONS, EndOfMessage, MacroValues, MilterClient

GOLDEN_HOSTILE = Path(__file__).resolve().parent / "golden" / "hostile"

Start = Callable[..., MilterDaemon]


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
        return client.send_message(
            message,
            sender=sender,
            recipients=["user@receiver.example"],
            macros_mail={"i": queue_id},
            macros_eom={"i": queue_id},
        )
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
