"""Benchmark: history faults through the real daemon, counted row by row.

Each scenario runs ``dmarcmilter run`` (tests/daemon.MilterDaemon) with MTA
traffic from several threads over the milter protocol (tests/faults.Traffic:
one queue id per message), breaks something on the way, restarts the daemon
on the same state directory when the scenario says so, and then counts the
rows per queue id in the database.  PostgreSQL is a throwaway cluster
(tests/pgserver.PostgresServer) behind a loopback proxy (tests/faults.
FaultProxy) that takes the database away from the daemon and gives it back;
state directories that fill up or are read-only are small tmpfs mounts.

Scenarios:

* ``outage``: PostgreSQL goes away for 3 s under load (traffic runs from
  0.5 s before to 1 s after it, so ``--messages`` does not apply);
* ``flapping``: five outages of 0.3 s, 0.3 s apart, under load (likewise);
* ``kill-replay``: rows wait in the journal, the daemon is SIGKILLed while
  it replays them after a restart, and started again;
* ``kill-sqlite``, ``kill-pg``: SIGKILL under load (SQLite in the state
  directory; PostgreSQL);
* ``kill-pg-down``: SIGKILL under load while PostgreSQL is down;
* ``sigterm``: a clean stop under load (messages begun after the stop
  started are tempfailed, and owe no row);
* ``full-disk``: the state directory (a tmpfs with room for about a third
  of the messages' rows) fills up while PostgreSQL is down; the rows it
  cannot take are lost, and the daemon's log must count exactly those;
* ``read-only``: the state directory is a read-only tmpfs at start
  (``paths.unwritable_state_dir = "continue"``), PostgreSQL is up.

Columns: ``sent`` (MAIL FROM given), ``replied`` (the MTA was told to take
the message), ``tempfailed`` (told to retry: no row owed), ``stored``
(replied with a row), ``duplicated`` (rows beyond one per queue id),
``lost`` (replied, no row) and ``logged_lost`` (what the daemon's log lines
say was lost).  ``ok`` is "yes" when nothing is duplicated and lost is 0,
or, for ``full-disk``, equals ``logged_lost``.

Needs root (tmpfs mounts, and PostgreSQL runs as an unprivileged user then);
without root the tmpfs scenarios are skipped.

    .venv/bin/python -m bench.history_faults [--messages 3000]
        [--scenarios outage,flapping,...] [--threads 4]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from dmarcmilter.history import db
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.faults import (
    TRAFFIC_ZONE,
    FaultProxy,
    Tally,
    Tmpfs,
    Traffic,
    kill,
    lost_in_log,
    mount_unavailable,
    restart,
    rows_per_queue_id,
    wait_rows,
)
from tests.pgserver import HOST, PostgresServer, start_server


@dataclass
class Context:
    work: Path
    dns_port: int
    pg: PostgresServer
    messages: int
    threads: int
    databases: int = 0

    def database(self) -> str:
        """A new, migrated PostgreSQL database; its URL."""
        self.databases += 1
        name = f"faults{self.databases}"
        with psycopg.connect(
            host=HOST, port=self.pg.port, user=self.pg.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://{self.pg.user}@{HOST}:{self.pg.port}/{name}"
        db.upgrade(url)
        return url

    def daemon(self, name: str, config: dict[str, Any]) -> MilterDaemon:
        directory = self.work / name
        directory.mkdir()
        return MilterDaemon(directory, self.dns_port, config)

    def traffic(self, daemon: MilterDaemon, prefix: str, count: int | None = None) -> Traffic:
        return Traffic(daemon.socket, count or self.messages, prefix=prefix, threads=self.threads)


@dataclass
class Result:
    tally: Tally
    logged_lost: int
    seconds: float
    lossy: bool = False  # the scenario must lose what the log counts
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.tally.duplicated:
            return False
        if self.lossy:
            return self.tally.lost == self.logged_lost
        return self.tally.lost == 0 and self.logged_lost == 0


def settle(url: str, traffics: list[Traffic], timeout: float = 60.0) -> collections.Counter[str]:
    """The rows once every owed row is there (or the time is up)."""
    return wait_rows(url, len(Tally.owed(traffics)), timeout)


def finish(
    daemon: MilterDaemon, url: str, traffics: list[Traffic], started: float, **kw: Any
) -> Result:
    if daemon.proc is not None and daemon.proc.poll() is None:
        settle(url, traffics)
        daemon.stop()
    counts = rows_per_queue_id(url)
    return Result(Tally.of(traffics, counts), lost_in_log(daemon), time.monotonic() - started, **kw)


def pulses(proxy: FaultProxy, outages: list[tuple[float, float]]) -> threading.Thread:
    """Take the database down at each (start, length), seconds from now."""

    def run() -> None:
        t0 = time.monotonic()
        for start, length in outages:
            time.sleep(max(0.0, t0 + start - time.monotonic()))
            proxy.down()
            time.sleep(length)
            proxy.up()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def outage_scenario(ctx: Context, outages: list[tuple[float, float]]) -> Result:
    url = ctx.database()
    with FaultProxy((HOST, ctx.pg.port)) as proxy:
        daemon = ctx.daemon(f"outage{len(outages)}", {"database": {"url": proxy.url(url)}})
        daemon.start()
        started = time.monotonic()
        # Traffic at full speed from before the first outage to a second
        # after the last.
        traffic = ctx.traffic(daemon, "O", 10**7).start()
        pulses(proxy, outages).join()
        time.sleep(1.0)
        traffic.stop()
        traffic.join()
        return finish(daemon, url, [traffic], started)


def outage(ctx: Context) -> Result:
    return outage_scenario(ctx, [(0.5, 3.0)])


def flapping(ctx: Context) -> Result:
    return outage_scenario(ctx, [(0.3 + 0.6 * i, 0.3) for i in range(5)])


def kill_replay(ctx: Context) -> Result:
    url = ctx.database()
    with FaultProxy((HOST, ctx.pg.port)) as proxy:
        proxy.down()
        daemon = ctx.daemon("kill-replay", {"database": {"url": proxy.url(url)}})
        daemon.start()
        started = time.monotonic()
        traffic = ctx.traffic(daemon, "R", ctx.messages * 2).run(300)
        daemon.stop()
        proxy.up()
        restart(daemon)
        total = len(Tally.owed([traffic]))
        note = "replay finished before the kill"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stored = rows_per_queue_id(url).total()
            if 0 < stored < total:
                kill(daemon)
                note = f"killed with {stored} of {total} rows replayed"
                break
            if stored >= total:
                break
            time.sleep(0.005)
        if daemon.proc is not None and daemon.proc.poll() is not None:
            restart(daemon)
        return finish(daemon, url, [traffic], started, note=note)


def kill_under_load(ctx: Context, database: str) -> Result:
    config: dict[str, Any] = {}
    proxy: FaultProxy | None = None
    url = ""
    if database != "sqlite":
        url = ctx.database()
        proxy = FaultProxy((HOST, ctx.pg.port))
        config = {"database": {"url": proxy.url(url)}}
        if database == "pg-down":
            proxy.down()
    try:
        daemon = ctx.daemon(f"kill-{database}", config)
        daemon.start()
        url = url or daemon.database_url
        started = time.monotonic()
        traffic = ctx.traffic(daemon, "K", ctx.messages * 10).start()
        traffic.wait_replied(ctx.messages // 2)
        kill(daemon)
        traffic.stop()
        traffic.join()
        if proxy is not None:
            proxy.up()
        restart(daemon)
        return finish(daemon, url, [traffic], started)
    finally:
        if proxy is not None:
            proxy.close()


def sigterm(ctx: Context) -> Result:
    daemon = ctx.daemon("sigterm", {})
    daemon.start()
    started = time.monotonic()
    traffic = ctx.traffic(daemon, "T", ctx.messages * 10).start()
    traffic.wait_replied(ctx.messages // 2)
    daemon.stop()
    traffic.stop()
    traffic.join()
    restart(daemon)
    return finish(daemon, daemon.database_url, [traffic], started)


def full_disk(ctx: Context) -> Result:
    url = ctx.database()
    with FaultProxy((HOST, ctx.pg.port)) as proxy:
        proxy.down()
        daemon = ctx.daemon("full-disk", {"database": {"url": proxy.url(url)}})
        # Room for about a third of the rows.
        with Tmpfs(daemon.state_dir, max(64 << 10, ctx.messages * 300)):
            daemon.start()
            started = time.monotonic()
            traffic = ctx.traffic(daemon, "F").run(300)
            daemon.stop()
            proxy.up()
            restart(daemon)
            owed = len(Tally.owed([traffic])) - lost_in_log(daemon)
            wait_rows(url, owed, 60)
            daemon.stop()
            counts = rows_per_queue_id(url)
            return Result(
                Tally.of([traffic], counts),
                lost_in_log(daemon),
                time.monotonic() - started,
                lossy=True,
            )


def read_only(ctx: Context) -> Result:
    url = ctx.database()
    daemon = ctx.daemon("read-only", {"database": {"url": url}})
    with Tmpfs(daemon.state_dir, 1 << 20) as fs:
        fs.remount(read_only=True)
        daemon.start()
        started = time.monotonic()
        traffic = ctx.traffic(daemon, "W").run(300)
        return finish(daemon, url, [traffic], started)


SCENARIOS: dict[str, tuple[Callable[[Context], Result], bool]] = {
    # name: (run, needs a tmpfs)
    "outage": (outage, False),
    "flapping": (flapping, False),
    "kill-replay": (kill_replay, False),
    "kill-sqlite": (lambda ctx: kill_under_load(ctx, "sqlite"), False),
    "kill-pg": (lambda ctx: kill_under_load(ctx, "pg"), False),
    "kill-pg-down": (lambda ctx: kill_under_load(ctx, "pg-down"), False),
    "sigterm": (sigterm, False),
    "full-disk": (full_disk, True),
    "read-only": (read_only, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per scenario")
    parser.add_argument("--threads", type=int, default=4, help="concurrent MTA connections")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    names = [name for name in args.scenarios.split(",") if name]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    no_mount = mount_unavailable()
    header = (
        f"{'scenario':<14}{'sent':>7}{'replied':>9}{'tempfailed':>12}{'stored':>8}"
        f"{'duplicated':>12}{'lost':>6}{'logged_lost':>13}{'seconds':>9}  ok"
    )
    print(f"dmarcmilter history faults: {args.messages} messages, {args.threads} connections")
    print(header)
    failed = False
    pg = start_server()
    dns = TestDNSServer().start()
    dns.set_zone(TRAFFIC_ZONE)
    try:
        with tempfile.TemporaryDirectory(prefix="dmarcmilter-faults-") as tmp:
            ctx = Context(Path(tmp), dns.port, pg, args.messages, args.threads)
            for name in names:
                run, needs_mount = SCENARIOS[name]
                if needs_mount and no_mount:
                    print(f"{name:<14}skipped: {no_mount}")
                    continue
                r = run(ctx)
                t = r.tally
                failed |= not r.ok
                print(
                    f"{name:<14}{t.sent:>7}{t.replied:>9}{t.tempfailed:>12}{t.stored:>8}"
                    f"{t.duplicated:>12}{t.lost:>6}{r.logged_lost:>13}{r.seconds:>9.1f}"
                    f"  {'yes' if r.ok else 'NO'}" + (f"  ({r.note})" if r.note else ""),
                    flush=True,
                )
    finally:
        dns.stop()
        pg.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root; the tmpfs scenarios are skipped", file=sys.stderr)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
