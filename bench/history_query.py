"""Benchmark: the aggregate-report query over one busy policy domain's day.

A fresh SQLite history (in a temporary directory, migrated with ``db
upgrade``) is filled with ``--rows`` messages for one policy domain within
one UTC day, spread as real traffic is: ~2,000 source IPs with a few large
senders, each IP a legitimate sender (own servers, an ESP, a forwarder) or
a spoofer, a few From subdomains, DKIM result sets, envelope domains and
failures with override reasons, and a policy change late in the day.
Messages for other domains on that day and for the same domain on the days
around it are added (a quarter as many again), so the WHERE clause has
something to skip.  Then ``list(report_records(...))`` for that domain and
day is timed: wall time, the median of ``--repeat`` runs, everything from
the query to the last decoded record.

    .venv/bin/python -m bench.history_query [--rows 1000000] [--repeat 3]

Target: at most 5 s for 1,000,000 messages on SQLite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine

from dmarcmilter.history import db
from dmarcmilter.history.models import MessageRow
from dmarcmilter.history.reader import _report_query, report_records
from dmarcmilter.history.rows import record_key

DOMAIN = "example.com"
DAY = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
SOURCE_IPS = 2000
INSERT_BATCH = 20_000
SECONDS_PER_DAY = 86_400
TARGET_SECONDS = 5.0

POLICY: dict[str, Any] = {
    "p": "reject",
    "sp": "quarantine",
    "np": None,
    "adkim": "r",
    "aspf": "r",
    "testing": "n",
    "pct": None,
    "fo": "0",
    "psd": "u",
    "discovery_method": "treewalk",
    "rua": f"mailto:dmarc@{DOMAIN}",
    "ruf": "",
    "record_errors": None,
}
# Published at 20:00: the domain owner dropped sp, a second configuration.
LATE_POLICY = {**POLICY, "sp": None}
LATE_HOUR = 20

FROM_DOMAINS = [DOMAIN, f"news.{DOMAIN}", f"mail.{DOMAIN}", f"support.{DOMAIN}"]
RECIPIENTS = ["receiver.example", "customers.example", "staff.example"]


def dkim(*sigs: tuple[str, str, str]) -> str:
    return "[" + ",".join(f'["{d}","{s}","{r}"]' for d, s, r in sigs) + "]"


# Sender profiles: (weight, variants); each variant is the columns that vary
# per message, drawn with its weight.  An IP gets one profile for the day.
PROFILES: list[tuple[float, list[tuple[float, dict[str, Any]]]]] = [
    # The domain's own outbound servers: aligned DKIM and SPF, two selectors
    # during a key rollover.
    (
        0.35,
        [
            (0.7, {"dkim": dkim((DOMAIN, "s2026", "pass")), "mfrom": f"bounce.{DOMAIN}"}),
            (0.25, {"dkim": dkim((DOMAIN, "s2025", "pass")), "mfrom": f"bounce.{DOMAIN}"}),
            (0.05, {"dkim": "[]", "mfrom": "", "spf_scope": "helo"}),  # bounces
        ],
    ),
    # An ESP: aligned DKIM plus its own signature, SPF for its own domain.
    (
        0.35,
        [
            (
                0.9,
                {
                    "dkim": dkim((DOMAIN, "esp1", "pass"), ("esp.example", "k1", "pass")),
                    "mfrom": "esp.example",
                    "spf_aligned": False,
                },
            ),
            (
                0.1,
                {
                    "dkim": dkim((DOMAIN, "esp1", "fail"), ("esp.example", "k1", "pass")),
                    "mfrom": "esp.example",
                    "spf_aligned": False,
                    "dkim_aligned": False,
                    "fail": "local_policy",
                },
            ),
        ],
    ),
    # Forwarders and mailing lists: the signature survives or breaks.
    (
        0.2,
        [
            (
                0.6,
                {
                    "dkim": dkim((DOMAIN, "s2026", "pass")),
                    "mfrom": "lists.example.net",
                    "spf_aligned": False,
                },
            ),
            (
                0.4,
                {
                    "dkim": dkim((DOMAIN, "s2026", "fail"), ("lists.example.net", "l", "pass")),
                    "mfrom": "lists.example.net",
                    "spf_aligned": False,
                    "dkim_aligned": False,
                    "fail": "mailing_list",
                },
            ),
        ],
    ),
    # Spoofers: nothing aligned, SPF fails.
    (
        0.1,
        [
            (
                1.0,
                {
                    "dkim": "[]",
                    "mfrom": "spoof.example",
                    "spf_aligned": False,
                    "dkim_aligned": False,
                    "spf_result": "fail",
                    "fail": "local_policy",
                },
            ),
        ],
    ),
]
COMMENTS = {"local_policy": "p=reject is quarantined here", "mailing_list": ""}


def source_ips(rng: random.Random) -> list[tuple[str, list[tuple[float, dict[str, Any]]]]]:
    ips = []
    for i in range(SOURCE_IPS):
        ip = f"2001:db8:{i:x}::25" if i % 10 == 9 else f"10.{i // 250}.{i % 250}.25"
        (profile,) = rng.choices(PROFILES, weights=[w for w, _ in PROFILES])
        ips.append((ip, profile[1]))
    return ips


def messages(
    rng: random.Random, count: int, domain: str, day: dt.datetime
) -> Iterator[dict[str, Any]]:
    """``count`` message rows for ``domain`` arriving on ``day``, in arrival
    order (without their idempotency keys)."""
    ips = source_ips(rng)
    # A few large senders and a long tail, as real traffic is.
    weights = [1 / (rank + 1) for rank in range(len(ips))]
    senders = rng.choices(ips, weights=weights, k=count)
    offsets = sorted(rng.randrange(SECONDS_PER_DAY * 1000) for _ in range(count))  # ms
    for n, ((ip, variants), offset) in enumerate(zip(senders, offsets, strict=True)):
        arrived = day + dt.timedelta(milliseconds=offset)
        ((_, variant),) = rng.choices(variants, weights=[w for w, _ in variants])
        failing = "fail" in variant
        header_from = rng.choice(FROM_DOMAINS).replace(DOMAIN, domain)
        late = arrived.hour >= LATE_HOUR
        yield {
            "arrived_at": arrived,
            "queue_id": f"{n:X}",
            "client_ip": ip,
            "helo": f"mx{n % 7}.sender.example",
            "envelope_from_domain": variant["mfrom"],
            "envelope_to_domain": rng.choice(RECIPIENTS),
            "header_from_domain": header_from,
            "policy_domain": domain,
            "org_domain": domain,
            **(LATE_POLICY if late else POLICY),
            "dmarc_result": "fail" if failing else "pass",
            "policy_evaluated": "reject",
            "disposition": "quarantine" if failing else "pass",
            "dkim_aligned": variant.get("dkim_aligned", True),
            "spf_aligned": variant.get("spf_aligned", True),
            "spf_domain": variant["mfrom"] or "mx.sender.example",
            "spf_scope": variant.get("spf_scope", "mfrom"),
            "spf_result": variant.get("spf_result", "pass"),
            "arc_result": "none",
            "dkim_summary": variant["dkim"],
            "reasons_summary": (
                f'[["{variant["fail"]}","{COMMENTS[variant["fail"]]}"]]' if failing else "[]"
            ),
        }


def fill(engine: Engine, rows: int, rng: random.Random) -> int:
    """Insert the history; return the number of messages stored."""
    # The measured domain and day, with other domains' messages on that day
    # and the measured domain's on the days around it.
    noise = rows // 4
    days = [
        (DAY - dt.timedelta(days=1), {DOMAIN: noise // 4}),
        (DAY, {DOMAIN: rows, **{f"other{i}.example": noise // 20 for i in range(10)}}),
        (DAY + dt.timedelta(days=1), {DOMAIN: noise // 4}),
    ]
    statement = insert(MessageRow)
    key = 0
    for day, counts in days:
        # Interleaved in arrival order, as the writer stores them: rowid
        # order follows time, which is what the (policy_domain, arrived_at)
        # index lookups then read.
        traffic = heapq.merge(
            *(messages(rng, count, domain, day) for domain, count in counts.items()),
            key=itemgetter("arrived_at"),
        )
        # One transaction per day: a big one, as a bulk load.
        with engine.begin() as conn:
            batch: list[dict[str, Any]] = []
            for row in traffic:
                row["idempotency_key"] = f"{key:032x}"
                row["record_key"] = record_key(row)
                key += 1
                batch.append(row)
                if len(batch) == INSERT_BATCH:
                    conn.execute(statement, batch)
                    batch = []
            if batch:
                conn.execute(statement, batch)
    return key


def query_plan(engine: Engine) -> list[str]:
    """SQLite's plan for the report query: the very SELECT report_records
    runs, built by the reader's private builder."""
    query = _report_query(engine, DOMAIN, DAY, DAY + dt.timedelta(days=1), False)
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
    return [str(row[-1]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="messages in the day")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dmarcmilter-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'history.sqlite3'}"
        db.upgrade(url)
        engine = db.make_engine(url)
        try:
            start = time.perf_counter()
            stored = fill(engine, args.rows, random.Random(args.seed))
            print(f"history:   {stored} messages inserted in {time.perf_counter() - start:.1f} s")
            size = (Path(tmp) / "history.sqlite3").stat().st_size
            print(f"database:  {size / 1e6:.0f} MB (SQLite, WAL)")
            # No ANALYZE: the milter never runs it, so the planner works
            # without statistics here too.
            print("plan:      " + "\n           ".join(query_plan(engine)))

            end = DAY + dt.timedelta(days=1)
            timings = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                records = list(report_records(engine, DOMAIN, DAY, end))
                timings.append(time.perf_counter() - t0)
            counted = sum(r.count for r in records)
            configurations = len({r.policy for r in records})
            assert counted == args.rows, (counted, args.rows)
        finally:
            engine.dispose()

    median = statistics.median(timings)
    print(f"query:     {DOMAIN}, {DAY:%Y-%m-%d}: {counted} messages -> {len(records)} records")
    print(f"           ({configurations} policy configurations)")
    print(
        f"time:      median {median:.2f} s of {args.repeat} ("
        + ", ".join(f"{t:.2f}" for t in timings)
        + ")"
    )
    print(
        f"target:    at most {TARGET_SECONDS:.0f} s per 1,000,000 messages: "
        + ("met" if median * 1_000_000 / args.rows <= TARGET_SECONDS else "MISSED")
    )


if __name__ == "__main__":
    main()
