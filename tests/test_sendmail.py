"""dmarcmilter behind a real Sendmail 8.17, configured from the README.

Debian's ``sendmail-bin`` conflicts with ``postfix``, so Sendmail runs in a
container (tests/containers/sendmail, built once per session from the local
Debian 12 base image) sharing the host's network.  Its ``sendmail.cf`` is made
with m4 from Debian's ``sendmail.mc`` plus the mc lines of the README's
"With Sendmail" section, taken from README.md verbatim, followed by this
test's own lines: where to listen, a relay to the SMTP sink on the host (so no
DNS is needed), SMTP AUTH with a sasldb user.

The milter is a real ``dmarcmilter run`` on the host, with the README's
``[milter]`` settings except that its socket directory is a host directory
mounted in the container at the directory the README's ``S=`` names.  Its DNS
is the loopback test server.  The client connects from 127.0.0.1, so the
milter runs with ``trusted_networks = []``, as the README says for a loopback
test, and the SPF records name 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import podman
from tests.conftest import IN_CI
from tests.daemon import MilterDaemon, merge
from tests.dnsserver import TestDNSServer
from tests.postfixserver import Delivered, SendResult, SMTPSession, SMTPSink, free_port
from tests.signing import dkim_sign, dkim_zone, make_message

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONTAINER_DIR = ROOT / "tests" / "containers" / "sendmail"
IMAGE = "localhost/dmarcmilter-test-sendmail:latest"
LABEL = "dmarcmilter-test-sendmail"  # its value: the pid of the test run
HOSTNAME = "mx.receiver.example"  # Sendmail's $j
AUTHSERV_ID = HOSTNAME  # authserv_id is left empty: the milter takes $j
SINK_HOSTNAME = "sink.dmarcmilter.test"
SASL_USER, SASL_PASSWORD = "alice", "alice-secret"  # made in the Dockerfile
CLIENT_IP = "127.0.0.1"
RCPT = "user@receiver.example"
START_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 20.0

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    "bounce.example.com": [("TXT", f"v=spf1 ip4:{CLIENT_IP} -all")],
    "slow.example": "TIMEOUT",
    "_dmarc.slow.example": "TIMEOUT",
    "slow-helo.example": "TIMEOUT",
    "s1._domainkey.slow-key.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
}
GOOD_FROM = "bounce@bounce.example.com"
BAD_FROM = "x@elsewhere.example"

_ACCEPTED = re.compile(r"^2\.0\.0 (\S+) Message accepted for delivery")


# -- the README ------------------------------------------------------------------------


def readme_section() -> str:
    text = README.read_text()
    start = text.index("### With Sendmail\n")
    end = text.index("\n### ", start + 1)
    return text[start:end]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a README section: (info string, text)."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def readme_mc_lines() -> str:
    blocks = [text for _, text in code_blocks(readme_section()) if "INPUT_MAIL_FILTER" in text]
    assert len(blocks) == 1, "the README's Sendmail section must have one block of mc lines"
    return blocks[0]


def readme_milter_settings() -> dict[str, Any]:
    blocks = [text for info, text in code_blocks(readme_section()) if info == "toml"]
    assert len(blocks) == 1, "the README's Sendmail section must have one TOML block"
    return tomllib.loads(blocks[0])


def readme_release_commands() -> list[str]:
    """The README's commands to list and release held mail, comments removed."""
    blocks = [text for info, text in code_blocks(readme_section()) if "mailq" in text]
    assert len(blocks) == 1
    return [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]


def socket_path(mc_lines: str) -> str:
    found = re.search(r"S=unix:([^,']+)", mc_lines)
    assert found, f"no unix socket in the README's mc lines:\n{mc_lines}"
    return found.group(1)


# -- the container -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def sendmail_image() -> str:
    podman.require("the Sendmail test")
    try:
        return podman.build(IMAGE, CONTAINER_DIR / "Dockerfile", CONTAINER_DIR)
    except (RuntimeError, OSError) as exc:
        if IN_CI:
            raise
        pytest.skip(f"the Sendmail image cannot be built here: {exc}")


@dataclass
class Sendmail:
    """One Sendmail container, its SMTP port on loopback, and the sink it relays to."""

    name: str
    port: int
    sink: SMTPSink
    milter: MilterDaemon

    def exec(self, command: str, check: bool = True) -> str:
        result = podman.podman("exec", self.name, "sh", "-c", command, check=check, timeout=60)
        return (result.stdout + result.stderr).decode(errors="replace")

    def log(self) -> str:
        return self.exec("cat /var/log/mail.log", check=False)

    def session(self, helo: str = "mx.example.com") -> SMTPSession:
        session = SMTPSession(CLIENT_IP, self.port)
        reply = session.ehlo(helo)
        assert reply.code == 250, reply
        return session

    def send(
        self, mail_from: str, message: bytes, login: bool = False, helo: str = "mx.example.com"
    ) -> SendResult:
        with self.session(helo) as session:
            if login:
                code, text = session.smtp.login(SASL_USER, SASL_PASSWORD)
                assert code == 235, text
            return session.send(mail_from, RCPT, message)

    def delivered(self, queue_id: str) -> Delivered:
        found = self.sink.wait(lambda m: m.queue_id == queue_id, timeout=DELIVERY_TIMEOUT)
        assert found is not None, f"{queue_id} was not delivered to the sink:\n{self.log()[-3000:]}"
        return found


def queue_id(sent: SendResult) -> str:
    found = _ACCEPTED.match(sent.text) if sent.code == 250 else None
    assert found, sent.reply
    return found.group(1)


def local_mc_lines(port: int, sink_port: int) -> str:
    """This test's mc lines, after the README's."""
    relay = f"TCP $h {sink_port}"
    return "\n".join(
        [
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Name=MTA-test, Port={port}, Addr=127.0.0.1')dnl",
            # Everything to the sink on the host; no DNS anywhere.  ([127.0.0.1]
            # would not do: Sendmail takes its own addresses for itself.)
            f"define(`SMART_HOST', `[{SINK_HOSTNAME}]')dnl",
            f"define(`RELAY_MAILER_ARGS', `{relay}')dnl",
            f"define(`ESMTP_MAILER_ARGS', `{relay}')dnl",
            f"define(`SMTP_MAILER_ARGS', `{relay}')dnl",
            "define(`confSERVICE_SWITCH_FILE', `/etc/mail/service.switch-nodns')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`nocanonify')dnl",
            # SMTP AUTH PLAIN on the loopback connection, without TLS.
            "define(`confAUTH_MECHANISMS', `PLAIN LOGIN')dnl",
            "TRUST_AUTH_MECH(`PLAIN LOGIN')dnl",
            "define(`confAUTH_OPTIONS', `A')dnl",
            "",
        ]
    )


def wait_listening(port: int, name: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((CLIENT_IP, port), timeout=5) as sock:
                sock.settimeout(10)
                if sock.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        state = podman.podman("inspect", "-f", "{{.State.Running}}", name, check=False)
        if state.stdout.strip() != b"true":
            logs = podman.podman("logs", name, check=False)
            raise RuntimeError(f"Sendmail exited:\n{(logs.stdout + logs.stderr).decode()}")
        time.sleep(0.2)
    raise RuntimeError(f"Sendmail did not answer on port {port} in {timeout} s")


def reap_stale_containers() -> None:
    """Remove the containers of test runs that were killed: Sendmail would go
    on listening on the host's loopback."""
    listed = podman.podman(
        "ps",
        "-a",
        "--filter",
        f"label={LABEL}",
        "--format",
        f'{{{{.Names}}}} {{{{index .Labels "{LABEL}"}}}}',
        check=False,
    )
    for line in listed.stdout.decode().splitlines():
        name, _, owner = line.partition(" ")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            podman.podman("rm", "-f", "-t", "0", name, check=False)


@pytest.fixture(scope="module")
def sendmail(sendmail_image: str, dns_server_session: TestDNSServer) -> Iterator[Sendmail]:
    mc_lines = readme_mc_lines()
    settings = readme_milter_settings()
    in_container = socket_path(mc_lines)
    assert settings["milter"]["socket"] == f"unix:{in_container}", (
        "the README's [milter] socket must be the mc line's S="
    )
    name = f"dmarcmilter-test-sendmail-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="dmarcmilter-sendmail-") as tmp:
        # The milter's directory is the container's socket directory.
        milter_dir = Path(tmp) / "milter"
        milter_dir.mkdir()
        milter = MilterDaemon(milter_dir, dns_server_session.port)
        assert milter.socket.endswith("/" + Path(in_container).name)
        # The README's settings, the socket as the host sees it, and loopback
        # clients evaluated (the README's advice for a test from the host).
        milter.base = merge(
            merge(milter.base, settings),
            {
                # Empty: the authserv-id is Sendmail's j macro (confDOMAIN_NAME).
                "authserv_id": "",
                "milter": {"socket": f"unix:{milter.socket}"},
                "clients": {"trusted_networks": []},
            },
        )
        milter.write_config({})
        milter.start()
        sink = SMTPSink().start()
        test_dir = Path(tmp) / "test"
        test_dir.mkdir()
        port = free_port()
        (test_dir / "local.mc").write_text(mc_lines + local_mc_lines(port, sink.port))
        reap_stale_containers()
        podman.podman(
            "run", "-d", "--rm", "--name", name, "--network", "host",
            "--label", f"{LABEL}={os.getpid()}",
            "--hostname", HOSTNAME, "--add-host", f"{HOSTNAME}:127.0.0.1",
            "--add-host", f"{SINK_HOSTNAME}:127.0.0.1",
            "-v", f"{milter_dir}:{Path(in_container).parent}",
            "-v", f"{test_dir}:/test:ro",
            sendmail_image,
        )  # fmt: skip
        server = Sendmail(name, port, sink, milter)
        try:
            wait_listening(port, name)
            yield server
        finally:
            podman.podman("rm", "-f", "-t", "2", name, check=False)
            sink.stop()
            milter.stop()


@pytest.fixture
def mta(sendmail: Sendmail, dns_server: TestDNSServer) -> Iterator[Sendmail]:
    dns_server.set_zone(ZONE)
    sendmail.milter.reload({})
    sendmail.sink.clear()
    yield sendmail


def unique_id() -> str:
    return f"<{uuid.uuid4().hex}@example.com>"


def our_results(values: list[str]) -> list[str]:
    return [v for v in values if v.split(";")[0].strip() == AUTHSERV_ID]


def log_line(milter: MilterDaemon, qid: str) -> dict[str, str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in milter.log_lines("message") if line.get("queue_id") == qid]
        if lines or time.monotonic() > deadline:
            assert len(lines) == 1, milter.log_text()[-3000:]
            return lines[0]
        time.sleep(0.05)


# -- the tests ---------------------------------------------------------------------------


def test_a_pass_is_delivered_with_authentication_results(mta: Sendmail) -> None:
    message = dkim_sign(
        make_message(from_="alice@example.com", message_id=unique_id()), "example.com", "s1"
    )
    sent = mta.send(GOOD_FROM, message)
    qid = queue_id(sent)
    delivered = mta.delivered(qid)
    # Our field is the first line of the message, above Sendmail's Received.
    first_line = delivered.header_section.split(b"\r\n", 1)[0]
    assert first_line == f"Authentication-Results: {AUTHSERV_ID};".encode()
    ours = our_results(delivered.header_values("Authentication-Results"))
    assert len(ours) == 1
    assert "dkim=pass header.d=example.com header.s=s1" in ours[0]
    assert "spf=pass smtp.mailfrom=bounce.example.com" in ours[0]
    assert "dmarc=pass policy.dmarc=reject header.from=example.com" in ours[0]
    assert delivered.header("X-Spam-Flag") is None
    # The macros: Sendmail's queue id (i) and the client address reach the milter.
    line = log_line(mta.milter, qid)
    assert (line["client_ip"], line["dmarc"]) == (CLIENT_IP, "pass")


def test_a_rejection_gives_the_client_550(mta: Sendmail) -> None:
    mta.milter.reload({"policy": {"enforce_reject": True}})
    before = len(mta.milter.log_lines("message"))
    sent = mta.send(BAD_FROM, make_message(from_="ceo@example.com", message_id=unique_id()))
    assert (sent.code, sent.text) == (
        550,
        "5.7.1 Message rejected per DMARC policy for example.com",
    )
    lines = mta.milter.wait_log("message", before + 1)
    assert len(lines) == before + 1, mta.milter.log_text()[-3000:]
    line = lines[-1]
    assert (line["dmarc"], line["action"]) == ("fail", "reject")
    assert line["queue_id"] not in mta.exec("mailq")


def test_a_hold_is_quarantined_in_sendmail_and_released(mta: Sendmail) -> None:
    mta.milter.reload({"policy": {"quarantine_action": "hold"}})
    sent = mta.send(BAD_FROM, make_message(from_="ceo@example.com", message_id=unique_id()))
    qid = queue_id(sent)
    # Accepted, and kept in the queue as quarantined with our reason: only
    # `mailq -qQ` lists it, and no queue run delivers it.
    held = mta.exec("mailq -qQ")
    assert re.search(
        rf"^{qid} .*\n\s+QUARANTINE: DMARC fail under policy reject of example\.com$",
        held,
        re.MULTILINE,
    ), held
    assert qid not in mta.exec("mailq")
    mta.exec("sendmail -q")
    assert mta.sink.wait(lambda m: m.queue_id == qid, timeout=1) is None
    # The README's commands: release (a normal queue entry again), then deliver.
    unquarantine, deliver = (c for c in readme_release_commands() if "<queue-id>" in c)
    mta.exec(unquarantine.replace("<queue-id>", shlex.quote(qid)))
    assert qid not in mta.exec("mailq -qQ") and qid in mta.exec("mailq")
    mta.exec(deliver.replace("<queue-id>", shlex.quote(qid)))
    delivered = mta.delivered(qid)
    ours = our_results(delivered.header_values("Authentication-Results"))
    assert len(ours) == 1 and "dmarc=fail policy.dmarc=reject header.from=example.com" in ours[0]
    assert qid not in mta.exec("mailq -qQ")


def test_forged_results_are_removed(mta: Sendmail) -> None:
    message = make_message(
        from_="ceo@example.com",
        message_id=unique_id(),
        extra_headers=[
            ("Authentication-Results", f"{AUTHSERV_ID}; dmarc=pass header.from=example.com"),
            ("Authentication-Results", "upstream.example; spf=pass smtp.mailfrom=a@b.example"),
            ("Authentication-Results", f"{AUTHSERV_ID.upper()}; dkim=pass header.d=example.com"),
        ],
    )
    sent = mta.send(BAD_FROM, message)
    delivered = mta.delivered(queue_id(sent))
    values = delivered.header_values("Authentication-Results")
    ours = our_results(values)
    assert len(ours) == 1 and "dmarc=fail" in ours[0]
    assert [v for v in values if v not in ours] == [
        "upstream.example; spf=pass smtp.mailfrom=a@b.example"
    ]


def test_a_sasl_client_is_skipped(mta: Sendmail) -> None:
    mta.milter.reload({"policy": {"enforce_reject": True}})
    forged = ("Authentication-Results", f"{AUTHSERV_ID}; dmarc=pass header.from=example.com")
    message = make_message(from_="ceo@example.com", message_id=unique_id(), extra_headers=[forged])
    sent = mta.send("ceo@example.com", message, login=True)
    qid = queue_id(sent)
    delivered = mta.delivered(qid)
    # Not evaluated and not enforced (p=reject with enforce_reject would give 550);
    # the forgery is removed all the same.
    assert our_results(delivered.header_values("Authentication-Results")) == []
    assert delivered.header("X-Spam-Flag") is None
    assert log_line(mta.milter, qid)["skipped"] == "authenticated"


def test_a_client_name_that_is_not_utf8_is_still_evaluated(mta: Sendmail) -> None:
    """Sendmail hands the milter the client's reverse-DNS name as it found it
    (here from /etc/hosts: "caf\\351.example", Latin-1); pymilter cannot decode
    it, so the connect callback never runs, and the address must come from the
    connect macros for the message to be evaluated at all."""
    mta.exec(
        "cp /etc/hosts /tmp/hosts.orig"
        " && { printf '127.0.0.1\\tcaf\\351.example\\n'; cat /tmp/hosts.orig; } > /tmp/hosts"
        " && cat /tmp/hosts > /etc/hosts"  # a bind mount: rewritten in place
    )
    try:
        mta.milter.reload({"policy": {"enforce_reject": True}})
        sent = mta.send(BAD_FROM, make_message(from_="ceo@example.com", message_id=unique_id()))
    finally:
        mta.exec("cat /tmp/hosts.orig > /etc/hosts")
    assert (sent.code, sent.text) == (
        550,
        "5.7.1 Message rejected per DMARC policy for example.com",
    )
    assert "relay=caf\\351.example [127.0.0.1]" in mta.log()


def test_sendmail_waits_for_dns_that_takes_the_whole_budget(mta: Sendmail) -> None:
    """The README's R and E exceed the default [dns] budget: with the default
    timeout and budget (etc/dmarcmilter.toml) and a sender whose DNS never
    answers (the author's policy, MAIL FROM, HELO, a DKIM key), the milter
    answers only when the budget is spent, and Sendmail waits for it (a short
    R, such as R:2s, would give up and pass the message unchecked)."""
    mta.milter.reload(
        {
            "dns": {"timeout": 2.0, "budget": 8.0},
            "policy": {"temperror_action": "tempfail"},
        }
    )
    message = dkim_sign(
        make_message(from_="a@slow.example", message_id=unique_id()), "slow-key.example", "s1"
    )
    before = len(mta.milter.log_lines("message"))
    sent = mta.send("x@slow.example", message, helo="slow-helo.example")
    assert (sent.code, sent.text) == (
        451,
        "4.7.0 DMARC policy for slow.example could not be checked; try again later",
    )
    lines = mta.milter.wait_log("message", before + 1)
    assert len(lines) == before + 1
    assert lines[-1]["dmarc"] == "temperror"
    assert float(lines[-1]["elapsed_ms"]) > 7000, lines[-1]


def test_mail_passes_unchecked_while_the_milter_is_down(mta: Sendmail) -> None:
    """No F= in the README's line: like Postfix's milter_default_action = accept."""
    mta.milter.reload({"policy": {"enforce_reject": True}})
    mta.milter.stop()  # the socket is removed: Sendmail finds no milter
    try:
        message = make_message(from_="ceo@example.com", message_id=unique_id())
        sent = mta.send(BAD_FROM, message)
        delivered = mta.delivered(queue_id(sent))
        assert our_results(delivered.header_values("Authentication-Results")) == []
    finally:
        restart(mta.milter)


def restart(milter: MilterDaemon, timeout: float = 30) -> None:
    def starts() -> int:
        return sum("listening on" in line.get("msg", "") for line in milter.log_lines())

    before = starts()
    milter.start(wait=False)
    deadline = time.monotonic() + timeout
    while starts() == before:
        assert milter.proc is not None and milter.proc.poll() is None, milter.log_text()[-2000:]
        assert time.monotonic() < deadline, milter.log_text()[-2000:]
        time.sleep(0.05)
