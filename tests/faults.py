"""Faults for tests and benchmarks of the history path: a database that goes
away, a state directory that fills up or turns read-only, a daemon that is
killed, and the mail that runs through it meanwhile.

* :class:`FaultProxy`: a TCP proxy on loopback in front of a database
  server.  ``down()`` refuses new connections (the listening socket is
  closed: ECONNREFUSED) and cuts the open ones; ``up()`` listens again on the
  same port.  One daemon can so lose "its" database while the server itself,
  shared by other tests, keeps running.
* :class:`Tmpfs`: a small tmpfs mounted on a directory (root only), to fill
  up (:func:`fill`) or remount read-only.  :func:`mount_unavailable` says why
  mounting is impossible here.
* :class:`Traffic`: messages sent to a running ``dmarcmilter run`` from
  several threads, each a milter connection carrying one SMTP session after
  another, with the queue ids that got their end-of-message reply recorded.
* :func:`rows_per_queue_id` and :class:`Tally`: what the database holds,
  checked against what was sent and answered.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dmarcmilter.errors import DatabaseError
from dmarcmilter.history import db
from dmarcmilter.history.models import MessageRow
from tests.daemon import MilterDaemon
from tests.milterclient import MilterClient, MilterClientError, Reply
from tests.signing import make_message

LOOPBACK = "127.0.0.1"

# -- the database, behind a proxy -------------------------------------------------


class FaultProxy:
    """A TCP proxy from a loopback port to ``target`` (host, port); see the
    module docstring.  Each connection is two threads copying bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self.up()

    def url(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL of the target) pointed at the proxy."""
        return make_url(url).set(host=LOOPBACK, port=self.port).render_as_string(False)

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        """Accept and forward connections again, on the same port."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener,), name="fault-proxy", daemon=True
        ).start()

    def down(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            listener.close()
        for pair in pairs:
            pair.reset()

    close = down

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(client, server)
            with self._lock:
                if self._listener is not listener:
                    pair.reset()
                    return
                self._pairs.add(pair)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst), name="fault-proxy-pump", daemon=True
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            pair.ended += 1
            done = pair.ended == 2
            if done:
                self._pairs.discard(pair)
        if done:
            pair.close()


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self.ended = 0

    def reset(self) -> None:
        for sock in self.sockets:
            _reset(sock)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST, waking any thread blocked on the socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# -- a small file system ----------------------------------------------------------


class MountUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (not root, or no CAP_SYS_ADMIN)."""


_probe: list[str | None] = []


def mount_unavailable() -> str | None:
    """Why a tmpfs cannot be mounted here, or None when it can (tried once)."""
    if not _probe:
        reason: str | None = None
        if os.geteuid() != 0:
            reason = "mounting a tmpfs needs root"
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="dmarcmilter-mnt-") as tmp:
                try:
                    Tmpfs(Path(tmp), 64 << 10).unmount()
                except MountUnavailable as exc:
                    reason = str(exc)
        _probe.append(reason)
    return _probe[0]


def _mount(*args: str) -> None:
    try:
        result = subprocess.run(
            ["mount", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise MountUnavailable(f"mount {' '.join(args)}: {exc}") from None
    if result.returncode != 0:
        raise MountUnavailable(f"mount {' '.join(args)}: {result.stderr.strip()}")


class Tmpfs:
    """A tmpfs of ``size`` bytes mounted on ``path`` (created if needed)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
        self.mounted = True

    def remount(self, *, read_only: bool) -> None:
        _mount("-o", "remount,ro" if read_only else "remount,rw", str(self.path))

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def __enter__(self) -> Tmpfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def fill(directory: Path, *, leave: int = 0, name: str = "filler") -> Path:
    """Take all the free space of ``directory``'s file system but ``leave``
    bytes with one file; remove the file to give the space back."""
    path = directory / name
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if free > leave:
            os.posix_fallocate(fd, 0, free - leave)
    finally:
        os.close(fd)
    return path


# -- traffic ----------------------------------------------------------------------

# A domain for the traffic: SPF pass for CLIENT_IP, DMARC p=none, so every
# message is accepted and recorded.
DOMAIN = "example.com"
TRAFFIC_ZONE: dict[str, Any] = {
    DOMAIN: [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    f"_dmarc.{DOMAIN}": [("TXT", "v=DMARC1; p=none")],
}
# Outside clients.trusted_networks (loopback by default): evaluated and recorded.
CLIENT_IP = "203.0.113.7"
MESSAGE = make_message(from_=f"Alice <alice@{DOMAIN}>")


@dataclass
class Traffic:
    """``count`` messages with queue ids ``{prefix}{i}`` sent to the milter at
    ``socket_path`` by ``threads`` concurrent MTA connections, each carrying
    ``per_session`` messages before it reconnects.  A thread that loses its
    connection tries again until ``stop()`` or ``give_up`` seconds of
    failures in a row; the message in flight is not sent again.

    ``attempted``: queue ids whose MAIL FROM was sent; ``replied``: those
    that got an end-of-message reply, with its kind.
    """

    socket_path: str
    count: int
    prefix: str = "Q"
    threads: int = 4
    per_session: int = 25
    give_up: float = 5.0
    message: bytes = MESSAGE
    attempted: set[str] = field(default_factory=set)
    replied: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def queue_ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]

    def start(self) -> Traffic:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"traffic-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def run(self, timeout: float = 120.0) -> Traffic:
        """Send everything and wait for the threads to end."""
        return self.start().join(timeout)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> Traffic:
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            self._stop.set()
            raise TimeoutError(f"traffic did not finish in {timeout} s: {self.summary()}")
        return self

    def wait_replied(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replied) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.replied)} of {n} replies: {self.summary()}")
            time.sleep(0.005)

    def summary(self) -> str:
        return f"{len(self.attempted)} sent, {len(self.replied)} replied, errors: {self.errors[:3]}"

    def _take(self) -> str | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self.count:
                return None
            queue_id = f"{self.prefix}{self._next}"
            self._next += 1
            self.attempted.add(queue_id)
            return queue_id

    def _session(self) -> MilterClient:
        client = MilterClient(self.socket_path, timeout=30.0)
        try:
            client.negotiate()
            client.connect("mx.sender.example", CLIENT_IP)
            client.helo("mx.sender.example")
        except BaseException:
            client.close()
            raise
        return client

    def _run(self) -> None:
        client: MilterClient | None = None
        sent = 0
        failing_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self._session()
                        sent = 0
                    queue_id = self._take()
                    if queue_id is None:
                        return
                    eom = client.send_message(
                        self.message,
                        sender=f"bounce@{DOMAIN}",
                        recipients=["user@receiver.example"],
                        macros_mail={"i": queue_id},
                        macros_eom={"i": queue_id},
                    )
                except (MilterClientError, OSError) as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    if client is not None:
                        client.close()
                        client = None
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > self.give_up:
                        return
                    time.sleep(0.05)
                    continue
                failing_since = None
                if eom.stage == "eom":
                    self.replied[queue_id] = _verdict(eom.reply)
                sent += 1
                if sent >= self.per_session:
                    with contextlib.suppress(MilterClientError, OSError):
                        client.quit()
                    client.close()
                    client = None
        finally:
            if client is not None:
                with contextlib.suppress(MilterClientError, OSError):
                    client.quit()
                client.close()


def _verdict(reply: Reply) -> str:
    """The reply's kind, with a reply code as the verdict it carries."""
    if reply.kind == "replycode":
        return "tempfail" if (reply.code or "").startswith("4") else "reject"
    return reply.kind


# -- the daemon ---------------------------------------------------------------------


def kill(daemon: MilterDaemon) -> int:
    """SIGKILL the daemon and reap it; its exit status (-9)."""
    daemon.signal(signal.SIGKILL)
    return daemon.stop()


def restart(daemon: MilterDaemon, timeout: float = 30.0) -> MilterDaemon:
    """Start a stopped daemon again on the same directories; return once
    this run listens (its log file holds the earlier runs too)."""
    before = daemon.log_text().count("listening on")
    daemon.start(wait=False)
    deadline = time.monotonic() + timeout
    while daemon.log_text().count("listening on") <= before:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dmarcmilter did not start again: {daemon.log_text()[-3000:]}")
        time.sleep(0.02)
    return daemon


def lost_in_log(daemon: MilterDaemon) -> int:
    """The rows the daemon's log lines say were lost, summed over its runs."""
    import re

    total = 0
    for line in daemon.log_lines():
        msg = line.get("msg", "")
        if match := re.search(r"(\d+) rows lost", msg):
            total += int(match.group(1))
        elif re.search(r"\brow \S+ lost\b|\bit is lost\b", msg):
            total += 1
    return total


def last_stopped(daemon: MilterDaemon) -> dict[str, str]:
    lines = daemon.log_lines("stopped")
    assert lines, daemon.log_text()[-3000:]
    return lines[-1]


# -- the database ---------------------------------------------------------------------


def rows_per_queue_id(url: str) -> collections.Counter[str]:
    """How many history rows each queue id has."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(
                select(MessageRow.queue_id, func.count()).group_by(MessageRow.queue_id)
            )
            return collections.Counter({queue_id: n for queue_id, n in result})
    finally:
        engine.dispose()


def wait_rows(url: str, n: int, timeout: float = 20.0) -> collections.Counter[str]:
    """Poll until the database holds at least ``n`` rows (or the time is up);
    the rows per queue id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            counts = rows_per_queue_id(url)
        except (DatabaseError, SQLAlchemyError):  # still coming up
            counts = collections.Counter()
        if counts.total() >= n or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


@dataclass(frozen=True)
class Tally:
    """What one run did to the history: messages ``sent`` (MAIL FROM given),
    ``replied`` (got an end-of-message reply other than a tempfail: the MTA
    takes the message, so it must have a row), ``tempfailed`` (the MTA
    tries again later: no row is owed), ``stored`` (replied ones with a
    row), ``duplicated`` (rows beyond the first for a queue id), ``lost``
    (replied, no row) and ``unreplied_stored`` (a row without a reply: the
    message was evaluated, the kill came before the reply)."""

    sent: int
    replied: int
    tempfailed: int
    stored: int
    duplicated: int
    lost: int
    unreplied_stored: int

    @staticmethod
    def owed(traffics: Iterable[Traffic]) -> set[str]:
        """The queue ids that must have a row."""
        return {q for t in traffics for q, kind in t.replied.items() if kind != "tempfail"}

    @classmethod
    def of(cls, traffics: Iterable[Traffic], counts: collections.Counter[str]) -> Tally:
        traffics = list(traffics)
        attempted = {q for t in traffics for q in t.attempted}
        answered = {q for t in traffics for q in t.replied}
        replied = cls.owed(traffics)
        return cls(
            sent=len(attempted),
            replied=len(replied),
            tempfailed=len(answered - replied),
            stored=sum(1 for q in replied if counts[q] > 0),
            duplicated=sum(n - 1 for n in counts.values() if n > 1),
            lost=sum(1 for q in replied if counts[q] == 0),
            unreplied_stored=sum(1 for q in attempted - replied if counts[q] > 0),
        )

    @staticmethod
    def problems(counts: collections.Counter[str], replied: Iterable[str]) -> list[str]:
        """Some queue ids that went wrong, for an assertion message."""
        lost = sorted(q for q in replied if counts[q] == 0)[:10]
        dups = sorted(q for q, n in counts.items() if n > 1)[:10]
        return [f"lost: {lost}", f"duplicated: {dups}"]


def state_files(directory: Path) -> dict[str, int]:
    """The files left in a state directory, with their sizes."""
    out = {}
    for path in sorted(directory.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            out[path.name] = path.stat().st_size
    return out


@contextlib.contextmanager
def proxied(target_url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A proxy in front of the database at ``target_url``; the URL through it."""
    parsed = make_url(target_url)
    proxy = FaultProxy((parsed.host or LOOPBACK, int(parsed.port or 5432)))
    try:
        yield proxy, proxy.url(target_url)
    finally:
        proxy.close()
