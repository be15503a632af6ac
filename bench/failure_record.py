"""Benchmark: what recording failure reports adds to the mail path, and
what building and storing an incident costs the writer thread.

1. The milter side.  With failure reports on, the milter thread runs, per
   evaluated message, :meth:`DMARCMilter._failure_material` (references to
   the header fields, its Authentication-Results and, with include_body, a
   view of the body) and passes it to the writer's ``enqueue()``, which
   adds :func:`rows.failure_candidate` (does the record have a usable-looking
   ruf, not psd=y) and, for a candidate, keeps the material for the writer
   thread (with include_body, a copy of at most 64 KB of the body).  Timed
   with a real writer (SQLite, its thread storing rows meanwhile), each call
   as the calling thread's CPU time, at --rate calls a second, for each kind
   of message: "off" is ``enqueue(evaluation, decision)``, "on" the material
   and ``enqueue(evaluation, decision, material)``.
2. The writer side: :func:`rows.failure_entry` (the decision, the domain
   filter, the incident and its capped sample) for a due incident, and
   ``insert_rows()`` of 1,000-row batches into SQLite with an incident line
   after every message against none.

    .venv/bin/python -m bench.failure_record [--calls 20000] [--rate 5000] [--rows 50000]

Target (issue): the milter's added cost per message with failure reports on
at most 20 µs at p99.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.evaluate import build_cases, build_zone
from dmarcmilter.actions import MilterActions, plan
from dmarcmilter.config import Config, DNSConfig, FailureReportsConfig
from dmarcmilter.evaluation import Envelope, Evaluation, evaluate, resolver_from_config
from dmarcmilter.history import db
from dmarcmilter.history.bulk import insert_rows
from dmarcmilter.history.rows import (
    FailureMaterial,
    failure_candidate,
    failure_entry,
    failure_line,
    kept_material,
    message_row,
)
from dmarcmilter.history.writer import HistoryWriter
from dmarcmilter.message import Message
from dmarcmilter.milter import DMARCMilter
from dmarcmilter.policy import Decision, decide
from tests.dnsserver import TestDNSServer
from tests.signing import make_message

Case = tuple[str, Evaluation, Decision, MilterActions, Message]


def cases() -> list[Case]:
    zone = build_zone()
    zone["_dmarc.example.com"] = [
        ("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com; ruf=mailto:f@example.com; fo=1")
    ]
    zone["_dmarc.example.org"] = [
        ("TXT", "v=DMARC1; p=quarantine; ruf=mailto:f@example.org")  # fo=0
    ]
    zone["_dmarc.example.net"] = [("TXT", "v=DMARC1; p=none; rua=mailto:d@example.net")]
    server = TestDNSServer().start()
    try:
        server.set_zone(zone)
        config = Config(dns=DNSConfig(nameservers=(server.host,), port=server.port))
        resolver = resolver_from_config(config)
        built = []
        no_ruf = (
            Envelope.create("192.0.2.1", "mx.sender.example", "a@example.net"),
            Message.from_bytes(make_message(from_="news@example.net")),
        )
        for envelope, message in [*build_cases(), no_ruf]:
            ev = evaluate(envelope, message, resolver.session(), config)
            decision = decide(ev, config.policy)
            built.append((ev, decision, plan(ev, decision, config, "mx.receiver.example"), message))
    finally:
        server.stop()
    _rsa, ed, unsigned, tampered, without = built
    assert ed[0].dmarc.result.value == "pass" and tampered[0].dmarc.result.value == "fail"
    # The tampered message as refused: no Authentication-Results was added.
    refused = (tampered[0], tampered[1], MilterActions(), tampered[3])
    return [
        ("pass, fo=0, nothing due", *ed),
        ("fail, fo=1, incident (A-R added)", *tampered),
        ("fail, fo=1, incident (A-R rendered)", *refused),
        ("record without ruf", *without),
        ("unsigned, fo=1, incident", *unsigned),
    ]


def timed(call: Callable[[], Any], n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        call()
        out.append(clock() - t0)
    return out


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def material_for(case: Case, settings: FailureReportsConfig) -> Callable[[], FailureMaterial]:
    _name, _ev, _decision, actions, message = case
    milter = types.SimpleNamespace(
        runtime=types.SimpleNamespace(config=types.SimpleNamespace(failure_reports=settings)),
        authserv_id="mx.receiver.example",
    )
    headers = list(message.headers)
    # As the milter counts them while receiving (name, value and ": \r\n").
    header_bytes = sum(len(n) + len(v) + 4 for n, v in headers)
    txn = types.SimpleNamespace(body_cut=False, header_bytes=header_bytes)

    def material() -> FailureMaterial:
        return DMARCMilter._failure_material(milter, txn, headers, actions, message)  # type: ignore[arg-type]

    return material


def milter_side(
    case: Case, n: int, rate: float, settings: FailureReportsConfig, state: Path
) -> dict[str, list[int]]:
    _name, ev, decision, _actions, _message = case
    material = material_for(case, settings)
    url = f"sqlite:///{state / 'milter.sqlite3'}"
    db.upgrade(url)
    writer = HistoryWriter(url, state / "journal")
    writer.start()
    # The added code alone, timed as wall time in a tight loop (no writer
    # thread running): the material, then what enqueue() adds for it.
    pending: collections.deque[Any] = collections.deque()
    lock = threading.Lock()
    held = [0]

    def added() -> None:
        failure = material()
        if failure_candidate(ev):
            kept = kept_material(failure)
            with lock:  # as enqueue() bounds what waits, in count and bytes
                held[0] += kept.held_bytes
                pending.append((ev, decision, kept))

    timed(added, 200)
    isolated = timed(added, n)
    cpu, clock = time.thread_time_ns, time.perf_counter_ns
    out: dict[str, list[int]] = {"added": isolated, "off": [], "on": []}
    interval = int(1e9 / rate)
    due = clock()
    try:
        for i in range(2 * n):
            while clock() < due:
                time.sleep(0.0002)
            due += interval
            if i % 2:
                c0 = cpu()
                writer.enqueue(ev, decision)
                out["off"].append(cpu() - c0)
            else:
                c0 = cpu()
                writer.enqueue(ev, decision, material())
                out["on"].append(cpu() - c0)
        writer.wait_idle(600)
    finally:
        writer.close()
    return out


def writer_side(case: Case, rows: int, base: Path) -> None:
    _name, ev, decision, _actions, _message = case
    material = material_for(case, FailureReportsConfig(enabled=True))()
    entry = failure_entry(ev, decision, material)
    assert entry is not None
    values = timed(lambda: failure_entry(ev, decision, material), 20_000)
    print(
        f"  failure_entry(), a due incident:    p50 {pct(values, 0.5):6.2f} µs, "
        f"p99 {pct(values, 0.99):6.2f} µs"
    )
    for with_incident in (False, True):
        url = f"sqlite:///{base / f'w{int(with_incident)}.sqlite3'}"
        db.upgrade(url)
        engine = db.make_engine(url)
        batches = []
        for start in range(0, rows, 1000):
            batch = []
            for _ in range(start, min(rows, start + 1000)):
                row = message_row(ev, decision)
                batch.append(row)
                if with_incident:
                    batch.append(failure_line(row, entry))
            batches.append(batch)
        t0 = time.perf_counter()
        for batch in batches:
            with engine.begin() as conn:
                insert_rows(conn, batch, skip_existing=False)
        elapsed = time.perf_counter() - t0
        engine.dispose()
        what = "with an incident each" if with_incident else "no incidents"
        print(f"  insert_rows, SQLite, messages {what:22} {rows / elapsed:10,.0f} messages/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per case and setting")
    parser.add_argument("--rate", type=float, default=5000, help="enqueue calls per second")
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    built = cases()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for label, settings in (
            ("failure reports on", FailureReportsConfig(enabled=True)),
            ("on, include_body", FailureReportsConfig(enabled=True, include_body=True)),
        ):
            print(
                f"milter side, {label}, {args.calls:,} calls each (µs): the added code "
                "alone (wall), and enqueue() without and with it (CPU, writer running):"
            )
            for i, case in enumerate(built):
                state = base / f"{label[:2]}{i}"
                state.mkdir()
                timings = milter_side(case, args.calls, args.rate, settings, state)
                off, on, added = timings["off"], timings["on"], timings["added"]
                print(
                    f"  {case[0]:38} added p50 {pct(added, 0.5):5.2f} p99 {pct(added, 0.99):5.2f}"
                    f" | enqueue off p50 {pct(off, 0.5):6.2f} p99 {pct(off, 0.99):6.2f},"
                    f" on p50 {pct(on, 0.5):6.2f} p99 {pct(on, 0.99):6.2f}"
                )
        print(f"writer side, {args.rows:,} messages:")
        writer_side(built[1], args.rows, base)


if __name__ == "__main__":
    main()
