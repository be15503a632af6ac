"""Benchmark: every aggregate report of a busy day, as a dry run on SQLite.

A SQLite history (migrated with ``db upgrade``) is filled with ``--rows``
messages (10,000,000 by default) spread over one UTC day and ``--domains``
policy domains (10,000), each publishing ``rua=mailto:dmarc@<domain>``.
Traffic per domain is uneven, as it is in life: a few large senders and a
long tail.  Each message comes from one of the domain's source IPs and is
a legitimate pass, a forwarded DKIM-only pass or a spoof quarantined by
local policy, so a domain's report holds tens of records.  Filling uses the
sqlite3 module directly (the writer's own speed is bench.history_write's
business) and keeps the database between runs (``--db``), since building
10 M rows takes minutes.

Then the real command runs, in a child process, as an operator would:

    dmarcmilter report --config C --date 2026-05-01 --dry-run OUT

and the wall time and the child's peak RSS (VmHWM) are measured; the
output directory is checked to hold one .xml.gz and one .eml per domain.

    .venv/bin/python -m bench.report_dryrun [--rows 10000000] [--domains 10000]
        [--db /var/tmp/dmarcmilter-bench/report-10000000.sqlite3]

Targets: at most 120 s and 500 MB RSS for 10 M rows across 10 k domains.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dmarcmilter.history import db
from dmarcmilter.history.rows import RECORD_KEY_COLUMNS, new_idempotency_key, record_key

DAY = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
TARGET_SECONDS = 120.0
TARGET_RSS_MB = 500.0
BATCH = 50_000
ROOT = Path(__file__).resolve().parent.parent

# Indexes dropped while filling and built again afterwards: one sorted
# build is much faster than ten million random index inserts.
INDEXES = (
    "ix_messages_policy_domain_arrived_at_record_key",
    "ix_messages_arrived_at",
    "uq_messages_idempotency_key",
)


def templates(domain: str, rng: random.Random) -> list[dict[str, Any]]:
    """The distinct kinds of message one domain gets: its senders."""
    n = rng.randint(0, 250)
    own = [f"10.{n}.{rng.randint(0, 255)}.{i}" for i in range(1, rng.randint(2, 12))]
    esp = [f"192.0.2.{rng.randint(1, 254)}" for _ in range(rng.randint(1, 6))]
    forwarders = [f"198.51.100.{rng.randint(1, 254)}" for _ in range(rng.randint(0, 4))]
    spoofers = [f"203.0.113.{rng.randint(1, 254)}" for _ in range(rng.randint(1, 15))]
    policy = {
        "policy_domain": domain,
        "org_domain": domain,
        "p": "reject",
        "sp": None,
        "np": None,
        "adkim": "r",
        "aspf": "r",
        "testing": "n",
        "pct": None,
        "fo": "0",
        "psd": "u",
        "discovery_method": "treewalk",
        "rua": f"mailto:dmarc@{domain}",
        "ruf": "",
        "record_errors": None,
        "arc_result": "none",
    }
    out = []
    for ip in own:
        out.append(
            {
                **policy,
                "client_ip": ip,
                "helo": f"mx.{domain}",
                "header_from_domain": domain,
                "envelope_from_domain": domain,
                "dmarc_result": "pass",
                "policy_evaluated": "reject",
                "disposition": "pass",
                "dkim_aligned": True,
                "spf_aligned": True,
                "spf_domain": domain,
                "spf_scope": "mfrom",
                "spf_result": "pass",
                "dkim_summary": json.dumps([[domain, "s1", "pass"]], separators=(",", ":")),
                "reasons_summary": "[]",
            }
        )
    for ip in esp:
        out.append(
            {
                **out[0],
                "client_ip": ip,
                "helo": "out.esp.example",
                "envelope_from_domain": "bounces.esp.example",
                "spf_aligned": False,
                "spf_domain": "bounces.esp.example",
                "dkim_summary": json.dumps(
                    [[domain, "esp1", "pass"], ["esp.example", "k", "pass"]], separators=(",", ":")
                ),
            }
        )
    for ip in forwarders:
        out.append(
            {
                **out[0],
                "client_ip": ip,
                "helo": "list.example.org",
                "envelope_from_domain": "list.example.org",
                "spf_aligned": False,
                "spf_domain": "list.example.org",
            }
        )
    for ip in spoofers:
        out.append(
            {
                **policy,
                "client_ip": ip,
                "helo": "spoof.example",
                "header_from_domain": rng.choice((domain, f"www.{domain}")),
                "envelope_from_domain": rng.choice(("", "spoof.example")),
                "dmarc_result": "fail",
                "policy_evaluated": "reject",
                "disposition": "quarantine",
                "dkim_aligned": False,
                "spf_aligned": False,
                "spf_domain": "spoof.example",
                "spf_scope": "mfrom",
                "spf_result": "fail",
                "dkim_summary": "[]",
                "reasons_summary": '[["local_policy","p=reject failure quarantined"]]',
            }
        )
    for t in out:
        t["envelope_to_domain"] = "receiver.example"
        t["record_key"] = record_key(t)
    return out


def zipf_counts(total: int, domains: int) -> list[int]:
    """Uneven traffic: a Zipf-like share per domain, at least one each,
    summing to ``total``; the first domain is the busiest."""
    weights = [1.0 / (i + 1) ** 0.6 for i in range(domains)]
    scale = total / sum(weights)
    counts = [max(1, int(w * scale)) for w in weights]
    counts[0] += total - sum(counts)
    return counts


def fill(path: Path, rows: int, domains: int) -> None:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    rng = random.Random(9990)
    names = [f"d{i:05d}.example" for i in range(domains)]
    counts = zipf_counts(rows, domains)
    columns = [
        "idempotency_key",
        "arrived_at",
        "queue_id",
        *(c for c in TEMPLATE_COLUMNS),
    ]
    sql = f"INSERT INTO messages ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-200000")
    for index in INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    started = time.monotonic()
    batch: list[tuple[Any, ...]] = []
    done = 0
    seconds = 86_400 * 1_000_000
    for name, count in zip(names, counts, strict=True):
        kinds = [tuple(t[c] for c in TEMPLATE_COLUMNS) for t in templates(name, rng)]
        # Most mail from the first senders.
        kind_weights = [1.0 / (k + 1) for k in range(len(kinds))]
        for kind in rng.choices(kinds, kind_weights, k=count):
            arrived = DAY + dt.timedelta(microseconds=rng.randrange(seconds))
            batch.append(
                (new_idempotency_key(), arrived.strftime("%Y-%m-%d %H:%M:%S.%f"), "Q", *kind)
            )
        if len(batch) >= BATCH:
            conn.executemany(sql, batch)
            done += len(batch)
            batch.clear()
            print(f"\r  filled {done:,} rows ({time.monotonic() - started:.0f} s)", end="")
    if batch:
        conn.executemany(sql, batch)
        done += len(batch)
    conn.commit()
    print(f"\r  filled {done:,} rows in {time.monotonic() - started:.0f} s; indexing ...")
    conn.close()
    # The indexes exactly as the migration made them: recreate them by
    # running the migration's DDL for them again.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA cache_size=-400000")
    conn.execute(
        "CREATE INDEX ix_messages_policy_domain_arrived_at_record_key"
        " ON messages (policy_domain, arrived_at, record_key)"
    )
    conn.execute("CREATE INDEX ix_messages_arrived_at ON messages (arrived_at)")
    conn.execute("CREATE UNIQUE INDEX uq_messages_idempotency_key ON messages (idempotency_key)")
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()
    print(f"  database ready in {time.monotonic() - started:.0f} s")


TEMPLATE_COLUMNS = tuple(
    dict.fromkeys(
        (
            *RECORD_KEY_COLUMNS,
            "helo",
            "envelope_to_domain",
            "policy_domain",
            "org_domain",
            "ruf",
            "record_errors",
            "dmarc_result",
            "policy_evaluated",
            "arc_result",
            "record_key",
        )
    )
)


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a running process, from /proc (0 once gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def count_rows(path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--db", type=Path, help="the SQLite file (kept for later runs)")


def history_database(args: argparse.Namespace) -> Path:
    """The benchmark's history: ``--db``, or one kept per size under
    /var/tmp; (re)built when it does not hold ``--rows`` messages."""
    path: Path = args.db or Path("/var/tmp/dmarcmilter-bench") / f"report-{args.rows}.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    if count_rows(path) != args.rows:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        print(f"building {path}: {args.rows:,} rows, {args.domains:,} domains")
        fill(path, args.rows, args.domains)
    size = path.stat().st_size / 1e9
    print(f"history: {path} ({args.rows:,} rows, {size:.1f} GB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_history_arguments(parser)
    args = parser.parse_args(argv)
    path = history_database(args)
    work = Path(tempfile.mkdtemp(prefix="dmarcmilter-bench-"))
    try:
        config = work / "dmarcmilter.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{path}"\n'
            '[report]\norg_name = "Bench Receiver"\n'
            'from_address = "dmarc-reports@receiver.example"\n'
            'submitter = "mx.receiver.example"\n'
        )
        out = work / "out"
        command = [
            sys.executable,
            "-m",
            "dmarcmilter",
            "report",
            "--config",
            str(config),
            "--date",
            DAY.date().isoformat(),
            "--dry-run",
            str(out),
            "--verbose",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # The child's own high-water mark, read while it runs: getrusage's
        # figure for children would include this process's memory, which a
        # child shares between fork and exec.
        peak_kb = 0
        while child.poll() is None:
            peak_kb = max(peak_kb, vm_hwm_kb(child.pid))
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        stdout, stderr = child.communicate()
        rss_mb = peak_kb / 1024
        if child.returncode != 0:
            print(stdout + stderr, file=sys.stderr)
            return 1
        reports = len(list(out.glob("*.xml.gz")))
        messages = len(list(out.glob("*.eml")))
        volume = sum(p.stat().st_size for p in out.glob("*.xml.gz")) / 1e6
        print(stdout.strip())
        print(
            f"{reports:,} reports and {messages:,} messages ({volume:.1f} MB compressed) "
            f"for {args.rows:,} rows"
        )
        print(f"wall time {elapsed:.1f} s (target <= {TARGET_SECONDS:.0f} s)")
        print(f"peak RSS  {rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB)")
        ok = (
            reports == args.domains
            and messages == args.domains
            and elapsed <= TARGET_SECONDS
            and rss_mb <= TARGET_RSS_MB
        )
        print("targets met" if ok else "TARGETS MISSED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
