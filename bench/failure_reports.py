"""Benchmark: the failure-report sender on SQLite, 100,000 recorded failures.

A fresh SQLite history (migrated with ``db upgrade``) gets ``--incidents``
failure incidents (100,000 by default) across ``--domains`` author domains
(1,000), each a message row and a failure_incidents row holding
``rows.failure_sample`` of a real FailureIncident, as the milter records
them.  Traffic is uneven (a Zipf-like share per domain), each domain has a
few spoofing source IPs, the failures arrive over ``--hours`` (2), and one
in four is due under two kinds (dmarc and spf).  Each domain's ruf is
``mailto:ruf@<domain>``.

Then the sender runs once, in this process, after every merge window has
closed: select the pending incidents, merge them, apply the rate limits,
store every report with its delivery and mark every incident, which is
the work ``dmarcmilter report --kind failure`` does before delivering.  By
default the limits are raised so that every merged group becomes a stored
report (the most work); ``--default-limits`` keeps the shipped ones (most
groups are then dropped, which is cheaper).  Delivery is not measured: it is
the outbox shared with aggregate reports, bounded by the smarthost.

    .venv/bin/python -m bench.failure_reports [--incidents 100000]
        [--domains 1000] [--hours 2] [--default-limits]

Target: at most 30 s for 100,000 incidents across 1,000 domains.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report_dryrun import zipf_counts
from dmarcmilter.config import config_from_mapping
from dmarcmilter.history import db
from dmarcmilter.history.rows import failure_sample, new_idempotency_key, record_key
from dmarcmilter.report.failure import FailureKind
from dmarcmilter.report.failure_mail import DeliveryResult, FailedSignature, FailureIncident
from dmarcmilter.report.failure_sender import FailureSender, FailureStats

START = dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)
TARGET_SECONDS = 30.0

MESSAGE = {
    "queue_id": "Q",
    "helo": "spoof.example",
    "envelope_from_domain": "spoof.example",
    "envelope_to_domain": "receiver.example",
    "p": "reject",
    "sp": None,
    "np": None,
    "adkim": "r",
    "aspf": "r",
    "testing": "n",
    "pct": None,
    "fo": "0:s",
    "psd": "u",
    "discovery_method": "treewalk",
    "rua": "",
    "record_errors": None,
    "dmarc_result": "fail",
    "policy_evaluated": "reject",
    "disposition": "reject",
    "dkim_aligned": False,
    "spf_aligned": False,
    "spf_domain": "spoof.example",
    "spf_scope": "mfrom",
    "spf_result": "fail",
    "arc_result": "none",
    "dkim_summary": "[]",
    "reasons_summary": "[]",
}


def sample(domain: str, ip: str, at: dt.datetime, n: int) -> str:
    incident = FailureIncident(
        kind=FailureKind.DMARC,
        reported_domain=domain,
        source_ip=ip,
        arrival_date=at,
        mail_from=f"billing{n}@{domain}",
        rcpt_to=(f"user{n % 977}@receiver.example",),
        authentication_results=(
            f"mx.receiver.example; spf=fail smtp.mailfrom={domain}; "
            f"dkim=fail header.d={domain} header.s=s1; dmarc=fail header.from={domain}"
        ),
        delivery_result=DeliveryResult.REJECT,
        headers=(
            ("Received", f"from spoof.example ([{ip}]) by mx.receiver.example"),
            ("From", f"Billing <billing{n}@{domain}>"),
            ("To", f"user{n % 977}@receiver.example"),
            ("Subject", "Your invoice https://pay.attacker.example/x"),
            ("Date", at.strftime("%a, %d %b %Y %H:%M:%S +0000")),
            ("Message-ID", f"<{n}@spoof.example>"),
        ),
        dkim_failed=(FailedSignature(domain, "s1", "fail", "", True, "body hash mismatch"),),
        spf_domain=domain,
        spf_result="fail",
        spf_aligned=True,
    )
    return json.dumps(failure_sample(incident), separators=(",", ":"))


def fill(path: Path, incidents: int, domains: int, hours: int) -> None:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    rng = random.Random(9991)
    names = [f"d{i:04d}.example" for i in range(domains)]
    counts = zipf_counts(incidents, domains)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    message_columns = [*MESSAGE, "idempotency_key", "arrived_at", "client_ip"]
    message_columns += ["header_from_domain", "policy_domain", "org_domain", "ruf", "record_key"]
    insert_message = (
        f"INSERT INTO messages ({', '.join(message_columns)}) "
        f"VALUES ({', '.join('?' * len(message_columns))})"
    )
    insert_incident = (
        "INSERT INTO failure_incidents (message_pk, arrived_at, policy_domain, "
        "reported_domain, source_ip, kinds, ruf, sample, status, handled_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL)"
    )
    span = hours * 3_600_000_000
    n = 0
    for name, count in zip(names, counts, strict=True):
        ips = [f"203.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(6)]
        ruf = f"mailto:ruf@{name}"
        for _ in range(count):
            n += 1
            ip = rng.choice(ips)
            at = START + dt.timedelta(microseconds=rng.randrange(span))
            stamp = at.strftime("%Y-%m-%d %H:%M:%S.%f")
            row: dict[str, Any] = {
                **MESSAGE,
                "idempotency_key": new_idempotency_key(),
                "arrived_at": stamp,
                "client_ip": ip,
                "header_from_domain": name,
                "policy_domain": name,
                "org_domain": name,
                "ruf": ruf,
            }
            row["record_key"] = record_key(row)
            cursor = conn.execute(insert_message, [row[c] for c in message_columns])
            kinds = "dmarc,spf" if n % 4 == 0 else "dmarc"
            conn.execute(
                insert_incident,
                (cursor.lastrowid, stamp, name, name, ip, kinds, ruf, sample(name, ip, at, n)),
            )
    conn.commit()
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=1_000)
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--default-limits", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dmarcmilter-bench-failure-"))
    try:
        path = work / "history.sqlite3"
        started = time.monotonic()
        fill(path, args.incidents, args.domains, args.hours)
        print(
            f"filled {args.incidents:,} incidents, {args.domains:,} domains, "
            f"{args.hours} h in {time.monotonic() - started:.1f} s"
        )
        limits = (
            {}
            if args.default_limits
            else {
                "destination_burst": 10_000,
                "destination_per_hour": 100_000,
                "max_per_hour": 1_000_000,
            }
        )
        config = config_from_mapping(
            {
                "database": {"url": f"sqlite:///{path}"},
                "report": {
                    "org_name": "Bench Receiver",
                    "from_address": "dmarc-reports@receiver.example",
                    "submitter": "mx.receiver.example",
                },
                "failure_reports": {"enabled": True, **limits},
            }
        )
        engine = db.make_engine(config.database_url())
        now = START + dt.timedelta(hours=args.hours, minutes=10)
        stats = FailureStats()
        sender = FailureSender(
            config=config, engine=engine, clock=lambda: now, host="bench", stats=stats
        )
        started = time.monotonic()
        sender.run()
        elapsed = time.monotonic() - started
        engine.dispose()
        handled = stats.failure_incidents + stats.failure_dropped_incidents
        print(
            f"sender: {stats.failure_reports:,} reports of {stats.failure_incidents:,} "
            f"incident-kinds, {stats.failure_dropped_reports:,} dropped "
            f"({stats.failure_dropped_incidents:,}), {stats.failure_left:,} left; "
            f"{elapsed:.1f} s (target {TARGET_SECONDS:.0f} s)"
        )
        with sqlite3.connect(path) as conn:
            pending = conn.execute(
                "SELECT count(*) FROM failure_incidents WHERE status = 'pending'"
            ).fetchone()[0]
        ok = elapsed <= TARGET_SECONDS and pending == 0 and handled >= args.incidents
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
