"""Benchmark: dmarcmilter behind a real Postfix, against no milter and against
Debian's opendkim + opendmarc, in one run.

What is measured
----------------
Messages per second through a private Postfix 3.7 instance (delivering to
``discard:``), and the SMTP transaction latency as a client sees it (from
connect to the final reply to the end of DATA, one message per session), for:

* ``a``      Postfix without a milter;
* ``b``      Postfix with ``dmarcmilter run`` (tests/daemon.MilterDaemon) on TCP
  loopback, quickack on: SPF (MAIL FROM and HELO), DKIM (RSA-2048 and
  ed25519), ARC, DMARC, the Authentication-Results header, one log line per
  message and the SQLite history;
* ``c``      Postfix with Debian's opendkim (verify mode only) and opendmarc
  (``SPFSelfValidate true``, ``HistoryFile`` written for every message) chained
  as two milters on TCP loopback, quickack on, other settings at their defaults;
* ``b-unix`` dmarcmilter again, over a unix socket;
* ``b-base`` dmarcmilter from another source tree (``--baseline-tree DIR``,
  for example ``git worktree add --detach DIR HEAD~1``) on TCP loopback,
  quickack on: a change is measured against its predecessor in one run;
* ``b-noqa`` dmarcmilter on TCP loopback with quickack off (the kernel
  defaults): Nagle plus delayed ACKs stall each of the milter protocol's small
  writes for ~40 ms, see ../shared/notes/field-notes.md;
* ``b-metrics`` dmarcmilter on TCP loopback as (b), with ``[metrics] listen``
  on and /metrics scraped every ``SCRAPE_INTERVAL`` seconds by this process
  (more often than a usual Prometheus, so the scrapes' cost shows): its milter
  CPU per message against (b)'s is the cost of the metrics (target: at most
  ``METRICS_TARGET`` more).

The configurations take turns in rounds (a b c b-unix b-noqa, a b c ..., each
round ``--seconds`` long) so that any drift of the machine hits them all
alike; each first gets a short unmeasured warm-up (Postfix's process pools,
the milters' DNS caches).  Throughput is the messages whose final reply came
within the round, divided by its length (mean and per round); p50 and p99 are
over every round.  Also shown: the machine's CPU use, the milter processes'
CPU time per message, their maximum RSS (sampled from /proc/PID/status VmRSS,
children included, every 0.2 s during their rounds) and DNS queries per
message.

How
---
Everything runs inside a private network and mount namespace (the script
re-executes itself under ``unshare --net --mount`` when it is not already
there): ``lo`` is brought up, ``quickack 1`` set on the local table's loopback
routes (``ip route show table local`` is printed), and a private resolv.conf
saying ``nameserver 127.0.0.1`` is bind-mounted over /etc/resolv.conf, because
opendmarc (libresolv, libspf2) only reads that file and port 53.  One
TestDNSServer (tests/dnsserver.py) with the zone of bench/evaluate.py serves
127.0.0.1:53 for all three stacks: dmarcmilter through its config, opendmarc
through resolv.conf, opendkim (built with libunbound) through its
``Nameservers`` setting.  Its UDP side memoizes the server's own answers
(the zone does not change during the run), so the Python DNS server's CPU
does not weigh on the stacks that cache less (opendmarc's DMARC lookups are
not cached at all); a real MX host would have a local caching resolver.

The load generator is ``--clients`` SMTP clients (threads in a few forked
processes) on loopback.  Each session: EHLO, ``XCLIENT ADDR= NAME= HELO=``
(to set the client address and HELO name the milters see), EHLO, MAIL, RCPT,
DATA, QUIT.  smtpd connects to its milters at the start of a session and again
after XCLIENT; ``smtpd_milter_maps`` disables the milters for the load
generator's own address, so that each message makes one milter connection (per
milter), as real traffic does (``--milter-before-xclient`` keeps both).

The messages (fixed seed) are a quarter each: RSA-2048 signed (dmarc=pass),
ed25519 signed (pass), unsigned but SPF-aligned (pass), and a spoof (SPF fail,
broken DKIM signature, dmarc=fail under p=reject), of 2 to 100 KB.  Before
the measurement one message of each kind goes through dmarcmilter and through
opendkim + opendmarc with an SMTP sink behind Postfix, and their
Authentication-Results are checked; after it, the per-message results each
stack recorded during the rounds (dmarcmilter's log lines, opendmarc's history
file) are counted per kind, so a stack that is misconfigured cannot look fast
by doing nothing.

Needs root, Postfix, and opendkim + opendmarc (``make bench-system-packages``).

    .venv/bin/python -m bench.milter_throughput [--rounds 5] [--seconds 15]
        [--clients 16] [--configs a,b,c,b-unix,b-noqa] [--profile] [--quick]

``--profile`` adds one more dmarcmilter round under ``py-spy record``
(``pip install py-spy``) and prints where its process spends its time.
``--quick`` is a short smoke run.  The cost of the metrics alone:
``--configs a,b,b-metrics``.

Targets (on a 2-core machine): (b) at least 1.5 times the throughput of (c),
with a p99 latency no higher than (c)'s; dmarcmilter's RSS at most 150 MB.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord

from bench.evaluate import build_zone
from tests.daemon import MilterDaemon, parse_logfmt
from tests.dnsserver import TestDNSServer, _make_handler
from tests.postfixserver import PostfixServer, allow_postfix, free_port
from tests.signing import dkim_sign, make_message

ROOT = Path(__file__).resolve().parent.parent
NETNS_ENV = "DMARCMILTER_BENCH_NETNS"
HOST = "127.0.0.1"
AUTHSERV_ID = "mx.receiver.example"
RCPT = "user@receiver.example"
PSL = "/usr/share/publicsuffix/public_suffix_list.dat"
RSS_TARGET_MB = 150.0
RATIO_TARGET = 1.5
# b-metrics: seconds between two scrapes of /metrics; the most the milter's
# CPU per message may grow with the metrics on.
SCRAPE_INTERVAL = 3.0
METRICS_TARGET = 0.02
SEED = 20260501

# -- the message mix ------------------------------------------------------------------

KINDS = ("rsa", "ed25519", "unsigned", "fail")
# kind: (client address, HELO, MAIL FROM, header From, DKIM (domain, selector, key) or None)
MIX: dict[str, tuple[str, str, str, str, tuple[str, str, str] | None]] = {
    "rsa": (
        "192.0.2.1",
        "mx.sender.example",
        "bounce@bounce.example.com",
        "news@example.com",
        ("example.com", "rsa2048", "rsa"),
    ),
    "ed25519": (
        "192.0.2.2",
        "mx.sender.example",
        "a@example.org",
        "news@example.org",
        ("example.org", "ed", "ed25519"),
    ),
    "unsigned": (
        "192.0.2.3",
        "mx.sender.example",
        "bounce@bounce.example.com",
        "news@example.com",
        None,
    ),
    # Signed, then altered in transit, from an address SPF refuses.
    "fail": (
        "203.0.113.9",
        "spoof.example",
        "x@spoof.example",
        "ceo@example.com",
        ("example.com", "rsa2048", "rsa"),
    ),
}
KIND_BY_IP = {spec[0]: kind for kind, spec in MIX.items()}
# What each stack must find, per kind: (spf, dkim, dmarc).
EXPECTED = {
    "rsa": ("pass", "pass", "pass"),
    "ed25519": ("pass", "pass", "pass"),
    "unsigned": ("pass", "none", "pass"),
    "fail": ("fail", "fail", "fail"),
}
MIN_SIZE, MAX_SIZE = 2 * 1024, 100 * 1024
WORDS_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
    "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
    "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
    "report quarterly figures invoice meeting agenda summary attached schedule review"
)


def bench_zone(failure_reports: bool = False) -> dict[str, list[tuple[str, object]]]:
    """bench/evaluate.py's zone; the HELO name's SPF covers the whole test /24,
    as the mix uses one client address per kind.  With ``failure_reports``
    every DMARC record also asks for failure reports (``fo=1`` and a ruf),
    so each failing or partly failing message makes the milter record one."""
    zone = build_zone()
    zone["mx.sender.example"] = [("A", "192.0.2.1"), ("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]
    if failure_reports:
        for name, records in zone.items():
            if name.startswith("_dmarc."):
                zone[name] = [
                    (kind, f"{value}; fo=1; ruf=mailto:ruf@{name.removeprefix('_dmarc.')}")
                    if kind == "TXT"
                    else (kind, value)
                    for kind, value in records
                ]
    return zone


@dataclass(frozen=True)
class Mail:
    kind: str
    size: int
    xclient: bytes
    ehlo: bytes
    mail: bytes
    rcpt: bytes
    payload: bytes  # dot-stuffed, with the final ".\r\n"
    raw: bytes


def _body(rng: random.Random, size: int, lines: Sequence[str]) -> str:
    out: list[str] = []
    total = 0
    while total < size:
        line = lines[rng.randrange(len(lines))]
        out.append(line)
        total += len(line) + 2
    return "\n".join(out) + "\n"


def build_mail(kind: str, index: int, size: int, rng: random.Random, lines: Sequence[str]) -> Mail:
    ip, helo, mail_from, header_from, signer = MIX[kind]
    head = make_message(from_=header_from, subject=f"{kind} {index}", body="")
    overhead = len(head) + (550 if signer else 0)
    raw = make_message(
        from_=header_from,
        to=f"<{RCPT}>",
        subject=f"Bench {kind} message {index}",
        body=_body(rng, max(200, size - overhead), lines),
        message_id=f"<bench.{kind}.{index}@{header_from.split('@')[1]}>",
    )
    if signer is not None:
        domain, selector, key = signer
        raw = dkim_sign(raw, domain, selector, key)
    if kind == "fail":
        raw += b"Altered in transit.\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", raw)
    return Mail(
        kind=kind,
        size=len(raw),
        xclient=f"XCLIENT ADDR={ip} NAME=[UNAVAILABLE] HELO={helo}\r\n".encode(),
        ehlo=f"EHLO {helo}\r\n".encode(),
        mail=f"MAIL FROM:<{mail_from}>\r\n".encode(),
        rcpt=f"RCPT TO:<{RCPT}>\r\n".encode(),
        payload=stuffed + b".\r\n",
        raw=raw,
    )


def build_mails(per_kind: int, seed: int = SEED) -> list[Mail]:
    """``per_kind`` messages of each kind, sizes uniform in 2-100 KB, shuffled;
    the same list for the same seed."""
    rng = random.Random(seed)
    words = WORDS_TEXT.split()
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 12))).capitalize() + "."
        for _ in range(300)
    ]
    mails = [
        build_mail(kind, i, rng.randint(MIN_SIZE, MAX_SIZE), rng, lines)
        for kind in KINDS
        for i in range(per_kind)
    ]
    rng.shuffle(mails)
    return mails


# -- the load generator ---------------------------------------------------------------


class SMTPError(Exception):
    pass


def _reply(f: Any) -> tuple[int, bytes]:
    """Read one (possibly multi-line) SMTP reply."""
    while True:
        line = f.readline()
        if not line:
            raise SMTPError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), line
            except ValueError:
                raise SMTPError(f"bad reply {line!r}") from None


def _expect(f: Any, code: int, what: str) -> None:
    got, line = _reply(f)
    if got != code:
        raise SMTPError(f"{what}: {line.decode(errors='replace').strip()}")


def transaction(port: int, mail: Mail) -> tuple[float, float, int]:
    """One SMTP session with one message: (start, end, final reply code); the
    end is taken at the final reply to DATA, before QUIT."""
    start = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=120)
    f = sock.makefile("rb")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _expect(f, 220, "greeting")
        sock.sendall(b"EHLO loadgen.bench.example\r\n")
        _expect(f, 250, "EHLO")
        sock.sendall(mail.xclient)
        _expect(f, 220, "XCLIENT")
        sock.sendall(mail.ehlo)
        _expect(f, 250, "EHLO after XCLIENT")
        sock.sendall(mail.mail)
        _expect(f, 250, "MAIL")
        sock.sendall(mail.rcpt)
        _expect(f, 250, "RCPT")
        sock.sendall(b"DATA\r\n")
        _expect(f, 354, "DATA")
        sock.sendall(mail.payload)
        code, line = _reply(f)
        end = time.monotonic()
        if code != 250:
            raise SMTPError(f"end of DATA: {line.decode(errors='replace').strip()}")
        with contextlib.suppress(OSError, SMTPError):
            sock.sendall(b"QUIT\r\n")
            _reply(f)
        return start, end, code
    finally:
        f.close()
        sock.close()


@dataclass
class ClientResult:
    # (end time, latency, kind) of every message accepted with 250
    done: list[tuple[float, float, str]] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)


def _client_thread(
    slot: int, port: int, start_at: float, deadline: float, mails: list[Mail], position: list[int]
) -> ClientResult:
    result = ClientResult()
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    while time.monotonic() < deadline:
        mail = mails[position[slot] % len(mails)]
        position[slot] += 1
        try:
            start, end, _ = transaction(port, mail)
        except (OSError, SMTPError) as exc:
            result.errors += 1
            if len(result.first_errors) < 3:
                result.first_errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)
            continue
        result.done.append((end, end - start, mail.kind))
    return result


def _run_client(results: list[ClientResult], i: int, slot: int, *args: Any) -> None:
    results[i] = _client_thread(slot, *args)


def _worker(conn: multiprocessing.connection.Connection, mails: list[Mail], nclients: int) -> None:
    """A load-generator process: runs its client threads for each round it is
    sent, and sends back what they measured.  Each client walks the message
    list from its own starting point, continuing across rounds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stride = max(1, len(mails) // max(1, nclients))
    position = [slot * stride for slot in range(nclients)]
    while True:
        command = conn.recv()
        if command is None:
            return
        port, start_at, deadline, slots = command
        results: list[ClientResult] = [ClientResult() for _ in slots]
        threads = [
            threading.Thread(
                target=_run_client,
                args=(results, i, slot, port, start_at, deadline, mails, position),
                daemon=True,
            )
            for i, slot in enumerate(slots)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send(results)


class LoadGenerator:
    """``clients`` SMTP clients spread over a few forked processes."""

    def __init__(self, mails: list[Mail], clients: int, processes: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.clients = clients
        self.workers: list[tuple[Any, multiprocessing.connection.Connection, list[int]]] = []
        processes = max(1, min(processes, clients))
        for p in range(processes):
            slots = list(range(p, clients, processes))
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, mails, clients), daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent, slots))

    def run(
        self, port: int, start_at: float, deadline: float, clients: int | None = None
    ) -> list[ClientResult]:
        """Every client (or the first ``clients``) sends until ``deadline``."""
        busy = []
        for _, conn, slots in self.workers:
            mine = [s for s in slots if clients is None or s < clients]
            if mine:
                conn.send((port, start_at, deadline, mine))
                busy.append(conn)
        out: list[ClientResult] = []
        for conn in busy:
            out.extend(conn.recv())
        return out

    def close(self) -> None:
        for proc, conn, _ in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# -- DNS ------------------------------------------------------------------------------


class BenchDNSServer(TestDNSServer):
    """The test DNS server on a fixed port (53), whose UDP side memoizes its
    answers: a repeated question (same bytes after the ID) gets the answer the
    server gave the first time, with the new ID.  TCP is answered as usual."""

    def __init__(self, host: str = HOST, ttl: int = 3600) -> None:
        super().__init__(host, ttl)
        self.hits = 0
        self.answered = 0
        self._sock: socket.socket | None = None
        self._cache: dict[bytes, bytes] = {}

    def start_on(self, port: int = 53) -> BenchDNSServer:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, port))
        self._tcp = socketserver.ThreadingTCPServer((self.host, port), _make_handler(self))
        self._tcp.daemon_threads = True
        self.port = port
        threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True).start()
        threading.Thread(target=self._tcp.serve_forever, name="dns-tcp", daemon=True).start()
        return self

    @property
    def total(self) -> int:
        return self.hits + self.answered

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        self.answered += 1
        return super().answer(request)

    def _serve_udp(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data, addr = sock.recvfrom(4096)
            except OSError:
                return
            if len(data) < 12:
                continue
            key = data[2:]
            packed = self._cache.get(key)
            if packed is None:
                packed = self._udp_reply(data)
                if packed is None:
                    continue
                self._cache[key] = packed
            else:
                self.hits += 1
            with contextlib.suppress(OSError):
                sock.sendto(data[:2] + packed[2:], addr)

    def _udp_reply(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = self.answer(request)
        if reply is None:
            return None
        packed = reply.pack()
        limit = max(
            [512] + [getattr(rr, "edns_len", 512) for rr in request.ar if rr.rtype == QTYPE.OPT]
        )
        if len(packed) > limit:
            truncated = request.reply()
            truncated.header.tc = 1
            truncated.header.aa = 1
            packed = truncated.pack()
        return bytes(packed)

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tcp is not None:
            self._tcp.shutdown()
            self._tcp.server_close()
            self._tcp = None


# -- the namespace --------------------------------------------------------------------


def reexec_in_namespace(argv: Sequence[str]) -> int:
    """Run this script again under ``unshare --net --mount`` (mount propagation
    private: the resolv.conf bind mount stays inside)."""
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (network namespace, Postfix)")
    if shutil.which("unshare") is None:
        raise SystemExit("unshare (util-linux) is needed")
    env = {**os.environ, NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    cmd = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    cmd += [sys.executable, "-m", "bench.milter_throughput", *argv]
    return subprocess.call(cmd, cwd=ROOT, env=env)


def run_ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


LOCAL_ROUTES = ("127.0.0.0/8", "127.0.0.1")


def set_quickack(on: bool) -> str:
    """quickack on (1) or off (the default) on the loopback routes; the local
    table as ``ip route show table local`` prints it."""
    for dst in LOCAL_ROUTES:
        spec = ["route", "change", "local", dst, "dev", "lo", "proto", "kernel"]
        spec += ["scope", "host", "src", HOST, "table", "local"]
        run_ip(*spec, *(["quickack", "1"] if on else []))
    table = run_ip("route", "show", "table", "local")
    for line in table.splitlines():
        if line.split()[1] in LOCAL_ROUTES and ("quickack 1" in line) != on:
            raise SystemExit(f"quickack {'on' if on else 'off'} did not take:\n{table}")
    return table


def setup_namespace(workdir: Path) -> str:
    run_ip("link", "set", "lo", "up")
    table = set_quickack(True)
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {HOST}\noptions attempts:2 timeout:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    if "nameserver 127.0.0.1" not in Path("/etc/resolv.conf").read_text():
        raise SystemExit("the private /etc/resolv.conf did not take")
    return table


# -- the milters ----------------------------------------------------------------------


def wait_tcp_listen(port: int, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    wanted = f"{socket.inet_aton(HOST)[::-1].hex().upper()}:{port:04X}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} does not listen on port {port}: {log.read_text()[-2000:]}")


class CStack:
    """Debian's opendkim (verify only) and opendmarc, private foreground
    instances with their own config, pid files and history under ``directory``."""

    def __init__(self, directory: Path) -> None:
        for tool in ("opendkim", "opendmarc"):
            if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
                raise SystemExit(
                    f"{tool} is not installed: run `make bench-system-packages` "
                    "(apt-get install opendkim opendmarc, services not started)"
                )
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.dkim_port = free_port()
        self.dmarc_port = free_port()
        while self.dmarc_port == self.dkim_port:
            self.dmarc_port = free_port()
        self.history = directory / "opendmarc.dat"
        self.dkim_conf = directory / "opendkim.conf"
        self.dmarc_conf = directory / "opendmarc.conf"
        # Debian's /etc/opendkim.conf, minus signing, TrustAnchorFile (the
        # test zone is unsigned) and the user; DNS through libunbound, which
        # Debian's opendkim is built with: without Nameservers it would
        # recurse from the root servers instead of reading resolv.conf.
        self.dkim_conf.write_text(
            "Mode v\n"
            "Syslog yes\n"
            "SyslogSuccess yes\n"
            "UMask 007\n"
            f"Socket inet:{self.dkim_port}@{HOST}\n"
            f"PidFile {directory / 'opendkim.pid'}\n"
            f"AuthservID {AUTHSERV_ID}\n"
            f"Nameservers {HOST}\n"
        )
        # Debian's /etc/opendmarc.conf, plus SPF checking and the history.
        self.dmarc_conf.write_text(
            "Syslog true\n"
            "UMask 0002\n"
            f"Socket inet:{self.dmarc_port}@{HOST}\n"
            f"PidFile {directory / 'opendmarc.pid'}\n"
            f"PublicSuffixList {PSL}\n"
            f"AuthservID {AUTHSERV_ID}\n"
            f"TrustedAuthservIDs {AUTHSERV_ID}\n"
            "SPFSelfValidate true\n"
            f"HistoryFile {self.history}\n"
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    @property
    def milter(self) -> str:
        return f"inet:{HOST}:{self.dkim_port}, inet:{HOST}:{self.dmarc_port}"

    def start(self) -> CStack:
        for name, argv, port in (
            ("opendkim", ["opendkim", "-f", "-x", str(self.dkim_conf)], self.dkim_port),
            ("opendmarc", ["opendmarc", "-f", "-c", str(self.dmarc_conf)], self.dmarc_port),
        ):
            log_path = self.dir / f"{name}.log"
            log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            proc = subprocess.Popen(
                argv, stdout=log, stderr=log, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            )
            self.procs[name] = proc
            wait_tcp_listen(port, name, proc, log_path)
        return self

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} died with {proc.returncode}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def start_dmarcmilter(
    directory: Path,
    socket_spec: str,
    source: Path = ROOT,
    failure_reports: bool = False,
    metrics_listen: str = "",
) -> MilterDaemon:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    config: dict[str, Any] = {"milter": {"socket": socket_spec, "socket_mode": "0666"}}
    if failure_reports:
        config["failure_reports"] = {"enabled": True}
    if metrics_listen:
        config["metrics"] = {"listen": metrics_listen}
    daemon = MilterDaemon(directory, 53, config, source=source)
    daemon.start()
    if socket_spec.startswith("unix:"):
        allow_postfix(socket_spec.removeprefix("unix:"))
    return daemon


# -- /proc ----------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def tcp_accepts() -> int:
    """TCP connections accepted in this network namespace so far (PassiveOpens)."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = (row for row in rows if row[0] == "Tcp:")
    return int(values[names.index("PassiveOpens")])


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def rss_mb(pid: int) -> float:
    """VmRSS of the process and its descendants, in MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo += _children(p)
    return total / 1024


class Scraper:
    """Scrapes a /metrics every ``interval`` seconds, as Prometheus would,
    for as long as the run lasts."""

    def __init__(self, url: str, interval: float = SCRAPE_INTERVAL) -> None:
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self.last = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scrape()

    def scrape(self) -> bytes:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                self.last = answer.read()
            self.scrapes += 1
        except OSError:
            self.failures += 1
        return self.last

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def metric_value(text: bytes, name: str) -> float:
    """One unlabelled sample of a scrape (0 when absent)."""
    match = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class RSSSampler:
    """Samples the RSS of the pids set for the current round, every 0.2 s."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.current = ""
        self.max: dict[str, float] = collections.defaultdict(float)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def watch(self, config: str, pids: list[int]) -> None:
        self.current, self.pids = config, pids

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pids, current = self.pids, self.current
            if pids:
                value = sum(rss_mb(p) for p in pids)
                self.max[current] = max(self.max[current], value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- result checks --------------------------------------------------------------------


def dmarcmilter_results(daemon: MilterDaemon, offset: int) -> tuple[list[dict[str, str]], int]:
    """The per-message log lines after ``offset`` bytes; and the new offset."""
    with open(daemon.log_path, "rb") as f:
        f.seek(offset)
        text = f.read()
    end = text.rfind(b"\n") + 1
    lines = [parse_logfmt(line) for line in text[:end].decode(errors="replace").splitlines()]
    return [f for f in lines if f.get("msg") == "message"], offset + end


def dmarcmilter_verdict(fields: dict[str, str]) -> tuple[str, str, str, str]:
    """(kind, spf, dkim, dmarc) from one log line."""
    kind = KIND_BY_IP.get(fields.get("client_ip", ""), "?")
    dkim = fields.get("dkim", "none").split(",")[0].split(":")[0]
    return kind, fields.get("spf", "?"), dkim, fields.get("dmarc", fields.get("skipped", "?"))


# opendmarc's history: the spf and dkim results are ARES result codes
# (opendmarc's parse.h), align_dkim and align_spf 4 (pass) or 5 (fail).
ARES = {0: "pass", 2: "softfail", 3: "neutral", 4: "temperror", 5: "permerror", 6: "none"}
ARES[7] = "fail"


def opendmarc_results(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read()
    except FileNotFoundError:
        return [], offset
    # A record ends at its "action" line.
    end = text.rfind(b"\naction ")
    if end < 0:
        return [], offset
    end = text.find(b"\n", end + 1) + 1
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in text[:end].decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "job":
            current = {"dkim": []}
            records.append(current)
        if key == "dkim":
            current["dkim"].append(value)
        else:
            current[key] = value
    return records, offset + end


def opendmarc_verdict(record: dict[str, Any]) -> tuple[str, str, str, str]:
    kind = KIND_BY_IP.get(record.get("ipaddr", ""), "?")
    try:
        spf = ARES.get(int(record.get("spf", "-1")), record.get("spf", "?"))
    except ValueError:
        spf = "?"
    dkims = record.get("dkim") or []
    if dkims:
        code = dkims[0].split()[-1]
        dkim = ARES.get(int(code), code) if code.lstrip("-").isdigit() else code
    else:
        dkim = "none"
    aligned = "4" in (record.get("align_dkim"), record.get("align_spf"))
    dmarc = "pass" if aligned else "fail"
    if record.get("policy") in (None, "") or record.get("pdomain") in (None, ""):
        dmarc = "none"
    return kind, spf, dkim, dmarc


AR_PART = re.compile(r"\b(spf|dkim|dmarc)=([a-z]+)")


def ar_results(values: Sequence[str]) -> dict[str, str]:
    """spf/dkim/dmarc results from our Authentication-Results fields (the first
    of each method)."""
    found: dict[str, str] = {}
    for value in values:
        if value.split(";")[0].strip() != AUTHSERV_ID:
            continue
        for method, result in AR_PART.findall(value):
            found.setdefault(method, result)
    return found


def delivered_check(server: PostfixServer, mails: list[Mail], label: str) -> list[str]:
    """One message of each kind through ``server`` (with a sink); the
    Authentication-Results found against the expected ones.  Problems are
    returned."""
    problems: list[str] = []
    for kind in KINDS:
        mail = next(m for m in mails if m.kind == kind)
        ip, helo, mail_from, _, _ = MIX[kind]
        sent = server.send(mail_from, RCPT, mail.raw, client_ip=ip, helo=helo)
        if sent.code != 250:
            problems.append(f"{label} {kind}: refused: {sent.code} {sent.text}")
            continue
        delivered = server.wait_for_delivery(sent, timeout=30)
        values = delivered.header_values("Authentication-Results")
        got = ar_results(values)
        want = dict(zip(("spf", "dkim", "dmarc"), EXPECTED[kind], strict=True))
        shown = " ".join(f"{m}={got.get(m, '-')}" for m in ("spf", "dkim", "dmarc"))
        ok = all(got.get(m, "none") == want[m] for m in want)
        print(f"  {label:<22} {kind:<9} {shown:<36} {'ok' if ok else 'UNEXPECTED'}")
        if not ok:
            problems.append(f"{label} {kind}: got {got}, want {want}; A-R: {values}")
    return problems


def tally(verdicts: list[tuple[str, str, str, str]]) -> str:
    """Per kind: count and result distributions, with mismatches flagged."""
    by_kind: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for kind, spf, dkim, dmarc in verdicts:
        by_kind[kind].append((spf, dkim, dmarc))
    parts = []
    for kind in (*KINDS, "?"):
        rows = by_kind.get(kind)
        if not rows:
            continue
        want = EXPECTED.get(kind)
        good = sum(1 for r in rows if r == want)
        results = collections.Counter(r[2] for r in rows)
        dist = "/".join(f"{k}:{v}" for k, v in results.most_common())
        parts.append(f"{kind} {len(rows)} (as expected {good}; dmarc {dist})")
    return "; ".join(parts)


# -- the run --------------------------------------------------------------------------


@dataclass
class Config:
    key: str
    label: str
    server: PostfixServer
    milters: dict[str, int]  # name: pid
    quickack: bool = True
    rounds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    cpu_busy: list[float] = field(default_factory=list)
    # name: [user, system] seconds
    milter_cpu: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(lambda: [0.0, 0.0])
    )
    bench_cpu: float = 0.0  # this process: the DNS server, the RSS sampler
    tcp_accepts: int = 0  # SMTP and milter connections
    probe: list[float] = field(default_factory=list)  # one client: latencies
    probe_rate: float = 0.0
    cpu_msgs: int = 0
    dns_queries: int = 0
    results: ResultLog | None = None
    verdicts: list[tuple[str, str, str, str]] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def milter_pids(self) -> list[int]:
        return list(self.milters.values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@contextlib.contextmanager
def quickack_state(on: bool) -> Iterator[None]:
    if on:
        yield
        return
    set_quickack(False)
    try:
        yield
    finally:
        set_quickack(True)


class ResultLog:
    """What a stack recorded per message: dmarcmilter's log lines, or
    opendmarc's history file; read from where the last read ended."""

    def __init__(self, source: MilterDaemon | Path) -> None:
        self.source = source
        self.offset = 0

    @property
    def path(self) -> Path:
        return self.source.log_path if isinstance(self.source, MilterDaemon) else self.source

    def skip(self) -> None:
        """Forget what is there now (the check, the warm-up)."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> list[tuple[str, str, str, str]]:
        if isinstance(self.source, MilterDaemon):
            lines, self.offset = dmarcmilter_results(self.source, self.offset)
            return [dmarcmilter_verdict(f) for f in lines]
        records, self.offset = opendmarc_results(self.source, self.offset)
        return [opendmarc_verdict(r) for r in records]


def measure_round(
    cfg: Config,
    load: LoadGenerator,
    dns: BenchDNSServer,
    rss: RSSSampler,
    seconds: float,
    measure: bool = True,
    clients: int | None = None,
) -> float:
    """One round of ``cfg``; its messages per second.  With ``measure``, what
    the round measured is added to ``cfg``; with ``clients``, only that many
    clients send (the latency probe)."""
    with quickack_state(cfg.quickack):
        rss.watch(cfg.key, cfg.milter_pids if measure else [])
        cpu0 = machine_cpu()
        milter0 = {name: cpu_seconds(pid) for name, pid in cfg.milters.items()}
        self0 = cpu_seconds(os.getpid())
        accepts0 = tcp_accepts()
        dns0 = dns.total
        start_at = time.monotonic() + 0.1
        deadline = start_at + seconds
        results = load.run(cfg.server.port, start_at, deadline, clients)
        cpu1 = machine_cpu()
        milter1 = {name: cpu_seconds(pid) for name, pid in cfg.milters.items()}
        self1 = cpu_seconds(os.getpid())
        accepts1 = tcp_accepts()
        rss.watch("", [])
    done = [d for r in results for d in r.done]
    in_time = [d for d in done if d[0] <= deadline]
    rate = len(in_time) / seconds
    if clients is not None and measure:
        cfg.probe.extend(d[1] for d in in_time)
        cfg.probe_rate = rate
    elif measure:
        cfg.rounds.append(rate)
        cfg.latencies.extend(d[1] for d in in_time)
        cfg.accepted += len(done)
        cfg.kinds.update(d[2] for d in done)
        cfg.errors += sum(r.errors for r in results)
        for r in results:
            cfg.first_errors.extend(r.first_errors[: 3 - len(cfg.first_errors)])
        busy, total = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        cfg.cpu_busy.append(busy / total if total else 0.0)
        for name in cfg.milters:
            for i in (0, 1):
                cfg.milter_cpu[name][i] += milter1[name][i] - milter0[name][i]
        cfg.cpu_msgs += len(done)
        cfg.dns_queries += dns.total - dns0
        cfg.bench_cpu += sum(self1) - sum(self0)
        cfg.tcp_accepts += accepts1 - accepts0
    return rate


# Where a sample belongs: the first area, in this order, that a frame of its
# stack matches.
PROFILE_AREAS = (
    ("history writer thread (rows, SQLAlchemy, SQLite)", ("history/", "sqlalchemy/", "sqlite3")),
    ("logging (the line per message)", ("logging/__init__.py", "logline.py", "LineFormatter")),
    (
        "pymilter addheader/chgheader/quarantine (calls into libmilter)",
        ("Base.addheader", "Base.chgheader", "Base.quarantine", "Base.setreply"),
    ),
    ("DKIM verification", ("dmarcmilter/dkim.py", "dkim/", "nacl/", "hashlib")),
    ("ARC", ("dmarcmilter/arc.py",)),
    ("SPF", ("spf.py",)),
    ("DMARC policy discovery", ("discovery.py", "dmarcmilter/dmarc.py", "dmarcmilter/record.py")),
    ("DNS resolver and cache", ("resolver.py", "dns/")),
    ("message rebuild and parsing", ("message.py", "email/", "author.py")),
    (
        "policy, A-R header, actions",
        ("policy.py", "authres/render.py", "actions.py", "upstream.py"),
    ),
    ("milter callbacks (connect, envelope, header, body)", ("milter.py", "Milter/")),
)


def summarize_profile(raw: Path, top: int = 15) -> None:
    """Where the samples went, from py-spy's raw (collapsed stacks) output."""
    self_time: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        if not frames:
            areas["no Python frame: libmilter threads in C (I/O, waiting for the GIL)"] += count
            self_time["(no Python frame)"] += count
            continue
        self_time[frames[-1]] += count
        for name, needles in PROFILE_AREAS:
            if any(n in frame for frame in frames for n in needles):
                areas[name] += count
                break
        else:
            areas["other: " + frames[-1][:70]] += count
    if not total:
        print("    (no samples)")
        return
    print(f"    {total} samples, by area:")
    for name, count in areas.most_common(14):
        print(f"      {100 * count / total:5.1f}%  {name}")
    print("    by function (self time):")
    for frame, count in self_time.most_common(top):
        print(f"      {100 * count / total:5.1f}%  {frame}")


CONFIG_KEYS = ("a", "b", "c", "b-unix", "b-noqa", "b-base", "b-metrics")
LABELS = {
    "a": "(a) Postfix, no milter",
    "b": "(b) + dmarcmilter, TCP",
    "c": "(c) + opendkim + opendmarc, TCP",
    "b-unix": "(b-unix) + dmarcmilter, unix socket",
    "b-noqa": "(b-noqa) + dmarcmilter, TCP, quickack off",
    "b-base": "(b-base) + baseline dmarcmilter, TCP",
    "b-metrics": "(b-metrics) + dmarcmilter, TCP, metrics on",
}


def run(args: argparse.Namespace) -> int:
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(CONFIG_KEYS))
    if unknown or not keys:
        raise SystemExit(f"--configs: choose from {', '.join(CONFIG_KEYS)} (not {unknown})")
    if "b-base" in keys and args.baseline_tree is None:
        raise SystemExit("--configs b-base needs --baseline-tree DIR")
    workdir = Path(tempfile.mkdtemp(prefix="dmarcmilter-bench-"))
    workdir.chmod(0o755)  # smtpd (user postfix) reaches the unix socket in here
    print(f"work directory: {workdir}")
    table = setup_namespace(workdir)
    print("loopback routes (ip route show table local):")
    print("".join(f"  {line}\n" for line in table.splitlines()), end="")

    started = time.monotonic()
    mails = build_mails(args.messages_per_kind)
    sizes = [m.size for m in mails]
    print(
        f"message mix: {len(mails)} messages, {args.messages_per_kind} each of "
        f"{', '.join(KINDS)}; sizes {min(sizes):,}-{max(sizes):,} bytes, mean "
        f"{statistics.fmean(sizes):,.0f} (seed {SEED}; built in "
        f"{time.monotonic() - started:.1f} s)"
    )
    # Fork the load generator before this process starts any thread.
    load = LoadGenerator(mails, args.clients, args.processes)
    dns = BenchDNSServer().start_on(53)
    dns.set_zone(bench_zone(args.failure_reports))
    settings: dict[str, object] = {"default_process_limit": max(200, 8 * args.clients)}
    if not args.milter_before_xclient:
        # smtpd connects to its milters when a session starts, and again after
        # XCLIENT: two milter connections per message, where real traffic makes
        # one.  No milters for the load generator's own address (127.0.0.1):
        # only the connection for the client that XCLIENT sets remains.
        maps = workdir / "smtpd_milter_maps.cidr"
        maps.write_text("127.0.0.0/8 DISABLE\n")
        settings["smtpd_milter_maps"] = f"cidr:{maps}"
    servers: list[PostfixServer] = []
    daemons: list[MilterDaemon] = []
    cstack: CStack | None = None
    scraper: Scraper | None = None
    rss = RSSSampler()
    configs: list[Config] = []
    exit_code = 0

    def postfix(milter: str | None, sink: bool = False) -> PostfixServer:
        server = PostfixServer(milter=milter, sink=sink, settings=settings)
        servers.append(server)
        return server.start()

    try:
        daemon_tcp = daemon_unix = None
        if "b" in keys or "b-noqa" in keys:
            spec = f"inet:{free_port()}@{HOST}"
            daemon_tcp = start_dmarcmilter(
                workdir / "dmarcmilter-tcp", spec, failure_reports=args.failure_reports
            )
            daemons.append(daemon_tcp)
        if "b-unix" in keys:
            spec = f"unix:{workdir / 'dmarcmilter-unix' / 'milter.sock'}"
            daemon_unix = start_dmarcmilter(
                workdir / "dmarcmilter-unix", spec, failure_reports=args.failure_reports
            )
            daemons.append(daemon_unix)
        daemon_base = None
        if "b-base" in keys:
            spec = f"inet:{free_port()}@{HOST}"
            daemon_base = start_dmarcmilter(
                workdir / "dmarcmilter-base", spec, source=args.baseline_tree
            )
            daemons.append(daemon_base)
        daemon_metrics = None
        if "b-metrics" in keys:
            spec = f"inet:{free_port()}@{HOST}"
            listen = f"{HOST}:{free_port()}"
            daemon_metrics = start_dmarcmilter(
                workdir / "dmarcmilter-metrics",
                spec,
                failure_reports=args.failure_reports,
                metrics_listen=listen,
            )
            daemons.append(daemon_metrics)
            scraper = Scraper(f"http://{listen}/metrics")
        if "c" in keys:
            cstack = CStack(workdir / "opendkim-opendmarc").start()

        # Before measuring: each stack really resolves and evaluates.
        print("check: one message of each kind through each stack to a sink; our A-R fields:")
        problems: list[str] = []
        checker = postfix(None, sink=True)
        if daemon_tcp is not None:
            checker.reconfigure(milter=milter_spec(daemon_tcp))
            problems += delivered_check(checker, mails, "(b) dmarcmilter")
        if daemon_unix is not None:
            checker.reconfigure(milter=milter_spec(daemon_unix))
            problems += delivered_check(checker, mails, "(b-unix) dmarcmilter")
        if daemon_metrics is not None:
            checker.reconfigure(milter=milter_spec(daemon_metrics))
            problems += delivered_check(checker, mails, "(b-metrics) dmarcmilter, metrics on")
        if daemon_base is not None:
            checker.reconfigure(milter=milter_spec(daemon_base))
            problems += delivered_check(checker, mails, "(b-base) dmarcmilter, baseline")
        if cstack is not None:
            checker.reconfigure(milter=cstack.milter)
            problems += delivered_check(checker, mails, "(c) opendkim+opendmarc")
        servers.remove(checker)
        checker.cleanup()
        for problem in problems:
            print("  PROBLEM:", problem)
        if problems and not args.ignore_check:
            raise SystemExit("a stack does not evaluate as expected: not measuring")

        tcp_server: PostfixServer | None = None
        tcp_log = ResultLog(daemon_tcp) if daemon_tcp is not None else None
        for key in keys:
            if key == "a":
                cfg = Config(key, LABELS[key], postfix(None), {})
            elif key in ("b", "b-noqa"):
                assert daemon_tcp is not None and daemon_tcp.proc is not None
                if tcp_server is None:
                    tcp_server = postfix(milter_spec(daemon_tcp))
                cfg = Config(key, LABELS[key], tcp_server, {"dmarcmilter": daemon_tcp.proc.pid})
                cfg.quickack = key == "b"
                cfg.results = tcp_log
            elif key == "b-base":
                assert daemon_base is not None and daemon_base.proc is not None
                server = postfix(milter_spec(daemon_base))
                cfg = Config(key, LABELS[key], server, {"dmarcmilter": daemon_base.proc.pid})
                cfg.quickack = True
                cfg.results = ResultLog(daemon_base)
            elif key == "b-metrics":
                assert daemon_metrics is not None and daemon_metrics.proc is not None
                server = postfix(milter_spec(daemon_metrics))
                cfg = Config(key, LABELS[key], server, {"dmarcmilter": daemon_metrics.proc.pid})
                cfg.quickack = True
                cfg.results = ResultLog(daemon_metrics)
            elif key == "b-unix":
                assert daemon_unix is not None and daemon_unix.proc is not None
                server = postfix(milter_spec(daemon_unix))
                cfg = Config(key, LABELS[key], server, {"dmarcmilter": daemon_unix.proc.pid})
                cfg.results = ResultLog(daemon_unix)
            else:
                assert cstack is not None
                cfg = Config(key, LABELS[key], postfix(cstack.milter), cstack.pids())
                cfg.results = ResultLog(cstack.history)
            configs.append(cfg)

        print(
            f"warm-up: {args.warmup:g} s per configuration; then {args.rounds} rounds of "
            f"{args.seconds:g} s each, {args.clients} clients in {len(load.workers)} processes"
        )
        for cfg in configs:
            rate = measure_round(cfg, load, dns, rss, args.warmup, measure=False)
            print(f"  warm-up {cfg.key:<7} {rate:7.1f} msgs/s", flush=True)
            time.sleep(1.0)
        time.sleep(0.5)
        for cfg in configs:
            if cfg.results is not None:
                cfg.results.skip()

        for n in range(1, args.rounds + 1):
            line = []
            for cfg in configs:
                rate = measure_round(cfg, load, dns, rss, args.seconds)
                check_alive(daemons, cstack)
                time.sleep(0.5)  # the last log lines and history records of the round
                if cfg.results is not None:
                    cfg.verdicts.extend(cfg.results.read())
                line.append(f"{cfg.key} {rate:.1f}")
            print(f"  round {n}/{args.rounds}: " + ", ".join(line) + " msgs/s", flush=True)

        if args.probe_seconds > 0:
            print(f"latency probe: one client at a time, {args.probe_seconds:g} s per config")
            for cfg in configs:
                measure_round(cfg, load, dns, rss, args.probe_seconds, clients=1)
                time.sleep(0.5)
                if cfg.results is not None:
                    cfg.results.skip()

        report(configs, rss)
        if scraper is not None:
            metrics_report(configs, scraper)
        if args.profile and daemon_tcp is not None:
            profile(configs, load, dns, rss, daemon_tcp, workdir, args)
    except KeyboardInterrupt:
        print("interrupted")
        exit_code = 130
    finally:
        rss.stop()
        if scraper is not None:
            scraper.stop()
        load.close()
        for server in servers:
            with contextlib.suppress(Exception):
                server.cleanup()
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        if cstack is not None:
            cstack.stop()
        dns.stop()
        subprocess.run(["umount", "/etc/resolv.conf"], check=False)
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code


def metrics_report(configs: list[Config], scraper: Scraper) -> None:
    """The cost of the metrics: b-metrics's milter CPU per message against
    b's, measured in the same alternating rounds."""
    text = scraper.scrape()
    evaluated = metric_value(text, "dmarcmilter_messages_evaluated_total")
    print(
        f"  b-metrics: {scraper.scrapes} scrapes of /metrics every {scraper.interval:g} s "
        f"({scraper.failures} failed; last one {len(text):,} bytes, "
        f"{evaluated:.0f} messages evaluated counted)"
    )
    per = {
        cfg.key: sum(map(sum, cfg.milter_cpu.values())) / cfg.cpu_msgs
        for cfg in configs
        if cfg.cpu_msgs and cfg.milters
    }
    if "b" in per and "b-metrics" in per:
        b, m = per["b"], per["b-metrics"]
        delta = (m - b) / b if b else float("nan")
        verdict = "within" if delta <= METRICS_TARGET else "OVER"
        print(
            f"  metrics cost: milter CPU per message b {1000 * b:.3f} ms, b-metrics "
            f"{1000 * m:.3f} ms: {100 * delta:+.1f}% ({verdict} the "
            f"{100 * METRICS_TARGET:.0f}% target)"
        )


def check_alive(daemons: list[MilterDaemon], cstack: CStack | None) -> None:
    if cstack is not None:
        cstack.check_alive()
    for d in daemons:
        if d.proc is not None and d.proc.poll() is not None:
            raise SystemExit(f"dmarcmilter died: {d.log_text()[-2000:]}")


def milter_spec(daemon: MilterDaemon) -> str:
    """Postfix's smtpd_milters entry for a MilterDaemon."""
    text = daemon.config_path.read_text()
    inet = re.search(r'socket = "inet:(\d+)@([^"]+)"', text)
    if inet:
        return f"inet:{inet.group(2)}:{inet.group(1)}"
    unix = re.search(r'socket = "unix:([^"]+)"', text)
    assert unix is not None, text
    return f"unix:{unix.group(1)}"


def profile(
    configs: list[Config],
    load: LoadGenerator,
    dns: BenchDNSServer,
    rss: RSSSampler,
    daemon: MilterDaemon,
    workdir: Path,
    args: argparse.Namespace,
) -> None:
    cfg = next((c for c in configs if c.key == "b"), None)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if cfg is None or not Path(spy).exists():
        print("profile: needs configuration b and py-spy (pip install py-spy)")
        return
    assert daemon.proc is not None
    seconds = max(5.0, args.seconds)
    for mode, flags, what in (
        ("all", [], "every sampled thread that is not idle"),
        ("gil", ["--gil"], "only the thread holding the GIL: where the Python CPU goes"),
    ):
        raw = workdir / f"dmarcmilter.pyspy-{mode}.txt"
        spy_cmd = [spy, "record", "--pid", str(daemon.proc.pid), "--rate", "200"]
        spy_cmd += ["--nonblocking", *flags, "--duration", str(int(seconds))]
        spy_cmd += ["--format", "raw", "-o", str(raw)]
        proc = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        cpu0 = cpu_seconds(daemon.proc.pid)
        rate = measure_round(cfg, load, dns, rss, seconds, measure=False)
        cpu1 = cpu_seconds(daemon.proc.pid)
        _, err = proc.communicate(timeout=seconds + 60)
        print(
            f"\nprofile of dmarcmilter under load (py-spy record --nonblocking {' '.join(flags)}; "
            f"{what}):\n  {seconds:g} s round at {rate:.1f} msgs/s; the process used "
            f"{cpu1[0] - cpu0[0]:.1f} s user + {cpu1[1] - cpu0[1]:.1f} s system CPU; {raw}"
        )
        if proc.returncode != 0 or not raw.exists():
            print("    py-spy failed:", err.decode(errors="replace")[-1000:])
            continue
        summarize_profile(raw)


def report(configs: list[Config], rss: RSSSampler) -> None:
    print()
    print(
        "msgs/s: messages accepted within the rounds / round length (mean, and each round); "
        "p50/p99: SMTP\ntransaction latency over all rounds; CPU busy: the whole machine; "
        "milter CPU: user+system time of the\nmilter process(es) per message; DNS: queries "
        "reaching the test server per message; RSS: max sampled."
    )
    head = (
        f"{'configuration':<42} {'msgs/s':>7}  {'per round':<30} {'p50':>6} {'p99':>6} "
        f"{'CPU':>5} {'milter':>7} {'DNS':>5} {'RSS':>5}"
    )
    print(head)
    print(
        f"{'':<42} {'mean':>7}  {'':<30} {'ms':>6} {'ms':>6} {'busy':>5} "
        f"{'CPU ms':>7} {'q/msg':>5} {'MB':>5}"
    )
    print("-" * len(head))
    summary: dict[str, tuple[float, float, float]] = {}
    for cfg in configs:
        mean = statistics.fmean(cfg.rounds) if cfg.rounds else 0.0
        p50 = percentile(cfg.latencies, 0.50) * 1000
        p99 = percentile(cfg.latencies, 0.99) * 1000
        per_round = " ".join(f"{r:.0f}" for r in cfg.rounds)
        busy = statistics.fmean(cfg.cpu_busy) * 100 if cfg.cpu_busy else 0.0
        milter_ms = "-"
        if cfg.milters and cfg.cpu_msgs:
            milter_ms = f"{1000 * sum(map(sum, cfg.milter_cpu.values())) / cfg.cpu_msgs:.2f}"
        dnsq = cfg.dns_queries / cfg.cpu_msgs if cfg.cpu_msgs else 0.0
        mem = rss.max.get(cfg.key, 0.0)
        print(
            f"{cfg.label:<42} {mean:7.1f}  {per_round:<30} {p50:6.1f} {p99:6.1f} "
            f"{busy:4.0f}% {milter_ms:>7} {dnsq:5.2f} {(f'{mem:.0f}' if mem else '-'):>5}"
        )
        summary[cfg.key] = (mean, p50, p99)
    print("  CPU per message, user + system, of the milters; and of this process (test DNS):")
    for cfg in configs:
        if cfg.cpu_msgs:
            parts = [
                f"{name} {1000 * user / cfg.cpu_msgs:.2f} + {1000 * system / cfg.cpu_msgs:.2f} ms"
                for name, (user, system) in cfg.milter_cpu.items()
            ]
            parts.append(f"bench/DNS {1000 * cfg.bench_cpu / cfg.cpu_msgs:.2f} ms")
            print(f"    {cfg.key:<7} {', '.join(parts)}")
    cores = os.cpu_count() or 1
    per_message = [
        f"{cfg.key} {machine_ms:.1f} ms"
        for cfg in configs
        if cfg.cpu_busy and cfg.rounds and statistics.fmean(cfg.rounds) > 0
        for machine_ms in [
            statistics.fmean(cfg.cpu_busy) * cores * 1000 / statistics.fmean(cfg.rounds)
        ]
    ]
    if per_message:
        print(f"  whole-machine CPU per message ({cores} cores): " + ", ".join(per_message))
    print(
        "  TCP connections accepted per message (SMTP + TCP milters): "
        + ", ".join(
            f"{cfg.key} {cfg.tcp_accepts / cfg.cpu_msgs:.2f}" for cfg in configs if cfg.cpu_msgs
        )
    )

    probed = [cfg for cfg in configs if cfg.probe]
    if probed:
        print()
        print("one client at a time (no queueing; shows per-message service time and stalls):")
        for cfg in probed:
            print(
                f"  {cfg.label:<42} {cfg.probe_rate:6.1f} msgs/s  "
                f"p50 {percentile(cfg.probe, 0.5) * 1000:6.1f} ms  "
                f"p99 {percentile(cfg.probe, 0.99) * 1000:6.1f} ms"
            )

    print()
    print("sanity (per-message results each stack recorded during the measured rounds):")
    for cfg in configs:
        extra = f", {cfg.errors} errors {cfg.first_errors}" if cfg.errors else ", no errors"
        print(
            f"  {cfg.key:<7} accepted {cfg.accepted:,} "
            f"({', '.join(f'{k} {cfg.kinds[k]:,}' for k in KINDS)}){extra}"
        )
        if cfg.results is None:
            continue
        who = "opendmarc history" if cfg.key == "c" else "dmarcmilter log"
        print(f"          {who}: {len(cfg.verdicts):,} messages: {tally(cfg.verdicts)}")

    b, c = summary.get("b"), summary.get("c")
    print()
    print("targets:")
    if b and c and c[0]:
        ratio = b[0] / c[0]
        print(
            f"  throughput (b)/(c) = {b[0]:.1f}/{c[0]:.1f} = {ratio:.2f}x   "
            f"target >= {RATIO_TARGET}x: {'MET' if ratio >= RATIO_TARGET else 'MISSED'}"
        )
        print(
            f"  p99 (b) {b[2]:.1f} ms vs (c) {c[2]:.1f} ms   "
            f"target p99(b) <= p99(c): {'MET' if b[2] <= c[2] else 'MISSED'}"
        )
    memory = [rss.max[k] for k in ("b", "b-unix", "b-noqa") if rss.max.get(k)]
    if memory:
        top = max(memory)
        print(
            f"  dmarcmilter RSS max {top:.0f} MB   target <= {RSS_TARGET_MB:.0f} MB: "
            f"{'MET' if top <= RSS_TARGET_MB else 'MISSED'}"
        )
    sockets = [
        f"{name} {summary[key][0]:.1f} msgs/s, p99 {summary[key][2]:.1f} ms"
        for key, name in (
            ("b-unix", "unix socket"),
            ("b", "TCP with quickack"),
            ("b-noqa", "TCP, kernel defaults"),
        )
        if key in summary
    ]
    if len(sockets) > 1:
        print("  dmarcmilter by socket: " + "; ".join(sockets))
    if "b" in summary and "b-base" in summary and summary["b-base"][0]:
        change = 100 * (summary["b"][0] / summary["b-base"][0] - 1)
        print(f"  this tree against --baseline-tree (b / b-base msgs/s): {change:+.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of a round")
    parser.add_argument("--clients", type=int, default=16, help="concurrent SMTP clients")
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument(
        "--configs", default="a,b,c,b-unix,b-noqa", help="which configurations, in round order"
    )
    parser.add_argument("--warmup", type=float, default=4.0, help="warm-up seconds per config")
    parser.add_argument("--messages-per-kind", type=int, default=64)
    parser.add_argument(
        "--probe-seconds", type=float, default=5.0, help="one-client latency probe per config"
    )
    parser.add_argument("--profile", action="store_true", help="one more (b) round under py-spy")
    parser.add_argument(
        "--milter-before-xclient",
        action="store_true",
        help="let smtpd also connect to the milters before XCLIENT (2 connections per message)",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help=(
            "a source tree of an earlier dmarcmilter (e.g. `git worktree add --detach DIR REV`) "
            "for --configs b-base: both versions measured in one run"
        ),
    )
    parser.add_argument(
        "--failure-reports",
        action="store_true",
        help=(
            "DMARC records ask for failure reports (fo=1, ruf) and dmarcmilter (not b-base) "
            "records them: the cost of failure reports on the mail path"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--ignore-check", action="store_true", help="measure even if the result check fails"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.messages_per_kind = 1, 3.0, 1.0, 8
        args.probe_seconds = 2.0
    if os.environ.get(NETNS_ENV) != "1":
        return reexec_in_namespace(sys.argv[1:] if argv is None else list(argv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
