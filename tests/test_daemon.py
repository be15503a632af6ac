"""``dmarcmilter run`` as a real process, driven over the milter protocol.

The MTA side is tests/milterclient.py, which speaks milter protocol 6 the way
Postfix does; the DNS is the loopback test server; the history is SQLite in
the daemon's state directory.  (tests/test_postfix.py runs the same daemon
behind a real Postfix.)
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import ROOT, MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.milterclient import EndOfMessage, MilterClient, Modification, apply_modifications
from tests.podman import root_is_mount_point
from tests.signing import dkim_sign, dkim_zone, make_message

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@example.com")],
    "example.org": [("A", "192.0.2.90")],
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.slow.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
}
GOOD_IP, BAD_IP = "192.0.2.1", "203.0.113.66"

Start = Callable[..., MilterDaemon]


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    dns_server.set_zone(ZONE)
    daemons: list[MilterDaemon] = []

    def start_daemon(config: dict[str, Any] | None = None, **kw: Any) -> MilterDaemon:
        directory = tmp_path / f"d{len(daemons)}"
        directory.mkdir()
        daemon = MilterDaemon(directory, dns_server.port, config)
        daemons.append(daemon)
        return daemon.start(**kw)

    yield start_daemon
    for daemon in daemons:
        daemon.stop()


def signed(from_: str = "alice@example.com", **kw: Any) -> bytes:
    return dkim_sign(make_message(from_=from_, **kw), "example.com", "s1")


def session(
    daemon: MilterDaemon, ip: str = BAD_IP, helo: str = "mx.sender.example"
) -> MilterClient:
    client = MilterClient(daemon.socket)
    client.negotiate()
    client.connect(helo, ip)
    client.helo(helo)
    return client


def send(
    client: MilterClient,
    message: bytes,
    sender: str = "x@elsewhere.example",
    queue_id: str = "4QID1",
    auth: str = "",
) -> EndOfMessage:
    mail_macros = {"i": queue_id, **({"{auth_authen}": auth} if auth else {})}
    return client.send_message(
        message,
        sender=sender,
        recipients=["user@receiver.example"],
        macros_mail=mail_macros,
        macros_eom={"i": queue_id},
    )


def one(daemon: MilterDaemon, message: bytes, ip: str = BAD_IP, **kw: Any) -> EndOfMessage:
    client = session(daemon, ip)
    try:
        return send(client, message, **kw)
    finally:
        client.quit()
        client.close()


def inserted(eom: EndOfMessage, name: str) -> list[Modification]:
    return [m for m in eom.modifications if m.kind == "insheader" and m.name == name]


def ar_value(eom: EndOfMessage) -> str:
    (mod,) = inserted(eom, "Authentication-Results")
    assert mod.index == 0
    assert mod.value is not None
    return mod.value


def history(daemon: MilterDaemon) -> list[tuple[Any, ...]]:
    path = daemon.state_dir / "history.sqlite3"
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT queue_id, client_ip, header_from_domain, dmarc_result, disposition "
            "FROM messages ORDER BY id"
        ).fetchall()


# -- evaluation, headers and verdicts -------------------------------------------------


def test_pass_gets_authentication_results_at_the_top(start: Start) -> None:
    daemon = start()
    eom = one(daemon, signed(), ip=GOOD_IP, sender="b@bounce.example.com")
    assert eom.reply.kind == "continue"
    value = ar_value(eom)
    # Leading whitespace was negotiated, so the value comes with its space.
    assert value.startswith(" mx.receiver.example;")
    assert "dkim=pass header.d=example.com header.s=s1" in value
    assert "spf=pass smtp.mailfrom=bounce.example.com" in value
    assert value.rstrip().endswith("dmarc=pass policy.dmarc=reject header.from=example.com")
    assert [m.kind for m in eom.modifications] == ["insheader"]


def test_negotiation_asks_only_for_what_is_used(start: Start) -> None:
    daemon = start()
    client = MilterClient(daemon.socket)
    try:
        negotiated = client.negotiate()
    finally:
        client.close()
    # ADDHDRS | CHGHDRS | QUARANTINE
    assert negotiated.actions == 0x01 | 0x10 | 0x20
    for flag in (0x200, 0x100):  # no DATA, no unknown-command callbacks
        assert negotiated.has(flag)
    for flag in (0x1000, 0x2000, 0x4000, 0x8000, 0x80, 0x80000):  # no replies before eom
        assert negotiated.has(flag)
    assert negotiated.has(0x100000)  # header values with their leading space


def test_failure_is_quarantined_with_a_header_by_default(start: Start) -> None:
    daemon = start()
    eom = one(daemon, make_message(from_="ceo@example.com"))
    assert eom.reply.kind == "continue"
    assert "dmarc=fail policy.dmarc=reject header.from=example.com" in ar_value(eom)
    added = [(m.name, m.value) for m in eom.modifications if m.kind == "addheader"]
    assert added == [("X-Spam-Flag", " YES")]


def test_enforced_rejection_replies_550(start: Start) -> None:
    daemon = start({"policy": {"enforce_reject": True}})
    eom = one(daemon, make_message(from_="ceo@example.com"))
    assert (eom.reply.kind, eom.reply.code, eom.reply.xcode) == ("replycode", "550", "5.7.1")
    assert eom.reply.text == "Message rejected per DMARC policy for example.com"
    assert eom.modifications == []


def test_hold_quarantine(start: Start) -> None:
    daemon = start({"policy": {"quarantine_action": "hold"}})
    eom = one(daemon, make_message(from_="bob@example.org"))
    (hold,) = [m for m in eom.modifications if m.kind == "quarantine"]
    assert hold.reason == "DMARC fail under policy quarantine of example.org"
    assert eom.reply.kind == "continue"


def test_temperror_tempfails_when_asked(start: Start) -> None:
    daemon = start({"policy": {"temperror_action": "tempfail"}})
    eom = one(daemon, make_message(from_="a@slow.example"))
    assert (eom.reply.kind, eom.reply.code, eom.reply.xcode) == ("replycode", "451", "4.7.0")
    accepting = start()
    eom = one(accepting, make_message(from_="a@slow.example"))
    assert eom.reply.kind == "continue"
    assert "dmarc=temperror" in ar_value(eom)


def test_monitor_mode_says_what_it_would_have_done(start: Start) -> None:
    daemon = start({"policy": {"monitor": True, "enforce_reject": True}})
    eom = one(daemon, make_message(from_="ceo@example.com"))
    assert eom.reply.kind == "continue"
    added = [(m.name, m.value) for m in eom.modifications if m.kind == "addheader"]
    assert added == [
        ("X-DMARC-Monitor", " would reject; dmarc=fail policy=reject header.from=example.com")
    ]


def test_received_spf(start: Start) -> None:
    daemon = start({"headers": {"received_spf": True}})
    eom = one(daemon, signed(), ip=GOOD_IP, sender="b@bounce.example.com")
    delivered = apply_modifications(
        [("From", " alice@example.com")], eom.modifications, leadspc=True
    )
    # Both at the top, Received-SPF first, as a trace field.
    assert [name for name, _ in delivered] == ["Received-SPF", "Authentication-Results", "From"]
    (spf,) = inserted(eom, "Received-SPF")
    assert spf.value is not None and spf.value.startswith(" pass (")
    assert "client-ip=192.0.2.1;" in spf.value


# -- forged results, skipped clients ------------------------------------------------------


def test_forged_authentication_results_are_removed(start: Start) -> None:
    daemon = start({"headers": {"owned_authserv_ids": ["mx2.receiver.example"]}})
    message = make_message(
        from_="ceo@example.com",
        extra_headers=[
            ("Authentication-Results", "mx.receiver.example; dmarc=pass header.from=example.com"),
            ("Authentication-Results", "upstream.example; spf=pass smtp.mailfrom=a@b.example"),
            ("Authentication-Results", "MX2.Receiver.Example; dkim=pass header.d=example.com"),
        ],
    )
    eom = one(daemon, message)
    deletions = [(m.name, m.index, m.value) for m in eom.modifications if m.kind == "chgheader"]
    # Highest index first, so each deletion leaves the others' numbering alone.
    assert deletions == [("Authentication-Results", 3, ""), ("Authentication-Results", 1, "")]
    assert "dmarc=fail" in ar_value(eom)


@pytest.mark.parametrize(
    ("how", "ip", "auth", "skipped"),
    [
        ("sasl", BAD_IP, "alice", "authenticated"),
        ("loopback", "127.0.0.1", "", "trusted_network"),
        ("configured network", "198.51.100.7", "", "trusted_network"),
    ],
)
def test_trusted_clients_are_not_evaluated(
    start: Start, how: str, ip: str, auth: str, skipped: str
) -> None:
    daemon = start({"clients": {"trusted_networks": ["127.0.0.0/8", "198.51.100.0/24"]}})
    forged = ("Authentication-Results", "mx.receiver.example; dmarc=pass header.from=example.com")
    eom = one(
        daemon, make_message(from_="ceo@example.com", extra_headers=[forged]), ip=ip, auth=auth
    )
    assert eom.reply.kind == "continue"
    # Not evaluated: no results, no marking, but the forgery goes all the same.
    assert [(m.kind, m.index) for m in eom.modifications] == [("chgheader", 1)]
    (line,) = daemon.wait_log("message")
    assert (line["skipped"], line["action"]) == (skipped, "accept")


def test_trusted_upstream_results_are_used(start: Start) -> None:
    daemon = start(
        {
            "headers": {
                "trusted_authserv_ids": ["relay.internal.example"],
                "trusted_upstream_networks": ["203.0.113.0/24"],
            }
        }
    )
    # Our own SPF check of this client fails; the relay saw the real sender.
    upstream = (
        "Authentication-Results",
        "relay.internal.example; spf=pass smtp.mailfrom=news@example.com; dkim=none",
    )
    eom = one(
        daemon,
        make_message(from_="ceo@example.com", extra_headers=[upstream]),
        sender="news@example.com",
    )
    value = ar_value(eom)
    assert "spf=pass smtp.mailfrom=example.com" in value
    assert "dmarc=pass" in value
    assert [m.kind for m in eom.modifications] == ["insheader"]  # the relay's A-R is kept


# -- transactions, bounds -------------------------------------------------------------


def test_two_messages_on_one_connection_are_evaluated_apart(start: Start) -> None:
    daemon = start()
    client = session(daemon, GOOD_IP)
    try:
        first = send(client, signed(), sender="b@bounce.example.com", queue_id="Q1")
        second = send(client, make_message(from_="ceo@example.com"), queue_id="Q2")
        client.mail("<x@elsewhere.example>", macros={"i": "Q3"})
        client.abort()  # RSET before anything else
        third = send(client, signed(), sender="b@bounce.example.com", queue_id="Q4")
    finally:
        client.quit()
        client.close()
    assert "dmarc=pass" in ar_value(first)
    assert "dmarc=fail" in ar_value(second)
    assert "dmarc=pass" in ar_value(third)
    lines = daemon.wait_log("message", 3)
    assert [(line["queue_id"], line["dmarc"]) for line in lines] == [
        ("Q1", "pass"),
        ("Q2", "fail"),
        ("Q4", "pass"),
    ]
    assert daemon.stop() == 0
    assert [row[0] for row in history(daemon)] == ["Q1", "Q2", "Q4"]


def test_a_body_over_the_limit_is_not_kept(start: Start) -> None:
    daemon = start({"milter": {"max_body_bytes": 4096}})
    big = signed(body="x" * 70 + "\n") if False else signed(body=("y" * 99 + "\n") * 200)
    eom = one(daemon, big, ip=GOOD_IP, sender="b@bounce.example.com")
    value = ar_value(eom)
    assert 'dkim=permerror reason="body larger than 4096 bytes was not verified"' in value
    # SPF still aligns, so DMARC passes on it.
    assert "dmarc=pass" in value
    small = one(daemon, signed(), ip=GOOD_IP, sender="b@bounce.example.com")
    assert "dkim=pass" in ar_value(small)


def test_ten_megabyte_message(start: Start) -> None:
    daemon = start()
    body = ("z" * 998 + "\n") * 10_000
    eom = one(daemon, signed(body=body), ip=GOOD_IP, sender="b@bounce.example.com")
    assert "dkim=pass" in ar_value(eom)


def test_eight_bit_headers_survive_for_dkim(start: Start) -> None:
    daemon = start()
    message = signed(subject="Grüße aus Köln ✓", body="Grüße\n")
    eom = one(daemon, message, ip=GOOD_IP, sender="b@bounce.example.com")
    assert "dkim=pass" in ar_value(eom)


# -- history and logging --------------------------------------------------------------


def test_every_evaluated_message_is_logged_once_and_recorded(start: Start) -> None:
    daemon = start()
    one(daemon, signed(), ip=GOOD_IP, sender="b@bounce.example.com", queue_id="A1")
    one(daemon, make_message(from_="ceo@example.com"), queue_id="A2")
    one(daemon, make_message(from_="ceo@example.com"), ip="127.0.0.1", queue_id="A3")
    lines = daemon.wait_log("message", 3)
    assert len(lines) == 3
    fail = lines[1]
    assert {k: fail[k] for k in ("queue_id", "client_ip", "header_from", "policy_domain")} == {
        "queue_id": "A2",
        "client_ip": BAD_IP,
        "header_from": "example.com",
        "policy_domain": "example.com",
    }
    assert {k: fail[k] for k in ("spf", "dkim", "dmarc", "policy", "disposition", "action")} == {
        "spf": "none",
        "dkim": "none",
        "dmarc": "fail",
        "policy": "reject",
        "disposition": "quarantine",
        "action": "quarantine:header",
    }
    assert fail["reasons"] == "local_policy"
    assert float(fail["elapsed_ms"]) >= 0
    assert daemon.stop() == 0
    # The skipped message (from loopback) is not in the history.
    assert history(daemon) == [
        ("A1", GOOD_IP, "example.com", "pass", "pass"),
        ("A2", BAD_IP, "example.com", "fail", "quarantine"),
    ]


def test_our_own_report_mail_is_never_recorded(start: Start) -> None:
    """The loop guard: report mail of ours is evaluated and logged, but
    kept out of the history, so no report ever reports on reports."""
    import datetime as dt

    from dmarcmilter.report.mail import build_report_message, report_filename

    daemon = start(
        {
            "report": {
                "org_name": "Receiver Example",
                "from_address": "dmarc-reports@example.com",
                "submitter": "mx.receiver.example",
            }
        }
    )
    report_id = "0123456789abcdef0123456789abcdef"

    def report_mail(submitter: str) -> bytes:
        return build_report_message(
            from_address="dmarc-reports@example.com",
            to_address="agg@example.org",
            receiver=submitter,
            submitter=submitter,
            org_name="Receiver Example",
            policy_domain="example.org",
            begin=1777593600,
            end=1777679999,
            report_id=report_id,
            attachment=b"\x1f\x8b not really",
            filename=report_filename(submitter, "example.org", 1777593600, 1777679999, report_id),
            date=dt.datetime(2026, 5, 2, tzinfo=dt.UTC),
        )

    ours = dkim_sign(report_mail("mx.receiver.example"), "example.com", "s1")
    # The same From with another reporter's Message-ID is not ours.
    theirs = dkim_sign(report_mail("mx.other.example"), "example.com", "s1")
    one(daemon, ours, ip=GOOD_IP, sender="b@bounce.example.com", queue_id="R1")
    one(daemon, theirs, ip=GOOD_IP, sender="b@bounce.example.com", queue_id="R2")
    lines = daemon.wait_log("message", 2)
    assert [(line["queue_id"], line["dmarc"], line.get("own_report")) for line in lines] == [
        ("R1", "pass", "true"),
        ("R2", "pass", None),
    ]
    assert daemon.stop() == 0
    assert [row[0] for row in history(daemon)] == ["R2"]


def test_json_log_lines(start: Start) -> None:
    import json

    daemon = start({"log": {"format": "json"}})
    one(daemon, make_message(from_="ceo@example.com"), queue_id="J1")
    deadline = time.monotonic() + 10
    while '"J1"' not in daemon.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    records = [json.loads(line) for line in daemon.log_text().splitlines()]
    (message,) = [r for r in records if r["msg"] == "message"]
    assert (message["queue_id"], message["dmarc"], message["level"]) == ("J1", "fail", "info")


# -- signals --------------------------------------------------------------------------


def test_sighup_reloads_and_refuses_a_bad_file(start: Start) -> None:
    daemon = start()
    assert one(daemon, make_message(from_="ceo@example.com")).reply.kind == "continue"
    daemon.write_config({"policy": {"enforce_reject": True}})
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded from " + str(daemon.config_path))
    assert one(daemon, make_message(from_="ceo@example.com")).reply.code == "550"
    # A broken file is refused; rejection stays enabled.
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[policy]\nbogus = 1\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration not reloaded, the running one stays: ", timeout=2)
    errors = [line for line in daemon.log_lines() if line.get("level") == "error"]
    assert len(errors) == 1 and str(daemon.config_path) in errors[0]["msg"], errors
    assert one(daemon, make_message(from_="ceo@example.com")).reply.code == "550"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_sigterm_finishes_the_message_in_progress(start: Start) -> None:
    daemon = start()
    client = session(daemon, GOOD_IP)
    try:
        client.mail("b@bounce.example.com", macros={"i": "T1"})
        client.rcpt("user@receiver.example")
        daemon.signal(signal.SIGTERM)
        daemon.wait_log("stopping: no new connections; waiting for messages in progress")
        # The daemon waits for this message.
        assert daemon.proc is not None and daemon.proc.poll() is None
        message = signed()
        head, _, body = message.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            client.header(name, value)
        client.eoh()
        client.body(body)
        eom = client.end_of_message(macros={"i": "T1"})
    finally:
        client.close()
    assert "dmarc=pass" in ar_value(eom)
    assert daemon.stop() == 0
    assert [row[0] for row in history(daemon)] == ["T1"]
    # New connections are refused once stopping.
    assert not Path(daemon.socket).exists()


# -- start-up errors ------------------------------------------------------------------


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[milter]\nsocket = "inet:70000@127.0.0.1"\n', "milter.socket: port must be a number"),
        ('[milter]\nsocket = "unix:/nonexistent/dir/s.sock"\n', "directory /nonexistent/dir does"),
        ('[clients]\ntrusted_networks = ["10.1.2.3/40"]\n', "clients.trusted_networks"),
        ("[policy]\nmonitor = 1\n", "policy.monitor: expected true or false, got 1"),
        ("[frobnicate]\n", "unknown key 'frobnicate' in the top level"),
    ],
)
def test_bad_configuration_stops_start_up(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config + f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    proc = run_command("run", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmarcmilter run: error: "), proc.stderr
    assert message in lines[0]


def test_socket_in_use_stops_start_up(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(
            f'[milter]\nsocket = "inet:{port}@127.0.0.1"\n[paths]\nstate_dir = "{tmp_path}/s"\n'
        )
        proc = run_command("run", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in proc.stderr


def test_a_database_behind_the_schema_stops_start_up(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "history.sqlite3") as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('0000')")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[milter]\nsocket = "unix:{tmp_path}/m.sock"\n[paths]\nstate_dir = "{state}"\n'
    )
    proc = run_command("run", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "history database schema is at 0000, this dmarcmilter needs 0005" in proc.stderr
    assert "run `dmarcmilter db upgrade`" in proc.stderr


def test_first_start_without_configuration(tmp_path: Path) -> None:
    """No configuration at all: inet:8893@127.0.0.1 and a local state
    directory (here ./state, as for an unprivileged user: /var/lib is
    replaced by pointing HOME-independent defaults at the working dir)."""
    import os
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8893)) == 0:
            pytest.skip("port 8893 is in use on this machine")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dmarcmilter", "run"]
    if os.geteuid() == 0 and root_is_mount_point():
        # As root the default state directory is /var/lib/dmarcmilter: give
        # the daemon an empty /var/lib of its own, so that the test neither
        # reads a history an earlier run left there (at an older schema,
        # say) nor leaves one behind.  (A plain chroot, such as the
        # bare-machine check's throwaway root, cannot make its mounts
        # private: there the daemon uses the chroot's own /var/lib.)
        if shutil.which("unshare") is None:
            pytest.skip("unshare is needed to run as root without touching /var/lib")
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /var/lib && exec "$@"',
            "sh",
            *command,
        ]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        line = proc.stderr.readline()
        while "listening on" not in line:
            # (Run as root, the state directory is /var/lib/dmarcmilter: a
            # history there from an older version must be upgraded first,
            # and the daemon says so.)
            assert line, f"dmarcmilter exited before listening: {''.join(seen)}"
            seen.append(line)
            line = proc.stderr.readline()
        assert "listening on inet:8893@127.0.0.1" in line
        expected = "/var/lib/dmarcmilter" if os.geteuid() == 0 else str(tmp_path / "state")
        assert f"state_dir={expected} " in line, line
        client = MilterClient(("127.0.0.1", 8893))
        client.negotiate()
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, rest


def test_a_helo_that_is_not_utf8_does_not_escape_evaluation(start: Start) -> None:
    daemon = start()
    client = MilterClient(daemon.socket)
    try:
        client.negotiate()
        client.connect("client.example", BAD_IP)
        client.helo("mx\udcff.example")  # pymilter cannot decode it for us
        eom = send(client, make_message(from_="ceo@example.com"))
    finally:
        client.quit()
        client.close()
    value = ar_value(eom)
    assert "dmarc=fail" in value
    (line,) = daemon.wait_log("message")
    assert (line["client_ip"], line["dmarc"]) == (BAD_IP, "fail")


def test_a_host_name_that_is_not_utf8_does_not_escape_evaluation(start: Start) -> None:
    daemon = start()
    client = MilterClient(daemon.socket)
    try:
        client.negotiate()
        # The connect callback cannot run; the address comes from the macros.
        client.connect("bad\udcff.example", BAD_IP, macros={"_": f"bad.example [{BAD_IP}]"})
        client.helo("mx.sender.example")
        eom = send(client, make_message(from_="ceo@example.com"))
    finally:
        client.quit()
        client.close()
    assert "dmarc=fail" in ar_value(eom)
    (line,) = daemon.wait_log("message")
    assert line["client_ip"] == BAD_IP


def test_syslog_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    from dmarcmilter import daemon as daemon_module

    if Path(daemon_module.SYSLOG_SOCKET).exists():
        pytest.skip(f"{daemon_module.SYSLOG_SOCKET} exists here")
    path = tmp_path / "c.toml"
    path.write_text(f'[log]\ntarget = "syslog"\n[paths]\nstate_dir = "{tmp_path}/s"\n')
    proc = run_command("run", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "dmarcmilter run: error: log.target: cannot log to syslog at /dev/log"
    )


def test_syslog_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import socket as socketlib

    from dmarcmilter import daemon as daemon_module
    from dmarcmilter.config import Config, LogConfig

    path = str(tmp_path / "log.sock")
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(5)
        monkeypatch.setattr(daemon_module, "SYSLOG_SOCKET", path)
        daemon_module.configure_logging(
            Config(log=LogConfig(target="syslog", syslog_facility="local3"))
        )
        logger = logging.getLogger("dmarcmilter.message")
        try:
            logger.info("message", extra={"fields": {"queue_id": "Q1", "dmarc": "pass"}})
            datagram = syslog.recv(4096).decode()
        finally:
            daemon_module.stop_logging()
            root = logging.getLogger("dmarcmilter")
            for handler in list(root.handlers):
                root.removeHandler(handler)
                handler.close()
    # <priority>: local3 (19) * 8 + info (6) = 158; no timestamp (syslog adds it).
    assert datagram == "<158>dmarcmilter: level=info msg=message queue_id=Q1 dmarc=pass\x00"
