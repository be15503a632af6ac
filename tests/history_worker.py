"""History rows for tests, and a writer process the tests start and kill.

``make_row`` builds a complete row dict in :func:`message_row`'s shape, so
tests can store thousands of distinct rows without evaluating thousands of
messages.  Run as a program, this module is one milter's history writer:

    python -m tests.history_worker write URL STATE_DIR --count N --prefix P
        enqueue N rows (queue ids P-0 ... P-(N-1)), flush, exit 0
    python -m tests.history_worker replay URL STATE_DIR
        start (which replays the journal), wait until it is drained, exit 0

Both exit 3 if the writer does not get idle in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dmarcmilter.history.rows import new_idempotency_key, record_key
from dmarcmilter.history.writer import HistoryWriter

ARRIVED = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)

# One message as the writer stores it: p=reject for example.com, aligned
# DKIM and SPF passes from 192.0.2.1.  Tests change what they need.
BASE_MESSAGE: dict[str, Any] = {
    "queue_id": "4XyZ1",
    "client_ip": "192.0.2.1",
    "helo": "mx.example.com",
    "envelope_from_domain": "bounce.example.com",
    "envelope_to_domain": "receiver.example",
    "header_from_domain": "example.com",
    "policy_domain": "example.com",
    "org_domain": "example.com",
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
    "rua": "mailto:dmarc@example.com",
    "ruf": "",
    "record_errors": None,
    "dmarc_result": "pass",
    "policy_evaluated": "reject",
    "disposition": "pass",
    "dkim_aligned": True,
    "spf_aligned": True,
    "spf_domain": "bounce.example.com",
    "spf_scope": "mfrom",
    "spf_result": "pass",
    "arc_result": "none",
    "dkim_summary": '[["example.com","s1","pass"]]',
    "reasons_summary": "[]",
}


def make_row(queue_id: str, **overrides: Any) -> dict[str, Any]:
    """A history row for an aligned DKIM pass from 192.0.2.1 for example.com
    (and an unaligned SPF softfail), with its DKIM results as the writer
    receives them."""
    dkim = [{"domain": "example.com", "selector": "s1", "result": "pass", "human_result": ""}]
    row: dict[str, Any] = {
        **BASE_MESSAGE,
        "idempotency_key": new_idempotency_key(),
        "arrived_at": ARRIVED.isoformat(),
        "queue_id": queue_id,
        "sp": None,
        "rua": "mailto:d@example.com",
        "spf_aligned": False,
        "spf_result": "softfail",
        "dkim_summary": json.dumps(
            [[d["domain"], d["selector"], d["result"]] for d in dkim], separators=(",", ":")
        ),
        "dkim_results": dkim,
        "override_reasons": [],
    }
    row.update(overrides)
    row["record_key"] = record_key(row)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("write", "replay"))
    parser.add_argument("url")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--prefix", default="Q")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    writer = HistoryWriter(args.url, args.state_dir, batch_size=args.batch_size)
    writer.start()
    for i in range(args.count):
        writer.enqueue_row(make_row(f"{args.prefix}-{i}"))
    idle = writer.wait_idle(args.timeout)
    writer.close()
    print(json.dumps(writer.stats().__repr__()))
    return 0 if idle else 3


if __name__ == "__main__":
    sys.exit(main())
