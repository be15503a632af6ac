"""Benchmark: ``dmarcmilter impact`` over the report benchmark's history.

The SQLite history is bench.report_dryrun's (built by its ``fill``, and
kept: ``--db``, the same default path, so one build serves both): ``--rows``
messages (10,000,000 by default) over one UTC day and ``--domains`` policy
domains with uneven traffic, passes and quarantined spoofs.

Then the real command runs in a child process, as an operator would, for
the default top 20 domains over a seven-day window holding that day:

    dmarcmilter impact --config C --since 2026-04-25T00:00:00Z \\
        --until 2026-05-02T00:00:00Z --json

and the wall time and the child's peak RSS (VmHWM) are measured; the JSON
is checked to count every row and to show 20 domains.

    .venv/bin/python -m bench.impact [--rows 10000000] [--domains 10000]
        [--db /var/tmp/dmarcmilter-bench/report-10000000.sqlite3]

Targets: at most 60 s and 300 MB RSS for 10 M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report_dryrun import ROOT, add_history_arguments, history_database, vm_hwm_kb

TARGET_SECONDS = 60.0
TARGET_RSS_MB = 300.0
SINCE = "2026-04-25T00:00:00Z"
UNTIL = "2026-05-02T00:00:00Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_history_arguments(parser)
    args = parser.parse_args(argv)
    path = history_database(args)
    load_before = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory(prefix="dmarcmilter-bench-") as work:
        config = Path(work) / "dmarcmilter.toml"
        config.write_text(f'[database]\nurl = "sqlite:///{path}"\n')
        command = [
            sys.executable,
            "-m",
            "dmarcmilter",
            "impact",
            "--config",
            str(config),
            "--since",
            SINCE,
            "--until",
            UNTIL,
            "--json",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.monotonic()
            child = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
            # The child's own high-water mark, read while it runs.
            # Its CPU time too (wait4): this machine may be shared, and then
            # the wall time says as much about the neighbours as about us.
            peak_kb = 0
            while True:
                peak_kb = max(peak_kb, vm_hwm_kb(child.pid))
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            child.returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
    rss_mb = peak_kb / 1024
    if child.returncode != 0:
        print(stdout + stderr, file=sys.stderr)
        return 1
    data = json.loads(stdout)
    shown = len(data["domains"])
    total = data["total"]["messages"]
    changed = data["total"]["settings"]["enforce_reject"]["changed"]
    print(f"{total:,} messages, {shown} domains shown; enforce_reject would change {changed:,}")
    print(f"wall time {elapsed:.1f} s (target <= {TARGET_SECONDS:.0f} s), CPU time {cpu:.1f} s")
    print(f"load average before and after: {load_before} / {os.getloadavg()[0]:.1f}")
    print(f"peak RSS  {rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB)")
    ok = (
        total == args.rows
        and shown == min(20, args.domains)
        and elapsed <= TARGET_SECONDS
        and rss_mb <= TARGET_RSS_MB
    )
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
