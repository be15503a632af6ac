"""Benchmark: the history writer, from the milter's enqueue call to rows in
the database.

1. Sustained insert rate: real evaluations (an RSA-signed pass, an ed25519
   pass, an unsigned message and a failure with an override reason, each
   with its own queue id) are enqueued and the clock runs until the writer
   is idle, so the figure includes building each row, batching, the INSERTs
   of messages and their DKIM and reason rows, and the commits.  Measured
   again with the rows built beforehand, which times the store alone.  On SQLite
   (a file in a temporary directory, WAL mode, as shipped) and on
   PostgreSQL (a throwaway local cluster started for the run, fsync off, or
   the server --pg-url names).
2. The cost on the mail path, while the writer thread is busy writing:
   every call is timed with perf_counter_ns, at 5,000 calls a second (more
   than one host's milter can evaluate) unless told otherwise.  Three
   figures: ``enqueue()`` as the milter calls it (building the row, its
   journal line and the journal write); the journal write alone
   (``enqueue_row()`` of a row built beforehand: the JSON line, the lock
   and one write()); and building the row alone (``message_row()``, which
   the writer thread did before rows were journaled).  Each is given as
   the calling thread's CPU time (what the call costs) and as wall-clock
   time (which adds the waits for the interpreter lock while the writer
   thread holds it: a busy process's scheduling, not the call's work).

    .venv/bin/python -m bench.history_write [--rows 200000] [--pg-url URL | --no-pg]
        [--rate 5000] [--latency-calls 50000]

Targets on a 2-core machine: at least 20,000 messages per second into SQLite;
the journal write at most 20 µs at p99.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from bench.evaluate import build_cases, build_zone
from dmarcmilter.config import Config, DNSConfig
from dmarcmilter.evaluation import Evaluation, evaluate, resolver_from_config
from dmarcmilter.history import db
from dmarcmilter.history.rows import message_row
from dmarcmilter.history.writer import HistoryWriter
from dmarcmilter.policy import Decision, decide
from tests.dnsserver import TestDNSServer


def evaluations() -> list[tuple[Evaluation, Decision]]:
    server = TestDNSServer().start()
    try:
        server.set_zone(build_zone())
        config = Config(dns=DNSConfig(nameservers=(server.host,), port=server.port))
        resolver = resolver_from_config(config)
        out = []
        for envelope, message in build_cases():
            ev = evaluate(envelope, message, resolver.session(), config)
            out.append((ev, decide(ev, config.policy)))
        return out
    finally:
        server.stop()


def items(pairs: list[tuple[Evaluation, Decision]], n: int) -> list[tuple[Evaluation, Decision]]:
    out = []
    for i in range(n):
        ev, decision = pairs[i % len(pairs)]
        envelope = dataclasses.replace(ev.envelope, queue_id=f"Q{i:08d}")
        out.append((dataclasses.replace(ev, envelope=envelope), decision))
    return out


def insert_rate(
    url: str, work: list[tuple[Evaluation, Decision]], state: Path, *, prebuilt: bool = False
) -> float:
    """Messages per second from the first enqueue to the writer being idle.
    ``prebuilt`` hands over finished rows (what a replay or another producer
    hands over), so only the batching and the INSERTs are timed."""
    db.upgrade(url)
    rows = [message_row(ev, decision) for ev, decision in work] if prebuilt else []
    writer = HistoryWriter(url, state, queue_size=len(work) + 1)
    writer.start()
    started = time.perf_counter()
    if prebuilt:
        for row in rows:
            writer.enqueue_row(row)
    for ev, decision in [] if prebuilt else work:
        writer.enqueue(ev, decision)
    if not writer.wait_idle(600):
        raise SystemExit(f"writer not idle after 600 s: {writer.stats()}")
    elapsed = time.perf_counter() - started
    stats = writer.stats()
    writer.close()
    if stats.rows_written != len(work) or stats.rows_unjournaled or stats.catching_up:
        raise SystemExit(f"unexpected writer state: {stats}")
    return len(work) / elapsed


Timings = dict[str, tuple[list[int], list[int]]]


def enqueue_latency(
    url: str, work: list[tuple[Evaluation, Decision]], state: Path, rate: float
) -> tuple[Timings, bool]:
    """Per-call ns at ``rate`` calls a second, so the writer thread is busy
    writing while the calls are timed, as on a loaded MX host: of
    ``enqueue()``, of ``enqueue_row()`` (the journal write alone) and of
    ``message_row()``; and whether the writer ever fell behind its queue."""
    db.upgrade(url)
    writer = HistoryWriter(url, state)
    writer.start()
    timings: Timings = {name: ([], []) for name in ("enqueue()", "journal write", "message_row()")}
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    interval = int(1e9 / rate)
    due = clock()
    behind = False
    for i, (ev, decision) in enumerate(work):
        while clock() < due:
            time.sleep(0.0005)
        due += interval
        if i % 2:
            c0, t0 = cpu(), clock()
            writer.enqueue(ev, decision)
            t1, c1 = clock(), cpu()
            timings["enqueue()"][0].append(c1 - c0)
            timings["enqueue()"][1].append(t1 - t0)
            continue
        c0, t0 = cpu(), clock()
        row = message_row(ev, decision)
        t1, c1 = clock(), cpu()
        writer.enqueue_row(row)
        t2, c2 = clock(), cpu()
        timings["message_row()"][0].append(c1 - c0)
        timings["message_row()"][1].append(t1 - t0)
        timings["journal write"][0].append(c2 - c1)
        timings["journal write"][1].append(t2 - t1)
        behind = behind or writer.stats().catching_up
    writer.wait_idle(600)
    writer.close()
    return timings, behind


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--pg-url", help="PostgreSQL URL (default: a throwaway local cluster)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument(
        "--rate", type=float, default=5000, help="enqueue calls per second when timing them"
    )
    parser.add_argument("--latency-calls", type=int, default=50_000)
    args = parser.parse_args()

    pairs = evaluations()
    work = items(pairs, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rate = insert_rate(f"sqlite:///{base / 'rate.sqlite3'}", work, base / "s1")
        print(
            f"SQLite:     {rate:,.0f} messages/s sustained ({args.rows:,} rows, from evaluations)"
        )
        rate = insert_rate(f"sqlite:///{base / 'rows.sqlite3'}", work, base / "s4", prebuilt=True)
        print(
            f"SQLite:     {rate:,.0f} messages/s sustained ({args.rows:,} rows, built beforehand)"
        )

        calls = work[: args.latency_calls]
        timings, behind = enqueue_latency(
            f"sqlite:///{base / 'latency.sqlite3'}", calls, base / "s2", args.rate
        )
        print(
            f"mail path, {len(calls):,} calls at {args.rate:,.0f}/s while the writer runs"
            f"{' (it fell behind and read the journal)' if behind else ''}:"
        )
        for name, (cpu_ns, wall_ns) in timings.items():
            for kind, values in (("CPU", cpu_ns), ("wall", wall_ns)):
                print(
                    f"  {name:14} {kind:4} p50 {pct(values, 0.50):7.2f} µs, "
                    f"p99 {pct(values, 0.99):7.2f} µs, p99.9 {pct(values, 0.999):7.2f} µs, "
                    f"mean {statistics.fmean(values) / 1000:7.2f} µs"
                )

        if args.no_pg:
            return
        server = None
        url = args.pg_url
        if url is None:
            from tests.pgserver import start_server

            server = start_server()
            url = server.url
        try:
            rate = insert_rate(url, work, base / "s3")
            where = "throwaway local cluster, fsync off" if server else url
            print(f"PostgreSQL: {rate:,.0f} messages/s sustained ({args.rows:,} rows; {where})")
        finally:
            if server is not None:
                server.cleanup()


if __name__ == "__main__":
    main()
