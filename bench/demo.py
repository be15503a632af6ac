"""Demonstration: evaluate examples/sample.eml against a demo DNS zone.

The zone (example.com with SPF, DKIM and a p=reject DMARC record) is served
by the test DNS server on a loopback port, so the demonstration needs no
network.  It runs the real ``dmarcmilter evaluate`` command.

    .venv/bin/python -m bench.demo
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.dnsserver import TestDNSServer
from tests.signing import dkim_zone

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample.eml"

ZONE = {
    "example.com": [("A", "192.0.2.80"), ("MX", (10, "mx.example.com"))],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc-reports@example.com")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.example.com": [("A", "192.0.2.1"), ("TXT", "v=spf1 a -all")],
    **dkim_zone("example.com", "s1"),
}


def main() -> int:
    server = TestDNSServer().start()
    server.set_zone(ZONE)
    try:
        command = [
            sys.executable, "-m", "dmarcmilter", "evaluate", str(SAMPLE),
            "--client-ip", "192.0.2.1", "--helo", "mx.example.com",
            "--mail-from", "bounce@bounce.example.com", "--rcpt-to", "you@receiver.example",
            "--dns", server.address, "--authserv-id", "mx.receiver.example",
        ]  # fmt: skip
        print("$ dmarcmilter evaluate examples/sample.eml --client-ip 192.0.2.1 ...")
        return subprocess.call(command)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
