"""The dmarcmilter command line, run as a real subprocess against the
loopback DNS server: output, JSON shape, and one-line errors with exit 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsserver import TestDNSServer
from tests.signing import dkim_sign, dkim_zone, make_message

ZONE = {
    "example.com": [("A", "192.0.2.80"), ("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; adkim=x; rua=mailto:agg@example.com")],
    "mx.example.com": [("A", "192.0.2.1")],
    **dkim_zone("example.com", "s1"),
}


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dmarcmilter", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc


@pytest.fixture
def zone(dns_server: TestDNSServer) -> TestDNSServer:
    dns_server.set_zone(ZONE)
    return dns_server


@pytest.fixture
def eml(tmp_path: Path) -> Path:
    path = tmp_path / "signed.eml"
    path.write_bytes(dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1"))
    return path


def test_check_json_lists_queries_record_and_policy(zone: TestDNSServer) -> None:
    proc = run("check", "News.Example.com.", "--dns", zone.address, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["domain"] == "news.example.com"
    assert data["status"] == "found"
    assert data["policy_domain"] == "example.com"
    assert data["org_domain"] == "example.com"
    assert data["policy"] == "reject"
    assert data["record"]["adkim"] == "r"
    assert any("adkim" in p for p in data["record"]["problems"])
    names = [q["name"] for q in data["queries"] if q["type"] == "TXT"]
    assert names[:3] == ["_dmarc.news.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_check_text_output(zone: TestDNSServer) -> None:
    proc = run("check", "example.com", "--dns", zone.address)
    assert proc.returncode == 0, proc.stderr
    assert "_dmarc.example.com TXT: noerror" in proc.stdout
    assert "Policy that applies: reject" in proc.stdout
    assert "problem:" in proc.stdout


def test_check_psl_method(zone: TestDNSServer) -> None:
    proc = run("check", "example.com", "--dns", zone.address, "--method", "psl", "--json")
    assert json.loads(proc.stdout)["discovery_method"] == "psl"


def test_evaluate_json(zone: TestDNSServer, eml: Path) -> None:
    proc = run(
        "evaluate",
        str(eml),
        "--client-ip",
        "192.0.2.1",
        "--helo",
        "mx.example.com",
        "--mail-from",
        "bounce@example.com",
        "--rcpt-to",
        "u@r.example",
        "--dns",
        zone.address,
        "--authserv-id",
        "mx.test",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dmarc"] == data["dmarc"] | {
        "result": "pass",
        "policy": "reject",
        "disposition": "pass",
    }
    assert data["header_from"] == "example.com"
    assert data["policy_domain"] == "example.com" and data["org_domain"] == "example.com"
    assert data["discovery_method"] == "treewalk"
    assert data["spf"] == data["spf"] | {
        "result": "pass",
        "domain": "example.com",
        "scope": "mfrom",
        "aligned": True,
    }
    assert [(d["domain"], d["selector"], d["result"], d["aligned"]) for d in data["dkim"]] == [
        ("example.com", "s1", "pass", True)
    ]
    assert data["arc"]["result"] == "none"
    assert data["reasons"] == []
    assert data["authentication_results"].startswith("mx.test;")


def test_evaluate_text_from_stdin_null_sender(zone: TestDNSServer, eml: Path) -> None:
    proc = run(
        "evaluate",
        "-",
        "--client-ip",
        "203.0.113.5",
        "--helo",
        "mx.example.com",
        "--mail-from",
        "<>",
        "--dns",
        zone.address,
        "--authserv-id",
        "mx.test",
        stdin=make_message(from_="alice@example.com"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Authentication-Results: mx.test;")
    assert "dmarc=fail policy.dmarc=reject header.from=example.com" in proc.stdout
    assert "Disposition:   quarantine" in proc.stdout
    assert "Reason:        local_policy" in proc.stdout


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EV = ["--helo", "mx.example.com", "--mail-from", "a@example.com"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate", "/nonexistent.eml", "--client-ip", "192.0.2.1", *EV], "cannot read"),
        (["evaluate", "NOTAMESSAGE", "--client-ip", "192.0.2.1", *EV], "not an RFC 5322 message"),
        (["evaluate", "EML", "--client-ip", "999.1.1.1", *EV], "invalid client IP"),
        (["evaluate", "EML", "--client-ip", "192.0.2.1", *EV, "--dns", "DEAD"], "unreachable"),
        (["evaluate", "EML", "--client-ip", "192.0.2.1", *EV, "--dns", "nameserver"], "--dns"),
        (["evaluate", "EML", *EV], "--client-ip"),
        (["evaluate", "EML", "--client-ip", "192.0.2.1", *EV, "--config", "BADCONF"], "prot"),
        (["check", "exa mple.com", "--dns", "DNS"], "invalid character"),
        (["check", "example.com", "--method", "guess"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, zone: TestDNSServer, eml: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    badconf = tmp_path / "bad.toml"
    badconf.write_text("[dns]\nprot = 53\n")
    subst = {
        "EML": str(eml),
        "NOTAMESSAGE": str(junk),
        "DEAD": f"127.0.0.1:{_free_udp_port()}",
        "DNS": zone.address,
        "BADCONF": str(badconf),
    }
    proc = run(*[subst.get(a, a) for a in args])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
